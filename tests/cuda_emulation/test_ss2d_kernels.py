"""The SS2D-family CUDA kernels, run on the CPU in cuda_emulation.h's emulation (the real kernel
sources and launchers, compiled by g++), against the float64 references.

The torch-side glue of csrc/ss2d/ss2d_cuda.cpp (x_proj before the kernels, x_proj's adjoint and
the per-chunk sums after the backward) is redone here in torch; the x_proj kernel that does
x_proj and the adjoint's dx for 16-bit x on a GPU (ss2d_xproj_kernel.cuh) is tested on its own
(the last tests); on a GPU the op tests cover the glue itself. What the emulation does and does not check is in its header.
Skipped without g++ or the CUDA headers (emulation.py builds the harness).
"""

from __future__ import annotations

import ctypes
import math

import pytest
import torch
from emulation import build, poisoned, ptr

from pyssm import ops
from pyssm.ops.cross_scan import cross_scan_reference

F64 = torch.float64
CODES = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    lib = build(tmp_path_factory, "ss2d_kernels.cpp")
    for name in ("emu_ss2d_fwd_scratch", "emu_ss2d_bwd_scratch", "emu_ss2d_bwd_tile",
                 "emu_selective_scan_carries", "emu_ss2d_state_tiles"):
        getattr(lib, name).restype = ctypes.c_int64
    lib.emu_ss2d_bwd_tile.argtypes = [ctypes.c_int64]
    lib.emu_ss2d_state_tiles.argtypes = [ctypes.c_int64]
    lib.emu_ss2d_xproj.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 5 + \
        [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.emu_cross_scan.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + \
        [ctypes.c_int64] * 4 + [ctypes.c_int]
    return lib


# cross_scan / cross_merge -------------------------------------------------------------------

SCAN_SHAPES = [(2, 3, 5, 7), (1, 1, 1, 1), (1, 2, 1, 9), (2, 5, 8, 3)]


@pytest.mark.parametrize("dtype", list(CODES))
@pytest.mark.parametrize("shape", SCAN_SHAPES, ids=str)
def test_cross_scan_and_merge(emu, dtype, shape):
    B, C, H, W = shape
    x = torch.randn(B, C, H, W, dtype=dtype)
    out = poisoned(B, 4, C, H * W, dtype=dtype)
    assert emu.emu_cross_scan(CODES[dtype], ptr(x), ptr(out), B, C, H, W, 0) == 0
    assert torch.equal(out, ops.cross_scan(x, backend="reference"))

    ys = torch.randn(B, 4, C, H, W, dtype=dtype)
    merged = poisoned(B, C, H * W, dtype=dtype)
    assert emu.emu_cross_scan(CODES[dtype], ptr(ys), ptr(merged), B, C, H, W, 1) == 0
    exact = ops.cross_merge(ys.double(), backend="reference")
    # the four directions summed in the accumulation type, then rounded once
    torch.testing.assert_close(merged, exact.to(dtype))


# selective_scan (block scans through warp shuffles) -----------------------------------------

# (batch, groups, dim per group, dstate, length): one tile and several (tiles of 512), N 1 to
# 16, groups of more channels than a backward block takes (11: blocks of 8 and 3, or 3, 3, 3, 2)
SCAN_CASES = [(2, 2, 3, 1, 37), (1, 4, 2, 3, 1100), (1, 1, 2, 16, 513), (1, 2, 11, 1, 600),
              (2, 1, 9, 4, 70)]


@pytest.mark.parametrize("case", SCAN_CASES, ids=lambda c: "b{}k{}d{}n{}l{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("per_block,with_state", [(0, False), (1, True), (3, True), (8, False)],
                         ids=lambda c: ("state" if c else "no-state") if isinstance(c, bool)
                         else f"cpb{c}")
def test_selective_scan(emu, case, dtype, per_block, with_state):
    """per_block: the channels a backward block takes (0: the launcher's choice; 1: v1's).
    with_state: the kernels that also write the last state (selective_scan_with_state) and take
    its gradient into the backward, against the reference's autograd through both outputs."""
    Bt, K, Dg, N, L = case
    C_ = K * Dg
    acc = acc_of(dtype)
    u, delta = torch.randn(Bt, C_, L, dtype=dtype), torch.randn(Bt, C_, L, dtype=dtype) * 0.5
    Bm, Cm = torch.randn(Bt, K, N, L, dtype=dtype), torch.randn(Bt, K, N, L, dtype=dtype)
    A = -torch.rand(C_, N, dtype=acc) - 0.2
    D, bias = torch.randn(C_, dtype=acc), torch.randn(C_, dtype=acc) * 0.3
    sz = (ctypes.c_int64 * 5)(Bt, C_, L, K, N)
    out = poisoned(Bt, C_, L, dtype=acc)
    last = poisoned(Bt, C_, N, dtype=acc) if with_state else None
    code = CODES[dtype]
    args = [ptr(t) for t in (u, delta, A, Bm, Cm, D, bias, out)] + [ptr(last)]
    assert emu.emu_selective_scan(code, *args, sz, 1, *([None] * 10), ctypes.c_int64(0)) == 0
    exact_in = [t.double().requires_grad_() for t in (u, delta, A, Bm, Cm, D, bias)]
    want, want_last = ops.selective_scan_reference(*exact_in, delta_softplus=True,
                                                   return_last_state=True)
    tol = 1e-12 if dtype == F64 else 2e-5
    assert (out.double() - want).abs().max() <= tol * want.abs().max(), "out"
    if with_state:
        err = (last.double() - want_last).abs().max()
        assert err <= tol * want_last.abs().max(), ("last state", float(err))

    dout = torch.randn(Bt, C_, L, dtype=acc)
    dlast = torch.randn(Bt, C_, N, dtype=acc) if with_state else None
    grads = [poisoned(Bt, C_, L, dtype=acc), poisoned(Bt, C_, L, dtype=acc),
             torch.zeros(Bt, C_, N, dtype=acc), torch.zeros(Bt, K, N, L, dtype=acc),
             torch.zeros(Bt, K, N, L, dtype=acc), torch.zeros(Bt, C_, dtype=acc),
             torch.zeros(Bt, C_, dtype=acc)]
    carries = poisoned(emu.emu_selective_scan_carries(sz), dtype=acc)
    assert emu.emu_selective_scan(code, *args, sz, 1, ptr(dout), ptr(dlast),
                                  *(ptr(g) for g in grads), ptr(carries),
                                  ctypes.c_int64(per_block)) == 0
    du, ddelta, dA, dB, dC, dD, dbias = grads
    got = [du, ddelta, dA.sum(0), dB, dC, dD.sum(0), dbias.sum(0)]
    outputs, seeds = [want], [dout.double()]
    if with_state:
        outputs.append(want_last)
        seeds.append(dlast.double())
    exact = torch.autograd.grad(outputs, exact_in, seeds)
    tol = 1e-11 if dtype == F64 else 1e-4
    for name, a, b in zip("u delta A B C D bias".split(), got, exact):
        err = (a.double() - b).abs().max()
        assert err <= tol * b.abs().max(), (name, float(err))


# the fused ss2d forward and backward ----------------------------------------------------------

def make_case(B, H, W, D, R, N, dtype, weight_dtype):
    x = torch.randn(B, H, W, D, dtype=dtype)
    ws = [torch.randn(4, R + 2 * N, D, dtype=weight_dtype) / math.sqrt(D),
          torch.randn(4, D, R, dtype=weight_dtype) / math.sqrt(R),
          torch.randn(4, D, dtype=weight_dtype) * 0.5,
          torch.log(torch.rand(4 * D, N, dtype=weight_dtype) * 2 + 0.1),
          torch.randn(4 * D, dtype=weight_dtype)]
    return x, ws


def acc_of(dtype):
    return F64 if dtype == F64 else torch.float32


def prepare(x, ws):
    """ss2d_cuda.cpp's inputs to the kernels: z = x_proj of every pixel, A = -exp(A_logs)."""
    B, H, W, D = x.shape
    acc = acc_of(x.dtype)
    xw, dtw, dtb, A_logs, Ds = (w.to(acc).contiguous() for w in ws)
    z = (x.reshape(B * H * W, D).to(acc) @ xw.reshape(-1, D).t()).contiguous()
    return acc, z, dtw, dtb, (-torch.exp(A_logs)).contiguous(), Ds


def sizes_of(x, ws, chunk_len, chunks):
    B, H, W, D = x.shape
    R, N = ws[1].shape[2], ws[3].shape[1]
    return (ctypes.c_int64 * 8)(B, H, W, D, R, N, chunk_len, chunks)


def forward_emulated(emu, x, ws, chunks, n1=False, states=False, whole_tiles=None):
    """y, and with ``states`` (v3) also the states it kept for the backward, (B, 4,
    ceil(L / 64), D), poisoned before the launch: (y, states). whole_tiles (default: with
    states): chunks of whole 64-position tiles, as ss2d_cuda.cpp cuts v3's scans."""
    B, H, W, D = x.shape
    L = H * W
    acc, z, dtw, dtb, A, Ds = prepare(x, ws)
    chunk_len = -(-L // chunks)
    if states if whole_tiles is None else whole_tiles:
        chunk_len = -(-chunk_len // 64) * 64
    sizes = sizes_of(x, ws, chunk_len, -(-L // chunk_len))
    y = torch.zeros(B, L, D, dtype=acc)
    scratch = poisoned(emu.emu_ss2d_fwd_scratch(sizes), dtype=acc)
    kept = poisoned(B, 4, emu.emu_ss2d_state_tiles(L), D, dtype=acc) if states else None
    rc = emu.emu_ss2d_fwd(CODES[x.dtype], ptr(x), ptr(z), ptr(dtw), ptr(dtb), ptr(A), ptr(Ds),
                          ptr(y), ptr(scratch), sizes, int(n1), ptr(kept))
    assert rc == 0, f"launcher returned cudaError {rc}"
    return (y.view(B, H, W, D), kept) if states else y.view(B, H, W, D)


def backward_emulated(emu, dy, x, ws, chunks, n1=0, wide=False, states=None):
    """n1: 0 v1's kernels; 1 v3's main kernel after v1's summary; 2 v3's summary and main.
    wide: v3's variant with dpre out at any dt_rank (it always runs over 16). states: the
    forward's (one chunk), for v3's main kernel alone (no scratch given: none may be read)."""
    B, H, W, D = x.shape
    L = H * W
    R, N = ws[1].shape[2], ws[3].shape[1]
    zw = R + 2 * N
    acc, z, dtw, dtb, A, Ds = prepare(x, ws)
    tile = 64 if n1 else emu.emu_ss2d_bwd_tile(N)  # (v3: chunks of whole 64-position tiles)
    chunk_len = -(-(-(-L // chunks)) // tile) * tile
    chunks = -(-L // chunk_len)
    sizes = sizes_of(x, ws, chunk_len, chunks)
    dx = torch.zeros(B, L, D, dtype=acc)
    dz = torch.zeros(B, L, 4, zw, dtype=acc)
    # v3 over dt_rank 16 (or asked for): no dt_projs_weight planes; dpre, every element
    # written, instead
    wide = bool(n1) and (R > 16 or wide)
    partial = torch.zeros(B, 4, chunks, N + 2 + (0 if wide else R), D, dtype=acc)
    dpre = poisoned(4, B * L, D, dtype=acc) if wide else None
    scratch = None if states is not None else poisoned(emu.emu_ss2d_bwd_scratch(sizes),
                                                         dtype=acc)
    dy_acc = dy.dtype != x.dtype
    dy = dy.to(acc) if dy_acc else dy
    rc = emu.emu_ss2d_bwd(CODES[x.dtype], ptr(x), ptr(dy.contiguous()), int(dy_acc), ptr(z),
                          ptr(dtw), ptr(dtb), ptr(A), ptr(Ds), ptr(dx), ptr(dz), ptr(partial),
                          ptr(dpre), ptr(scratch), sizes, int(n1), ptr(states))
    assert rc == 0, f"launcher returned cudaError {rc}"
    sums = partial.sum((0, 2))
    if wide:  # ss2d_cuda.cpp's two GEMMs
        assert not dpre.isnan().any(), "dpre not written in full"
        dt_in = z.view(B * L, 4, zw)[:, :, :R].transpose(0, 1)
        dz.view(B * L, 4, zw)[:, :, :R] += torch.bmm(dpre, dtw).transpose(0, 1)
        d_dtw = torch.bmm(dpre.transpose(1, 2), dt_in)
    else:
        d_dtw = sums[:, N + 2:].transpose(1, 2)
    dzf = dz.view(B * L, 4 * zw)
    dx = dx.view(B * L, D) + dzf @ ws[0].to(acc).reshape(4 * zw, D)
    d_xw = (dzf.t() @ x.reshape(B * L, D).to(acc)).view(4, zw, D)
    d_A_logs = sums[:, :N].transpose(1, 2).reshape(4 * D, N) * A
    return [dx.view(B, H, W, D), d_xw, d_dtw, sums[:, N + 1], d_A_logs, sums[:, N].reshape(4 * D)]


# (B, H, W, D, R, N, chunks): one chunk and several (partial last ones), two channel blocks
# (D 130: the backward's dz by atomics), a single row, d_state 1 / 3 / 8 / 16, and dt_rank 17
# at d_state 1 (past the 16 whose dt_projs_weight gradient the backward keeps in registers).
SS2D_CASES = [(2, 3, 5, 4, 2, 1, 1), (1, 7, 9, 5, 3, 3, 4), (1, 5, 6, 130, 2, 16, 2),
              (2, 1, 9, 3, 1, 8, 3), (1, 13, 11, 33, 6, 1, 5), (1, 4, 5, 6, 17, 1, 2)]
CASE_IDS = ["b{}h{}w{}d{}r{}n{}c{}".format(*c) for c in SS2D_CASES]
NAMES = "x x_proj_weight dt_projs_weight dt_projs_bias A_logs Ds".split()


@pytest.mark.parametrize("case", SS2D_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_ss2d_forward(emu, case, dtype):
    B, H, W, D, R, N, chunks = case
    x, ws = make_case(B, H, W, D, R, N, dtype, F64 if dtype == F64 else torch.float32)
    got = forward_emulated(emu, x, ws, chunks)
    want = ops.ss2d_reference(x.double(), *(w.double() for w in ws))
    tol = 1e-12 if dtype == F64 else 2e-5
    assert (got.double() - want).abs().max() <= tol * want.abs().max()


# The d_state-1 forward (v3, ss2d_n1_kernel.cuh): blocks of 32 channels, tiles of 64 positions.
# D 4 / 33 / 6: no 16-byte vectors of x (bf16) and a partial channel block; D 40 / 16 / 64:
# vectors of x and y; dt_rank 2-8, 12 and 17 in registers (8-, 16- and 32-wide), 33 in shared
# memory; one chunk of 1-3 tiles, and 2-5 chunks of partial tiles or of a full tile and a
# partial one.
N1_CASES = [(2, 3, 5, 4, 2, 1, 1), (1, 13, 11, 33, 6, 1, 5), (1, 4, 5, 6, 17, 1, 2),
            (1, 12, 14, 40, 6, 1, 2), (2, 11, 13, 16, 12, 1, 1), (1, 9, 16, 64, 8, 1, 3),
            (1, 5, 7, 9, 33, 1, 2)]
N1_IDS = ["b{}h{}w{}d{}r{}n{}c{}".format(*c) for c in N1_CASES]


@pytest.mark.parametrize("case", N1_CASES, ids=N1_IDS)
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_ss2d_forward_n1(emu, case, dtype):
    B, H, W, D, R, N, chunks = case
    x, ws = make_case(B, H, W, D, R, N, dtype, F64 if dtype == F64 else torch.float32)
    got = forward_emulated(emu, x, ws, chunks, n1=True)
    want = ops.ss2d_reference(x.double(), *(w.double() for w in ws))
    tol = 1e-12 if dtype == F64 else 2e-5
    assert (got.double() - want).abs().max() <= tol * want.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ss2d_forward_n1_unaligned_x(emu, dtype):
    """x 16-byte vectors only from an aligned base: one element past it, the scalar loads."""
    B, H, W, D, R, N = 1, 12, 14, 40, 6, 1
    x, ws = make_case(B, H, W, D, R, N, dtype, torch.float32)
    shifted = torch.empty(x.numel() + 1, dtype=dtype)[1:].view(x.shape)
    shifted.copy_(x)
    assert shifted.data_ptr() % 16 != 0
    got = forward_emulated(emu, shifted, ws, 2, n1=True)
    want = ops.ss2d_reference(x.double(), *(w.double() for w in ws))
    assert (got.double() - want).abs().max() <= 2e-5 * want.abs().max()


def test_ss2d_forward_n1_refuses_other_states(emu):
    """The d_state-1 kernel refuses d_state 2 (the host picks it only at 1)."""
    x, ws = make_case(1, 3, 4, 8, 2, 2, torch.float32, torch.float32)
    with pytest.raises(AssertionError, match="cudaError"):
        forward_emulated(emu, x, ws, 1, n1=True)


def assert_gradients(got, x, ws, dy):
    """Every gradient against autograd through the float64 reference from the same rounded
    inputs, relative to its largest value: 1e-11 for float64 x, 1e-4 otherwise."""
    exact_in = [t.double().requires_grad_() for t in (x, *ws)]
    want = torch.autograd.grad(ops.ss2d_reference(*exact_in), exact_in, dy.double())
    tol = 1e-11 if x.dtype == F64 else 1e-4
    for name, a, b in zip(NAMES, got, want):
        err = (a.double() - b).abs().max()
        assert err <= tol * b.abs().max(), (name, float(err), float(b.abs().max()))


@pytest.mark.parametrize("case", SS2D_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype,dy_dtype", [(F64, F64), (torch.float32, torch.float32),
                                            (torch.bfloat16, torch.bfloat16),
                                            (torch.bfloat16, torch.float32)])
def test_ss2d_backward(emu, case, dtype, dy_dtype):
    """Every gradient against autograd through the float64 reference from the same rounded
    inputs (dy in fp32 with bf16 x: the out_float32 case, read as fp32)."""
    B, H, W, D, R, N, chunks = case
    x, ws = make_case(B, H, W, D, R, N, dtype, F64 if dtype == F64 else torch.float32)
    dy = torch.randn(B, H, W, D, dtype=dy_dtype)
    got = backward_emulated(emu, dy, x, ws, chunks)
    assert_gradients(got, x, ws, dy)


# The d_state-1 backward (v3's main kernel after the summary, v1's or v3's, and v1's carry):
# dt_rank 2-16 (8- and 16-wide registers), 17 and 33 (dt_projs_weight in shared memory, dpre
# out), and 24 over two chunks with two channel blocks (VMamba-T stage 3's rank); one channel
# block (plain adds into dz) and two (atomics: D 33, 40, 64), one chunk of 1-3 tiles and 2-3
# chunks of whole tiles and a partial last one.
N1_BWD_CASES = N1_CASES + [(2, 6, 11, 37, 24, 1, 2)]
N1_BWD_IDS = ["b{}h{}w{}d{}r{}n{}c{}".format(*c) for c in N1_BWD_CASES]


@pytest.mark.parametrize("case", N1_BWD_CASES, ids=N1_BWD_IDS)
@pytest.mark.parametrize("dtype,dy_dtype", [(F64, F64), (torch.float32, torch.float32),
                                            (torch.bfloat16, torch.bfloat16),
                                            (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("summary", ["v3", "v1"])
def test_ss2d_backward_n1(emu, case, dtype, dy_dtype, summary):
    B, H, W, D, R, N, chunks = case
    x, ws = make_case(B, H, W, D, R, N, dtype, F64 if dtype == F64 else torch.float32)
    dy = torch.randn(B, H, W, D, dtype=dy_dtype)
    got = backward_emulated(emu, dy, x, ws, chunks, n1=2 if summary == "v3" else 1)
    assert_gradients(got, x, ws, dy)


@pytest.mark.parametrize("case", [c for c in N1_CASES if c[4] <= 16],
                         ids=[i for c, i in zip(N1_CASES, N1_IDS) if c[4] <= 16])
@pytest.mark.parametrize("dtype", [F64, torch.bfloat16])
def test_ss2d_backward_n1_wide_at_small_ranks(emu, case, dtype):
    """v3's dpre variant (PYSSM_SS2D_BWD=v3-wide) where the register one would run: the same
    gradients."""
    B, H, W, D, R, N, chunks = case
    x, ws = make_case(B, H, W, D, R, N, dtype, F64 if dtype == F64 else torch.float32)
    dy = torch.randn(B, H, W, D, dtype=dtype)
    got = backward_emulated(emu, dy, x, ws, chunks, n1=2, wide=True)
    assert_gradients(got, x, ws, dy)


# The forward v3's states for the backward (training): the state entering every 64-position
# tile of each direction's scan, and the backward's main kernel alone, started from them.

def states_reference(x, ws):
    """float64 model of the kept states: (B, 4, ceil(L / 64), D), direction k's state before
    positions 0, 64, 128, ... of its scan order (DESIGN.md's recurrence at d_state 1)."""
    x, ws = x.double(), [w.double() for w in ws]
    B, H, W, D = x.shape
    R, L = ws[1].shape[2], H * W
    xs = cross_scan_reference(x.permute(0, 3, 1, 2))                   # (B, 4, D, L)
    z = torch.einsum("kcd,bkdl->bkcl", ws[0], xs)                       # (B, 4, R + 2, L)
    pre = torch.einsum("kdr,bkrl->bkdl", ws[1], z[:, :, :R]) + ws[2][None, :, :, None]
    delta = torch.nn.functional.softplus(pre)
    a = torch.exp(delta * -torch.exp(ws[3]).view(1, 4, D, 1))
    bu = delta * xs * z[:, :, R:R + 1]
    h = torch.zeros(B, 4, D, dtype=F64)
    out = []
    for step in range(L):
        if step % 64 == 0:
            out.append(h.clone())
        h = a[..., step] * h + bu[..., step]
    return torch.stack(out, 2)                                          # (B, 4, tiles, D)


@pytest.mark.parametrize("case", N1_BWD_CASES, ids=N1_BWD_IDS)
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_ss2d_forward_n1_keeps_states(emu, case, dtype):
    """Every tile's entering state written (the poison gone), equal to the float64 model, with
    one chunk and with several (their carries included), and y unchanged by writing them."""
    B, H, W, D, R, N, chunks = case
    x, ws = make_case(B, H, W, D, R, N, dtype, F64 if dtype == F64 else torch.float32)
    y, kept = forward_emulated(emu, x, ws, chunks, n1=True, states=True)
    assert not kept.isnan().any(), "a tile's state not written"
    want = states_reference(x, ws)
    tol = 1e-12 if dtype == F64 else 2e-5
    assert (kept.double() - want).abs().max() <= tol * want.abs().max()
    assert torch.equal(y, forward_emulated(emu, x, ws, chunks, n1=True, whole_tiles=True))


@pytest.mark.parametrize("case", N1_BWD_CASES, ids=N1_BWD_IDS)
@pytest.mark.parametrize("dtype,dy_dtype", [(F64, F64), (torch.float32, torch.float32),
                                            (torch.bfloat16, torch.bfloat16),
                                            (torch.bfloat16, torch.float32)])
def test_ss2d_backward_n1_from_forward_states(emu, case, dtype, dy_dtype):
    """The main kernel alone over each whole scan, from the states the forward kept (cut into
    the case's chunks: the states do not depend on them), no scratch: every gradient against
    float64 autograd. dt_rank 17, 24 and 33 take the dpre variant."""
    B, H, W, D, R, N, chunks = case
    x, ws = make_case(B, H, W, D, R, N, dtype, F64 if dtype == F64 else torch.float32)
    dy = torch.randn(B, H, W, D, dtype=dy_dtype)
    _, kept = forward_emulated(emu, x, ws, chunks, n1=True, states=True)
    got = backward_emulated(emu, dy, x, ws, 1, n1=2, states=kept)
    assert_gradients(got, x, ws, dy)


def test_ss2d_backward_n1_reads_the_states(emu):
    """Zeroed states (the ones a summary pass would be needed for) give wrong gradients past
    the first tile: the kernel starts its tiles from what it is given."""
    x, ws = make_case(1, 12, 14, 40, 6, 1, torch.float64, F64)
    dy = torch.randn(1, 12, 14, 40, dtype=F64)
    _, kept = forward_emulated(emu, x, ws, 1, n1=True, states=True)
    assert kept[:, :, 1:].abs().max() > 0
    with pytest.raises(AssertionError):
        assert_gradients(backward_emulated(emu, dy, x, ws, 1, n1=2,
                                           states=torch.zeros_like(kept)), x, ws, dy)


def test_ss2d_states_launchers_refuse_what_they_cannot_do(emu):
    """Kept states are v3's: the forward v2 refuses to keep them, and the backward takes them
    only over one chunk and only in v3 (the host never asks otherwise)."""
    x, ws = make_case(1, 12, 14, 8, 2, 1, torch.float32, torch.float32)
    with pytest.raises(AssertionError, match="cudaError"):
        forward_emulated(emu, x, ws, 1, n1=False, states=True)
    _, kept = forward_emulated(emu, x, ws, 1, n1=True, states=True)
    dy = torch.randn_like(x)
    with pytest.raises(AssertionError, match="cudaError"):
        backward_emulated(emu, dy, x, ws, 2, n1=2, states=kept)
    with pytest.raises(AssertionError, match="cudaError"):
        backward_emulated(emu, dy, x, ws, 1, n1=0, states=kept)


# x_proj on tensor cores (ss2d_xproj_kernel.cuh): bf16 mma with W (and fp16 x, and the
# backward's fp32 dz) split into bf16 hi + lo. (rows, dim, cols): one row and a partial block;
# several row blocks (128 rows) and column tiles (32) with partial last ones; dim a multiple of 8
# but not of the 32 of a step.
XPROJ_CASES = [(1, 8, 2), (130, 40, 20), (257, 96, 32), (37, 72, 44), (140, 24, 104)]


@pytest.mark.parametrize("case", XPROJ_CASES, ids=lambda c: "m{}d{}n{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ss2d_xproj(emu, case, dtype):
    rows, dim, cols = case
    # magnitudes over six decades (fp16 subnormals included), so a dropped lo part shows
    scale = 10.0 ** torch.empty(rows, 1).uniform_(-5 if dtype == torch.float16 else -6, 1)
    x = (torch.randn(rows, dim) * scale).to(dtype)
    w = torch.randn(cols, dim) * 10.0 ** torch.empty(cols, dim).uniform_(-3, 0)
    z = poisoned(rows, cols, dtype=torch.float32)
    assert emu.emu_ss2d_xproj(CODES[dtype], ptr(x), ptr(w), None, ptr(z), None, rows, dim, cols,
                              0) == 0
    exact = x.double() @ w.double().t()
    # each product within 2^-16 of |x w| for bf16 x (W's lo part rounded to bf16), 2^-15 for
    # fp16 x (its x_lo W_lo term dropped too): twice that bounds the fp32 sums; W rounded once to
    # bf16 misses by up to 2^-8
    per_product = 2.0 ** -15 if dtype == torch.float16 else 2.0 ** -16
    bound = 2 * per_product * (x.double().abs() @ w.double().abs().t()) + 1e-30
    err = (z.double() - exact).abs()
    assert torch.all(err <= bound), float((err / bound).max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ss2d_xproj_refuses_what_it_cannot_read(emu, dtype):
    x = torch.randn(40, 20).to(dtype)
    w = torch.randn(6, 20)
    z = poisoned(40, 6, dtype=torch.float32)
    # dim not a multiple of 8, an x not 16-byte aligned, an odd column count
    assert emu.emu_ss2d_xproj(CODES[dtype], ptr(x), ptr(w), None, ptr(z), None, 40, 20, 6, 0) != 0
    xs = torch.randn(40 * 16 + 1).to(dtype)
    assert emu.emu_ss2d_xproj(CODES[dtype], ptr(xs[1:]), ptr(w), None, ptr(z), None, 40, 16, 6,
                              0) != 0
    assert emu.emu_ss2d_xproj(CODES[dtype], ptr(xs), ptr(w), None, ptr(z), None, 40, 16, 5, 0) != 0
    assert torch.isnan(z).all()  # nothing written


# The backward's use of it: dx = dx_scan + dz W in x's dtype. (rows, dim = 4 (R + 2N), cols = D)
XPROJ_BWD_CASES = [(1, 8, 2), (130, 32, 40), (257, 56, 96), (37, 24, 72), (140, 104, 36)]


@pytest.mark.parametrize("case", XPROJ_BWD_CASES, ids=lambda c: "m{}k{}d{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ss2d_xproj_backward(emu, case, dtype):
    rows, dim, cols = case
    dz = torch.randn(rows, dim) * 10.0 ** torch.empty(rows, 1).uniform_(-4, 1)
    wt = torch.randn(cols, dim) * 10.0 ** torch.empty(cols, dim).uniform_(-3, 0)
    add = torch.randn(rows, cols)
    want = add.double() + dz.double() @ wt.double().t()
    # each product within 3 x 2^-16 of |dz w| (dz's and W's lo parts rounded, lo lo dropped)
    bound = 2.0 ** -13 * (dz.double().abs() @ wt.double().abs().t())
    # the kernel's fp32 sums, before the rounding to x's dtype
    out32 = poisoned(rows, cols, dtype=torch.float32)
    assert emu.emu_ss2d_xproj(CODES[dtype], ptr(dz), ptr(wt), ptr(add), ptr(out32), None, rows,
                              dim, cols, 1) == 0
    err = (out32.double() - want).abs()
    assert torch.all(err <= bound + 2.0 ** -23 * want.abs() + 1e-30), float((err / bound).max())
    # as the op runs it: rounded once to x's dtype
    out = poisoned(rows, cols, dtype=dtype)
    split = poisoned(rows, 2 * dim, dtype=torch.bfloat16)  # dz as bf16 hi | lo, for dW_x
    bf16 = dtype == torch.bfloat16
    if not bf16:  # (the split is for bf16 x's GEMM only)
        assert emu.emu_ss2d_xproj(CODES[dtype], ptr(dz), ptr(wt), ptr(add), ptr(out),
                                  ptr(split), rows, dim, cols, 0) != 0
    assert emu.emu_ss2d_xproj(CODES[dtype], ptr(dz), ptr(wt), ptr(add), ptr(out),
                              ptr(split) if bf16 else None, rows, dim, cols, 0) == 0
    unit = 2.0 ** -8 if bf16 else 2.0 ** -11  # the dtype's unit roundoff
    assert torch.all((out.double() - want).abs() <= unit * want.abs() + 1.01 * bound + 1e-30)
    if bf16:
        hi, lo = split[:, :dim], split[:, dim:]
        assert torch.equal(hi, dz.to(torch.bfloat16))
        assert torch.equal(lo, (dz - hi.float()).to(torch.bfloat16))
