"""cross_scan and cross_merge against the index table of DESIGN.md, in float64."""

import naive
import pytest
import torch
from conftest import backend_params

from pyssm import _extension, ops

GRIDS = [(1, 1), (1, 7), (3, 3), (7, 14), (14, 7), (17, 14), (17, 17)]


def _x(shape, device, dtype=torch.float64, requires_grad=False):
    return torch.randn(shape, dtype=dtype, device=device).requires_grad_(requires_grad)


@pytest.mark.parametrize("device,backend", backend_params("cross_scan"))
@pytest.mark.parametrize("H,W", GRIDS)
def test_cross_scan_matches_index_table(device, backend, H, W):
    x = _x((2, 3, H, W), device)
    out = ops.cross_scan(x, backend=backend)
    assert out.shape == (2, 4, 3, H * W) and out.dtype == x.dtype
    torch.testing.assert_close(out.cpu(), naive.cross_scan(x.cpu()), atol=1e-10, rtol=0)


@pytest.mark.parametrize("device,backend", backend_params("cross_merge"))
@pytest.mark.parametrize("H,W", GRIDS)
def test_cross_merge_matches_index_table(device, backend, H, W):
    ys = _x((2, 4, 3, H, W), device)
    out = ops.cross_merge(ys, backend=backend)
    assert out.shape == (2, 3, H * W)
    torch.testing.assert_close(out.cpu(), naive.cross_merge(ys.cpu()), atol=1e-10, rtol=0)


@pytest.mark.parametrize("device,backend", backend_params("cross_scan"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cross_scan_low_precision_is_exact(device, backend, dtype):
    x = _x((1, 5, 7, 3), device, dtype)
    assert torch.equal(ops.cross_scan(x, backend=backend).cpu(), naive.cross_scan(x.cpu()).to(dtype))


@pytest.mark.parametrize("device,backend", backend_params("cross_merge"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cross_merge_low_precision(device, backend, dtype):
    ys = _x((1, 4, 5, 7, 3), device, dtype)
    exact = naive.cross_merge(ys.cpu())
    err = (ops.cross_merge(ys, backend=backend).cpu().double() - exact).abs().max()
    rounding = (exact.to(dtype).double() - exact).abs().max()  # one rounding of the true sum
    assert err <= 2 * rounding + 1e-6


@pytest.mark.parametrize("device,backend", backend_params("cross_scan"))
def test_gradients_against_reference(device, backend):
    x = _x((2, 3, 7, 5), device, requires_grad=True)
    ys = _x((2, 4, 3, 7, 5), device, requires_grad=True)
    for fn, ref, inp, out_shape in ((ops.cross_scan, ops.cross_scan_reference, x, (2, 4, 3, 35)),
                                    (ops.cross_merge, ops.cross_merge_reference, ys, (2, 3, 35))):
        g = torch.randn(out_shape, dtype=torch.float64, device=device)
        (got,) = torch.autograd.grad(fn(inp, backend=backend), inp, g)
        (want,) = torch.autograd.grad(ref(inp), inp, g)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    assert torch.autograd.gradcheck(lambda t: ops.cross_scan(t, backend=backend), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.cross_merge(t, backend=backend), (ys,))


@pytest.mark.parametrize("device,backend", backend_params("cross_scan"))
def test_noncontiguous_nan_and_empty(device, backend):
    base = _x((2, 6, 9, 4), device)
    view = base.permute(0, 3, 1, 2)[:, :, ::2]  # (2, 4, 5, 6), not contiguous
    torch.testing.assert_close(ops.cross_scan(view, backend=backend).cpu(),
                               naive.cross_scan(view.cpu()), atol=0, rtol=0)
    nan_x = _x((1, 2, 3, 3), device)
    nan_x[0, 1, 2, 0] = float("nan")
    out = ops.cross_scan(nan_x, backend=backend)
    assert out[:, :, 1].isnan().sum() == 4 and not out[:, :, 0].isnan().any()
    assert ops.cross_scan(_x((0, 3, 4, 5), device), backend=backend).shape == (0, 4, 3, 20)
    assert ops.cross_merge(_x((2, 4, 0, 4, 5), device), backend=backend).shape == (2, 0, 20)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_inputs(backend):
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        ops.cross_scan(torch.ones(1, 2, 3, 4, dtype=torch.int64), backend=backend)
    with pytest.raises(ValueError, match=r"x must have 4 dimensions \(B, C, H, W\)"):
        ops.cross_scan(torch.randn(2, 3, 4), backend=backend)
    with pytest.raises(ValueError, match=r"ys must have shape \(B, 4, C, H, W\)"):
        ops.cross_merge(torch.randn(1, 3, 2, 4, 4), backend=backend)
    with pytest.raises(ValueError, match="ys must have 5 dimensions"):
        ops.cross_merge(torch.randn(1, 4, 2, 16), backend=backend)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.cross_scan([[1.0]], backend=backend)


def test_direct_op_call_checks_too():
    """torch.ops.pyssm.* called without the Python wrapper still validates in C++."""
    if not _extension.available():
        pytest.skip("extension not built")
    with pytest.raises(ValueError, match="ys must have shape"):
        torch.ops.pyssm.cross_merge(torch.randn(1, 3, 2, 4, 4))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        torch.ops.pyssm.cross_scan(torch.ones(1, 2, 3, 4, dtype=torch.int32))


@pytest.mark.parametrize("device,backend", [p for p in backend_params("cross_scan")
                                            if p.values[1] != "reference"])
def test_opcheck(device, backend):
    x = _x((2, 3, 5, 7), device, requires_grad=True)
    ys = _x((2, 4, 3, 5, 7), device, requires_grad=True)
    torch.library.opcheck(torch.ops.pyssm.cross_scan.default, (x,))
    torch.library.opcheck(torch.ops.pyssm.cross_merge.default, (ys,))


@pytest.mark.slow
@pytest.mark.parametrize("device,backend", [p for p in backend_params("cross_scan")
                                            if p.values[1] != "reference"])
def test_compile_fullgraph(device, backend):
    def f(x):
        ys = ops.cross_scan(x, backend=backend)
        return ops.cross_merge(ys.reshape(*ys.shape[:3], *x.shape[2:]), backend=backend)

    x = _x((2, 3, 5, 7), device, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True)
    g = torch.randn(2, 3, 35, dtype=torch.float64, device=device)
    (got,) = torch.autograd.grad(compiled(x), x, g)
    (want,) = torch.autograd.grad(f(x), x, g)
    torch.testing.assert_close(compiled(x), f(x))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("device,backend", backend_params("cross_scan"))
def test_gradients_match_index_table(device, backend):
    x = _x((2, 3, 5, 4), device, requires_grad=True)
    ys = _x((2, 4, 3, 5, 4), device, requires_grad=True)
    for fn, ref, inp in ((ops.cross_scan, naive.cross_scan, x),
                         (ops.cross_merge, naive.cross_merge, ys)):
        out = fn(inp, backend=backend)
        g = torch.randn_like(out)
        (got,) = torch.autograd.grad(out, inp, g)
        cpu = inp.detach().cpu().requires_grad_()
        (want,) = torch.autograd.grad(ref(cpu), cpu, g.cpu())
        torch.testing.assert_close(got.cpu(), want, atol=1e-10, rtol=0)
