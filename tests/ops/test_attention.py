"""attention against row-by-row float64 softmax attention, forward and backward."""

import importlib
import math
import os

import naive
import pytest
import torch
from conftest import backend_params

from pyssm import _extension, ops

F64 = torch.float64


def qkv(batch, seqlen_q, seqlen_k, heads, heads_k, head_dim, device, dtype=F64,
        requires_grad=False):
    q = torch.randn(batch, seqlen_q, heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch, seqlen_k, heads_k, head_dim, dtype=dtype, device=device)
    v = torch.randn(batch, seqlen_k, heads_k, head_dim, dtype=dtype, device=device)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


CASES = [  # batch, seqlen_q, seqlen_k, heads, heads_k, head_dim
    (1, 1, 1, 1, 1, 32), (2, 5, 5, 3, 3, 64), (1, 197, 197, 2, 2, 80), (2, 7, 12, 4, 2, 32),
    (1, 9, 4, 2, 1, 64),
]


@pytest.mark.parametrize("device,backend", backend_params("attention"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}q{}k{}h{}hk{}d{}".format(*c))
@pytest.mark.parametrize("causal", [False, True])
def test_forward_matches_softmax(device, backend, case, causal):
    q, k, v = qkv(*case, device=device)
    scale = 0.3 if case[1] == 7 else None
    out, lse = ops.attention(q, k, v, causal=causal, softmax_scale=scale, return_lse=True,
                             backend=backend)
    want_out, want_lse = naive.attention(q.cpu(), k.cpu(), v.cpu(), causal, scale)
    assert out.shape == q.shape and lse.shape == (case[0], case[3], case[1])
    torch.testing.assert_close(out.cpu(), want_out, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse.cpu(), want_lse, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("device,backend", backend_params("attention"))
@pytest.mark.parametrize("causal", [False, True])
def test_gradients_against_reference_autograd(device, backend, causal):
    q, k, v = qkv(2, 9, 6, 4, 2, 32, device, requires_grad=True)  # causal: 3 rows see no key
    out, lse = ops.attention(q, k, v, causal=causal, return_lse=True, backend=backend)
    ref_out, ref_lse = ops.attention_reference(q, k, v, causal=causal, return_lse=True)
    g, g_lse = torch.randn_like(out), torch.randn_like(lse)
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=1e-10, rtol=1e-10)
    g_lse = torch.where(finite, g_lse, torch.zeros_like(g_lse))
    got = torch.autograd.grad((out * g).sum() + (lse * g_lse).nan_to_num().sum(), (q, k, v))
    want = torch.autograd.grad((ref_out * g).sum() + (ref_lse * g_lse).nan_to_num().sum(),
                               (q, k, v))
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=f"d{name}")


@pytest.mark.parametrize("device,backend", backend_params("attention"))
def test_gradcheck(device, backend):
    q, k, v = qkv(1, 4, 5, 2, 1, 3, device, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: ops.attention(*t, causal=True, backend=backend), (q, k, v))


@pytest.mark.parametrize("device,backend", backend_params("attention"))
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_equals_separate_sequences(device, backend, causal):
    lengths = [5, 1, 17, 0, 9]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32,
                      device=device)
    total = sum(lengths)
    q, k, v = (torch.randn(total, 3, 32, dtype=F64, device=device, requires_grad=True)
               for _ in range(3))
    out, lse = ops.attention(q, k, v, causal=causal, cu_seqlens=cu, max_seqlen=max(lengths),
                             return_lse=True, backend=backend)
    assert out.shape == q.shape and lse.shape == (3, total)
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        if n:
            want_out, want_lse = naive.attention(q[None, sl].detach().cpu(), k[None, sl].detach().cpu(),
                                                 v[None, sl].detach().cpu(), causal)
            torch.testing.assert_close(out[sl].detach().cpu(), want_out[0], atol=1e-10, rtol=1e-10)
            torch.testing.assert_close(lse[:, sl].detach().cpu(), want_lse[0], atol=1e-10,
                                       rtol=1e-10)
            ref = ops.attention_reference(q[None, sl], k[None, sl], v[None, sl], causal=causal)
            want = torch.autograd.grad(ref, (q, k, v), g[None, sl])
            for a, b in zip((dq, dk, dv), want):
                torch.testing.assert_close(a[sl], b[sl], atol=1e-10, rtol=1e-10)
        start += n


# Keys packed with offsets of their own (cu_seqlens_k): Sq < Sk, Sq > Sk (under causal the
# first rows see no key), a sequence with no query, one with no key, one query against many
# keys.
LENGTHS_Q, LENGTHS_K = [5, 0, 13, 4, 1, 7], [9, 4, 6, 0, 23, 7]


def offsets(lengths, device):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32,
                        device=device)


@pytest.mark.parametrize("device,backend", backend_params("attention"))
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_key_offsets_equal_separate_sequences(device, backend, causal):
    """Each sequence's queries against its own keys, forward (out, lse) and gradients (through
    both) against row-by-row float64 attention over that sequence alone."""
    cu, cu_k = offsets(LENGTHS_Q, device), offsets(LENGTHS_K, device)
    q = torch.randn(sum(LENGTHS_Q), 4, 16, dtype=F64, device=device, requires_grad=True)
    k, v = (torch.randn(sum(LENGTHS_K), 2, 16, dtype=F64, device=device, requires_grad=True)
            for _ in range(2))
    out, lse = ops.attention(q, k, v, causal=causal, cu_seqlens=cu, cu_seqlens_k=cu_k,
                             return_lse=True, backend=backend)
    assert out.shape == q.shape and lse.shape == (4, sum(LENGTHS_Q))
    cpu = [t.detach().cpu().requires_grad_() for t in (q, k, v)]
    want_out, want_lse = [], []
    for (s, e), (sk, ek) in zip(zip(cu.tolist(), cu.tolist()[1:]),
                                zip(cu_k.tolist(), cu_k.tolist()[1:])):
        o, l_ = naive.attention(cpu[0][None, s:e], cpu[1][None, sk:ek], cpu[2][None, sk:ek],
                                causal)
        want_out.append(o[0])
        want_lse.append(l_[0])
    want_out, want_lse = torch.cat(want_out), torch.cat(want_lse, -1)
    assert not torch.isfinite(want_lse).all(), "the case has rows that see no key"
    assert_out_lse_and_grads(out, lse, want_out, want_lse, (q, k, v), cpu)


def assert_out_lse_and_grads(out, lse, want_out, want_lse, inputs, exact_inputs):
    """out and lse (-inf exactly where want_lse is) against float64, then the gradients of
    q, k, v through both against autograd through the float64 ones (exact_inputs: CPU leaves);
    returns the gradients."""
    torch.testing.assert_close(out.detach().cpu(), want_out.detach(), atol=1e-10, rtol=1e-10)
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse.detach().cpu()), finite)
    torch.testing.assert_close(lse.detach().cpu()[finite], want_lse.detach()[finite],
                               atol=1e-10, rtol=1e-10)
    g = torch.randn_like(out)
    g_lse = torch.where(finite.to(lse.device), torch.randn_like(lse), torch.zeros_like(lse))
    got = torch.autograd.grad((out * g).sum() + (lse * g_lse).nan_to_num().sum(), inputs)
    want = torch.autograd.grad((want_out * g.cpu()).sum()
                               + (want_lse * g_lse.cpu()).nan_to_num().sum(), exact_inputs)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a.cpu(), b, atol=1e-10, rtol=1e-10, msg=f"d{name}")
    return got


@pytest.mark.parametrize("device,backend", backend_params("attention"))
def test_varlen_key_offsets_equal_to_the_queries_change_nothing(device, backend):
    """cu_seqlens_k equal to cu_seqlens (and max_seqlen_k given) is the shared-offsets call."""
    cu = offsets([6, 0, 11], device)
    q, k, v = (torch.randn(17, 2, 32, dtype=F64, device=device) for _ in range(3))
    want = ops.attention(q, k, v, causal=True, cu_seqlens=cu, backend=backend)
    got = ops.attention(q, k, v, causal=True, cu_seqlens=cu, cu_seqlens_k=cu.clone(),
                        max_seqlen_k=11, backend=backend)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("device,backend", backend_params("attention"))
@pytest.mark.parametrize("causal", [False, True])
def test_seqused_k_attends_to_each_rows_first_keys(device, backend, causal):
    """A dense batch with seqused_k (a KV cache filled to different lengths): row b equals
    attention over its first seqused_k[b] keys alone (none, one, fewer than the queries, all),
    out, lse and gradients (through both) against row-by-row float64; the keys past a row's
    used ones get exactly zero gradient."""
    used = [0, 1, 2, 9, 5]
    q = torch.randn(5, 3, 4, 16, dtype=F64, device=device, requires_grad=True)
    k, v = (torch.randn(5, 9, 2, 16, dtype=F64, device=device, requires_grad=True)
            for _ in range(2))
    seqused = torch.tensor(used, dtype=torch.int32, device=device)
    out, lse = ops.attention(q, k, v, causal=causal, seqused_k=seqused, return_lse=True,
                             backend=backend)
    cpu = [t.detach().cpu().requires_grad_() for t in (q, k, v)]
    rows = [naive.attention(cpu[0][b:b + 1], cpu[1][b:b + 1, :u], cpu[2][b:b + 1, :u], causal)
            for b, u in enumerate(used)]
    want_out, want_lse = torch.cat([o for o, _ in rows]), torch.cat([l_ for _, l_ in rows])
    got = assert_out_lse_and_grads(out, lse, want_out, want_lse, (q, k, v), cpu)
    for b, u in enumerate(used):
        assert (got[1][b, u:] == 0).all() and (got[2][b, u:] == 0).all()


@pytest.mark.parametrize("device,backend", backend_params("attention"))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_used", [True, False], ids=["used", "lead-only"])
def test_leftpad_k_attends_to_each_rows_keys_from_its_first(device, backend, causal, with_used):
    """A dense batch with leftpad_k (a left-padded KV cache), with seqused_k or alone: row b
    equals attention over its keys [leftpad_k[b], seqused_k[b]) alone (none, one, fewer than the
    queries, all but the first, all), causal aligned at their end; out, lse and gradients
    against row-by-row float64; the keys outside get exactly zero gradient."""
    lead, used = [3, 8, 0, 1, 0], [3, 9, 2, 9, 9]
    if not with_used:
        used = [9] * 5
    q = torch.randn(5, 3, 4, 16, dtype=F64, device=device, requires_grad=True)
    k, v = (torch.randn(5, 9, 2, 16, dtype=F64, device=device, requires_grad=True)
            for _ in range(2))
    keys = dict(leftpad_k=torch.tensor(lead, dtype=torch.int32, device=device))
    if with_used:
        keys["seqused_k"] = torch.tensor(used, dtype=torch.int32, device=device)
    out, lse = ops.attention(q, k, v, causal=causal, return_lse=True, backend=backend, **keys)
    cpu = [t.detach().cpu().requires_grad_() for t in (q, k, v)]
    rows = [naive.attention(cpu[0][b:b + 1], cpu[1][b:b + 1, s:u], cpu[2][b:b + 1, s:u], causal)
            for b, (s, u) in enumerate(zip(lead, used))]
    want_out, want_lse = torch.cat([o for o, _ in rows]), torch.cat([l_ for _, l_ in rows])
    got = assert_out_lse_and_grads(out, lse, want_out, want_lse, (q, k, v), cpu)
    for b, (s, u) in enumerate(zip(lead, used)):
        for g in got[1:]:
            assert (g[b, :s] == 0).all() and (g[b, u:] == 0).all()


@pytest.mark.parametrize("device,backend", backend_params("attention"))
def test_seqused_k_of_every_key_changes_nothing(device, backend):
    q, k, v = qkv(2, 5, 7, 2, 2, 32, device)
    full = torch.full((2,), 7, dtype=torch.int32, device=device)
    torch.testing.assert_close(
        ops.attention(q, k, v, causal=True, seqused_k=full, backend=backend),
        ops.attention(q, k, v, causal=True, backend=backend), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("device,backend", backend_params("attention"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision(device, backend, dtype):
    q, k, v = qkv(2, 33, 33, 2, 2, 64, device, dtype=dtype)
    exact, _ = naive.attention(q.cpu(), k.cpu(), v.cpu())
    out = ops.attention(q, k, v, backend=backend)
    assert out.dtype == dtype
    err = (out.cpu().double() - exact).abs().max()
    rounding = (exact.to(dtype).double() - exact).abs().max()
    assert err <= 2 * rounding + 1e-5, (err, rounding)


@pytest.mark.parametrize("device,backend", backend_params("attention"))
def test_noncontiguous_nan_and_empty(device, backend):
    qkv_packed = torch.randn(2, 11, 3, 4, 32, dtype=F64, device=device)  # fused QKV linear
    q, k, v = qkv_packed.unbind(2)
    want, _ = naive.attention(q.cpu(), k.cpu(), v.cpu())
    torch.testing.assert_close(ops.attention(q, k, v, backend=backend).cpu(), want,
                               atol=1e-10, rtol=1e-10)
    q2 = q.clone()
    q2[1, 3, 2, 0] = float("nan")
    out = ops.attention(q2, k, v, backend=backend)
    assert out[1, 3, 2].isnan().all() and not out[0].isnan().any()
    q0, k0, v0 = qkv(0, 5, 5, 2, 2, 32, device)
    assert ops.attention(q0, k0, v0, backend=backend).shape == (0, 5, 2, 32)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_inputs(backend):
    q, k, v = qkv(2, 5, 5, 4, 2, 32, "cpu")
    with pytest.raises(ValueError, match="the 3 heads of k and v must divide the 4 heads of q"):
        ops.attention(q, *qkv(2, 5, 5, 3, 3, 32, "cpu")[1:], backend=backend)
    with pytest.raises(ValueError, match="k must have head_dim 32"):
        ops.attention(q, *qkv(2, 5, 5, 4, 2, 64, "cpu")[1:], backend=backend)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        ops.attention(q, k, v[:, :4], backend=backend)
    with pytest.raises(TypeError, match="q, k and v must have the same dtype"):
        ops.attention(q, k.float(), v, backend=backend)
    with pytest.raises(ValueError, match=r"q must have 4 dimensions \(batch, seqlen, heads"):
        ops.attention(q[0], k, v, backend=backend)
    with pytest.raises(ValueError, match="same batch size"):
        ops.attention(q, k[:1], v[:1], backend=backend)
    with pytest.raises(ValueError, match="max_seqlen is only used with cu_seqlens"):
        ops.attention(q, k, v, max_seqlen=5, backend=backend)
    packed = torch.randn(10, 2, 32, dtype=F64)
    with pytest.raises(TypeError, match="cu_seqlens must be int32"):
        ops.attention(packed, packed, packed, cu_seqlens=torch.tensor([0, 10]), backend=backend)
    with pytest.raises(ValueError, match="cu_seqlens must end at the 10 tokens of q"):
        ops.attention(packed, packed, packed, cu_seqlens=torch.tensor([0, 4, 12], dtype=torch.int32),
                      backend=backend)
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        ops.attention(packed, packed, packed, cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32),
                      backend=backend)
    with pytest.raises(ValueError, match=r"max_seqlen \(3\) is smaller than the longest"):
        ops.attention(packed, packed, packed, cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32),
                      max_seqlen=3, backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_key_offsets(backend):
    q, kv = torch.randn(10, 2, 32, dtype=F64), torch.randn(7, 1, 32, dtype=F64)
    cu, cu_k = offsets([4, 6], "cpu"), offsets([2, 5], "cpu")
    dense = qkv(2, 5, 5, 2, 1, 32, "cpu")
    with pytest.raises(ValueError, match="cu_seqlens_k is only used with cu_seqlens"):
        ops.attention(*dense, cu_seqlens_k=cu_k, backend=backend)
    with pytest.raises(ValueError, match="max_seqlen_k is only used with cu_seqlens_k"):
        ops.attention(q, q, q, cu_seqlens=cu, max_seqlen_k=6, backend=backend)
    with pytest.raises(ValueError, match="k and v must have the same number of tokens as q"):
        ops.attention(q, kv, kv, cu_seqlens=cu, backend=backend)
    with pytest.raises(TypeError, match="cu_seqlens_k must be int32"):
        ops.attention(q, kv, kv, cu_seqlens=cu, cu_seqlens_k=cu_k.long(), backend=backend)
    with pytest.raises(ValueError, match="cu_seqlens_k must hold 3 offsets, as cu_seqlens does"):
        ops.attention(q, kv, kv, cu_seqlens=cu, cu_seqlens_k=offsets([7], "cpu"),
                      backend=backend)
    with pytest.raises(ValueError, match="cu_seqlens_k must end at the 7 tokens of k and v"):
        ops.attention(q, kv, kv, cu_seqlens=cu, cu_seqlens_k=offsets([2, 4], "cpu"),
                      backend=backend)
    with pytest.raises(ValueError, match="cu_seqlens_k must be non-decreasing"):
        ops.attention(q, kv, kv, cu_seqlens=cu,
                      cu_seqlens_k=torch.tensor([0, 8, 7], dtype=torch.int32), backend=backend)
    with pytest.raises(ValueError, match=r"max_seqlen_k \(4\) is smaller than the longest "
                                         r"sequence in cu_seqlens_k \(5\)"):
        ops.attention(q, kv, kv, cu_seqlens=cu, cu_seqlens_k=cu_k, max_seqlen_k=4,
                      backend=backend)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        ops.attention(q, kv, kv[:6], cu_seqlens=cu, cu_seqlens_k=cu_k, backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("name,holds", [("seqused_k", "key lengths"),
                                        ("leftpad_k", "first keys")])
def test_bad_cache_rows_tensor(backend, name, holds):
    """seqused_k and leftpad_k: dense batches only, int32, one value a row."""
    q, k, v = qkv(2, 3, 5, 2, 1, 32, "cpu")
    rows = torch.tensor([1, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match=f"{name} is for dense batches"):
        packed = torch.randn(6, 2, 32, dtype=F64)
        ops.attention(packed, packed, packed, cu_seqlens=offsets([2, 4], "cpu"),
                      backend=backend, **{name: rows})
    with pytest.raises(TypeError, match=f"{name} must be int32"):
        ops.attention(q, k, v, backend=backend, **{name: rows.long()})
    with pytest.raises(ValueError, match=f"{name} must hold the 2 {holds} of the batch"):
        ops.attention(q, k, v, backend=backend, **{name: rows[:1]})


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_seqused_k(backend):
    q, k, v = qkv(2, 3, 5, 2, 1, 32, "cpu")
    used = torch.tensor([5, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"seqused_k\[0\] must be in \[0, 5\] \(the keys of k "
                                         r"and v\), got 6"):
        ops.attention(q, k, v, seqused_k=torch.tensor([6, 2], dtype=torch.int32),
                      backend=backend)
    bad = torch.tensor([5, -1], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"seqused_k\[1\] must be in \[0, 5\]"):
        ops.attention(q, k, v, seqused_k=bad, backend=backend)
    ops.attention(q, k, v, seqused_k=used, backend=backend)   # checked once, then cached ...
    used[0] = 7                                                # ... until written to
    with pytest.raises(ValueError, match=r"seqused_k\[0\] must be in \[0, 5\]"):
        ops.attention(q, k, v, seqused_k=used, backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_leftpad_k(backend):
    q, k, v = qkv(2, 3, 5, 2, 1, 32, "cpu")
    lead, used = torch.tensor([1, 2], dtype=torch.int32), torch.tensor([5, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"leftpad_k\[1\] must be in \[0, 5\] \(the keys of k "
                                         r"and v\), got 6"):
        ops.attention(q, k, v, leftpad_k=torch.tensor([0, 6], dtype=torch.int32),
                      backend=backend)
    with pytest.raises(ValueError, match=r"leftpad_k\[1\] must be in \[0, 2\] \(seqused_k\[1\]\), "
                                         r"got 3"):
        ops.attention(q, k, v, leftpad_k=torch.tensor([0, 3], dtype=torch.int32),
                      seqused_k=used, backend=backend)
    with pytest.raises(ValueError, match=r"leftpad_k\[0\] must be in \[0, 5\]"):
        ops.attention(q, k, v, leftpad_k=torch.tensor([-1, 0], dtype=torch.int32),
                      backend=backend)
    ops.attention(q, k, v, leftpad_k=lead, seqused_k=used, backend=backend)  # checked, cached
    used[1] = 1                         # ... until seqused_k is written to
    with pytest.raises(ValueError, match=r"leftpad_k\[1\] must be in \[0, 1\]"):
        ops.attention(q, k, v, leftpad_k=lead, seqused_k=used, backend=backend)
    used[1] = 2
    ops.attention(q, k, v, leftpad_k=lead, seqused_k=used, backend=backend)
    other = used.clone()                # ... or another seqused_k comes with it
    other[1] = 0
    with pytest.raises(ValueError, match=r"leftpad_k\[1\] must be in \[0, 0\]"):
        ops.attention(q, k, v, leftpad_k=lead, seqused_k=other, backend=backend)


def test_packed_offsets_are_read_once_per_tensor_and_version(monkeypatch):
    """A vision tower passes the same cu_seqlens to every layer: its values are read (a device
    sync on a GPU) once, read again after an in-place write, and still checked against
    max_seqlen and the packed length every call."""
    attention_module = importlib.import_module("pyssm.ops.attention")   # (ops.attention: the op)
    reads = []
    summary = attention_module._offsets_summary
    monkeypatch.setattr(attention_module, "_offsets_summary",
                        lambda cu, total, *names: reads.append(total) or summary(cu, total,
                                                                                 *names))
    packed = torch.randn(10, 2, 32, dtype=F64)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    want = ops.attention(packed, packed, packed, cu_seqlens=cu.clone(), backend="reference")
    assert len(reads) == 1
    for _ in range(3):
        torch.testing.assert_close(
            ops.attention(packed, packed, packed, cu_seqlens=cu, backend="reference"), want)
    assert len(reads) == 2                                     # the clone, then cu once
    with pytest.raises(ValueError, match=r"max_seqlen \(5\) is smaller than the longest"):
        ops.attention(packed, packed, packed, cu_seqlens=cu, max_seqlen=5, backend="reference")
    assert len(reads) == 2                                     # from what was read before
    with pytest.raises(ValueError, match="cu_seqlens must end at the 9 tokens of q"):
        ops.attention(packed[:9], packed[:9], packed[:9], cu_seqlens=cu, backend="reference")
    cu[1] = 12                                                 # in place: read again
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        ops.attention(packed, packed, packed, cu_seqlens=cu, backend="reference")
    cu[1] = 6
    ops.attention(packed, packed, packed, cu_seqlens=cu, max_seqlen=6, backend="reference")
    assert len(reads) == 5                   # the clone, cu, cu against 9 tokens, twice after
    cu[1:2].add_(5)                                            # through a view: read again
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        ops.attention(packed, packed, packed, cu_seqlens=cu, max_seqlen=6, backend="reference")
    assert len(reads) == 6


def test_direct_op_call_checks_too():
    if not _extension.available():
        pytest.skip("extension not built")
    packed = torch.randn(10, 2, 32, dtype=F64)
    with pytest.raises(ValueError, match="cu_seqlens must end at the 10 tokens"):
        torch.ops.pyssm.attention(packed, packed, packed, False, None,
                                  torch.tensor([0, 4, 12], dtype=torch.int32), None)
    with pytest.raises(ValueError, match="cu_seqlens_k must end at the 10 tokens of k and v"):
        torch.ops.pyssm.attention(packed, packed, packed, False, None,
                                  torch.tensor([0, 4, 10], dtype=torch.int32), None,
                                  torch.tensor([0, 4, 9], dtype=torch.int32), None)
    dense = packed.view(2, 5, 2, 32)
    with pytest.raises(ValueError, match=r"seqused_k\[1\] must be in \[0, 5\]"):
        torch.ops.pyssm.attention(dense, dense, dense, False, None, None, None, None, None,
                                  torch.tensor([5, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"leftpad_k\[0\] must be in \[0, 4\] \(seqused_k\[0\]\)"):
        torch.ops.pyssm.attention(dense, dense, dense, False, None, None, None, None, None,
                                  torch.tensor([4, 5], dtype=torch.int32),
                                  torch.tensor([5, 0], dtype=torch.int32))


@pytest.mark.parametrize("device,backend", [p for p in backend_params("attention")
                                            if p.values[1] != "reference"])
@pytest.mark.parametrize("causal", [False, True])
def test_opcheck(device, backend, causal):
    q, k, v = qkv(2, 5, 7, 4, 2, 32, device, requires_grad=True)
    torch.library.opcheck(torch.ops.pyssm.attention.default, (q, k, v, causal, None, None, None))
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=device)
    packed = [torch.randn(8, 2, 32, dtype=F64, device=device, requires_grad=True) for _ in range(3)]
    torch.library.opcheck(torch.ops.pyssm.attention.default,
                          (*packed, causal, 1 / math.sqrt(8), cu, 5))
    # torch SDPA's heads-first layout transposed (dense, not contiguous): the outputs are
    # contiguous all the same, in the fake functions as in the kernels
    heads_first = [t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
                   for t in (q, k, v)]
    torch.library.opcheck(torch.ops.pyssm.attention.default,
                          (*heads_first, causal, None, None, None))
    # keys with offsets of their own
    cu_k = torch.tensor([0, 6, 7], dtype=torch.int32, device=device)
    keys = [torch.randn(7, 1, 32, dtype=F64, device=device, requires_grad=True) for _ in range(2)]
    torch.library.opcheck(torch.ops.pyssm.attention.default,
                          (packed[0], *keys, causal, None, cu, 5, cu_k, 6))
    # a dense batch using each row's first keys
    used = torch.tensor([7, 2], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.pyssm.attention.default,
                          (q, k, v, causal, None, None, None, None, None, used))
    # ... and from its first (a left-padded cache)
    lead = torch.tensor([3, 0], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.pyssm.attention.default,
                          (q, k, v, causal, None, None, None, None, None, used, lead))


@pytest.mark.slow
@pytest.mark.parametrize("device,backend", [p for p in backend_params("attention")
                                            if p.values[1] != "reference"])
def test_compile_fullgraph(device, backend):
    q, k, v = qkv(2, 13, 13, 4, 4, 32, device, requires_grad=True)

    def f(q, k, v):
        return ops.attention(q, k, v, causal=True, backend=backend) * 2

    compiled = torch.compile(f, fullgraph=True)
    out = compiled(q, k, v)
    torch.testing.assert_close(out, f(q, k, v))
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g),
                    torch.autograd.grad(f(q, k, v), (q, k, v), g)):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("device,backend", [p for p in backend_params("attention")
                                            if p.values[1] != "reference"])
def test_compile_fullgraph_key_offsets_and_seqused_k(device, backend):
    """cu_seqlens_k / max_seqlen_k and seqused_k through torch.compile (fullgraph: the fake
    functions take them, no graph break), forward and backward equal to eager."""
    q = torch.randn(9, 2, 32, dtype=F64, device=device, requires_grad=True)
    k, v = (torch.randn(12, 1, 32, dtype=F64, device=device, requires_grad=True)
            for _ in range(2))
    cu, cu_k = offsets([4, 5], device), offsets([10, 2], device)
    dense = [t.detach().view(3, 3, *t.shape[1:]).requires_grad_() for t in (q,)] + \
        [t.detach().view(3, 4, *t.shape[1:]).requires_grad_() for t in (k, v)]
    used = torch.tensor([4, 0, 2], dtype=torch.int32, device=device)

    def f(q, k, v, dq, dk, dv):
        packed = ops.attention(q, k, v, causal=True, cu_seqlens=cu, max_seqlen=5,
                               cu_seqlens_k=cu_k, max_seqlen_k=10, backend=backend)
        cache = ops.attention(dq, dk, dv, causal=True, seqused_k=used, backend=backend)
        return packed * 2, cache * 2

    inputs = (q, k, v, *dense)
    got = torch.compile(f, fullgraph=True)(*inputs)
    want = f(*inputs)
    g = [torch.randn_like(t) for t in want]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    for a, b in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device,backend", backend_params("attention"))
@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_independent_math(device, backend, causal):
    """Gradients (through out and lse) against autograd through row-by-row float64 attention."""
    q, k, v = qkv(2, 5, 6, 4, 2, 8, device, requires_grad=True)
    out, lse = ops.attention(q, k, v, causal=causal, return_lse=True, backend=backend)
    g, g_lse = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad((out * g).sum() + (lse * g_lse).sum(), (q, k, v))
    cpu = [t.detach().cpu().requires_grad_() for t in (q, k, v)]
    want_out, want_lse = naive.attention(*cpu, causal)
    want = torch.autograd.grad((want_out * g.cpu()).sum() + (want_lse * g_lse.cpu()).sum(), cpu)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a.cpu(), b, atol=1e-10, rtol=1e-10, msg=f"d{name}")


# attention_qkvpacked: one (B, S, 3, H, d) or packed (T, 3, H, d) input, one gradient of its
# shape; dense and packed, causal or not, through out and lse, against row-by-row float64.
QKVPACKED_CASES = [((2, 13, 3, 4, 32), None), ((23, 3, 2, 64), [0, 6, 6, 23])]


@pytest.mark.parametrize("device,backend", backend_params("attention"))
@pytest.mark.parametrize("case", QKVPACKED_CASES, ids=["dense", "varlen"])
@pytest.mark.parametrize("causal", [False, True])
def test_qkvpacked_against_float64(device, backend, case, causal):
    shape, lengths = case
    packed = torch.randn(*shape, dtype=F64, device=device, requires_grad=True)
    cu = None if lengths is None else torch.tensor(lengths, dtype=torch.int32, device=device)
    out, lse = ops.attention_qkvpacked(packed, causal=causal, cu_seqlens=cu, return_lse=True,
                                       backend=backend)
    g, g_lse = torch.randn_like(out), torch.randn_like(lse)
    (dqkv,) = torch.autograd.grad((out * g).sum() + (lse * g_lse).sum(), packed)
    assert dqkv.shape == packed.shape

    exact_in = packed.detach().cpu().requires_grad_()
    gc, gc_lse = g.cpu(), g_lse.cpu()
    if cu is None:   # sequence b: batch row b; packed: tokens lo..hi as a batch of one
        pieces = [(lambda t, b=b: t[b:b + 1], lambda t, b=b: t[b:b + 1])
                  for b in range(shape[0])]
    else:
        pieces = [(lambda t, lo=lo, hi=hi: t[None, lo:hi], lambda t, lo=lo, hi=hi: t[None, :, lo:hi])
                  for lo, hi in zip(lengths[:-1], lengths[1:])]
    loss = 0
    for rows, stats in pieces:
        o, l_ = naive.attention(*rows(exact_in).unbind(-3), causal)
        torch.testing.assert_close(rows(out.detach().cpu()), o, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(stats(lse.detach().cpu()), l_, atol=1e-10, rtol=1e-10)
        loss = loss + (o * rows(gc)).sum() + (l_ * stats(gc_lse)).sum()
    (want,) = torch.autograd.grad(loss, exact_in)
    torch.testing.assert_close(dqkv.cpu(), want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("device,backend", backend_params("attention"))
def test_qkvpacked_equals_unbound(device, backend):
    """The same values and gradients as attention(*qkv.unbind(-3)), the latter stacked."""
    packed = torch.randn(3, 9, 3, 2, 32, dtype=F64, device=device, requires_grad=True)
    out = ops.attention_qkvpacked(packed, causal=True, softmax_scale=0.2, backend=backend)
    want = ops.attention(*packed.unbind(2), causal=True, softmax_scale=0.2, backend=backend)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, packed, g)[0],
                               torch.autograd.grad(want, packed, g)[0], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("device,backend", backend_params("attention"))
def test_qkvpacked_switched_off_takes_copies(device, backend, monkeypatch):
    """PYSSM_QKVPACKED=0 (the benchmarks' comparison) runs attention on contiguous copies of
    q, k and v: the same values and gradient, through attention's op, not the packed one."""
    packed = torch.randn(2, 9, 3, 2, 32, dtype=F64, device=device, requires_grad=True)
    want = ops.attention_qkvpacked(packed, causal=True, backend=backend)
    g = torch.randn_like(want)
    (want_grad,) = torch.autograd.grad(want, packed, g)
    monkeypatch.setenv("PYSSM_QKVPACKED", "0")
    calls = []
    monkeypatch.setattr(torch.ops.pyssm, "attention_qkvpacked", lambda *a: calls.append(a),
                        raising=False)
    got = ops.attention_qkvpacked(packed, causal=True, backend=backend)
    assert not calls
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, packed, g)[0], want_grad, atol=1e-12,
                               rtol=1e-12)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_qkvpacked_bad_inputs(backend):
    with pytest.raises(ValueError, match=r"qkv must have 5 dimensions \(batch, seqlen, 3, heads"):
        ops.attention_qkvpacked(torch.randn(5, 3, 2, 32), backend=backend)
    with pytest.raises(ValueError, match=r"qkv must be \(batch, seqlen, 3, heads, head_dim\) "
                                         r"\(q, k and v along its dim -3\), got \(1, 5, 2, 2, 32\)"):
        ops.attention_qkvpacked(torch.randn(1, 5, 2, 2, 32), backend=backend)
    with pytest.raises(ValueError, match=r"qkv must have 4 dimensions \(total_tokens, 3, heads"):
        ops.attention_qkvpacked(torch.randn(1, 5, 3, 2, 32), backend=backend,
                                cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(TypeError, match="qkv must be a floating"):
        ops.attention_qkvpacked(torch.ones(1, 5, 3, 2, 32, dtype=torch.long), backend=backend)
    with pytest.raises(ValueError, match="cu_seqlens must end at the 5 tokens"):
        ops.attention_qkvpacked(torch.randn(5, 3, 2, 32),
                                cu_seqlens=torch.tensor([0, 4, 6], dtype=torch.int32),
                                backend=backend)


@pytest.mark.parametrize("device,backend", [p for p in backend_params("attention")
                                            if p.values[1] != "reference"])
def test_qkvpacked_opcheck(device, backend):
    packed = torch.randn(2, 5, 3, 4, 32, dtype=F64, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.pyssm.attention_qkvpacked.default,
                          (packed, True, None, None, None))
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=device)
    varlen = torch.randn(8, 3, 2, 32, dtype=F64, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.pyssm.attention_qkvpacked.default,
                          (varlen, False, 0.25, cu, 5))


CUDA_ONLY = [p for p in backend_params("attention") if p.id == "cuda"]


# The two CUDA paths: "sm90" lets an sm_90 GPU take the Hopper kernels (forward at head_dim 64
# to 128, backward likewise; elsewhere the portable ones again); "portable" turns them off
# (PYSSM_FLASH_SM90=0).
FLASH_PATHS = ["sm90", "portable"]


@pytest.fixture
def flash_path(request, monkeypatch):
    if request.param == "sm90" and os.environ.get("PYSSM_FLASH_SM90") == "0":
        pytest.skip("the Hopper path is turned off here (PYSSM_FLASH_SM90=0, as the device "
                    "check sets it when bench/hopper_smoke.py fails)")
    monkeypatch.setenv("PYSSM_FLASH_SM90", "1" if request.param == "sm90" else "0")
    # the prefill kernels, also for the few-query calls the flash-decoding kernel would take
    # (test_cuda_flash_decode tests that one)
    monkeypatch.setenv("PYSSM_FLASH_DECODE", "0")
    return request.param


@pytest.mark.parametrize("device,backend", CUDA_ONLY)
@pytest.mark.parametrize("flash_path", FLASH_PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 64, 72, 80, 96, 128, 256])
@pytest.mark.parametrize("shape,causal", [((2, 197, 197, 4, 4), False), ((1, 97, 300, 4, 2), True),
                                          ((1, 130, 65, 2, 1), True), ((3, 1, 1, 2, 2), False),
                                          ((1, 300, 555, 2, 1), False)])
def test_cuda_flash_kernel_error_within_twice_torchs(device, backend, flash_path, dtype, head_dim,
                                                     shape, causal):
    """CUDA flash kernel (fp16 / bf16, every head size it takes, both forward paths, tiles cut
    mid-way, grouped heads, causal with Sq < Sk and Sq > Sk, several query blocks and key
    tiles): forward error against float64 at most about twice that of torch's own SDPA in the
    same dtype; lse against float64 too."""
    if flash_path == "sm90" and head_dim in (32, 256):
        pytest.skip("the Hopper path takes head_dim 64 to 128 (the portable path's test runs)")
    B, Sq, Sk, H, Hk = shape
    q, k, v = qkv(B, Sq, Sk, H, Hk, head_dim, device, dtype=dtype)
    out, lse = ops.attention(q, k, v, causal=causal, return_lse=True, backend=backend)
    exact, exact_lse = naive.attention(q.cpu(), k.cpu(), v.cpu(), causal=causal)
    group = H // Hk
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(group, 2).transpose(1, 2),
        v.repeat_interleave(group, 2).transpose(1, 2),
        attn_mask=torch.ones(Sq, Sk, dtype=torch.bool, device=device).tril(Sk - Sq)
        if causal else None).transpose(1, 2)
    seen = torch.isfinite(exact_lse).transpose(1, 2)[..., None].expand_as(exact)  # rows with keys
    err = (out.cpu().double() - exact)[seen].abs().max()
    torch_err = (sdpa.cpu().double() - exact)[seen].abs().max()
    assert err <= 2 * torch_err + 1e-3, (err, torch_err)
    assert (out.cpu()[~seen] == 0).all()  # a query that sees no key: 0
    finite = torch.isfinite(exact_lse)
    torch.testing.assert_close(lse.cpu().double()[finite], exact_lse[finite], atol=2e-3,
                               rtol=2e-3)
    assert torch.isneginf(lse.cpu()[~finite]).all()


@pytest.mark.parametrize("device,backend", CUDA_ONLY)
@pytest.mark.parametrize("flash_path", FLASH_PATHS, indirect=True)
@pytest.mark.parametrize("max_seqlen", [None, 300])
def test_cuda_varlen_forward_and_backward_do_not_sync(device, backend, flash_path, max_seqlen):
    """Once pyssm.ops.attention has read a cu_seqlens tensor, a packed forward and backward on
    it never synchronise with the device (torch's sync debug mode raises if one does): the
    kernels size their grid from max_seqlen, or the longest sequence read before."""
    cu = torch.tensor([0, 5, 205, 505], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(505, 2, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    want = ops.attention(q, k, v, cu_seqlens=cu, max_seqlen=max_seqlen)   # reads cu
    dout = torch.randn_like(want)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ops.attention(q, k, v, cu_seqlens=cu, max_seqlen=max_seqlen)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    wq, wk, wv = torch.autograd.grad(want, (q, k, v), dout)
    for got, exp in ((dq, wq), (dk, wk), (dv, wv)):   # dq: fp32 atomics in another order
        torch.testing.assert_close(got.float(), exp.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("device,backend", CUDA_ONLY)
@pytest.mark.parametrize("flash_path", FLASH_PATHS, indirect=True)
@pytest.mark.parametrize("max_seqlen", [300, 200])
def test_cuda_unread_offsets_never_leave_the_packed_tokens(device, backend, flash_path,
                                                          max_seqlen):
    """The op called directly with offsets past the packed tokens (and a max_seqlen that
    understates them): the kernels clamp every offset, so nothing outside q, k, v, out or lse
    is touched (compute-sanitizer sees this case too). In bounds, sequence 0 is right."""
    cu = torch.tensor([0, 100, 400, 900], dtype=torch.int32, device=device)   # 300 tokens
    q, k, v = (torch.randn(300, 2, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
    out, lse = torch.ops.pyssm.attention(q, k, v, False, None, cu, max_seqlen)
    torch.cuda.synchronize()
    want = ops.attention(q[:100], k[:100], v[:100], cu_seqlens=cu[:2] * 1, max_seqlen=100)
    torch.testing.assert_close(out[:100], want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("device,backend", CUDA_ONLY)
@pytest.mark.parametrize("flash_path", FLASH_PATHS, indirect=True)
@pytest.mark.parametrize("head_dim", [72, 64, 128])
def test_cuda_flash_kernel_varlen_and_large_scores(device, backend, flash_path, head_dim):
    """Packed sequences of lengths 0, 1, 64, 65, 200, 300, and scores of magnitude 1e4: no NaN,
    each sequence equal to attention over it alone (both forward paths)."""
    lengths = [0, 1, 64, 65, 200, 300]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32,
                      device=device)
    q, k, v = (torch.randn(sum(lengths), 3, head_dim, device=device, dtype=torch.bfloat16)
               for _ in range(3))
    q = q * 100  # with k ~ 1: scores up to ~1e4
    out = ops.attention(q, k, v, cu_seqlens=cu, max_seqlen=max(lengths), causal=True,
                        backend=backend)
    assert torch.isfinite(out).all()
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if e > s:
            alone = ops.attention(q[None, s:e], k[None, s:e], v[None, s:e], causal=True,
                                  backend="reference")[0]
            torch.testing.assert_close(out[s:e].float(), alone.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("device,backend", CUDA_ONLY)
@pytest.mark.parametrize("flash_path", FLASH_PATHS, indirect=True)
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("packed", [False, True], ids=["separate", "qkvpacked"])
def test_cuda_attention_takes_the_hopper_path_on_sm90(device, backend, flash_path, head_dim,
                                                      packed):
    """On an sm_90 GPU the forward and the backward run the Hopper kernels at head_dim 64 to
    128, and the portable ones with PYSSM_FLASH_SM90=0 (kernel names from the profiler); from a
    fused qkv too (tensor maps at a token stride of 3 H d: a map the driver refused would fall
    back to the portable kernels, and this would say so)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper path runs on sm_90 GPUs only")
    fused = torch.randn(1, 197, 3, 2, head_dim, device=device, dtype=torch.bfloat16,
                        requires_grad=True)
    q, k, v = qkv(1, 197, 197, 2, 2, head_dim, device, dtype=torch.bfloat16, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        if packed:
            ops.attention_qkvpacked(fused, backend=backend).sum().backward()
        else:
            ops.attention(q, k, v, backend=backend).sum().backward()
        torch.cuda.synchronize()
    names = " ".join(e.name for e in prof.events())
    for kernel, portable in (("flash_fwd_sm90_kernel", "flash_fwd_kernel"),
                             ("flash_bwd_sm90_kernel", "flash_bwd_kernel")):
        hopper = kernel in names
        assert hopper == (flash_path == "sm90"), (kernel, names[:2000])
        assert hopper or portable in names, (portable, names[:2000])


@pytest.mark.parametrize("device,backend", CUDA_ONLY)
@pytest.mark.parametrize("head_dim", [64, 72, 80, 96, 128])
@pytest.mark.parametrize("dq", ["tma", "atomic"])
def test_cuda_hopper_backward_dq_by_tma_and_by_atomics(device, backend, head_dim, dq,
                                                       monkeypatch):
    """The Hopper backward's two ways of adding dQ (TMA reduce-adds, the default, and fp32
    atomics with PYSSM_FLASH_SM90_DQ=atomic) on grouped heads, several query tiles a block and
    packed sequences whose dQ tiles overlap the next sequence's rows: against float64
    autograd within the dtype's rounding."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper path runs on sm_90 GPUs only")
    monkeypatch.setenv("PYSSM_FLASH_SM90", "1")
    monkeypatch.setenv("PYSSM_FLASH_SM90_DQ", dq)
    lengths = [70, 0, 1, 197, 33]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32,
                      device=device)
    q = torch.randn(sum(lengths), 4, head_dim, dtype=torch.bfloat16, device=device,
                    requires_grad=True)
    k, v = (torch.randn(sum(lengths), 2, head_dim, dtype=torch.bfloat16, device=device,
                        requires_grad=True) for _ in range(2))
    out = ops.attention(q, k, v, causal=True, cu_seqlens=cu, max_seqlen=197, backend=backend)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    exact = _exact_grads(q, k, v, g, None, True, cu_seqlens=cu)
    _assert_grads_close(got, exact)


MODEL_CASES = [  # batch, seqlen_q, seqlen_k, heads, heads_k, head_dim, causal
    (2, 1, 1, 2, 2, 32, False), (1, 17, 17, 4, 2, 72, True), (1, 197, 197, 2, 1, 64, False),
    (1, 197, 130, 2, 2, 72, True), (1, 65, 197, 3, 1, 128, True), (2, 17, 197, 2, 2, 80, False),
    (1, 128, 129, 2, 1, 96, True), (1, 3, 1, 2, 1, 64, True), (2, 197, 150, 4, 2, 32, True),
    (1, 130, 197, 2, 2, 32, False),
]


@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda c: "b{}q{}k{}h{}hk{}d{}c{:d}".format(*c))
def test_flash_backward_model_matches_autograd(case):
    """The float64 model of the CUDA backward's tiling (flash_bwd_model.py: tiles of 64 keys and
    64 (head_dim 32) or 32 queries, causal skip, grouped heads, Delta with dlse) equals autograd through the
    reference, gradients through out and lse."""
    import flash_bwd_model
    B, Sq, Sk, H, Hk, d, causal = case
    q, k, v = qkv(B, Sq, Sk, H, Hk, d, "cpu", requires_grad=True)
    scale = 0.2 if d == 80 else None
    out, lse = ops.attention_reference(q, k, v, causal=causal, softmax_scale=scale,
                                       return_lse=True)
    g, g_lse = torch.randn_like(out), torch.randn_like(lse)
    g_lse = torch.where(torch.isfinite(lse), g_lse, torch.zeros_like(g_lse))
    want = torch.autograd.grad((out * g).sum() + (lse * g_lse).nan_to_num().sum(), (q, k, v))
    got = flash_bwd_model.flash_backward_model(
        *(t.detach().numpy() for t in (q, k, v, out, g, lse, g_lse)), causal=causal,
        softmax_scale=scale)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(torch.from_numpy(a), b, atol=1e-10, rtol=1e-10,
                                   msg=f"d{name}")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [72, 128])
def test_flash_backward_model_varlen(causal, head_dim):
    """The model on packed sequences (lengths 0, 1, 64, 65, 197, 17; max_seqlen above the
    longest) with grouped heads and an lse gradient, against autograd through the reference."""
    import flash_bwd_model
    lengths = [0, 1, 64, 65, 197, 17]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    total = sum(lengths)
    q = torch.randn(total, 4, head_dim, dtype=F64, requires_grad=True)
    k, v = (torch.randn(total, 2, head_dim, dtype=F64, requires_grad=True) for _ in range(2))
    out, lse = ops.attention_reference(q, k, v, causal=causal, cu_seqlens=cu, return_lse=True)
    g, g_lse = torch.randn_like(out), torch.randn_like(lse)
    want = torch.autograd.grad((out * g).sum() + (lse * g_lse).sum(), (q, k, v))
    got = flash_bwd_model.flash_backward_model(
        *(t.detach().numpy() for t in (q, k, v, out, g, lse, g_lse)), causal=causal,
        cu_seqlens=cu.tolist(), max_seqlen=200)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(torch.from_numpy(a), b, atol=1e-10, rtol=1e-10,
                                   msg=f"d{name}")


def _attend_without_sync(q, k, v, call):
    """ops.attention(q, k, v, **call) (return_lse) and its gradients through out and lse, under
    torch's sync debug mode (a device sync raises): (out, lse, g, g_lse, (dq, dk, dv)), g and
    g_lse the random output gradients (g_lse zero where lse is -inf)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, lse = ops.attention(q, k, v, **call)
        g = torch.randn_like(out)
        finite = torch.isfinite(lse)
        g_lse = torch.where(finite, torch.randn_like(lse), torch.zeros_like(lse))
        got = torch.autograd.grad((out * g).float().sum() + (lse * g_lse).nan_to_num().sum(),
                                  (q, k, v))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return out, lse, g, g_lse, got


def _bf16_case(packed, seqlen_q, head_dim, device, call):
    """bf16 q (4 heads), k, v (2 heads) needing gradients: seqlen_q queries against 1000 keys
    in 2 rows, or packed sequences of 700, 0, 1 and 399 tokens (their offsets put in ``call``)."""
    if packed:
        lq = [700, 0, 1, 399]
        call.update(cu_seqlens=offsets(lq, device), max_seqlen=700)
        q_shape, kv_shape = (sum(lq), 4, head_dim), (sum(lq), 2, head_dim)
    else:
        q_shape, kv_shape = (2, seqlen_q, 4, head_dim), (2, 1000, 2, head_dim)
    return [torch.randn(shape, dtype=torch.bfloat16, device=device, requires_grad=True)
            for shape in (q_shape, kv_shape, kv_shape)]


def _exact_grads(q, k, v, g, g_lse, causal, scale=None, cu_seqlens=None, cu_seqlens_k=None,
                 seqused_k=None, leftpad_k=None, window_size=(-1, -1), softcap=0.0):
    """float64 autograd through the reference on the CPU, from the same (rounded) inputs."""
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    cu, cu_k, used, lead = (None if t is None else t.cpu()
                            for t in (cu_seqlens, cu_seqlens_k, seqused_k, leftpad_k))
    out, lse = ops.attention_reference(q64, k64, v64, causal=causal, softmax_scale=scale,
                                       cu_seqlens=cu, cu_seqlens_k=cu_k, seqused_k=used,
                                       leftpad_k=lead, window_size=window_size, softcap=softcap,
                                       return_lse=True)
    loss = (out * g.cpu().double()).sum()
    if g_lse is not None:
        loss = loss + (lse * g_lse.cpu().double()).nan_to_num().sum()
    return torch.autograd.grad(loss, (q64, k64, v64))


def _assert_out_close(out, lse, q, k, v, **reference):
    """out within bf16's rounding (2^-6 of its largest value) of the float64 reference on the
    CPU from the same (rounded) inputs (``reference``: its mask and key arguments, on the CPU),
    lse -inf exactly where the reference's is; returns the reference's out."""
    want, want_lse = ops.attention_reference(*(t.detach().cpu().double() for t in (q, k, v)),
                                             return_lse=True, **reference)
    assert torch.equal(torch.isfinite(lse.detach().cpu()), torch.isfinite(want_lse))
    err = (out.detach().cpu().double() - want).abs().max()
    assert err <= 2.0 ** -6 * want.abs().max(), err
    return want


def _assert_grads_close(got, exact, bound=3e-2):
    """dq, dk, dv finite and within `bound` (relative, in norm) of the float64 gradients."""
    for name, a, x in zip("qkv", got, exact):
        assert torch.isfinite(a).all(), f"d{name} not finite"
        rel = (a.cpu().double() - x).norm() / x.norm()
        assert rel < bound, (name, rel)


@pytest.mark.parametrize("device,backend", CUDA_ONLY)
@pytest.mark.parametrize("flash_path", FLASH_PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 64, 72, 80, 96, 128])
@pytest.mark.parametrize("shape,causal", [((2, 197, 197, 4, 4), False), ((1, 97, 300, 4, 2), True),
                                          ((1, 130, 65, 2, 1), True), ((3, 1, 1, 2, 2), False),
                                          ((1, 17, 17, 6, 2), True), ((1, 300, 260, 4, 1), True)])
def test_cuda_flash_backward_error_within_twice_torchs(device, backend, flash_path, dtype,
                                                       head_dim, shape, causal):
    """CUDA flash backward (fp16 / bf16, every head size, both paths: the Hopper backward takes
    head_dim 64 to 128 on sm_90, key and query tiles cut mid-way, grouped heads, causal with
    Sq < Sk and Sq > Sk, seqlen 1): dq, dk, dv against float64 autograd, max error at most
    about twice that of torch's SDPA backward in the same dtype. Outputs start as NaN
    (conftest), so an unwritten element fails."""
    if flash_path == "sm90" and head_dim == 32:
        pytest.skip("the Hopper kernels take head_dim 64 to 128")
    B, Sq, Sk, H, Hk = shape
    q, k, v = qkv(B, Sq, Sk, H, Hk, head_dim, device, dtype=dtype, requires_grad=True)
    out = ops.attention(q, k, v, causal=causal, backend=backend)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    exact = _exact_grads(q, k, v, g, None, causal)
    # torch's SDPA on the query rows that see a key (bottom-right causal; with Sq > Sk the first
    # Sq - Sk rows see none, and their dq is 0)
    first = max(0, Sq - Sk) if causal else 0
    group = H // Hk
    q_seen = q[:, first:]
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q_seen.transpose(1, 2), k.repeat_interleave(group, 2).transpose(1, 2),
        v.repeat_interleave(group, 2).transpose(1, 2),
        attn_mask=torch.ones(Sq - first, Sk, dtype=torch.bool, device=device).tril(Sk - Sq + first)
        if causal else None).transpose(1, 2)
    tq, tk, tv = torch.autograd.grad(sdpa, (q, k, v), g[:, first:])
    for name, a, t, e in zip("qkv", got, (tq, tk, tv), exact):
        assert torch.isfinite(a).all(), f"d{name} not finite"
        if name == "q":
            assert (a[:, :first] == 0).all(), "dq of rows that see no key"
            a, t, e = a[:, first:], t[:, first:], e[:, first:]
        err = (a.cpu().double() - e).abs().max()
        torch_err = (t.cpu().double() - e).abs().max()
        # with one key the exact dq is 0 (softmax of one score has no gradient): there both
        # kernels leave only fp32 rounding of dP - Delta (~1e-7, the H200 measured 3.5e-7
        # against torch's 1.2e-7), so the floor is 1e-5 of the scale of dP
        scale = max(e.abs().max().item(), 1e-2 * (g.abs().max() * v.abs().max()).item())
        assert err <= 2 * torch_err + 1e-3 * scale, (name, err, torch_err)


@pytest.mark.parametrize("device,backend", CUDA_ONLY)
@pytest.mark.parametrize("flash_path", FLASH_PATHS, indirect=True)
@pytest.mark.parametrize("head_dim", [72, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_flash_backward_lse_gradient_and_varlen(device, backend, flash_path, head_dim, dtype,
                                                     causal):
    """CUDA flash backward with a gradient through lse (the dlse input), on packed sequences of
    lengths 0, 1, 64, 65, 197 with grouped heads, both paths: relative error against float64
    autograd within the dtype's rounding."""
    lengths = [0, 1, 64, 65, 197]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32,
                      device=device)
    total = sum(lengths)
    q = torch.randn(total, 4, head_dim, dtype=dtype, device=device, requires_grad=True)
    k, v = (torch.randn(total, 2, head_dim, dtype=dtype, device=device, requires_grad=True)
            for _ in range(2))
    out, lse = ops.attention(q, k, v, causal=causal, cu_seqlens=cu, max_seqlen=max(lengths),
                             return_lse=True, backend=backend)
    g, g_lse = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad((out * g).float().sum() + (lse * g_lse).sum(), (q, k, v))
    exact = _exact_grads(q, k, v, g, g_lse, causal, cu_seqlens=cu)
    bound = 1e-2 if dtype == torch.float16 else 3e-2
    _assert_grads_close(got, exact, bound)


@pytest.mark.parametrize("device,backend", CUDA_ONLY)
@pytest.mark.parametrize("flash_path", FLASH_PATHS, indirect=True)
@pytest.mark.parametrize("head_dim", [32, 64, 72, 80, 96, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_flash_varlen_key_offsets(device, backend, flash_path, head_dim, causal):
    """The flash kernels with keys packed at offsets of their own (cu_seqlens_k), bf16, grouped
    heads: a padded batch decoding (one query against 300 keys), Sq > Sk (rows that see no key
    under causal), a sequence with no key and one with no query, several key blocks. Forward
    and gradients (through out and lse) against float64 within bf16's rounding; a query that
    sees no key gives 0 and lse -inf; no synchronisation once the offsets are read."""
    if flash_path == "sm90" and head_dim == 32:
        pytest.skip("the Hopper path takes head_dim 64 to 128")
    lq, lk = [1, 200, 17, 0, 130, 1], [300, 70, 0, 40, 260, 1]
    cu, cu_k = offsets(lq, device), offsets(lk, device)
    dtype = torch.bfloat16
    q = torch.randn(sum(lq), 4, head_dim, dtype=dtype, device=device, requires_grad=True)
    k, v = (torch.randn(sum(lk), 2, head_dim, dtype=dtype, device=device, requires_grad=True)
            for _ in range(2))
    call = dict(causal=causal, cu_seqlens=cu, cu_seqlens_k=cu_k, return_lse=True,
                backend=backend)
    ops.attention(q, k, v, **call)   # reads the offsets
    out, lse, g, g_lse, got = _attend_without_sync(q, k, v, call)
    finite = torch.isfinite(lse)
    want, want_lse = ops.attention_reference(*(t.detach().cpu().double() for t in (q, k, v)),
                                             causal=causal, cu_seqlens=cu.cpu(),
                                             cu_seqlens_k=cu_k.cpu(), return_lse=True)
    assert torch.equal(finite.cpu(), torch.isfinite(want_lse))
    assert (out.detach().transpose(0, 1)[~finite] == 0).all(), "a query that sees no key"
    err = (out.detach().cpu().double() - want).abs().max()
    assert err <= 2.0 ** -6 * want.abs().max(), err
    torch.testing.assert_close(lse.detach().cpu().double()[finite.cpu()],
                               want_lse[finite.cpu()], atol=2e-3, rtol=2e-3)
    exact = _exact_grads(q, k, v, g, g_lse, causal, cu_seqlens=cu, cu_seqlens_k=cu_k)
    _assert_grads_close(got, exact)
    no_query = slice(sum(lk[:3]), sum(lk[:4]))   # the keys of the sequence with no query
    assert (got[1][no_query] == 0).all() and (got[2][no_query] == 0).all()


@pytest.mark.parametrize("device,backend", CUDA_ONLY)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("extra", ["packed", "window", "cache", "softcap", "decode"])
def test_cuda_flash_forward_head_dim_256(device, backend, dtype, extra):
    """head_dim 256 (Gemma's): the flash forward (32-key tiles) on packed sequences with keys of
    their own offsets (one with no key, one with no query), a sliding window and soft-capping;
    the flash-decoding forward (few queries a group of heads) on a left-padded cache
    (seqused_k and leftpad_k) and on one query against 700 keys (split over keys); each against
    float64 within the dtype's rounding (rows that see no key 0, lse -inf); its gradients, by
    the composed backward from the kernel's out and lse, against float64 too."""
    lq, lk = [1, 70, 17, 0, 40], [90, 33, 0, 5, 40]
    if extra == "packed":
        q = torch.randn(sum(lq), 4, 256, dtype=dtype, device=device)
        k, v = (torch.randn(sum(lk), 2, 256, dtype=dtype, device=device) for _ in range(2))
        call = dict(causal=True, cu_seqlens=offsets(lq, device), cu_seqlens_k=offsets(lk, device))
    elif extra == "decode":
        q, k, v = qkv(2, 1, 700, 8, 2, 256, device, dtype=dtype)
        call = dict(causal=True)
    else:
        q, k, v = qkv(3, 37 if extra != "cache" else 5, 90, 4, 2, 256, device, dtype=dtype)
        call = dict(window=dict(causal=True, window_size=(30, 0)), softcap=dict(softcap=30.0),
                    cache=dict(causal=True, seqused_k=torch.tensor(
                        [90, 40, 3], dtype=torch.int32, device=device), leftpad_k=torch.tensor(
                        [0, 7, 3], dtype=torch.int32, device=device)))[extra]
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = ops.attention(q, k, v, return_lse=True, backend=backend, **call)
    cpu = {name: t.cpu() if isinstance(t, torch.Tensor) else t for name, t in call.items()}
    exact_in = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    want, want_lse = ops.attention_reference(*exact_in, return_lse=True, **cpu)
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse.detach().cpu()), finite)
    err = (out.detach().cpu().double() - want).abs().max()
    assert err <= 4 * (2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7) * want.abs().max()
    torch.testing.assert_close(lse.detach().cpu().double()[finite], want_lse[finite], atol=2e-3,
                               rtol=2e-3)
    g = torch.randn_like(out)
    _assert_grads_close(torch.autograd.grad(out, (q, k, v), g),
                        torch.autograd.grad(want, exact_in, g.cpu().double()))


# A dense KV cache's rows: filled to different lengths (seqused_k: none, one, fewer keys than
# queries, a key block and a bit, all 300) or left-padded too (leftpad_k: keys [lead, used) =
# none, one, fewer than the queries, a key block and a bit from past the first, all 300)
CACHE_ROWS = {"used": dict(used=[0, 1, 5, 130, 300]),
              "left-padded": dict(used=[7, 300, 8, 290, 300], lead=[7, 299, 3, 150, 0])}


@pytest.mark.parametrize("device,backend", CUDA_ONLY)
@pytest.mark.parametrize("flash_path", FLASH_PATHS, indirect=True)
@pytest.mark.parametrize("head_dim", [32, 64, 72, 80, 96, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("rows", list(CACHE_ROWS))
def test_cuda_flash_seqused_k(device, backend, flash_path, head_dim, causal, rows):
    """The flash kernels on a dense KV cache (CACHE_ROWS), bf16, grouped heads, 17 queries (the
    prefill kernels). Forward and gradients against float64 within bf16's rounding, zero
    gradient outside each row's keys, no synchronisation once seqused_k / leftpad_k are read."""
    if flash_path == "sm90" and head_dim == 32:
        pytest.skip("the Hopper path takes head_dim 64 to 128")
    dtype, used = torch.bfloat16, CACHE_ROWS[rows]["used"]
    lead = CACHE_ROWS[rows].get("lead", [0] * len(used))
    q = torch.randn(5, 17, 4, head_dim, dtype=dtype, device=device, requires_grad=True)
    k, v = (torch.randn(5, 300, 2, head_dim, dtype=dtype, device=device, requires_grad=True)
            for _ in range(2))
    keys = dict(seqused_k=torch.tensor(used, dtype=torch.int32, device=device))
    if "lead" in CACHE_ROWS[rows]:
        keys["leftpad_k"] = torch.tensor(lead, dtype=torch.int32, device=device)
    call = dict(causal=causal, return_lse=True, backend=backend, **keys)
    ops.attention(q, k, v, **call)   # reads seqused_k (and leftpad_k)
    out, lse, g, g_lse, got = _attend_without_sync(q, k, v, call)
    cpu_keys = {n: t.cpu() for n, t in keys.items()}
    _assert_out_close(out, lse, q, k, v, causal=causal, **cpu_keys)
    exact = _exact_grads(q, k, v, g, g_lse, causal, **cpu_keys)
    _assert_grads_close(got, exact)
    for b, (s, u) in enumerate(zip(lead, used)):
        for a in got[1:]:
            assert (a[b, :s] == 0).all() and (a[b, u:] == 0).all()


@pytest.mark.parametrize("device,backend", CUDA_ONLY)
@pytest.mark.parametrize("flash_path", FLASH_PATHS, indirect=True)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_flash_padded_prefill(device, backend, flash_path, head_dim):
    """A padded prefill read in place, as the transformers backend runs one: causal, as many
    queries as keys, leftpad_k alone (left padding; right padding is past every valid query).
    The queries before each row's first key see none (out 0, lse -inf); forward and gradients
    against float64 within bf16's rounding, zero gradient for the keys before each lead."""
    dtype, lead = torch.bfloat16, [0, 37, 149]
    q = torch.randn(3, 150, 4, head_dim, dtype=dtype, device=device, requires_grad=True)
    k, v = (torch.randn(3, 150, 2, head_dim, dtype=dtype, device=device, requires_grad=True)
            for _ in range(2))
    keys = dict(leftpad_k=torch.tensor(lead, dtype=torch.int32, device=device))
    call = dict(causal=True, return_lse=True, backend=backend, **keys)
    ops.attention(q, k, v, **call)   # reads leftpad_k
    out, lse, g, g_lse, got = _attend_without_sync(q, k, v, call)
    cpu_keys = {n: t.cpu() for n, t in keys.items()}
    _assert_out_close(out, lse, q, k, v, causal=True, **cpu_keys)
    for b, s in enumerate(lead):
        assert (out[b, :s] == 0).all() and (got[0][b, :s] == 0).all()
        assert (got[1][b, :s] == 0).all() and (got[2][b, :s] == 0).all()
    exact = _exact_grads(q, k, v, g, g_lse, True, **cpu_keys)
    _assert_grads_close(got, exact)


# Calls the flash-decoding forward takes (csrc/attention/flash_decode_kernel.cuh: seqlen_q x
# heads / heads_k <= 16): one query of a group of 4 heads against 3000 keys (split over keys on
# any GPU), a KV cache filled to different lengths (a row using none) or left-padded (2
# queries, causal, a row whose keys start at its last), 4 queries x 4 heads
# under causal (speculative decoding: per-query masks), 16 queries of one head, packed
# sequences with keys of their own offsets (a sequence with no query, one longer than a chunk).
DECODE_CASES = {
    "gqa": dict(shape=(3, 1, 3000, 32, 8)),
    "kv-cache": dict(shape=(4, 1, 700, 8, 2), used=[0, 1, 333, 700]),
    "left-padded": dict(shape=(4, 2, 700, 8, 2), used=[700, 333, 700, 5], lead=[0, 100, 699, 5],
                        causal=True),
    "speculative": dict(shape=(2, 4, 777, 8, 2), causal=True),
    "mha-16": dict(shape=(1, 16, 129, 4, 4), causal=True),
    "varlen-k": dict(lengths=([1, 3, 0, 2], [3000, 3, 9, 130]), heads=(8, 2), causal=True),
    # a sliding window (the chunks split the window's keys only), and in a left-padded cache
    "sliding": dict(shape=(3, 1, 3000, 32, 8), window=(700, 0)),
    "sliding-left-padded": dict(shape=(4, 2, 700, 8, 2), used=[700, 333, 700, 5],
                                lead=[0, 100, 699, 5], causal=True, window=(100, 0)),
}


@pytest.mark.parametrize("device,backend", CUDA_ONLY)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 64, 72, 80, 96, 128])
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_cuda_flash_decode(monkeypatch, device, backend, dtype, head_dim, case):
    """The flash-decoding forward: out and lse against float64 within the dtype's rounding and
    as close to it as the prefill kernels' (PYSSM_FLASH_DECODE=0) on the same inputs; rows that
    see no key give 0 and lse -inf; gradients (the flash backward from the decoding kernel's
    out and lse) against float64; no synchronisation once the offsets / lengths are read."""
    c = DECODE_CASES[case]
    causal, window = c.get("causal", False), c.get("window", (-1, -1))
    call = dict(causal=causal, window_size=window, return_lse=True, backend=backend)
    if "lengths" in c:
        (lq, lk), (H, Hk) = c["lengths"], c["heads"]
        call.update(cu_seqlens=offsets(lq, device), cu_seqlens_k=offsets(lk, device))
        q_shape, kv_shape = (sum(lq), H, head_dim), (sum(lk), Hk, head_dim)
    else:
        B, Sq, Sk, H, Hk = c["shape"]
        q_shape, kv_shape = (B, Sq, H, head_dim), (B, Sk, Hk, head_dim)
        if "used" in c:
            call["seqused_k"] = torch.tensor(c["used"], dtype=torch.int32, device=device)
        if "lead" in c:
            call["leftpad_k"] = torch.tensor(c["lead"], dtype=torch.int32, device=device)
    q = torch.randn(q_shape, dtype=dtype, device=device, requires_grad=True)
    k, v = (torch.randn(kv_shape, dtype=dtype, device=device, requires_grad=True)
            for _ in range(2))
    monkeypatch.setenv("PYSSM_FLASH_DECODE", "0")
    prefill, prefill_lse = ops.attention(q, k, v, **call)   # (also reads offsets / lengths)
    monkeypatch.setenv("PYSSM_FLASH_DECODE", "1")
    out, lse, g, g_lse, got = _attend_without_sync(q, k, v, call)
    finite = torch.isfinite(lse)
    keys = {n: call[n].cpu() for n in ("cu_seqlens", "cu_seqlens_k", "seqused_k", "leftpad_k")
            if n in call}
    want, want_lse = ops.attention_reference(*(t.detach().cpu().double() for t in (q, k, v)),
                                             causal=causal, window_size=window, return_lse=True,
                                             **keys)
    assert torch.equal(finite.cpu(), torch.isfinite(want_lse))
    heads_first = out.detach().movedim(-2, 0)   # (H, ..., d): lse's row order
    assert (heads_first[~finite.movedim(-2, 0) if lse.dim() == 3 else ~finite] == 0).all(), \
        "a query that sees no key"
    eps = 2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7
    err = (out.detach().cpu().double() - want).abs().max()
    err_prefill = (prefill.detach().cpu().double() - want).abs().max()
    assert err <= 4 * eps * want.abs().max(), err
    assert err <= 2 * err_prefill + eps * want.abs().max(), (err, err_prefill)
    torch.testing.assert_close(lse.detach().cpu().double()[finite.cpu()],
                               want_lse[finite.cpu()], atol=2e-3, rtol=2e-3)
    exact = _exact_grads(q, k, v, g, g_lse, causal, window_size=window, **keys)
    _assert_grads_close(got, exact)


@pytest.mark.parametrize("device,backend", CUDA_ONLY)
@pytest.mark.parametrize("flash_path", FLASH_PATHS, indirect=True)
@pytest.mark.parametrize("head_dim", [64, 72, 128])
@pytest.mark.parametrize("lengths", [None, [0, 70, 70, 267]], ids=["dense", "varlen"])
def test_cuda_flash_reads_qkv_views_in_place_and_writes_dqkv(device, backend, flash_path,
                                                             head_dim, lengths):
    """q, k and v as views into one fused qkv (a token stride of 3 H d, read in place) give the
    values of contiguous copies: the output and dk, dv bit for bit, dq (summed by atomics, in
    no fixed order) within bf16 rounding; attention_qkvpacked's one gradient holds them in
    place. A view whose token stride is no multiple of 8 (copied first) agrees too, and so do
    q, k, v in torch SDPA's heads-first layout (read in place)."""
    H, dtype = 3, torch.bfloat16
    shape = (2, 197, 3, H, head_dim) if lengths is None else (267, 3, H, head_dim)
    cu = None if lengths is None else torch.tensor(lengths, dtype=torch.int32, device=device)
    packed = torch.randn(*shape, dtype=dtype, device=device, requires_grad=True)
    copies = [t.detach().contiguous().requires_grad_() for t in packed.unbind(-3)]
    want = ops.attention(*copies, cu_seqlens=cu, backend=backend)
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, copies, g)

    views = ops.attention(*packed.unbind(-3), cu_seqlens=cu, backend=backend)
    out = ops.attention_qkvpacked(packed, cu_seqlens=cu, backend=backend)
    assert torch.equal(views, want) and torch.equal(out, want)
    (dqkv,) = torch.autograd.grad(out, packed, g)
    dq, dk, dv = dqkv.unbind(-3)
    assert torch.equal(dk, want_grads[1]) and torch.equal(dv, want_grads[2])
    torch.testing.assert_close(dq, want_grads[0], rtol=0,
                               atol=2.0 ** -6 * float(want_grads[0].abs().max()))

    wide = torch.zeros(*shape[:-3], H * head_dim + 4, dtype=dtype, device=device)
    odd = wide[..., :H * head_dim].unflatten(-1, (H, head_dim))   # token stride H d + 4
    odd.copy_(copies[0])
    assert torch.equal(ops.attention(odd, *copies[1:], cu_seqlens=cu, backend=backend), want)

    # torch SDPA's heads-first layout, (B, H, N, d) or (H, T, d) transposed: read in place too
    def heads_first(t):
        return (t.transpose(0, 1).contiguous().transpose(0, 1) if cu is not None else
                t.transpose(1, 2).contiguous().transpose(1, 2)).detach().requires_grad_()
    firsts = [heads_first(t) for t in copies]
    got = ops.attention(*firsts, cu_seqlens=cu, backend=backend)
    assert torch.equal(got, want)
    got_grads = torch.autograd.grad(got, firsts, g)
    assert torch.equal(got_grads[1], want_grads[1]) and torch.equal(got_grads[2], want_grads[2])
    torch.testing.assert_close(got_grads[0], want_grads[0], rtol=0,
                               atol=2.0 ** -6 * float(want_grads[0].abs().max()))


# Sliding windows (window_size=(left, right), flash-attn's): query i sees key j when
# i + Sk - Sq - left <= j <= i + Sk - Sq + right, -1 a side without bound, causal right = 0.
WINDOWS = [(3, 0), (2, 2), (0, 0), (-1, 1), (4, -1), (0, -1), (20, 20)]
WINDOW_CASES = [  # batch, seqlen_q, seqlen_k, heads, heads_k, head_dim: Sq = Sk, <, >
    (2, 11, 11, 2, 1, 16), (1, 6, 13, 4, 2, 8), (2, 13, 6, 2, 2, 8)]


@pytest.mark.parametrize("device,backend", backend_params("attention"))
@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: "b{}q{}k{}h{}hk{}d{}".format(*c))
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"w{w[0]}_{w[1]}")
def test_window_matches_softmax_over_the_window(device, backend, case, window):
    """out, lse and gradients (through both) against the looped float64 definition
    (naive.attention); rows whose window holds no key give 0 and lse -inf."""
    q, k, v = qkv(*case, device=device, requires_grad=True)
    out, lse = ops.attention(q, k, v, window_size=window, return_lse=True, backend=backend)
    cpu = [t.detach().cpu().requires_grad_() for t in (q, k, v)]
    want_out, want_lse = naive.attention(*cpu, window_size=window)
    assert_out_lse_and_grads(out, lse, want_out, want_lse, (q, k, v), cpu)


@pytest.mark.parametrize("device,backend", backend_params("attention"))
@pytest.mark.parametrize("left", [-1, 0, 3])
def test_causal_is_a_window_right_of_zero(device, backend, left):
    """causal=True with window_size (left, -1) or (left, 0) equals window_size (left, 0)."""
    q, k, v = qkv(2, 9, 12, 2, 1, 16, device)
    want = ops.attention(q, k, v, window_size=(left, 0), backend=backend)
    for right in (-1, 0):
        got = ops.attention(q, k, v, causal=True, window_size=(left, right), backend=backend)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    if left == -1:
        torch.testing.assert_close(ops.attention(q, k, v, causal=True, backend=backend), want,
                                   atol=0, rtol=0)


@pytest.mark.parametrize("device,backend", backend_params("attention"))
@pytest.mark.parametrize("window", [(2, 0), (1, 3)], ids=lambda w: f"w{w[0]}_{w[1]}")
def test_window_with_packed_sequences_and_key_offsets(device, backend, window):
    """Packed sequences (the window aligned at each one's own keys' end): each equals
    attention over it alone, with keys sharing q's offsets and with offsets of their own;
    out, lse and gradients against float64 sequence by sequence."""
    lq, lk = [4, 0, 9, 1], [7, 3, 9, 0]
    for keys_own in (False, True):
        lengths_k = lk if keys_own else lq
        q = torch.randn(sum(lq), 2, 8, dtype=F64, device=device, requires_grad=True)
        k, v = (torch.randn(sum(lengths_k), 1, 8, dtype=F64, device=device, requires_grad=True)
                for _ in range(2))
        extra = dict(cu_seqlens_k=offsets(lk, device)) if keys_own else {}
        out, lse = ops.attention(q, k, v, cu_seqlens=offsets(lq, device), window_size=window,
                                 return_lse=True, backend=backend, **extra)
        cpu = [t.detach().cpu().requires_grad_() for t in (q, k, v)]
        outs, lses, a, c = [], [], 0, 0
        for n, m in zip(lq, lengths_k):
            o, l_ = naive.attention(cpu[0][None, a:a + n], cpu[1][None, c:c + m],
                                    cpu[2][None, c:c + m], window_size=window)
            outs.append(o[0])
            lses.append(l_[0])
            a, c = a + n, c + m
        assert_out_lse_and_grads(out, lse, torch.cat(outs), torch.cat(lses, -1), (q, k, v), cpu)


@pytest.mark.parametrize("device,backend", backend_params("attention"))
def test_window_in_a_left_padded_cache(device, backend):
    """seqused_k and leftpad_k with a window: row b's keys are [lead, used), the window aligned
    at used; keys outside every query's window get zero gradient."""
    used, lead, window = [9, 5, 9, 0], [0, 2, 6, 0], (2, 0)
    q = torch.randn(4, 3, 2, 8, dtype=F64, device=device, requires_grad=True)
    k, v = (torch.randn(4, 9, 1, 8, dtype=F64, device=device, requires_grad=True)
            for _ in range(2))
    rows = dict(seqused_k=torch.tensor(used, dtype=torch.int32, device=device),
                leftpad_k=torch.tensor(lead, dtype=torch.int32, device=device))
    out, lse = ops.attention(q, k, v, causal=True, window_size=window, return_lse=True,
                             backend=backend, **rows)
    cpu = [t.detach().cpu().requires_grad_() for t in (q, k, v)]
    parts = [naive.attention(cpu[0][b:b + 1], cpu[1][b:b + 1, s:u], cpu[2][b:b + 1, s:u],
                             causal=True, window_size=window)
             for b, (s, u) in enumerate(zip(lead, used))]
    got = assert_out_lse_and_grads(out, lse, torch.cat([o for o, _ in parts]),
                                   torch.cat([l_ for _, l_ in parts]), (q, k, v), cpu)
    for b, u in enumerate(used):   # 3 queries, each seeing itself and 2 back: keys >= u - 5
        first = max(lead[b], u - 5)
        for g in got[1:]:
            assert (g[b, :first] == 0).all() and (g[b, u:] == 0).all()


@pytest.mark.parametrize("device,backend", backend_params("attention"))
@pytest.mark.parametrize("extra", [dict(window_size=(3, 1)), dict(causal=True, softcap=0.8)],
                         ids=["window", "softcap"])
def test_qkvpacked_window_or_softcap_equals_attention(device, backend, extra):
    """A window or a cap: qkvpacked runs as attention on qkv's views, the same values and
    gradients."""
    qkv_t = torch.randn(2, 10, 3, 2, 16, dtype=F64, device=device, requires_grad=True)
    got = ops.attention_qkvpacked(qkv_t, backend=backend, **extra)
    want = ops.attention(*qkv_t.unbind(2), backend=backend, **extra)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    g = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, qkv_t, g)[0],
                               torch.autograd.grad(want, qkv_t, g)[0], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_window(backend):
    q, k, v = qkv(1, 4, 4, 1, 1, 8, "cpu")
    for bad, match in (((-2, 0), "each >= 0 or -1"), ((1.5, 0), "each >= 0 or -1"),
                       ((True, 0), "each >= 0 or -1"), ((1, 2, 3), "a pair"), (4, "a pair")):
        with pytest.raises(ValueError, match=match):
            ops.attention(q, k, v, window_size=bad, backend=backend)
    with pytest.raises(ValueError, match="causal=True bounds each query"):
        ops.attention(q, k, v, causal=True, window_size=(2, 1), backend=backend)


@pytest.mark.skipif(not _extension.available(), reason="needs the compiled extension")
def test_direct_op_call_checks_the_window():
    q, k, v = qkv(1, 4, 4, 1, 1, 8, "cpu")
    with pytest.raises(ValueError, match="window_left and window_right must be >= 0, or -1"):
        torch.ops.pyssm.attention(q, k, v, False, None, None, None, window_left=-3)
    with pytest.raises(ValueError, match="causal=True bounds each query"):
        torch.ops.pyssm.attention(q, k, v, True, None, None, None, window_right=2)


@pytest.mark.parametrize("device,backend", [p for p in backend_params("attention")
                                            if p.values[1] != "reference"])
def test_window_opcheck(device, backend):
    q, k, v = qkv(2, 5, 7, 4, 2, 32, device, requires_grad=True)
    torch.library.opcheck(torch.ops.pyssm.attention.default,
                          (q, k, v, False, None, None, None),
                          dict(window_left=2, window_right=1))
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=device)
    packed = [torch.randn(8, 2, 32, dtype=F64, device=device, requires_grad=True) for _ in range(3)]
    torch.library.opcheck(torch.ops.pyssm.attention.default,
                          (*packed, True, None, cu, 5), dict(window_left=1, window_right=0))


@pytest.mark.parametrize("device,backend", CUDA_ONLY)
@pytest.mark.parametrize("flash_path", FLASH_PATHS, indirect=True)
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("window,causal", [((256, 0), True), ((100, 150), False),
                                           ((-1, 40), False)], ids=["causal-256", "100-150",
                                                                    "right-40"])
def test_cuda_flash_sliding_window(device, backend, flash_path, head_dim, window, causal):
    """The flash kernels' windows: 1100 queries against 1000 keys (bands across many key
    tiles, rows that see no key under right 40) and packed sequences, forward and gradients
    against float64 within bf16's rounding, no synchronisation, zero gradient outside every
    window."""
    for packed in (False, True):
        call = dict(causal=causal, window_size=window, return_lse=True, backend=backend)
        q, k, v = _bf16_case(packed, 1100, head_dim, device, call)
        ops.attention(q, k, v, **call)   # (reads the offsets once)
        out, lse, g, g_lse, got = _attend_without_sync(q, k, v, call)
        keys = {n: call[n].cpu() for n in ("cu_seqlens",) if n in call}
        _assert_out_close(out, lse, q, k, v, causal=causal, window_size=window, **keys)
        exact = _exact_grads(q, k, v, g, g_lse, causal, window_size=window, **keys)
        _assert_grads_close(got, exact)
        for name, a, x in zip("qkv", got, exact):
            assert (a.cpu()[x == 0] == 0).all(), f"d{name} outside every window"


# Soft-capping (softcap=c > 0, flash-attn's and Gemma 2's): each score s becomes c tanh(s / c).
# Caps of 0.7 (most scores well into tanh's flat part) and 30 (Gemma 2's attention cap 50 at
# these score sizes: nearly linear).
SOFTCAPS = [0.7, 30.0]


@pytest.mark.parametrize("device,backend", backend_params("attention"))
@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: "b{}q{}k{}h{}hk{}d{}".format(*c))
@pytest.mark.parametrize("mask", [dict(), dict(causal=True), dict(window_size=(2, 1))],
                         ids=["full", "causal", "window"])
@pytest.mark.parametrize("softcap", SOFTCAPS)
def test_softcap_matches_the_capped_softmax(device, backend, case, mask, softcap):
    """out, lse and gradients (through both) against the looped float64 definition with each
    score capped (naive.attention), scale 0.9 so the cap does not sit on the default one."""
    q, k, v = qkv(*case, device=device, requires_grad=True)
    out, lse = ops.attention(q, k, v, softmax_scale=0.9, softcap=softcap, return_lse=True,
                             backend=backend, **mask)
    cpu = [t.detach().cpu().requires_grad_() for t in (q, k, v)]
    want_out, want_lse = naive.attention(*cpu, softmax_scale=0.9, softcap=softcap, **mask)
    assert_out_lse_and_grads(out, lse, want_out, want_lse, (q, k, v), cpu)
    if softcap < 1:   # (the cap changed the result: the test can tell)
        assert not torch.allclose(out, ops.attention(q, k, v, softmax_scale=0.9,
                                                     backend=backend, **mask))


@pytest.mark.parametrize("device,backend", backend_params("attention"))
def test_softcap_with_packed_sequences_and_a_padded_cache(device, backend):
    """The cap with the key arguments: packed sequences with keys of their own, and a dense
    batch reading each row's keys [leftpad_k, seqused_k); against float64 row by row."""
    lq, lk = [4, 0, 9, 1], [7, 3, 9, 0]
    q = torch.randn(sum(lq), 2, 8, dtype=F64, device=device, requires_grad=True)
    k, v = (torch.randn(sum(lk), 1, 8, dtype=F64, device=device, requires_grad=True)
            for _ in range(2))
    out, lse = ops.attention(q, k, v, cu_seqlens=offsets(lq, device),
                             cu_seqlens_k=offsets(lk, device), causal=True, softcap=1.5,
                             return_lse=True, backend=backend)
    cpu = [t.detach().cpu().requires_grad_() for t in (q, k, v)]
    outs, lses, a, c = [], [], 0, 0
    for n, m in zip(lq, lk):
        o, l_ = naive.attention(cpu[0][None, a:a + n], cpu[1][None, c:c + m],
                                cpu[2][None, c:c + m], causal=True, softcap=1.5)
        outs.append(o[0])
        lses.append(l_[0])
        a, c = a + n, c + m
    assert_out_lse_and_grads(out, lse, torch.cat(outs), torch.cat(lses, -1), (q, k, v), cpu)

    used, lead = [9, 5, 9, 0], [0, 2, 6, 0]
    q = torch.randn(4, 3, 2, 8, dtype=F64, device=device, requires_grad=True)
    k, v = (torch.randn(4, 9, 1, 8, dtype=F64, device=device, requires_grad=True)
            for _ in range(2))
    rows = dict(seqused_k=torch.tensor(used, dtype=torch.int32, device=device),
                leftpad_k=torch.tensor(lead, dtype=torch.int32, device=device))
    out, lse = ops.attention(q, k, v, causal=True, softcap=1.5, return_lse=True,
                             backend=backend, **rows)
    cpu = [t.detach().cpu().requires_grad_() for t in (q, k, v)]
    parts = [naive.attention(cpu[0][b:b + 1], cpu[1][b:b + 1, s:u], cpu[2][b:b + 1, s:u],
                             causal=True, softcap=1.5)
             for b, (s, u) in enumerate(zip(lead, used))]
    assert_out_lse_and_grads(out, lse, torch.cat([o for o, _ in parts]),
                             torch.cat([l_ for _, l_ in parts]), (q, k, v), cpu)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_softcap(backend):
    q, k, v = qkv(1, 4, 4, 1, 1, 8, "cpu")
    for bad in (-1.0, float("nan"), float("inf"), True, "50", None):
        with pytest.raises(ValueError, match="softcap must be a finite number >= 0"):
            ops.attention(q, k, v, softcap=bad, backend=backend)
    torch.testing.assert_close(ops.attention(q, k, v, softcap=0, backend=backend),
                               ops.attention(q, k, v, backend=backend), atol=0, rtol=0)


@pytest.mark.skipif(not _extension.available(), reason="needs the compiled extension")
def test_direct_op_call_checks_the_softcap():
    q, k, v = qkv(1, 4, 4, 1, 1, 8, "cpu")
    for bad in (-0.5, float("nan")):
        with pytest.raises(ValueError, match="softcap must be a finite number >= 0"):
            torch.ops.pyssm.attention(q, k, v, False, None, None, None, softcap=bad)


@pytest.mark.parametrize("device,backend", [p for p in backend_params("attention")
                                            if p.values[1] != "reference"])
def test_softcap_opcheck(device, backend):
    q, k, v = qkv(2, 5, 7, 4, 2, 32, device, requires_grad=True)
    torch.library.opcheck(torch.ops.pyssm.attention.default,
                          (q, k, v, True, None, None, None), dict(softcap=2.0))


@pytest.mark.parametrize("device,backend", CUDA_ONLY)
@pytest.mark.parametrize("flash_path", FLASH_PATHS, indirect=True)
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_softcap(device, backend, flash_path, head_dim, causal):
    """bf16 with Gemma 2's cap (50) and a tight one (2): 700 queries against 1000 keys and
    packed sequences, forward and gradients against float64 within bf16's rounding."""
    for softcap in (50.0, 2.0):
        for packed in (False, True):
            call = dict(causal=causal, softcap=softcap, return_lse=True, backend=backend)
            q, k, v = _bf16_case(packed, 700, head_dim, device, call)
            out, lse = ops.attention(q, k, v, **call)
            g = torch.randn_like(out)
            got = torch.autograd.grad(out, (q, k, v), g)
            keys = {n: call[n].cpu() for n in ("cu_seqlens",) if n in call}
            _assert_out_close(out, lse, q, k, v, causal=causal, softcap=softcap, **keys)
            exact = _exact_grads(q, k, v, g, None, causal, softcap=softcap, **keys)
            _assert_grads_close(got, exact)


# The composed path (the CPU kernel; on CUDA float64 and the head sizes the flash kernels do not
# take) cuts each chunk of sequences into pieces of queries within PYSSM_COMPOSED_SCORES score
# elements, each piece over only the keys its rows' windows reach.
COMPOSED = [p for p in backend_params("attention") if p.id != "reference"]
PIECE_CASES = [  # batch, seqlen_q, seqlen_k, heads, heads_k, head_dim, causal, window, softcap
    (3, 11, 11, 2, 1, 8, False, (-1, -1), 0.0), (2, 9, 13, 4, 2, 8, True, (-1, -1), 0.0),
    (2, 13, 6, 2, 2, 8, True, (3, -1), 0.0), (1, 12, 12, 2, 1, 16, False, (2, 2), 5.0),
    (2, 7, 12, 2, 2, 8, False, (-1, 1), 0.0), (2, 10, 10, 3, 1, 8, False, (4, 0), 2.0)]


@pytest.mark.parametrize("device,backend", COMPOSED)
@pytest.mark.parametrize("case", PIECE_CASES,
                         ids=lambda c: "b{}q{}k{}h{}hk{}d{}-causal{}-w{}_{}-cap{}".format(
                             *c[:7], *c[7], c[8]))
@pytest.mark.parametrize("budget", [1, 23, 150, 1000])
def test_composed_pieces_against_float64(device, backend, case, budget, monkeypatch):
    """With a score budget of one element (a query a piece, a batch row a chunk) up to a
    whole chunk: out, lse and gradients (through both) against the looped float64 definition,
    rows that see no key 0 with lse -inf."""
    monkeypatch.setenv("PYSSM_COMPOSED_SCORES", str(budget))
    *sizes, causal, window, softcap = case
    q, k, v = qkv(*sizes, device=device, requires_grad=True)
    out, lse = ops.attention(q, k, v, causal=causal, window_size=window, softcap=softcap,
                             return_lse=True, backend=backend)
    cpu = [t.detach().cpu().requires_grad_() for t in (q, k, v)]
    want_out, want_lse = naive.attention(*cpu, causal, None, window, softcap)
    assert_out_lse_and_grads(out, lse, want_out, want_lse, (q, k, v), cpu)


@pytest.mark.parametrize("device,backend", COMPOSED)
@pytest.mark.parametrize("budget", [1, 40])
def test_composed_pieces_with_packed_sequences_and_key_ranges(device, backend, budget,
                                                             monkeypatch):
    """Packed sequences with keys of their own (a window, and causal), and dense rows with
    seqused_k and leftpad_k: out, lse and gradients in pieces equal those in one piece (which
    the tests above check against float64) to rounding."""
    def run(budget, window, **kw):
        monkeypatch.setenv("PYSSM_COMPOSED_SCORES", str(budget))
        out, lse = ops.attention(*inputs, window_size=window, return_lse=True, backend=backend,
                                 **kw)
        finite = torch.isfinite(lse)
        loss = (out * g).sum() + (lse * torch.where(finite, g_lse, 0)).nan_to_num().sum()
        return (out, lse, *torch.autograd.grad(loss, inputs))

    lq, lk = [4, 0, 9, 1], [7, 3, 9, 0]
    packed = dict(cu_seqlens=offsets(lq, device), cu_seqlens_k=offsets(lk, device))
    q = torch.randn(sum(lq), 2, 8, dtype=F64, device=device, requires_grad=True)
    k, v = (torch.randn(sum(lk), 1, 8, dtype=F64, device=device, requires_grad=True)
            for _ in range(2))
    dense_q, dense_k, dense_v = qkv(3, 5, 9, 2, 2, 8, device, requires_grad=True)
    ranges = dict(seqused_k=torch.tensor([9, 4, 6], dtype=torch.int32, device=device),
                  leftpad_k=torch.tensor([0, 2, 5], dtype=torch.int32, device=device))
    for inputs, window, kw in [((q, k, v), (2, 0), packed), ((q, k, v), (-1, -1), packed),
                               ((dense_q, dense_k, dense_v), (1, 0), ranges)]:
        g = torch.randn_like(inputs[0])
        g_lse = torch.randn(inputs[0].shape[0], 2, inputs[0].shape[1], dtype=F64, device=device)
        if "cu_seqlens" in kw:
            g_lse = torch.randn(2, inputs[0].shape[0], dtype=F64, device=device)
        whole = run(1 << 30, window, **kw)
        for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], run(budget, window, **kw),
                              whole):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=name)


@pytest.mark.parametrize("device,backend", COMPOSED)
def test_composed_pieces_read_only_the_keys_their_rows_see(device, backend, monkeypatch):
    """A query a piece: a NaN value at a key no row but the last sees (causal), or that only
    the first rows see (a window of 2 left), reaches those rows' outputs and no other."""
    monkeypatch.setenv("PYSSM_COMPOSED_SCORES", "1")
    q, k, v = qkv(1, 9, 9, 2, 1, 8, device)
    for window, key, seen in [((-1, 0), 8, [8]), ((2, 0), 0, [0, 1, 2])]:
        poisoned = v.clone()
        poisoned[:, key] = float("nan")
        out = ops.attention(q, k, poisoned, window_size=window, backend=backend)
        nan_rows = out.isnan().any(-1).any(-1)[0].nonzero()[:, 0].tolist()
        assert nan_rows == seen, window


@pytest.mark.parametrize("value", ["0", "-3", "lots", "1.5"])
def test_bad_composed_score_budget(value, monkeypatch):
    monkeypatch.setenv("PYSSM_COMPOSED_SCORES", value)
    q, k, v = qkv(1, 3, 3, 1, 1, 8, "cpu")
    with pytest.raises(ValueError, match=f"PYSSM_COMPOSED_SCORES must be a positive number of "
                                         f"score elements, got '{value}'"):
        ops.attention(q, k, v, backend="cpu")


@pytest.mark.parametrize("device,backend", backend_params("attention"))
@pytest.mark.parametrize("budget", ["1", "16777216"])
def test_window_bounds_past_any_sequence_are_no_bounds(device, backend, budget, monkeypatch):
    """A window bound far past the sequence (up to int64's largest) sees what no bound sees,
    on both sides, with causal too; the composed path in pieces of one query and in one."""
    monkeypatch.setenv("PYSSM_COMPOSED_SCORES", budget)
    q, k, v = qkv(2, 9, 12, 2, 1, 8, device)
    free = ops.attention(q, k, v, backend=backend)
    causal = ops.attention(q, k, v, causal=True, backend=backend)
    for bound in (2 ** 40, 2 ** 62, 2 ** 63 - 1):
        torch.testing.assert_close(ops.attention(q, k, v, window_size=(bound, bound),
                                                 backend=backend), free, atol=0, rtol=0)
        torch.testing.assert_close(ops.attention(q, k, v, window_size=(bound, 0),
                                                 backend=backend), causal, atol=0, rtol=0)
        if backend != "reference":   # the op itself, without the Python wrapper's clamp
            torch.testing.assert_close(torch.ops.pyssm.attention(
                q, k, v, False, None, None, None, window_left=bound, window_right=bound)[0],
                free, atol=0, rtol=0)
