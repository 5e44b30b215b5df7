"""ss2d against an independent float64 composition of DESIGN.md's formulas."""

import math

import naive
import pytest
import torch
from conftest import backend_params
from dispatched import Dispatched

from pyssm import _extension, ops

F64 = torch.float64
EXTENSION = pytest.mark.skipif(not _extension.available(), reason="extension not built")


def make_weights(D, N, R, device, dtype=F64, requires_grad=False):
    """Official VMamba v2 shapes: x_proj (4, R+2N, D), dt_projs (4, D, R), bias (4, D),
    A_logs (4D, N), Ds (4D,)."""
    ws = [torch.randn(4, R + 2 * N, D, dtype=dtype, device=device) / math.sqrt(D),
          torch.randn(4, D, R, dtype=dtype, device=device) / math.sqrt(R),
          torch.randn(4, D, dtype=dtype, device=device) * 0.5,
          torch.log(torch.rand(4 * D, N, dtype=dtype, device=device) * 2 + 0.1),
          torch.randn(4 * D, dtype=dtype, device=device)]
    return [w.requires_grad_(requires_grad) for w in ws]


def make_x(B, H, W, D, device, channels_first=False, dtype=F64, requires_grad=False):
    shape = (B, D, H, W) if channels_first else (B, H, W, D)
    return torch.randn(shape, dtype=dtype, device=device).requires_grad_(requires_grad)


GRIDS = [(1, 1), (1, 3), (3, 1), (3, 7), (7, 3), (14, 14), (17, 14), (17, 17)]
# d_state 1 (VMamba v2) on every grid; d_state 16 (vanilla VMamba) on the ones the slow naive
# float64 scan gets through quickly.
GRID_CASES = [(H, W, 1) for H, W in GRIDS] + [(H, W, 16) for H, W in GRIDS if H * W <= 50]


@pytest.mark.parametrize("device,backend", backend_params("ss2d"))
@pytest.mark.parametrize("H,W,N", GRID_CASES)
@pytest.mark.parametrize("channels_first", [False, True])
def test_forward_matches_formula(device, backend, H, W, N, channels_first):
    D, R = 3, 2
    x = make_x(1 + (H % 2), H, W, D, device, channels_first)
    ws = make_weights(D, N, R, device)
    out = ops.ss2d(x, *ws, channels_first=channels_first, backend=backend)
    assert out.shape == x.shape and out.dtype == F64
    want = naive.ss2d(x.cpu(), *(w.cpu() for w in ws), channels_first=channels_first)
    torch.testing.assert_close(out.cpu(), want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("device,backend", backend_params("ss2d"))
@pytest.mark.parametrize("channels_first", [False, True])
@pytest.mark.parametrize("N", [1, 4])
def test_gradients_against_reference_autograd(device, backend, channels_first, N):
    x = make_x(2, 5, 3, 4, device, channels_first, requires_grad=True)
    ws = make_weights(4, N, 3, device, requires_grad=True)
    out = ops.ss2d(x, *ws, channels_first=channels_first, backend=backend)
    ref = ops.ss2d_reference(x, *ws, channels_first=channels_first)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *ws], g)
    want = torch.autograd.grad(ref, [x, *ws], g)
    names = "x x_proj_weight dt_projs_weight dt_projs_bias A_logs Ds".split()
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=f"d{name}")


@pytest.mark.parametrize("device,backend", backend_params("ss2d"))
def test_gradcheck(device, backend):
    x = make_x(1, 3, 2, 2, device, requires_grad=True)
    ws = make_weights(2, 2, 1, device, requires_grad=True)
    # CUDA: the four directions add into y and dx with float64 atomics, in no fixed order, so
    # two backward passes may differ in the last bits (test_cuda_run_to_run bounds it)
    nondet = 1e-12 if backend == "cuda" else 0.0
    assert torch.autograd.gradcheck(lambda *t: ops.ss2d(*t, backend=backend), (x, *ws),
                                    nondet_tol=nondet)


@pytest.mark.parametrize("device,backend", [p for p in backend_params("ss2d") if p.id == "cuda"])
def test_cuda_run_to_run(device, backend):
    """The same inputs twice: the CUDA kernels add the four directions into y (forward) and dx
    (backward), and channel blocks into dz, with fp32 atomics whose order varies, so results
    may differ by float32 rounding of those sums (a few ulp), never more."""
    x = make_x(2, 23, 19, 130, device, dtype=torch.float32, requires_grad=True)
    ws = make_weights(130, 1, 3, device, dtype=torch.float32, requires_grad=True)
    g = torch.randn(x.shape, device=device)
    runs = []
    for _ in range(2):
        out = ops.ss2d(x, *ws, backend=backend)
        runs.append([out.detach(), *torch.autograd.grad(out, [x, *ws], g)])
    for name, a, b in zip(["out"] + [f"d{n}" for n in "x x_proj_weight dt_projs_weight "
                                     "dt_projs_bias A_logs Ds".split()], *runs):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), name


@pytest.mark.parametrize("device,backend", backend_params("ss2d"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision(device, backend, dtype):
    x = make_x(2, 7, 5, 8, device, dtype=dtype)
    ws = make_weights(8, 1, 1, device, dtype=torch.float32)
    exact = naive.ss2d(x.cpu(), *(w.cpu() for w in ws))
    for out_float32 in (False, True):
        out = ops.ss2d(x, *ws, out_float32=out_float32, backend=backend)
        assert out.dtype == (torch.float32 if out_float32 else dtype)
        err = (out.cpu().double() - exact).abs().max()
        rounding = (exact.to(out.dtype).double() - exact).abs().max()
        assert err <= 2 * rounding + 1e-4 * exact.abs().max(), (err, rounding)


@pytest.mark.parametrize("device,backend", backend_params("ss2d"))
def test_noncontiguous_nan_and_empty(device, backend):
    ws = make_weights(4, 2, 2, device)
    x_nc = torch.randn(2, 4, 6, 5, dtype=F64, device=device).permute(0, 2, 3, 1)[:, ::2]
    torch.testing.assert_close(ops.ss2d(x_nc, *ws, backend=backend).cpu(),
                               naive.ss2d(x_nc.cpu(), *(w.cpu() for w in ws)),
                               atol=1e-10, rtol=1e-10)
    x = make_x(2, 3, 3, 4, device)
    x[1, 1, 1, 2] = float("nan")
    out = ops.ss2d(x, *ws, backend=backend)
    assert out[1].isnan().any() and not out[0].isnan().any()
    assert ops.ss2d(make_x(0, 3, 3, 4, device), *ws, backend=backend).shape == (0, 3, 3, 4)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_inputs(backend):
    D, N, R = 4, 2, 3
    x = make_x(1, 3, 3, D, "cpu")
    xp, dtw, dtb, al, ds = make_weights(D, N, R, "cpu")

    def call(**kw):
        args = dict(x=x, x_proj_weight=xp, dt_projs_weight=dtw, dt_projs_bias=dtb, A_logs=al,
                    Ds=ds)
        args.update(kw)
        return ops.ss2d(**args, backend=backend)

    with pytest.raises(ValueError, match=r"x_proj_weight must have shape \(4, 7, 4\) \(4, R \+ 2N, D\)"):
        call(x_proj_weight=xp[:, :6])
    with pytest.raises(ValueError, match=r"A_logs must have shape \(16, 2\) \(4\*D, N\)"):
        call(A_logs=al[:12])
    with pytest.raises(ValueError, match=r"dt_projs_weight must have shape \(4, 4, 3\)"):
        call(dt_projs_weight=dtw[:, :3])
    with pytest.raises(ValueError, match=r"dt_projs_bias must have shape \(4, 4\)"):
        call(dt_projs_bias=dtb.flatten())
    with pytest.raises(ValueError, match=r"Ds must have shape \(16,\)"):
        call(Ds=ds[:15])
    with pytest.raises(ValueError, match=r"x must have 4 dimensions \(B, H, W, D\)"):
        call(x=x[0])
    with pytest.raises(ValueError, match=r"dt_projs_weight must have shape \(4, 5, 3\)"):
        call(x=make_x(1, 3, 3, 5, "cpu"))
    with pytest.raises(TypeError, match="A_logs must be a floating-point tensor"):
        call(A_logs=al.int())


@EXTENSION
def test_direct_op_call_checks_too():
    x = make_x(1, 3, 3, 4, "cpu")
    xp, dtw, dtb, al, ds = make_weights(4, 2, 3, "cpu")
    with pytest.raises(ValueError, match="x_proj_weight must have shape"):
        torch.ops.pyssm.ss2d(x, xp[:, :6], dtw, dtb, al, ds, False, False)


@pytest.mark.parametrize("device,backend", [p for p in backend_params("ss2d")
                                            if p.values[1] != "reference"])
@pytest.mark.parametrize("channels_first", [False, True])
def test_opcheck(device, backend, channels_first):
    x = make_x(2, 3, 5, 4, device, channels_first, requires_grad=True)
    ws = make_weights(4, 2, 2, device, requires_grad=True)
    torch.library.opcheck(torch.ops.pyssm.ss2d.default, (x, *ws, channels_first, False))
    if channels_first:  # stored channels-last: the fake kernels' strides must agree too
        x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        torch.library.opcheck(torch.ops.pyssm.ss2d.default, (x_cl, *ws, True, False))


@pytest.mark.parametrize("device,backend", backend_params("ss2d"))
def test_channels_last_memory_in_and_out(device, backend):
    """A channels-first x stored channels-last (how pyssm's VMamba runs) gives an output and an
    x gradient stored channels-last, equal to the contiguous x's; other layouts give contiguous
    ones."""
    x = make_x(2, 5, 3, 4, device, channels_first=True)
    ws = make_weights(4, 2, 2, device)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    out_cl = ops.ss2d(x_cl, *ws, channels_first=True, backend=backend)
    out = ops.ss2d(x, *ws, channels_first=True, backend=backend)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    assert not out_cl.is_contiguous() and out.is_contiguous()
    torch.testing.assert_close(out_cl, out, atol=1e-12, rtol=1e-12)
    if backend != "reference":
        g = torch.randn_like(out)
        dx_cl = torch.ops.pyssm.ss2d_backward(g, x_cl, *ws, True)[0]
        dx = torch.ops.pyssm.ss2d_backward(g, x, *ws, True)[0]
        assert dx_cl.is_contiguous(memory_format=torch.channels_last) and not dx_cl.is_contiguous()
        assert dx.is_contiguous()
        torch.testing.assert_close(dx_cl, dx, atol=1e-12, rtol=1e-12)
    # channels-last (B, H, W, D) input stored in any order: a contiguous output
    x_odd = make_x(2, 5, 3, 4, device).permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    assert ops.ss2d(x_odd, *ws, backend=backend).is_contiguous()


@pytest.mark.slow
@pytest.mark.parametrize("device,backend", [p for p in backend_params("ss2d")
                                            if p.values[1] != "reference"])
def test_compile_fullgraph(device, backend):
    x = make_x(2, 3, 5, 4, device, requires_grad=True)
    ws = make_weights(4, 2, 2, device, requires_grad=True)

    def f(x, *ws):
        return torch.nn.functional.layer_norm(ops.ss2d(x, *ws, backend=backend), (4,))

    compiled = torch.compile(f, fullgraph=True)
    out = compiled(x, *ws)
    torch.testing.assert_close(out, f(x, *ws))
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [x, *ws], g),
                    torch.autograd.grad(f(x, *ws), [x, *ws], g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device,backend", backend_params("ss2d"))
@pytest.mark.parametrize("channels_first", [False, True])
def test_gradients_match_independent_math(device, backend, channels_first):
    """Gradients of the op against autograd through the independent float64 composition."""
    x = make_x(1, 3, 4, 2, device, channels_first, requires_grad=True)
    ws = make_weights(2, 2, 1, device, requires_grad=True)
    out = ops.ss2d(x, *ws, channels_first=channels_first, backend=backend)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *ws], g)
    cpu = [t.detach().cpu().requires_grad_() for t in (x, *ws)]
    want = torch.autograd.grad(naive.ss2d(*cpu, channels_first=channels_first), cpu, g.cpu())
    names = "x x_proj_weight dt_projs_weight dt_projs_bias A_logs Ds".split()
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a.cpu(), b, atol=1e-10, rtol=1e-10, msg=f"d{name}")


@pytest.mark.parametrize("device,backend", [p for p in backend_params("ss2d") if p.id == "cuda"])
@pytest.mark.parametrize("B,H,W,D,N,R,channels_first", [
    (1, 23, 23, 5, 1, 2, False),   # one image: the fused kernel cuts each scan into chunks
    (3, 17, 31, 130, 3, 4, True),  # two channel blocks, channels-first input
    (2, 1, 97, 7, 16, 1, False),   # a single row; d_state 16
])
def test_cuda_fused_forward_at_sizes_that_chunk(device, backend, B, H, W, D, N, R,
                                                channels_first):
    """CUDA: the fused forward where the scans are split into chunks with carries, and where
    the channels span several blocks, against the float64 CPU kernel."""
    x = make_x(B, H, W, D, device, channels_first=channels_first)
    weights = make_weights(D, N, R, device)
    got = ops.ss2d(x, *weights, channels_first=channels_first, backend=backend)
    want = ops.ss2d(x.cpu(), *(w.cpu() for w in weights), channels_first=channels_first,
                    backend="cpu")
    torch.testing.assert_close(got.cpu(), want, atol=1e-9, rtol=1e-9)
    lowp = ops.ss2d(x.float(), *weights, channels_first=channels_first, backend=backend)
    torch.testing.assert_close(lowp.double().cpu(), want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("device,backend", [p for p in backend_params("ss2d") if p.id == "cuda"])
@pytest.mark.parametrize("env", [{}, {"PYSSM_SS2D_BLOCKS_PER_SM": "0"}, {"PYSSM_SS2D_FWD": "v2"}],
                         ids=["v3", "v3-one-chunk", "v2"])
@pytest.mark.parametrize("B,H,W,D,R,channels_first", [
    (1, 23, 23, 5, 2, False),     # one image: chunks; 5 channels, no 16-byte vectors
    (3, 17, 31, 40, 6, True),     # two channel blocks (32 + 8), 16-byte vectors, channels-first
    (2, 9, 40, 96, 12, False),    # VMamba-T's width; dt_rank 12 (16-wide registers)
    (1, 11, 13, 33, 24, False),   # dt_rank 24 (32-wide registers)
    (1, 7, 9, 20, 40, False),     # dt_rank 40: dt_projs_weight in shared memory
])
def test_cuda_d_state_1_forward(device, backend, env, B, H, W, D, R, channels_first,
                                monkeypatch):
    """CUDA, d_state 1: the dedicated forward (v3; one chunk a scan, or the default chunks) and
    the general one (v2, PYSSM_SS2D_FWD=v2), against the float64 CPU kernel."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    x = make_x(B, H, W, D, device, channels_first=channels_first)
    weights = make_weights(D, 1, R, device)
    got = ops.ss2d(x, *weights, channels_first=channels_first, backend=backend)
    want = ops.ss2d(x.cpu(), *(w.cpu() for w in weights), channels_first=channels_first,
                    backend="cpu")
    torch.testing.assert_close(got.cpu(), want, atol=1e-9, rtol=1e-9)
    lowp = ops.ss2d(x.float(), *weights, channels_first=channels_first, backend=backend)
    torch.testing.assert_close(lowp.double().cpu(), want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("device,backend", [p for p in backend_params("ss2d") if p.id == "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,W,D,N,R,offset", [
    (2, 9, 40, 96, 1, 12, 0),   # VMamba-T's width: the tensor-core x_proj
    (1, 11, 13, 40, 16, 6, 0),  # d_state 16 (the general forward), 4 x 38 columns of z
    (1, 7, 9, 36, 1, 3, 0),     # D not a multiple of 8: the GEMM
    (1, 7, 9, 40, 1, 3, 1),     # x not 16-byte aligned: the GEMM
])
def test_cuda_xproj_kernel_matches_the_gemm(device, backend, dtype, B, H, W, D, N, R, offset,
                                            monkeypatch):
    """CUDA, 16-bit x: the op with the tensor-core x_proj (ss2d_xproj_kernel.cuh) against the
    same op with x cast to fp32 and an fp32 GEMM (PYSSM_SS2D_XPROJ=gemm), output and gradients
    in fp32: z differs by at most ~2^-16 of its terms, so they agree to 1e-4; and both against
    the float64 CPU kernel."""
    n = B * H * W * D
    x = torch.randn(n + offset, device=device).to(dtype)[offset:].view(B, H, W, D)
    ws = make_weights(D, N, R, device, dtype=torch.float32)
    g = torch.randn(B, H, W, D, device=device)

    def run():
        ts = [t.detach().clone().requires_grad_() for t in (x, *ws)]
        if offset:
            ts[0] = x.detach().requires_grad_()  # (the misaligned view itself)
        out = ops.ss2d(*ts, out_float32=True, backend=backend)
        return [out.detach()] + list(torch.autograd.grad(out, ts, g))

    got = run()
    monkeypatch.setenv("PYSSM_SS2D_XPROJ", "gemm")
    gemm = run()
    names = "y dx dx_proj_weight ddt_projs_weight ddt_projs_bias dA_logs dDs".split()
    for name, a, b in zip(names, got, gemm):
        assert (a.double() - b.double()).abs().max() <= 1e-4 * b.double().abs().max(), name
    exact = ops.ss2d(x.cpu().double(), *(w.cpu().double() for w in ws), backend="cpu")
    assert (got[0].cpu().double() - exact).abs().max() <= 1e-4 * exact.abs().max()


# The fused CUDA backward's algorithm (chunks, tiles, carries; ss2d_bwd_model.py), on the CPU.
# (B, H, W, D, R, N, chunks, tile): one chunk and several, partial last chunks and tiles, a grid
# of one row, d_state 1 to 16 (tile None: the kernel's own tile for that d_state).
BWD_MODEL_CASES = [
    (2, 3, 5, 4, 2, 1, 1, None), (1, 7, 4, 3, 3, 2, 4, None), (2, 5, 5, 2, 1, 3, 7, 4),
    (1, 1, 6, 2, 2, 1, 3, 2), (1, 6, 7, 5, 3, 16, 2, None), (1, 9, 9, 3, 2, 8, 3, None),
    (1, 13, 11, 2, 1, 1, 5, None),
]


@pytest.mark.parametrize("case", BWD_MODEL_CASES,
                         ids=lambda c: "b{}h{}w{}d{}r{}n{}c{}t{}".format(*c))
def test_fused_backward_model_matches_autograd(case):
    """The float64 model of the fused CUDA backward (ss2d_bwd_model.py) gives autograd's
    gradients through the reference, for every argument."""
    import ss2d_bwd_model
    B, H, W, D, R, N, chunks, tile = case
    x = make_x(B, H, W, D, "cpu", requires_grad=True)
    ws = make_weights(D, N, R, "cpu", requires_grad=True)
    out = ops.ss2d_reference(x, *ws)
    g = torch.randn_like(out)
    want = torch.autograd.grad(out, [x, *ws], g)
    got = ss2d_bwd_model.ss2d_backward_model(
        g.numpy(), *(t.detach().numpy() for t in (x, *ws)), chunks=chunks, tile=tile)
    names = "x x_proj_weight dt_projs_weight dt_projs_bias A_logs Ds".split()
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(torch.from_numpy(a), b, atol=1e-10, rtol=1e-10,
                                   msg=f"d{name}")


def _grads(x, ws, g, dev, dtype, backend, channels_first):
    """ss2d's gradients in every argument at (x, *ws) and output gradient g, all moved to
    ``dev`` in ``dtype``, as float64 CPU tensors."""
    ts = [t.detach().to(dev, dtype).requires_grad_() for t in (x, *ws)]
    out = ops.ss2d(*ts, channels_first=channels_first, backend=backend)
    return [a.double().cpu() for a in torch.autograd.grad(out, ts, g.to(dev, dtype))]


@pytest.mark.parametrize("device,backend", [p for p in backend_params("ss2d") if p.id == "cuda"])
@pytest.mark.parametrize("B,H,W,D,N,R,channels_first", [
    (1, 23, 23, 5, 1, 2, False),    # one image: chunks with carries both ways
    (3, 17, 31, 130, 3, 4, True),   # two channel blocks (dz by atomics), channels-first
    (2, 1, 97, 7, 16, 1, False),    # a single row; d_state 16 (tiles of 4)
    (2, 9, 11, 33, 8, 6, False),    # d_state 8, a block of 64 threads with 31 idle
    (3, 17, 31, 40, 1, 6, True),    # d_state 1 (v3's main kernel): two channel blocks
    (2, 9, 40, 96, 1, 12, False),   # d_state 1, VMamba-T's width, dt_rank 12
    (2, 14, 14, 40, 1, 24, False),  # dt_rank 24 (VMamba-T stage 3's): v3's dpre and GEMMs
    (1, 7, 11, 37, 1, 48, True),    # dt_rank 48, partial channel block, channels-first
])
@pytest.mark.parametrize("env", [{}, {"PYSSM_SS2D_BWD": "v1-summary"}, {"PYSSM_SS2D_BWD": "v1"},
                                 {"PYSSM_SS2D_BWD": "v3-wide"}],
                         ids=["default", "v1-summary", "v1", "v3-wide"])
def test_cuda_fused_backward_at_sizes_that_chunk(device, backend, B, H, W, D, N, R,
                                                 channels_first, env, monkeypatch):
    """CUDA: every gradient of the fused backward against the float64 CPU kernel, in float64
    and in float32 (whose bound covers fp32 rounding and the order of the atomic sums); at
    d_state 1 v3's kernels by default (over dt_rank 16 with dt_projs_weight's gradient and
    dz's dt part by GEMMs from dpre), v3's main one after v1's summary with
    PYSSM_SS2D_BWD=v1-summary, v1's with PYSSM_SS2D_BWD=v1, v3's dpre variant at every dt_rank
    with PYSSM_SS2D_BWD=v3-wide."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    x = make_x(B, H, W, D, device, channels_first=channels_first)
    ws = make_weights(D, N, R, device)
    g = torch.randn_like(x)

    def grads(dev, dtype, backend):
        return _grads(x, ws, g, dev, dtype, backend, channels_first)

    want = grads("cpu", F64, "cpu")
    names = "x x_proj_weight dt_projs_weight dt_projs_bias A_logs Ds".split()
    for name, a, b in zip(names, grads(device, F64, backend), want):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=f"d{name} float64")
    for name, a, b in zip(names, grads(device, torch.float32, backend), want):
        assert (a - b).abs().max() <= 2e-4 * b.abs().max() + 1e-6, f"d{name} float32"


@pytest.mark.parametrize("device,backend", backend_params("ss2d"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("out_float32", [False, True])
def test_low_precision_gradients(device, backend, dtype, out_float32):
    """Half-precision x, fp32 weights: each gradient within twice the rounding of its own dtype
    (plus 1e-3 of its size for the fp32 sums) of the exact float64 gradient of the same rounded
    inputs; with out_float32 the output gradient comes in fp32 (on CUDA: read as fp32)."""
    x = make_x(2, 7, 5, 24, device, dtype=dtype, requires_grad=True)
    ws = make_weights(24, 1, 3, device, dtype=torch.float32, requires_grad=True)
    out = ops.ss2d(x, *ws, out_float32=out_float32, backend=backend)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *ws], g)
    exact_in = [t.detach().cpu().double().requires_grad_() for t in (x, *ws)]
    exact = torch.autograd.grad(naive.ss2d(*exact_in), exact_in, g.cpu().double())
    names = "x x_proj_weight dt_projs_weight dt_projs_bias A_logs Ds".split()
    for name, a, b in zip(names, got, exact):
        assert a.dtype == (dtype if name == "x" else torch.float32), name
        rounding = (b.to(a.dtype).double() - b).abs().max()
        err = (a.cpu().double() - b).abs().max()
        assert err <= 2 * rounding + 1e-3 * b.abs().max(), (name, err, rounding)


# Training keeps the forward's tile states for the backward (ss2d_with_states).

@EXTENSION
def test_training_calls_keep_the_states(monkeypatch):
    """Where autograd records, ss2d runs as ss2d_with_states (its backward gets the states);
    under no_grad, with nothing requiring a gradient, or with PYSSM_SS2D_STATES=0, as ss2d;
    the same values and gradients either way."""
    x = make_x(2, 5, 3, 4, "cpu", requires_grad=True)
    ws = make_weights(4, 1, 3, "cpu", requires_grad=True)

    def run(*args, grad=True):
        with Dispatched() as seen, torch.set_grad_enabled(grad):
            out = ops.ss2d(*args, backend="cpu")
        return out, [f._opname for f in seen.ops if f.namespace == "pyssm"]

    out, names = run(x, *ws)
    assert names == ["ss2d_with_states"]
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *ws], g)
    assert run(x, *ws, grad=False)[1] == ["ss2d"]
    assert run(x.detach(), *(w.detach() for w in ws))[1] == ["ss2d"]
    monkeypatch.setenv("PYSSM_SS2D_STATES", "0")
    plain, names = run(x, *ws)
    assert names == ["ss2d"]
    torch.testing.assert_close(out, plain, atol=0, rtol=0)
    for a, b in zip(got, torch.autograd.grad(plain, [x, *ws], g)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@EXTENSION
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_states_op_on_the_cpu_keeps_none(dtype):
    """The composed CPU core keeps no states: y as ss2d's, an empty accumulation-type tensor."""
    x = make_x(2, 5, 3, 4, "cpu", dtype=dtype)
    ws = make_weights(4, 1, 3, "cpu")
    y, states = torch.ops.pyssm.ss2d_with_states(x, *ws, False, False)
    torch.testing.assert_close(y, torch.ops.pyssm.ss2d(x, *ws, False, False), atol=0, rtol=0)
    assert states.numel() == 0
    assert states.dtype == (F64 if dtype == F64 else torch.float32)


@EXTENSION
def test_backward_checks_the_states_it_is_given():
    """ss2d_backward's states: the forward's shape, dtype and device, or empty / None."""
    x = make_x(1, 9, 15, 4, "cpu")
    ws = make_weights(4, 1, 3, "cpu")
    g = torch.randn_like(x)
    want = torch.ops.pyssm.ss2d_backward(g, x, *ws, False)
    for states in (None, torch.empty(0, dtype=F64)):
        for a, b in zip(torch.ops.pyssm.ss2d_backward(g, x, *ws, False, states), want):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    # 135 positions: 3 tiles of 64
    with pytest.raises(RuntimeError, match=r"states must be .*\[1, 4, 3, 4\].*got \[1, 4, 2, 4\]"):
        torch.ops.pyssm.ss2d_backward(g, x, *ws, False, torch.zeros(1, 4, 2, 4, dtype=F64))
    with pytest.raises(RuntimeError, match="states must be Double .*got Float"):
        torch.ops.pyssm.ss2d_backward(g, x, *ws, False, torch.zeros(1, 4, 3, 4))


@pytest.mark.parametrize("device,backend", [p for p in backend_params("ss2d") if p.id == "cuda"])
@pytest.mark.parametrize("B,H,W,D,R,channels_first", [
    (68, 9, 13, 40, 6, False),   # 68 x 4 x 2 blocks: one chunk a scan; 2 tiles, a partial one
    (34, 11, 12, 64, 24, True),  # dt_rank 24 (dpre and the GEMMs), channels-first
])
def test_cuda_backward_from_the_forward_states(device, backend, B, H, W, D, R, channels_first,
                                               monkeypatch):
    """CUDA, batches whose blocks fill the GPU (2 an SM on up to 132 SMs): the forward keeps
    the states and the backward runs its main kernel alone from them; every gradient against
    the float64 CPU kernel and against the summary pass (PYSSM_SS2D_STATES=0)."""
    x = make_x(B, H, W, D, device, channels_first=channels_first)
    ws = make_weights(D, 1, R, device)
    g = torch.randn_like(x)
    L = H * W
    assert torch.cuda.get_device_properties(device).multi_processor_count * 2 <= B * 4 * (
        -(-D // 32)), "a GPU with more SMs chunks these scans: grow B"
    y, states = torch.ops.pyssm.ss2d_with_states(x.float(), *(w.float() for w in ws),
                                                  channels_first, False)
    assert states.shape == (B, 4, -(-L // 64), D) and states.dtype == torch.float32

    def grads(dev, dtype, backend):
        return _grads(x, ws, g, dev, dtype, backend, channels_first)

    want = grads("cpu", F64, "cpu")
    names = "x x_proj_weight dt_projs_weight dt_projs_bias A_logs Ds".split()
    kept = grads(device, torch.float32, backend)
    for name, a, b in zip(names, grads(device, F64, backend), want):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=f"d{name} float64")
    for name, a, b in zip(names, kept, want):
        assert (a - b).abs().max() <= 2e-4 * b.abs().max() + 1e-6, f"d{name} float32"
    monkeypatch.setenv("PYSSM_SS2D_STATES", "0")
    for name, a, b in zip(names, grads(device, torch.float32, backend), kept):
        assert (a - b).abs().max() <= 2e-4 * b.abs().max() + 1e-6, f"d{name} with / without"
