"""pyssm.integrations.flash_attn against independent float64 math (tests/naive.py)."""

import pytest
import torch

import naive
from pyssm.integrations.flash_attn import (flash_attn_func, flash_attn_qkvpacked_func,
                                          flash_attn_varlen_func,
                                          flash_attn_varlen_qkvpacked_func)

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


def test_what_is_not_supported_says_so():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(NotImplementedError, match="dropout"):
        flash_attn_func(q, q, q, dropout_p=0.1)
    with pytest.raises(NotImplementedError, match="sliding windows"):
        flash_attn_func(q, q, q, window_size=(2, 0))
    with pytest.raises(NotImplementedError, match="soft-capping"):
        flash_attn_func(q, q, q, softcap=30.0)
    with pytest.raises(NotImplementedError, match="ALiBi"):
        flash_attn_func(q, q, q, alibi_slopes=torch.ones(2))
    packed = torch.randn(6, 2, 8)
    cu_q = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="a paged KV cache"):
        flash_attn_varlen_func(packed, packed, packed, cu_q, cu_q, 4, 4,
                               block_table=torch.zeros(2, 1, dtype=torch.int32))
    with pytest.raises(NotImplementedError, match="dropout"):
        flash_attn_qkvpacked_func(torch.randn(1, 4, 3, 2, 8), dropout_p=0.1)
    with pytest.raises(NotImplementedError, match="sliding windows"):
        flash_attn_varlen_qkvpacked_func(torch.randn(6, 3, 2, 8), cu_q, 4, window_size=(1, 1))
