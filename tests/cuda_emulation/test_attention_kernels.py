"""The flash-attention CUDA kernels (forward and backward, the portable ones and the Hopper
ones), run on the CPU in cuda_emulation.h's emulation (warps, shuffles, mma.sync, ldmatrix and
cp.async; for the Hopper kernels TMA, mbarriers, named barriers and wgmma, from the PTX ISA's
definitions), against float64 attention from the same rounded inputs.

The torch-side glue (csrc/attention/attention_cuda.cpp: layouts, workspaces) is redone here;
on a GPU the op tests cover the glue itself. Skipped without g++ or the CUDA headers.
"""

from __future__ import annotations

import ctypes
import math

import pytest
import torch
from emulation import build, poisoned, ptr, sizes

from pyssm import ops

CODES = {torch.float16: 2, torch.bfloat16: 3}
EPS = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    lib = build(tmp_path_factory, "attention_kernels.cpp")
    lib.emu_flash_fwd_any.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * 11 + \
        [ctypes.c_float, ctypes.c_void_p, ctypes.c_float]
    lib.emu_flash_bwd_any.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * 18 + \
        [ctypes.c_float, ctypes.c_void_p, ctypes.c_float]
    return lib


# A case's `causal`: False, True, or a sliding window (left, right) (flash-attn's window_size,
# -1 a side without bound) with causal False.
def mask_args(causal):
    """The reference's mask arguments for a case's `causal`."""
    if isinstance(causal, tuple):
        return dict(causal=False, window_size=causal)
    return dict(causal=causal, window_size=(-1, -1))


def mask_codes(causal):
    """The harness's mask argument: causal, window_left, window_right."""
    m = mask_args(causal)
    return sizes(int(m["causal"]), *m["window_size"])


# A case's `lengths`: None (a dense batch), the packed sequences' lengths (keys packed with
# the queries), a pair (query lengths, key lengths): keys with offsets of their own
# (cu_seqlens_k), or {"used": [...], "lead": [...]} (either or both): a dense batch using
# each row's keys [lead, used) (seqused_k, leftpad_k).
def split_lengths(lengths):
    return lengths if isinstance(lengths, tuple) else (lengths, None)


def dense(lengths):
    return lengths is None or isinstance(lengths, dict)


def cumulative(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def offsets(lengths):
    """(cu_seqlens, cu_seqlens_k) of a case's lengths (None where not packed / shared)."""
    if dense(lengths):
        return None, None
    lq, lk = split_lengths(lengths)
    return cumulative(lq), None if lk is None else cumulative(lk)


def seqused(lengths):
    if isinstance(lengths, dict) and "used" in lengths:
        return torch.tensor(lengths["used"], dtype=torch.int32)
    return None


def leftpad(lengths):
    if isinstance(lengths, dict) and "lead" in lengths:
        return torch.tensor(lengths["lead"], dtype=torch.int32)
    return None


def key_args(lengths):
    """The reference's arguments for a case's lengths."""
    cu, cu_k = offsets(lengths)
    return dict(cu_seqlens=cu, cu_seqlens_k=cu_k, seqused_k=seqused(lengths),
                leftpad_k=leftpad(lengths))


def layout(B, Sq, Sk, H, Hk, lengths):
    """(batch, seqlen_q, seqlen_k, total_q, total_k, cu_seqlens, cu_seqlens_k) as
    attention_cuda.cpp sets them."""
    if dense(lengths):
        return B, Sq, Sk, B * Sq, B * Sk, None, None
    lq, lk = split_lengths(lengths)
    cu, cu_k = offsets(lengths)
    lk = lq if lk is None else lk
    return len(lq), max(lq), max(lk), sum(lq), sum(lk), cu, cu_k


def case_id(case):
    """b{B}q{Sq}k{Sk}h{H}hk{Hk}d{d}c{causal} (w{left}_{right} for a window), -varlen for
    packed sequences, -varlen-k where the keys have offsets of their own, -used / -lead for
    seqused_k / leftpad_k."""
    lengths, causal = case[7], case[6]
    mask = f"w{causal[0]}_{causal[1]}" if isinstance(causal, tuple) else f"c{causal:d}"
    head = "b{}q{}k{}h{}hk{}d{}".format(*case[:6]) + mask
    if isinstance(lengths, dict):
        return head + "".join(f"-{name}" for name in ("used", "lead") if name in lengths)
    return head + (
        "" if lengths is None else "-varlen-k" if isinstance(lengths, tuple) else "-varlen")


def inputs(dtype, B, Sq, Sk, H, Hk, d, lengths):
    if dense(lengths):
        return (torch.randn(B, Sq, H, d, dtype=dtype), torch.randn(B, Sk, Hk, d, dtype=dtype),
                torch.randn(B, Sk, Hk, d, dtype=dtype))
    lq, lk = split_lengths(lengths)
    total_q, total_k = sum(lq), sum(lq if lk is None else lk)
    return (torch.randn(total_q, H, d, dtype=dtype), torch.randn(total_k, Hk, d, dtype=dtype),
            torch.randn(total_k, Hk, d, dtype=dtype))


def strides_of(t):
    """(token, head, batch) strides of a (B, S, H, d) or (T, H, d) tensor with head_dim
    contiguous (FlashParams' TokenLayout), as attention_cuda.cpp's in_place_layout sets them:
    a size-1 dimension's stride replaced by its contiguous value."""
    *lead, H, d = t.shape
    assert t.stride(-1) == 1
    S = lead[-1]
    return (t.stride(-3) if S > 1 else H * d, t.stride(-2) if H > 1 else d,
            t.stride(0) if len(lead) == 2 and lead[0] > 1 else S * H * d)


def token_stride(t):
    """The token stride of a gradient buffer with packed heads (dq_row, dkv_row)."""
    row, head, _ = strides_of(t)
    assert head == t.shape[-1]
    return row


def spread(t, pad, fill=float("nan")):
    """t as a view whose tokens are heads * d + pad elements apart, the pad elements `fill`
    (NaN: an input the kernels must not read there; a sentinel: an output they must not write
    there), and the buffer behind it."""
    *lead, H, d = t.shape
    tokens, row = math.prod(lead), H * d + pad
    buf = torch.full((tokens, row), fill, dtype=t.dtype)
    buf[:, :H * d] = t.reshape(tokens, H * d)
    strides = (lead[1] * row, row, d, 1) if len(lead) == 2 else (row, d, 1)
    return buf.as_strided(t.shape, strides), buf


def forward_emulated(emu, q, k, v, causal, scale, lengths, sm90=False, softcap=0.0):
    """q, k and v may be strided as FlashParams allows (strides_of; k's and v's equal)."""
    H, Hk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    B, Sq, Sk = (q.shape[0], q.shape[1], k.shape[1]) if dense(lengths) else (0, 0, 0)
    batch, seqlen_q, seqlen_k, total_q, total_k, cu, cu_k = layout(B, Sq, Sk, H, Hk, lengths)
    used, lead = seqused(lengths), leftpad(lengths)
    assert strides_of(k) == strides_of(v)
    out = poisoned(*q.shape, dtype=q.dtype)
    lse = poisoned(*((batch, H, seqlen_q) if cu is None else (H, total_q)), dtype=torch.float32)
    rows = sizes(*strides_of(q), *strides_of(k))
    rc = emu.emu_flash_fwd_any(int(sm90), CODES[q.dtype], d, ptr(q), ptr(k), ptr(v), rows,
                               ptr(out), ptr(lse), ptr(cu), ptr(cu_k), ptr(used), ptr(lead),
                               sizes(batch, H, Hk, seqlen_q, seqlen_k, total_q, total_k), scale,
                               mask_codes(causal), softcap)
    assert rc == 0, f"launcher returned cudaError {rc}"
    return out, lse


def backward_emulated(emu, q, k, v, out, dout, lse, causal, scale, lengths, sm90=0, grads=None,
                      softcap=0.0, rc_expected=0):
    """sm90: 0 the portable backward, 1 the Hopper one (dQ by TMA reduce-adds), 2 the Hopper
    one with dQ by atomics (PYSSM_FLASH_SM90_DQ=atomic). grads: dq, dk, dv to write (strided
    as FlashBwdParams allows), else fresh poisoned ones."""
    H, Hk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    B, Sq, Sk = (q.shape[0], q.shape[1], k.shape[1]) if dense(lengths) else (0, 0, 0)
    batch, seqlen_q, seqlen_k, total_q, total_k, cu, cu_k = layout(B, Sq, Sk, H, Hk, lengths)
    used, lead = seqused(lengths), leftpad(lengths)
    dq, dk, dv = grads or (poisoned(*t.shape, dtype=t.dtype) for t in (q, k, v))
    if used is not None or lead is not None:   # as attention_cuda.cpp: the used keys' only
        dk.zero_()
        dv.zero_()
    assert strides_of(k) == strides_of(v) and token_stride(dk) == token_stride(dv)
    delta = poisoned(*lse.shape, dtype=torch.float32)
    dq_accum = poisoned(*q.shape, dtype=torch.float32)
    rows = sizes(*strides_of(q), *strides_of(k), token_stride(dq), token_stride(dk))
    rc = emu.emu_flash_bwd_any(int(sm90), CODES[q.dtype], d, ptr(q), ptr(k), ptr(v), rows,
                               ptr(out), ptr(dout), ptr(dq), ptr(dk), ptr(dv), ptr(lse), None,
                               ptr(delta), ptr(dq_accum), ptr(cu), ptr(cu_k), ptr(used),
                               ptr(lead),
                               sizes(batch, H, Hk, seqlen_q, seqlen_k, total_q, total_k), scale,
                               mask_codes(causal), softcap)
    assert rc == rc_expected, f"launcher returned cudaError {rc}"
    return dq, dk, dv


def check_forward(out, lse, exact_in, causal, dtype, cu_seqlens=None, cu_seqlens_k=None,
                  seqused_k=None, leftpad_k=None, softcap=0.0, scale=None):
    """out within 4 eps of the dtype of float64 attention from the same rounded inputs, lse
    within 1e-3, and -inf exactly on the rows that see no key; returns the float64 output."""
    want, want_lse = ops.attention_reference(*exact_in, **mask_args(causal), cu_seqlens=cu_seqlens,
                                             cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k,
                                             leftpad_k=leftpad_k, softcap=softcap,
                                             softmax_scale=scale, return_lse=True)
    bound = 4 * EPS[dtype] * want.abs().max()
    assert (out.double() - want).abs().max() <= bound, "out"
    visible = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), visible), "lse: the rows that see no key"
    assert torch.all((lse.double() - want_lse)[visible].abs() <= 1e-3), "lse"
    return want


def check_grads(got, exact, dout, v, dtype):
    """dq, dk, dv within 8 eps of the dtype of float64 autograd; with one key the exact dq is 0
    and only fp32 rounding of dP - Delta is left (as in tests/ops: a floor of 1e-5 |dO| |V|)."""
    floor = 1e-5 * float(dout.abs().max()) * float(v.abs().max())
    for name, a, b in zip("qkv", got, exact):
        err = (a.double() - b).abs().max()
        assert err <= 8 * EPS[dtype] * b.abs().max() + floor, (f"d{name}", float(err))


# (B, Sq, Sk, H, Hk, head_dim, causal, lengths): a tail tile, Sq != Sk under causal, grouped
# heads, head_dim 72 (padded to 80 in the reduction only), one key, packed sequences (0 long),
# several query blocks of the forward's 128 rows (head_dim <= 64) and of the backward's tiles.
CASES = [
    (1, 97, 97, 2, 1, 64, False, None),
    (1, 33, 70, 2, 2, 72, True, None),
    (2, 17, 17, 1, 1, 128, False, None),
    (1, 5, 1, 2, 2, 32, False, None),
    (0, 0, 0, 2, 1, 80, True, [0, 1, 65, 17]),
    (1, 200, 150, 2, 1, 64, True, None),   # two 128-row blocks (2 row tiles per warp), causal
    (1, 130, 130, 1, 1, 32, False, None),
    (1, 128, 129, 1, 1, 64, True, None),   # a full block's last row sees one key past a tile
    # keys with offsets of their own: Sq < Sk under causal, no query (dk, dv zeros), Sq > Sk
    # (rows that see no key), no key (out 0, lse -inf), one query against two key blocks
    (0, 0, 0, 2, 1, 64, True, ([5, 0, 130, 17, 1], [9, 4, 70, 0, 200])),
    (0, 0, 0, 2, 2, 72, False, ([1, 3, 70], [140, 0, 9])),
    # a dense batch using each row's first keys (seqused_k: a KV cache): none, one, a key
    # block and a bit, all of them; causal (bottom-right at the used length)
    (4, 3, 150, 2, 1, 64, True, {"used": [0, 1, 70, 150]}),
    (2, 1, 40, 2, 2, 128, False, {"used": [33, 7]}),
    # a left-padded cache (leftpad_k): keys [lead, used) of each row: none (lead = used), one,
    # a key block and a bit from past the first, all of them; and lead alone (keys to the end)
    (4, 3, 150, 2, 1, 64, True, {"used": [70, 150, 150, 150], "lead": [70, 149, 5, 0]}),
    (2, 2, 100, 2, 2, 72, False, {"lead": [3, 99]}),
    # a padded prefill read in place (the transformers backend): causal, Sq = Sk, lead alone,
    # so the queries before each row's lead see no key (out 0, lse -inf, dq 0)
    (3, 140, 140, 2, 1, 64, True, {"lead": [0, 37, 139]}),
    # sliding windows (left, right): causal with 70 keys back (later blocks start past key 0,
    # tiles inside the band unmasked), two-sided with Sq < Sk, left only, right only with
    # Sq > Sk (rows that see no key), the diagonal alone, key blocks no query sees (dk, dv 0),
    # packed sequences, keys of their own offsets, a left-padded cache
    (1, 300, 300, 2, 1, 64, (70, 0), None),
    (1, 200, 250, 2, 2, 72, (30, 20), None),
    (2, 150, 100, 1, 1, 32, (5, -1), None),
    (2, 150, 100, 1, 1, 128, (-1, 5), None),
    (1, 70, 70, 1, 1, 64, (0, 0), None),
    (1, 150, 400, 2, 1, 64, (20, 0), None),
    (0, 0, 0, 2, 1, 64, (40, 10), [0, 1, 200, 65]),
    (0, 0, 0, 2, 1, 80, (16, 0), ([5, 130, 1], [9, 200, 300])),
    (3, 3, 300, 2, 1, 64, (100, 0), {"used": [300, 150, 20], "lead": [0, 30, 0]}),
]
IDS = [case_id(c) for c in CASES]


@pytest.mark.parametrize("dtype", list(CODES))
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_flash_forward_and_backward(emu, case, dtype):
    B, Sq, Sk, H, Hk, d, causal, lengths = case
    q, k, v = inputs(dtype, B, Sq, Sk, H, Hk, d, lengths)
    scale = 1.0 / math.sqrt(d)
    keys = key_args(lengths)
    out, lse = forward_emulated(emu, q, k, v, causal, scale, lengths)
    exact_in = [t.double().requires_grad_() for t in (q, k, v)]
    want = check_forward(out, lse, exact_in, causal, dtype, **keys)

    dout = torch.randn_like(q)
    got = backward_emulated(emu, q, k, v, out, dout, lse, causal, scale, lengths)
    grads = torch.autograd.grad(want, exact_in, dout.double())
    check_grads(got, grads, dout, v, dtype)


# The portable forward at head_dim 256 (32-key tiles: Traits::kBlockN; its backward is the
# composed path's): one tile and several, a tail tile, causal with Sq > Sk (rows that see no
# key), grouped heads, packed sequences with keys of their own offsets (an empty one), a
# sliding window, seqused_k with leftpad_k.
HD256_CASES = [
    (1, 17, 17, 1, 1, 256, False, None),
    (1, 70, 97, 2, 1, 256, True, None),
    (2, 40, 20, 1, 1, 256, True, None),
    (0, 0, 0, 2, 1, 256, False, ([5, 0, 70], [33, 4, 1])),
    (1, 90, 90, 1, 1, 256, (20, 0), None),
    (3, 2, 70, 2, 2, 256, True, {"used": [70, 33, 1], "lead": [0, 3, 0]}),
]


@pytest.mark.parametrize("dtype", list(CODES))
@pytest.mark.parametrize("case", HD256_CASES, ids=[case_id(c) for c in HD256_CASES])
def test_flash_forward_head_dim_256(emu, case, dtype):
    B, Sq, Sk, H, Hk, d, causal, lengths = case
    q, k, v = inputs(dtype, B, Sq, Sk, H, Hk, d, lengths)
    out, lse = forward_emulated(emu, q, k, v, causal, 1.0 / math.sqrt(d), lengths)
    check_forward(out, lse, [t.double() for t in (q, k, v)], causal, dtype, **key_args(lengths))


# The Hopper forward (flash_sm90_kernel.cuh: 128-row blocks, 128-key tiles in a ring of two
# stages): one and several key tiles (a third tile reuses stage 0, so the empty barriers'
# phases matter), a tail tile, causal with Sq != Sk and rows that see no key, grouped heads,
# every head size (a row is a 64-column block and a tail of 16 (72: 8 real columns), 16, 32
# or 64 columns with its own swizzle), packed sequences with an empty one and one over
# two query blocks.
SM90_CASES = [
    (1, 97, 97, 2, 1, 64, False, None),
    (1, 300, 333, 1, 1, 64, False, None),
    (1, 200, 150, 2, 1, 64, True, None),
    (1, 150, 40, 1, 1, 64, True, None),
    (2, 17, 140, 2, 2, 128, False, None),
    (0, 0, 0, 2, 1, 64, True, [0, 1, 260, 17]),
    (1, 130, 257, 1, 1, 128, True, None),
    (1, 140, 200, 2, 1, 72, True, None),
    (2, 33, 130, 1, 1, 80, False, None),
    (0, 0, 0, 1, 1, 96, False, [5, 300]),
    (1, 128, 129, 1, 1, 64, True, None),  # a full block's last row sees one key past a tile
    (0, 0, 0, 2, 1, 64, True, ([5, 0, 130, 17, 1], [9, 4, 260, 0, 300])),   # keys' own offsets
    (0, 0, 0, 1, 1, 128, False, ([140, 3], [0, 257])),
    (4, 3, 300, 2, 1, 64, True, {"used": [0, 1, 130, 300]}),   # seqused_k
    (2, 130, 200, 1, 1, 80, False, {"used": [200, 57]}),
    (3, 3, 300, 2, 1, 64, True, {"used": [260, 300, 10], "lead": [130, 7, 10]}),  # leftpad_k
    (2, 130, 200, 1, 1, 128, False, {"lead": [0, 71]}),
    (3, 140, 140, 2, 1, 64, True, {"lead": [0, 37, 139]}),   # a padded prefill in place
    # sliding windows: causal 130 back over 4 key tiles (the last block starts at tile 1),
    # two-sided, right only with rows that see no key, packed, a left-padded cache
    (1, 400, 400, 1, 1, 64, (130, 0), None),
    (1, 200, 330, 2, 1, 128, (50, 60), None),
    (2, 150, 100, 1, 1, 80, (-1, 5), None),
    (0, 0, 0, 2, 1, 64, (40, 10), [0, 1, 300, 65]),
    (3, 3, 300, 2, 1, 64, (100, 0), {"used": [300, 150, 20], "lead": [0, 30, 0]}),
]
SM90_IDS = [case_id(c) for c in SM90_CASES]


@pytest.mark.parametrize("dtype", list(CODES))
@pytest.mark.parametrize("case", SM90_CASES, ids=SM90_IDS)
def test_flash_forward_sm90(emu, case, dtype):
    B, Sq, Sk, H, Hk, d, causal, lengths = case
    q, k, v = inputs(dtype, B, Sq, Sk, H, Hk, d, lengths)
    scale = 1.0 / math.sqrt(d)
    keys = key_args(lengths)
    out, lse = forward_emulated(emu, q, k, v, causal, scale, lengths, sm90=True)
    check_forward(out, lse, [t.double() for t in (q, k, v)], causal, dtype, **keys)


# The Hopper backward (flash_bwd_sm90_kernel.cuh: blocks of 128 keys, query tiles of 64 in a
# ring of two stages, dS^T through double-buffered shared memory, dQ by TMA reduce-adds from
# double-buffered chunks or by atomics): one and several key blocks and query tiles (stage and
# dQ buffer reuse), tails, causal with Sq != Sk, grouped heads (the q heads of a group walked
# by one block), packed sequences with an empty one (whose dQ tiles overlap the next
# sequence's rows); head_dim 72, 80, 96 and 128 (a tail column block of 16 (8 of them zeros at
# 72), 16, 32 or 64 columns, and 8, 8, 16 or 32 dQ tail columns a consumer: at 72 consumer 1's
# are past the tensor).
SM90_BWD_CASES = [
    (1, 97, 97, 2, 2, 64, False, None),
    (1, 150, 200, 2, 1, 64, True, None),
    (2, 70, 33, 4, 2, 64, False, None),
    (1, 130, 60, 1, 1, 64, True, None),
    (0, 0, 0, 2, 1, 64, True, [0, 1, 140, 17]),
    (1, 150, 140, 2, 1, 72, True, None),
    (2, 70, 33, 2, 2, 80, False, None),
    (0, 0, 0, 2, 1, 80, False, [0, 1, 140, 17]),
    (0, 0, 0, 1, 1, 72, False, [70, 0, 65]),
    (1, 97, 130, 2, 1, 96, True, None),
    (2, 70, 33, 2, 2, 128, False, None),
    (0, 0, 0, 2, 1, 128, True, [0, 1, 140, 17]),
    (0, 0, 0, 2, 1, 64, True, ([5, 0, 130, 17, 1], [9, 4, 140, 0, 200])),   # keys' own offsets
    (0, 0, 0, 1, 1, 80, False, ([70, 3], [0, 150])),
    (3, 70, 200, 2, 1, 64, True, {"used": [0, 140, 200]}),   # seqused_k
    (3, 70, 200, 2, 1, 64, True, {"used": [140, 200, 60], "lead": [3, 130, 0]}),  # leftpad_k
    (2, 33, 150, 2, 2, 80, False, {"lead": [149, 20]}),
    (3, 140, 140, 2, 1, 64, True, {"lead": [0, 37, 139]}),   # a padded prefill in place
    # sliding windows: causal 70 back (key blocks walk only their band's query tiles),
    # two-sided, right only with Sq > Sk, key blocks no query sees (dk, dv 0), packed
    (1, 300, 300, 2, 1, 64, (70, 0), None),
    (1, 200, 250, 2, 2, 128, (30, 20), None),
    (2, 150, 100, 1, 1, 72, (-1, 5), None),
    (1, 150, 400, 2, 1, 64, (20, 0), None),
    (0, 0, 0, 2, 1, 64, (40, 10), [0, 1, 200, 65]),
]


@pytest.mark.parametrize("dtype", list(CODES))
@pytest.mark.parametrize("case", SM90_BWD_CASES,
                         ids=[case_id(c) for c in SM90_BWD_CASES])
@pytest.mark.parametrize("dq", [1, 2], ids=["dq_tma", "dq_atomic"])
def test_flash_backward_sm90(emu, case, dtype, dq):
    B, Sq, Sk, H, Hk, d, causal, lengths = case
    q, k, v = inputs(dtype, B, Sq, Sk, H, Hk, d, lengths)
    scale = 1.0 / math.sqrt(d)
    keys = key_args(lengths)
    out, lse = forward_emulated(emu, q, k, v, causal, scale, lengths)
    exact_in = [t.double().requires_grad_() for t in (q, k, v)]
    want = ops.attention_reference(*exact_in, **mask_args(causal), **keys)
    dout = torch.randn_like(q)
    got = backward_emulated(emu, q, k, v, out, dout, lse, causal, scale, lengths, sm90=dq)
    grads = torch.autograd.grad(want, exact_in, dout.double())
    check_grads(got, grads, dout, v, dtype)


@pytest.mark.parametrize("sm90", [False, True], ids=["portable", "sm90"])
def test_offsets_past_the_packed_tokens_are_clamped(emu, sm90):
    """attention_cuda.cpp no longer reads cu_seqlens on the host when max_seqlen is given, so
    the kernels clamp the offsets into [0, total_q]. Offsets 0, 60, 400, 900 over 150 tokens
    are the sequences [0, 60), [60, 150) and an empty one: each buffer has NaN (inputs) or
    sentinel (outputs) rows past its end, which no kernel may read or write."""
    dtype, H, d, total, guard = torch.bfloat16, 2, 64, 150, 40
    cu = torch.tensor([0, 60, 400, 900], dtype=torch.int32)
    qkv = [torch.cat([torch.randn(total, H, d, dtype=dtype),
                      poisoned(guard, H, d, dtype=dtype)]) for _ in range(3)]
    dims = sizes(3, H, H, 340, 340, total, total)  # max_seqlen 340: the clamped lengths fit
    scale = 1.0 / math.sqrt(d)

    def sentinel(*shape):
        return torch.full(shape, 7.0, dtype=torch.float32)

    out, lse = sentinel(total + guard, H, d).to(dtype), sentinel(H * total + guard)
    out[:total] = float("nan")
    lse[:H * total] = float("nan")
    strides = (H * d, d, (total + guard) * H * d) * 2
    rc = emu.emu_flash_fwd_any(int(sm90), CODES[dtype], d, *map(ptr, qkv), sizes(*strides),
                               ptr(out), ptr(lse), ptr(cu), None, None, None, dims, scale,
                               mask_codes(False), 0.0)
    assert rc == 0
    assert (out[total:] == 7).all() and (lse[H * total:] == 7).all(), "wrote past the tokens"
    clamped = torch.tensor([0, 60, total], dtype=torch.int32)
    exact_in = [t[:total].double().requires_grad_() for t in qkv]
    check_forward(out[:total], lse[:H * total].view(H, total), exact_in, False, dtype,
                  cu_seqlens=clamped)

    dout = torch.randn(total, H, d, dtype=dtype)
    grads = [sentinel(total + guard, H, d).to(dtype) for _ in range(3)]
    delta, dq_accum = sentinel(H * total + guard), sentinel(total + guard, H, d)
    for t in (*grads, dq_accum):
        t[:total] = float("nan")
    delta[:H * total] = float("nan")
    rc = emu.emu_flash_bwd_any(int(sm90), CODES[dtype], d, *map(ptr, qkv),
                               sizes(*strides, H * d, H * d),
                               ptr(out), ptr(dout), *map(ptr, grads), ptr(lse), None, ptr(delta),
                               ptr(dq_accum), ptr(cu), None, None, None, dims, scale,
                               mask_codes(False), 0.0)
    assert rc == 0
    for name, t in zip(("dq", "dk", "dv", "dq_accum"), (*grads, dq_accum)):
        assert (t[total:] == 7).all(), f"{name}: wrote past the tokens"
    assert (delta[H * total:] == 7).all(), "delta: wrote past the tokens"
    want = ops.attention_reference(*exact_in, cu_seqlens=clamped)
    exact = torch.autograd.grad(want, exact_in, dout.double())
    check_grads([g[:total] for g in grads], exact, dout, qkv[2][:total], dtype)


# Strided q, k, v and gradients (FlashParams' and FlashBwdParams' token strides): every kernel
# reads q, k and v whose tokens are spread apart with NaN between them, and the backwards write
# dq, dk and dv spread apart likewise, the elements between them a sentinel that must survive.
# Dense and packed batches, grouped heads, head_dim 64, 72 (a tail column block) and 128.
STRIDED_CASES = [
    (2, 70, 33, 2, 2, 64, False, None),
    (1, 97, 130, 2, 1, 72, True, None),
    (0, 0, 0, 2, 1, 128, True, [0, 1, 140, 17]),
    (0, 0, 0, 2, 1, 64, True, ([3, 40], [70, 5])),
]


@pytest.mark.parametrize("kernel", ["portable", "sm90", "sm90_dq_atomic"])
@pytest.mark.parametrize("case", STRIDED_CASES,
                         ids=[case_id(c) for c in STRIDED_CASES])
def test_flash_strided_tokens(emu, case, kernel):
    B, Sq, Sk, H, Hk, d, causal, lengths = case
    dtype, sm90 = torch.bfloat16, {"portable": 0, "sm90": 1, "sm90_dq_atomic": 2}[kernel]
    q, k, v = inputs(dtype, B, Sq, Sk, H, Hk, d, lengths)
    scale = 1.0 / math.sqrt(d)
    keys = key_args(lengths)
    qs, ks, vs = spread(q, 24)[0], spread(k, 40)[0], spread(v, 40)[0]
    out, lse = forward_emulated(emu, qs, ks, vs, causal, scale, lengths, sm90=sm90 > 0)
    exact_in = [t.double().requires_grad_() for t in (q, k, v)]
    want = check_forward(out, lse, exact_in, causal, dtype, **keys)

    dout = torch.randn_like(q)
    spread_grads = [spread(torch.full_like(t, float("nan")), 8, fill=7.0) for t in (q, k, v)]
    grads = [g for g, _ in spread_grads]
    backward_emulated(emu, qs, ks, vs, out, dout, lse, causal, scale, lengths, sm90=sm90,
                      grads=grads)
    for name, (g, buf) in zip(("dq", "dk", "dv"), spread_grads):
        assert (buf[:, -8:] == 7).all(), f"{name}: wrote between the tokens"
    exact = torch.autograd.grad(want, exact_in, dout.double())
    check_grads(grads, exact, dout, v, dtype)


def heads_first(t, pad):
    """t (B, S, H, d) or (T, H, d) as a view of a heads-first buffer (torch SDPA's (B, H, S, d),
    or (H, T, d)) with `pad` NaN tokens after each head's: token stride d, head stride
    (S + pad) d, batch stride H (S + pad) d."""
    if t.dim() == 3:
        buf = torch.full((t.shape[1], t.shape[0] + pad, t.shape[2]), float("nan"), dtype=t.dtype)
        buf[:, :t.shape[0]] = t.transpose(0, 1)
        return buf[:, :t.shape[0]].transpose(0, 1)
    B, S, H, d = t.shape
    buf = torch.full((B, H, S + pad, d), float("nan"), dtype=t.dtype)
    buf[:, :, :S] = t.transpose(1, 2)
    return buf[:, :, :S].transpose(1, 2)


@pytest.mark.parametrize("kernel", ["portable", "sm90", "sm90_dq_atomic"])
@pytest.mark.parametrize("case", STRIDED_CASES,
                         ids=[case_id(c) for c in STRIDED_CASES])
def test_flash_heads_first_layout(emu, case, kernel):
    """q, k and v in torch SDPA's heads-first layout, transposed to (B, S, H, d) (the head
    stride larger than the token stride; TokenLayout's batch stride), read in place by every
    kernel: the forward and the gradients against float64."""
    B, Sq, Sk, H, Hk, d, causal, lengths = case
    dtype, sm90 = torch.bfloat16, {"portable": 0, "sm90": 1, "sm90_dq_atomic": 2}[kernel]
    q, k, v = inputs(dtype, B, Sq, Sk, H, Hk, d, lengths)
    scale = 1.0 / math.sqrt(d)
    keys = key_args(lengths)
    qs, ks, vs = heads_first(q, 8), heads_first(k, 3), heads_first(v, 3)
    assert strides_of(qs)[1] > strides_of(qs)[0]
    out, lse = forward_emulated(emu, qs, ks, vs, causal, scale, lengths, sm90=sm90 > 0)
    exact_in = [t.double().requires_grad_() for t in (q, k, v)]
    want = check_forward(out, lse, exact_in, causal, dtype, **keys)
    dout = torch.randn_like(q)
    got = backward_emulated(emu, qs, ks, vs, out, dout, lse, causal, scale, lengths, sm90=sm90)
    check_grads(got, torch.autograd.grad(want, exact_in, dout.double()), dout, v, dtype)


# The flash-decoding forward (flash_decode_kernel.cuh: 16 query rows a block, the group's heads
# times the sequence's queries; a split over keys merged by a second kernel). Cases: one query
# of a group of 4 heads; a KV cache's used lengths with a row using no key; 4 queries x 4 heads
# (16 rows) under a causal mask (per query, bottom-right) at head_dim 72; packed sequences
# with keys of their own offsets, one with no query; 16 queries of one head; 2 queries x 8
# heads over 500 keys; Sq > Sk under causal (rows that see no key).
DECODE_CASES = [
    (3, 1, 200, 8, 2, 128, False, None),
    (2, 1, 150, 4, 4, 64, True, {"used": [0, 150]}),
    (1, 4, 300, 8, 2, 72, True, None),
    (0, 0, 0, 4, 1, 80, True, ([1, 3, 0, 2], [70, 3, 9, 130])),
    (2, 16, 100, 2, 2, 32, False, None),
    (1, 2, 500, 16, 2, 96, False, None),
    (4, 1, 40, 2, 1, 64, False, {"used": [33, 7, 40, 1]}),
    (1, 3, 2, 4, 4, 64, True, None),
    (3, 2, 300, 8, 2, 128, True, {"used": [300, 200, 5], "lead": [100, 0, 5]}),
    (2, 1, 150, 4, 1, 64, False, {"lead": [0, 149]}),
    # sliding windows: a decoding step 100 keys back (the chunks split the window's keys
    # only), two-sided over 3 queries, and in a left-padded cache
    (2, 1, 500, 8, 2, 128, (100, 0), None),
    (2, 3, 200, 4, 4, 72, (10, 5), None),
    (3, 2, 300, 8, 2, 64, (64, -1), {"used": [300, 200, 5], "lead": [100, 0, 5]}),
    # head_dim 256 (Gemma's: 132 KB of tiles): a step over grouped heads, a cache's rows
    (2, 1, 150, 8, 4, 256, True, {"used": [150, 66], "lead": [0, 7]}),
]


def decode_emulated(emu, q, k, v, causal, scale, lengths, splits, chunk, softcap=0.0):
    """The decode kernel with `splits` chunks of `chunk` keys, its workspace NaN-poisoned."""
    H, Hk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    B, Sq, Sk = (q.shape[0], q.shape[1], k.shape[1]) if dense(lengths) else (0, 0, 0)
    batch, seqlen_q, seqlen_k, total_q, total_k, cu, cu_k = layout(B, Sq, Sk, H, Hk, lengths)
    out = poisoned(*q.shape, dtype=q.dtype)
    lse = poisoned(*((batch, H, seqlen_q) if cu is None else (H, total_q)), dtype=torch.float32)
    out_part = poisoned(splits, total_q, H, d, dtype=torch.float32) if splits > 1 else None
    lse_part = poisoned(splits, H, total_q, dtype=torch.float32) if splits > 1 else None
    used, lead = seqused(lengths), leftpad(lengths)  # (held: pointers to temporaries dangle)
    rc = emu.emu_flash_decode_any(CODES[q.dtype], d, ptr(q), ptr(k), ptr(v),
                                  sizes(*strides_of(q), *strides_of(k)), ptr(out), ptr(lse),
                                  ptr(cu), ptr(cu_k), ptr(used), ptr(lead),
                                  sizes(batch, H, Hk, seqlen_q, seqlen_k, total_q, total_k),
                                  scale, mask_codes(causal), splits, chunk, ptr(out_part),
                                  ptr(lse_part), softcap)
    assert rc == 0, f"launcher returned cudaError {rc}"
    return out, lse


@pytest.fixture
def emu_decode(emu):
    emu.emu_flash_decode_any.argtypes = [ctypes.c_int] * 2 + [ctypes.c_void_p] * 11 + \
        [ctypes.c_float, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] + \
        [ctypes.c_void_p] * 2 + [ctypes.c_float]
    emu.emu_flash_decode_plan.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_int, ctypes.c_void_p]
    return emu


# the split over keys: one chunk (out written directly), one tile a chunk (the last chunks of
# short sequences not run, nor read by the merge), and two chunks of one tile where more keys
# are left (the last chunk takes them all)
SPLITS = {"one": lambda Sk: (1, 64), "tiles": lambda Sk: (max(1, -(-Sk // 64)), 64),
          "short": lambda Sk: (2, 64)}


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("dtype", list(CODES))
@pytest.mark.parametrize("case", DECODE_CASES, ids=[case_id(c) for c in DECODE_CASES])
def test_flash_decode_forward(emu_decode, case, dtype, split):
    B, Sq, Sk, H, Hk, d, causal, lengths = case
    q, k, v = inputs(dtype, B, Sq, Sk, H, Hk, d, lengths)
    scale = 1.0 / math.sqrt(d)
    seqlen_k = layout(B, Sq, Sk, H, Hk, lengths)[2]
    splits, chunk = SPLITS[split](seqlen_k)
    out, lse = decode_emulated(emu_decode, q, k, v, causal, scale, lengths, splits, chunk)
    check_forward(out, lse, [t.double() for t in (q, k, v)], causal, dtype, **key_args(lengths))


def test_flash_decode_strided_inputs(emu_decode):
    """q, k and v read at their strides (spread apart with NaN between tokens; heads-first)."""
    B, Sq, Sk, H, Hk, d, causal, lengths = 2, 2, 140, 8, 2, 64, True, {"used": [140, 77],
                                                                         "lead": [9, 70]}
    dtype = torch.bfloat16
    q, k, v = inputs(dtype, B, Sq, Sk, H, Hk, d, lengths)
    qs, ks, vs = heads_first(q, 5), spread(k, 40)[0], spread(v, 40)[0]
    out, lse = decode_emulated(emu_decode, qs, ks, vs, causal, 0.125, lengths, 3, 64)
    check_forward(out, lse, [t.double() for t in (q, k, v)], causal, dtype,
                  **key_args(lengths))


@pytest.mark.parametrize("batch,heads_k,seqlen_k,sms", [
    (16, 8, 4096, 132), (1, 8, 4096, 132), (1, 1, 100, 132), (64, 32, 8192, 132),
    (1, 1, 1, 3), (2, 1, 0, 3), (1, 2, 300000, 132)])
def test_flash_decode_plan(emu_decode, batch, heads_k, seqlen_k, sms):
    """flash_decode_plan's split covers every key with whole tiles, runs no empty chunk, keeps
    two tiles a chunk or more, and aims at about two blocks a multiprocessor."""
    plan = sizes(0, 0)
    emu_decode.emu_flash_decode_plan(batch, heads_k, seqlen_k, sms, plan)
    splits, chunk = plan[0], plan[1]
    assert chunk % 64 == 0 and 1 <= splits <= 128
    assert splits * chunk >= seqlen_k and (splits == 1 or (splits - 1) * chunk < seqlen_k)
    if splits > 1:
        assert chunk >= 128
        assert batch * heads_k * (splits - 1) < 2 * sms, "more chunks than two waves need"


# Soft-capping (softcap > 0: each score s becomes softcap tanh(s / softcap), Gemma 2's) in the
# three forwards: a tight cap (2: most scores on tanh's flat part; scale 3 makes the inputs'
# scores large) and Gemma 2's 50, over the portable and Hopper prefill kernels' cases (full,
# causal, packed, a window, a left-padded cache) and the decode kernel's, split in chunks.
SOFTCAP_CASES = [
    (1, 97, 97, 2, 1, 64, False, None),
    (1, 200, 150, 2, 1, 128, True, None),
    (0, 0, 0, 2, 1, 80, True, [0, 1, 65, 17]),
    (1, 200, 250, 2, 2, 72, (30, 20), None),
    (3, 3, 300, 2, 1, 64, True, {"used": [260, 300, 10], "lead": [130, 7, 10]}),
]
SOFTCAP_DECODE_CASES = [
    (3, 1, 200, 8, 2, 128, False, None),
    (2, 3, 200, 4, 4, 72, (10, 5), None),
    (3, 2, 300, 8, 2, 64, True, {"used": [300, 200, 5], "lead": [100, 0, 5]}),
]


@pytest.mark.parametrize("softcap", [2.0, 50.0])
@pytest.mark.parametrize("kernel", ["portable", "sm90", "decode"])
@pytest.mark.parametrize("dtype", list(CODES))
def test_flash_forward_softcap(emu_decode, kernel, dtype, softcap):
    for case in SOFTCAP_DECODE_CASES if kernel == "decode" else SOFTCAP_CASES:
        B, Sq, Sk, H, Hk, d, causal, lengths = case
        q, k, v = inputs(dtype, B, Sq, Sk, H, Hk, d, lengths)
        if kernel == "decode":
            splits, chunk = SPLITS["tiles"](layout(B, Sq, Sk, H, Hk, lengths)[2])
            out, lse = decode_emulated(emu_decode, q, k, v, causal, 3.0, lengths, splits, chunk,
                                       softcap=softcap)
        else:
            out, lse = forward_emulated(emu_decode, q, k, v, causal, 3.0, lengths,
                                        sm90=kernel == "sm90", softcap=softcap)
        exact = [t.double() for t in (q, k, v)]
        want = check_forward(out, lse, exact, causal, dtype, softcap=softcap, scale=3.0,
                             **key_args(lengths))
        if softcap == 2.0:   # (the cap changed the result: the check can tell)
            uncapped = ops.attention_reference(*exact, **mask_args(causal), softmax_scale=3.0,
                                               **key_args(lengths))
            assert (uncapped - want).abs().max() > 0.1


@pytest.mark.parametrize("softcap", [2.0, 50.0])
@pytest.mark.parametrize("kernel", [0, 1, 2], ids=["portable", "sm90_dq_tma", "sm90_dq_atomic"])
@pytest.mark.parametrize("dtype", list(CODES))
def test_flash_backward_softcap(emu, kernel, dtype, softcap):
    """The backwards with soft-capping (P recomputed through tanh, dS times 1 - t^2; the
    portable one works t back from P): gradients against float64 autograd through the capped
    reference, from the emulated forward's out and lse, scale 3 (large scores). The Hopper one
    refuses a capped call at head_dim 128 (cudaErrorNotSupported: attention_cuda.cpp then runs
    the portable one), having no registers for it there."""
    for case in SOFTCAP_CASES:
        B, Sq, Sk, H, Hk, d, causal, lengths = case
        q, k, v = inputs(dtype, B, Sq, Sk, H, Hk, d, lengths)
        keys = key_args(lengths)
        out, lse = forward_emulated(emu, q, k, v, causal, 3.0, lengths, softcap=softcap)
        exact_in = [t.double().requires_grad_() for t in (q, k, v)]
        want = ops.attention_reference(*exact_in, **mask_args(causal), softmax_scale=3.0,
                                       softcap=softcap, **keys)
        dout = torch.randn_like(q)
        if kernel and d == 128:
            backward_emulated(emu, q, k, v, out, dout, lse, causal, 3.0, lengths, sm90=kernel,
                              softcap=softcap, rc_expected=801)
            continue
        got = backward_emulated(emu, q, k, v, out, dout, lse, causal, 3.0, lengths, sm90=kernel,
                                softcap=softcap)
        grads = torch.autograd.grad(want, exact_in, dout.double())
        check_grads(got, grads, dout, v, dtype)
