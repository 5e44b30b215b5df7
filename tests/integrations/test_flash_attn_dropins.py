"""pyssm.integrations.flash_attn against independent float64 math (tests/naive.py)."""

import pytest
import torch

import naive
from pyssm.integrations.flash_attn import (flash_attn_func, flash_attn_kvpacked_func,
                                          flash_attn_qkvpacked_func, flash_attn_varlen_func,
                                          flash_attn_varlen_kvpacked_func,
                                          flash_attn_varlen_qkvpacked_func,
                                          flash_attn_with_kvcache)

F64 = torch.float64


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_func_matches_math_with_gqa(causal):
    q = torch.randn(2, 7, 6, 16, dtype=F64)
    k, v = torch.randn(2, 9, 2, 16, dtype=F64), torch.randn(2, 9, 2, 16, dtype=F64)
    out = flash_attn_func(q, k, v, causal=causal, softmax_scale=0.3)
    want, want_lse = naive.attention(q, k, v, causal=causal, softmax_scale=0.3)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    out2, lse, probs = flash_attn_func(q, k, v, causal=causal, softmax_scale=0.3,
                                       return_attn_probs=True)
    assert probs is None and lse.shape == (2, 6, 7)
    torch.testing.assert_close(out2, out)
    torch.testing.assert_close(lse, want_lse, atol=1e-10, rtol=1e-10)


def test_flash_attn_varlen_func_packs_like_flash_attn():
    lengths = [5, 1, 12]
    cu = torch.tensor([0, 5, 6, 18], dtype=torch.int32)
    q, k, v = (torch.randn(18, 4, 8, dtype=F64) for _ in range(3))
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths),
                                         causal=True, return_attn_probs=True)
    assert lse.shape == (4, 18)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        want, want_lse = naive.attention(q[None, s:e], k[None, s:e], v[None, s:e], causal=True)
        torch.testing.assert_close(out[s:e], want[0], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(lse[:, s:e], want_lse[0], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_varlen_func_with_separate_key_offsets(causal):
    """cu_seqlens_q != cu_seqlens_k, as flash-attn takes them: a padded batch's new queries
    against its cached keys (one query against 6), and a chunk of queries against fewer keys
    (under causal the first rows see none). Forward, lse and gradients against float64."""
    lq, lk = [1, 4, 3], [6, 2, 3]
    cu_q = torch.tensor([0, 1, 5, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 6, 8, 11], dtype=torch.int32)
    q = torch.randn(8, 4, 8, dtype=F64, requires_grad=True)
    k, v = (torch.randn(11, 2, 8, dtype=F64, requires_grad=True) for _ in range(2))
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal,
                                         return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (4, 8)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    exact_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    loss = 0
    for s, e, sk, ek in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(),
                            cu_k[1:].tolist()):
        want, want_lse = naive.attention(exact_in[0][None, s:e], exact_in[1][None, sk:ek],
                                         exact_in[2][None, sk:ek], causal=causal)
        torch.testing.assert_close(out[s:e], want[0], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(lse[:, s:e], want_lse[0], atol=1e-10, rtol=1e-10)
        loss = loss + (want[0] * g[s:e]).sum()
    for name, a, b in zip("qkv", got, torch.autograd.grad(loss, exact_in)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=f"d{name}")


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_with_kvcache_appends_and_attends(causal):
    """Two new tokens a row written into the caches in place behind each row's cached ones
    (0, 5 and 9 of 12 slots), then each row's queries against its first cache_seqlens + 2
    keys (bottom-right causal): out and lse against float64, the other slots untouched."""
    B, cap, H, Hk, d, new = 3, 12, 4, 2, 16, 2
    k_cache, v_cache = torch.randn(B, cap, Hk, d, dtype=F64), torch.randn(B, cap, Hk, d, dtype=F64)
    before = k_cache.clone(), v_cache.clone()
    q = torch.randn(B, new, H, d, dtype=F64)
    k, v = torch.randn(B, new, Hk, d, dtype=F64), torch.randn(B, new, Hk, d, dtype=F64)
    lengths = [0, 5, 9]
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens,
                                       causal=causal, return_softmax_lse=True)
    assert out.shape == q.shape and lse.shape == (B, H, new)
    assert seqlens.tolist() == lengths                      # the caller advances it
    for b, n in enumerate(lengths):
        for cache, was, fresh in ((k_cache, before[0], k), (v_cache, before[1], v)):
            assert torch.equal(cache[b, n:n + new], fresh[b])
            assert torch.equal(cache[b, :n], was[b, :n]) and torch.equal(cache[b, n + new:],
                                                                       was[b, n + new:])
        want, want_lse = naive.attention(q[b:b + 1], k_cache[b:b + 1, :n + new],
                                         v_cache[b:b + 1, :n + new], causal=causal)
        torch.testing.assert_close(out[b:b + 1], want, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(lse[b:b + 1], want_lse, atol=1e-10, rtol=1e-10)


def _rotated(x, angles, positions, interleaved):
    """x (B, S, H, d) with its first 2 angles.shape[1] dimensions turned by angles[positions],
    as complex numbers: pairs (2i, 2i + 1) interleaved, else (i, i + half)."""
    half = angles.shape[1]
    head = x[..., :2 * half]
    if interleaved:
        z = torch.complex(head[..., 0::2], head[..., 1::2])
    else:
        z = torch.complex(head[..., :half], head[..., half:])
    z = z * torch.polar(torch.ones_like(angles), angles)[positions][:, :, None]
    pairs = (torch.stack((z.real, z.imag), -1).flatten(-2) if interleaved
             else torch.cat((z.real, z.imag), -1))
    return torch.cat((pairs, x[..., 2 * half:]), -1)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("interleaved", [False, True])
def test_flash_attn_with_kvcache_rotary(causal, interleaved):
    """rotary_cos / rotary_sin over the first 8 of 16 dimensions: the new k written into the
    cache rotated at positions cache_seqlens + j, v as given, and q rotated at cache_seqlens + i
    (causal) or cache_seqlens (every query, otherwise), as flash-attn does; out against
    float64 attention over the rotated q and keys."""
    B, cap, H, Hk, d, new = 3, 12, 4, 2, 16, 2
    k_cache, v_cache = torch.randn(B, cap, Hk, d, dtype=F64), torch.randn(B, cap, Hk, d, dtype=F64)
    q = torch.randn(B, new, H, d, dtype=F64)
    k, v = torch.randn(B, new, Hk, d, dtype=F64), torch.randn(B, new, Hk, d, dtype=F64)
    lengths = [0, 5, 10]
    angles = torch.arange(cap, dtype=F64)[:, None] * 10000.0 ** -(torch.arange(4) / 4)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=torch.tensor(
        lengths, dtype=torch.int32), rotary_cos=angles.cos(), rotary_sin=angles.sin(),
        causal=causal, rotary_interleaved=interleaved)
    slots = torch.tensor(lengths)[:, None] + torch.arange(new)
    q_at = torch.tensor(lengths)[:, None] + torch.arange(new) * int(causal)
    q_rot = _rotated(q, angles, q_at, interleaved)
    k_rot = _rotated(k, angles, slots, interleaved)
    assert not torch.allclose(k_rot[1], k[1]) and torch.equal(k_rot[..., 8:], k[..., 8:])
    for b, n in enumerate(lengths):
        torch.testing.assert_close(k_cache[b, n:n + new], k_rot[b], atol=1e-12, rtol=1e-12)
        assert torch.equal(v_cache[b, n:n + new], v[b])
        want, _ = naive.attention(q_rot[b:b + 1], k_cache[b:b + 1, :n + new],
                                  v_cache[b:b + 1, :n + new], causal=causal)
        torch.testing.assert_close(out[b:b + 1], want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_with_kvcache_left_padded(causal):
    """cache_leftpad: row b's keys are cache_leftpad[b] ... cache_seqlens[b] + 2 - 1 after the
    two new tokens are written at cache_seqlens[b] (rows starting at 1, at their new tokens, at
    0); out and lse against float64 over those keys alone."""
    B, cap, H, Hk, d, new = 3, 12, 4, 2, 16, 2
    k_cache, v_cache = torch.randn(B, cap, Hk, d, dtype=F64), torch.randn(B, cap, Hk, d, dtype=F64)
    q = torch.randn(B, new, H, d, dtype=F64)
    k, v = torch.randn(B, new, Hk, d, dtype=F64), torch.randn(B, new, Hk, d, dtype=F64)
    lengths, lead = [3, 5, 9], [1, 5, 0]
    out, lse = flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens=torch.tensor(lengths, dtype=torch.int32),
        cache_leftpad=torch.tensor(lead, dtype=torch.int32), causal=causal,
        return_softmax_lse=True)
    for b, (n, s) in enumerate(zip(lengths, lead)):
        assert torch.equal(k_cache[b, n:n + new], k[b]) and torch.equal(v_cache[b, n:n + new], v[b])
        want, want_lse = naive.attention(q[b:b + 1], k_cache[b:b + 1, s:n + new],
                                         v_cache[b:b + 1, s:n + new], causal=causal)
        torch.testing.assert_close(out[b:b + 1], want, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(lse[b:b + 1], want_lse, atol=1e-10, rtol=1e-10)
    # no new tokens, no cache_seqlens: the keys from cache_leftpad[b] to the cache's end
    out = flash_attn_with_kvcache(q, k_cache, v_cache,
                                  cache_leftpad=torch.tensor(lead, dtype=torch.int32))
    for b, s in enumerate(lead):
        torch.testing.assert_close(out[b:b + 1], naive.attention(q[b:b + 1], k_cache[b:b + 1, s:],
                                                                 v_cache[b:b + 1, s:])[0],
                                   atol=1e-10, rtol=1e-10)


def test_flash_attn_with_kvcache_reads_the_cache_as_it_is():
    """No new tokens: an int cache_seqlens, and None (the whole cache)."""
    k_cache, v_cache = torch.randn(2, 7, 1, 8, dtype=F64), torch.randn(2, 7, 1, 8, dtype=F64)
    q = torch.randn(2, 1, 2, 8, dtype=F64)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=4)
    torch.testing.assert_close(out, naive.attention(q, k_cache[:, :4], v_cache[:, :4])[0],
                               atol=1e-10, rtol=1e-10)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, causal=True)
    torch.testing.assert_close(out, naive.attention(q, k_cache, v_cache, causal=True)[0],
                               atol=1e-10, rtol=1e-10)


def test_flash_attn_with_kvcache_bad_arguments():
    k_cache = torch.randn(2, 6, 1, 8)
    q, k = torch.randn(2, 1, 2, 8), torch.randn(2, 2, 1, 8)
    seqlens = torch.tensor([4, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] must be in \[0, 4\] \(the "
                                         r"cache's 6 slots less the 2 new tokens\), got 5"):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), k, k.clone(),
                                cache_seqlens=seqlens)
    with pytest.raises(ValueError, match="k and v are given together"):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), k, cache_seqlens=seqlens)
    with pytest.raises(ValueError, match="cache_seqlens must say where k and v go"):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), k, k.clone())
    with pytest.raises(ValueError, match=r"cache_seqlens must be an int or int32 \(2,\)"):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), cache_seqlens=seqlens.long())
    with pytest.raises(ValueError, match="rotate the new k: give k and v too"):
        flash_attn_with_kvcache(q, k_cache, k_cache, rotary_cos=torch.ones(6, 4),
                                rotary_sin=torch.zeros(6, 4))
    with pytest.raises(ValueError, match="rotary_cos and rotary_sin are given together"):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), k, k.clone(), cache_seqlens=2,
                                rotary_cos=torch.ones(6, 4))
    with pytest.raises(ValueError, match=r"rotary_dim <= head_dim 8, got \(6, 5\)"):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), k, k.clone(), cache_seqlens=2,
                                rotary_cos=torch.ones(6, 5), rotary_sin=torch.ones(6, 5))
    with pytest.raises(ValueError, match=r"a row for each of the 6 positions .* got 5"):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), k, k.clone(), cache_seqlens=2,
                                rotary_cos=torch.ones(5, 2), rotary_sin=torch.ones(5, 2))
    with pytest.raises(ValueError, match=r"cache_leftpad\[1\] must be in \[0, 3\] "
                                         r"\(cache_seqlens\[1\]\), got 4"):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), k, k.clone(),
                                cache_seqlens=torch.tensor([4, 3], dtype=torch.int32),
                                cache_leftpad=torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cache_leftpad must be int32 \(2,\)"):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), cache_leftpad=torch.zeros(2))
    with pytest.raises(NotImplementedError, match="rotary embedding with cache_leftpad"):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), k, k.clone(), cache_seqlens=2,
                                cache_leftpad=torch.zeros(2, dtype=torch.int32),
                                rotary_cos=torch.ones(6, 4), rotary_sin=torch.ones(6, 4))
    with pytest.raises(NotImplementedError, match="a paged KV cache"):
        flash_attn_with_kvcache(q, k_cache, k_cache, block_table=torch.zeros(2, 1))


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_qkvpacked_func_matches_math(causal):
    qkv = torch.randn(2, 7, 3, 4, 16, dtype=F64, requires_grad=True)
    out, lse, probs = flash_attn_qkvpacked_func(qkv, causal=causal, softmax_scale=0.3,
                                                return_attn_probs=True)
    exact_in = qkv.detach().clone().requires_grad_()
    want, want_lse = naive.attention(*exact_in.unbind(2), causal=causal, softmax_scale=0.3)
    assert probs is None and out.shape == (2, 7, 4, 16) and lse.shape == (2, 4, 7)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, want_lse, atol=1e-10, rtol=1e-10)
    g = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, qkv, g)
    (exact,) = torch.autograd.grad(want, exact_in, g)
    torch.testing.assert_close(got, exact, atol=1e-10, rtol=1e-10)


def test_flash_attn_varlen_qkvpacked_func_packs_like_flash_attn():
    cu = torch.tensor([0, 5, 6, 18], dtype=torch.int32)
    qkv = torch.randn(18, 3, 4, 8, dtype=F64)
    out = flash_attn_varlen_qkvpacked_func(qkv, cu, 12, causal=True)
    assert out.shape == (18, 4, 8)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        want, _ = naive.attention(*qkv[None, s:e].unbind(2), causal=True)
        torch.testing.assert_close(out[s:e], want[0], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_kvpacked_funcs_match_math(causal):
    """kv (batch, seqlen_k, 2, heads_k, d), dense and packed with their own offsets: the values
    of the unpacked calls, and kv's gradient as one tensor of its shape."""
    q = torch.randn(2, 5, 4, 8, dtype=F64)
    kv = torch.randn(2, 7, 2, 2, 8, dtype=F64, requires_grad=True)
    out, lse, _ = flash_attn_kvpacked_func(q, kv, causal=causal, return_attn_probs=True)
    want, want_lse = naive.attention(q, *kv.detach().unbind(2), causal=causal)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, want_lse, atol=1e-10, rtol=1e-10)
    g = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, kv, g)
    exact = kv.detach().clone().requires_grad_()
    (want_g,) = torch.autograd.grad(naive.attention(q, *exact.unbind(2), causal=causal)[0],
                                    exact, g)
    assert got.shape == kv.shape
    torch.testing.assert_close(got, want_g, atol=1e-10, rtol=1e-10)

    cu_q = torch.tensor([0, 2, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 6, 7], dtype=torch.int32)
    packed_kv = torch.randn(7, 2, 2, 8, dtype=F64)
    packed = flash_attn_varlen_kvpacked_func(q[0], packed_kv, cu_q, cu_k, 3, 6, causal=causal)
    torch.testing.assert_close(packed, flash_attn_varlen_func(
        q[0], *packed_kv.unbind(1), cu_q, cu_k, 3, 6, causal=causal), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"kv must be \(batch, seqlen_k, 2, heads_k, head_dim\)"):
        flash_attn_kvpacked_func(q, kv.detach()[:, :, :1])


def test_what_is_not_supported_says_so():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(NotImplementedError, match="dropout"):
        flash_attn_func(q, q, q, dropout_p=0.1)
    with pytest.raises(NotImplementedError, match="ALiBi"):
        flash_attn_func(q, q, q, alibi_slopes=torch.ones(2))
    packed = torch.randn(6, 2, 8)
    cu_q = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="a paged KV cache"):
        flash_attn_varlen_func(packed, packed, packed, cu_q, cu_q, 4, 4,
                               block_table=torch.zeros(2, 1, dtype=torch.int32))
    with pytest.raises(NotImplementedError, match="dropout"):
        flash_attn_qkvpacked_func(torch.randn(1, 4, 3, 2, 8), dropout_p=0.1)
    with pytest.raises(ValueError, match="window_size must be a pair"):
        flash_attn_func(q, q, q, window_size=3)


def test_sliding_windows_as_flash_attn():
    """window_size in every entry point, as flash-attn's: (left, right) around each query's
    bottom-right aligned position; with causal=True the right side is 0 whatever was given
    (transformers passes (w - 1, w - 1) with causal=True)."""
    q, k, v = (torch.randn(2, 9, 2, 8, dtype=F64) for _ in range(3))
    want = naive.attention(q, k, v, window_size=(3, 1))[0]
    torch.testing.assert_close(flash_attn_func(q, k, v, window_size=(3, 1)), want,
                               atol=1e-12, rtol=1e-12)
    causal = naive.attention(q, k, v, window_size=(3, 0))[0]
    torch.testing.assert_close(flash_attn_func(q, k, v, causal=True, window_size=(3, 3)), causal,
                               atol=1e-12, rtol=1e-12)
    assert (causal - naive.attention(q, k, v, causal=True)[0]).abs().max() > 1e-3
    kv = torch.stack([k, v], dim=2)
    torch.testing.assert_close(flash_attn_kvpacked_func(q, kv, window_size=(3, 1)), want,
                               atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(flash_attn_qkvpacked_func(torch.stack([q, k, v], dim=2),
                                                         window_size=(3, 1)),
                               want, atol=1e-12, rtol=1e-12)
    cu = torch.tensor([0, 9, 18], dtype=torch.int32)
    flat = [t.reshape(18, 2, 8) for t in (q, k, v)]
    torch.testing.assert_close(
        flash_attn_varlen_func(*flat, cu, cu, 9, 9, window_size=(3, 1)).view(q.shape), want,
        atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(
        flash_attn_varlen_qkvpacked_func(torch.stack(flat, dim=1), cu, 9,
                                         window_size=(3, 1)).view(q.shape),
        want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(
        flash_attn_varlen_kvpacked_func(flat[0], torch.stack(flat[1:], dim=1), cu, cu, 9, 9,
                                        window_size=(3, 1)).view(q.shape),
        want, atol=1e-12, rtol=1e-12)
    # a decoding step: 2 new tokens written at each row's length, the window aligned there
    k_cache, v_cache = (torch.randn(2, 12, 2, 8, dtype=F64) for _ in range(2))
    new_k, new_v = k[:, :2].clone(), v[:, :2].clone()
    lengths = torch.tensor([5, 10], dtype=torch.int32)
    got = flash_attn_with_kvcache(q[:, :2], k_cache, v_cache, new_k, new_v,
                                  cache_seqlens=lengths, causal=True, window_size=(4, 4))
    for b, n in enumerate((7, 12)):
        row, _ = naive.attention(q[b:b + 1, :2], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n],
                                 window_size=(4, 0))
        torch.testing.assert_close(got[b:b + 1], row, atol=1e-12, rtol=1e-12)


def test_softcap_as_flash_attn():
    """softcap in every entry point, as flash-attn's: each score s becomes
    softcap * tanh(s / softcap); with windows, packed sequences and a decoding step."""
    q, k, v = (torch.randn(2, 9, 2, 8, dtype=F64) for _ in range(3))
    want = naive.attention(q, k, v, softcap=0.6)[0]
    assert (want - naive.attention(q, k, v)[0]).abs().max() > 1e-2   # (the cap matters)
    torch.testing.assert_close(flash_attn_func(q, k, v, softcap=0.6), want, atol=1e-12,
                               rtol=1e-12)
    kv = torch.stack([k, v], dim=2)
    torch.testing.assert_close(flash_attn_kvpacked_func(q, kv, softcap=0.6), want, atol=1e-12,
                               rtol=1e-12)
    torch.testing.assert_close(flash_attn_qkvpacked_func(torch.stack([q, k, v], dim=2),
                                                         softcap=0.6),
                               want, atol=1e-12, rtol=1e-12)
    cu = torch.tensor([0, 9, 18], dtype=torch.int32)
    flat = [t.reshape(18, 2, 8) for t in (q, k, v)]
    torch.testing.assert_close(
        flash_attn_varlen_func(*flat, cu, cu, 9, 9, softcap=0.6).view(q.shape), want,
        atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(
        flash_attn_varlen_qkvpacked_func(torch.stack(flat, dim=1), cu, 9,
                                         softcap=0.6).view(q.shape), want,
        atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(
        flash_attn_varlen_kvpacked_func(flat[0], torch.stack(flat[1:], dim=1), cu, cu, 9, 9,
                                        softcap=0.6).view(q.shape), want,
        atol=1e-12, rtol=1e-12)
    windowed = naive.attention(q, k, v, window_size=(3, 0), softcap=0.6)[0]
    torch.testing.assert_close(flash_attn_func(q, k, v, causal=True, window_size=(3, 3),
                                               softcap=0.6), windowed, atol=1e-12, rtol=1e-12)
    k_cache, v_cache = (torch.randn(2, 12, 2, 8, dtype=F64) for _ in range(2))
    lengths = torch.tensor([5, 10], dtype=torch.int32)
    got = flash_attn_with_kvcache(q[:, :2], k_cache, v_cache, k[:, :2].clone(),
                                  v[:, :2].clone(), cache_seqlens=lengths, causal=True,
                                  softcap=0.6)
    for b, n in enumerate((7, 12)):
        row, _ = naive.attention(q[b:b + 1, :2], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n],
                                 causal=True, softcap=0.6)
        torch.testing.assert_close(got[b:b + 1], row, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="softcap must be a finite number >= 0"):
        flash_attn_func(q, k, v, softcap=-1.0)
