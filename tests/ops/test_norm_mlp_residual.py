"""norm_mlp_residual (the residual add, a LayerNorm and a whole MLP added back, in one pass)
against float64, on the Triton kernel (compiled on a GPU; Triton's interpreter on CPU tensors
elsewhere) and the reference. The output's memory is poisoned by tests/conftest.py."""

import pytest
import torch
import torch.nn.functional as F
from float64_bound import err, multiplied64
from triton_params import PARAMS

from pyssm.ops import norm_mlp_residual_triton
from pyssm.ops.layer_norm import layer_norm
from pyssm.ops.linear_gelu import ACTIVATIONS, activate
from pyssm.ops.mlp_residual import mlp_residual_
from pyssm.ops.norm_mlp_residual import norm_mlp_residual, norm_mlp_residual_reference

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# (leading dims, C, H): one of each; odd sizes below a tile (C not a power of two, H not a
# multiple of the hidden step); VMamba's 96 -> 384 -> 96 over more rows than one 64-row tile;
# 160 wide (32-row tiles 256 wide); 256, the widest the kernel takes; 300 (layer_norm's and
# mlp_residual_'s kernels)
SHAPES = [((1,), 1, 1), ((3, 5), 7, 37), ((2, 133), 96, 384), ((70,), 160, 70), ((3,), 256, 50),
          ((2,), 300, 20)]


def _inputs(lead, C, H, device, x_dtype, branch_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # the stream with an offset and a spread per row (the variance is of the centred values)
    x = torch.randn(*lead, C, generator=g) * 2 + torch.randn(*lead, 1, generator=g) * 5
    branch = torch.randn(*lead, C, generator=g)
    nw = 1 + 0.3 * torch.randn(C, generator=g)
    nb = 0.2 * torch.randn(C, generator=g)
    w1 = torch.randn(H, C, generator=g) / C ** 0.5
    b1 = 0.5 * torch.randn(H, generator=g)
    w2 = torch.randn(C, H, generator=g) / max(H, 1) ** 0.5
    b2 = 0.5 * torch.randn(C, generator=g)
    return [x.to(x_dtype).to(device), branch.to(branch_dtype).to(device),
            *(t.to(device) for t in (nw, nb, w1, b1, w2, b2))]


def _exact(x, branch, nw, nb, w1, b1, w2, b2, eps, dtype, activation="gelu"):
    """float64 math on the op's operands (the weights rounded to the products' dtype), no
    rounding of the sum, the normalised sum, the hidden layer or the MLP's output."""
    s = x.cpu().double() + branch.cpu().double()
    h = F.layer_norm(s, s.shape[-1:], None if nw is None else nw.cpu().double(),
                     None if nb is None else nb.cpu().double(), eps)
    hidden = activate(F.linear(h, multiplied64(w1, dtype), multiplied64(b1, dtype)), activation)
    return s + F.linear(hidden, multiplied64(w2, dtype), multiplied64(b2, dtype))


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("lead,C,H", SHAPES)
@pytest.mark.parametrize("x_dtype,branch_dtype,dtype", [
    (FP32, FP32, FP32), (FP32, BF16, BF16), (FP32, FP16, FP16), (BF16, BF16, BF16),
    (BF16, FP32, BF16), (FP32, BF16, FP32)])
@pytest.mark.parametrize("affine", [True, False])
def test_against_float64(device, backend, lead, C, H, x_dtype, branch_dtype, dtype, affine):
    """Every output within twice the error of torch's own ops in the same dtypes (the
    reference) against float64, plus a floor of float32 rounding; x unchanged."""
    x, branch, nw, nb, w1, b1, w2, b2 = _inputs(lead, C, H, device, x_dtype, branch_dtype)
    if not affine:
        nw = nb = b1 = b2 = None
    kept = x.clone()
    exact = _exact(x, branch, nw, nb, w1, b1, w2, b2, 1e-5, dtype)
    own = norm_mlp_residual_reference(x, branch, nw, nb, w1, b1, w2, b2, dtype=dtype)
    with torch.no_grad():
        got = norm_mlp_residual(x, branch, nw, nb, w1, b1, w2, b2, dtype=dtype, backend=backend)
    assert got.dtype == torch.promote_types(x_dtype, branch_dtype) and got.shape == x.shape
    assert torch.isfinite(got).all()
    assert err(got, exact) <= 2 * err(own, exact) + 1e-5 * (1 + exact.abs().max().item())
    torch.testing.assert_close(x, kept, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", PARAMS[::2])
@pytest.mark.parametrize("activation,stream", [(a, FP32) for a in ACTIVATIONS] + [("gelu", BF16)])
def test_equals_layer_norm_then_mlp_residual(device, backend, activation, stream):
    """A bf16 branch into a float32 stream, each activation, and into a bf16 stream: the values
    of the two ops it fuses (the normalised sum rounded to bf16 as layer_norm writes it, the sum
    rounded to the stream's dtype, then mlp_residual_ into it), to within one bf16 ulp of the
    MLP's output (the float32 sums are made in another order) for most elements and equal for
    nine in ten, and not those of an unrounded norm and hidden layer."""
    x, branch, nw, nb, w1, b1, w2, b2 = _inputs((4, 37), 96, 200, device, stream, BF16, seed=3)
    with torch.no_grad():
        h, s = layer_norm(branch, nw, nb, residual=x, out_dtype=BF16, return_residual=True,
                          backend=backend)
        want = mlp_residual_(s.clone(), h, w1, b1, w2, b2, activation=activation,
                             backend=backend).cpu().double()
        got = norm_mlp_residual(x, branch, nw, nb, w1, b1, w2, b2, activation=activation,
                                dtype=BF16, backend=backend).cpu().double()
    y = want - s.cpu().double()
    ulp = torch.finfo(BF16).eps * y.abs().clamp_min(torch.finfo(BF16).tiny)
    close = (got - want).abs() <= ulp + 1e-6 * want.abs()
    assert close.double().mean() > 0.999  # (a norm rounded the other way moves a few)
    exact = _exact(x, branch, nw, nb, w1, b1, w2, b2, 1e-5, BF16, activation)
    assert (got - exact).abs().mean() > 10 * (got - want).abs().mean()
    assert (got == want).double().mean() > 0.9


@pytest.mark.parametrize("device,backend", PARAMS[::2])
@pytest.mark.parametrize("C,H", [(40, 70), (160, 50), (300, 20)])
def test_out_dtype_is_the_output_cast(device, backend, C, H):
    """out_dtype=bf16 from a float32 stream: bitwise the float32 output cast to bf16 (the sum
    rounded to float32 first, the cast once), a bf16 tensor of x's shape; up to 256 wide in the
    kernel's pass, wider after the two ops' kernels."""
    x, branch, *p = _inputs((3, 37), C, H, device, FP32, BF16, seed=4)
    with torch.no_grad():
        wide = norm_mlp_residual(x, branch, *p, dtype=BF16, backend=backend)
        got = norm_mlp_residual(x, branch, *p, dtype=BF16, out_dtype=BF16, backend=backend)
    assert wide.dtype == FP32 and got.dtype == BF16 and got.shape == x.shape
    assert torch.equal(got, wide.to(BF16))
    exact = _exact(x, branch, *p, 1e-5, BF16)
    own = norm_mlp_residual_reference(x, branch, *p, dtype=BF16, out_dtype=BF16)
    assert own.dtype == BF16
    assert err(got, exact) <= 2 * err(own, exact) + 1e-5 * (1 + exact.abs().max().item())


@pytest.mark.parametrize("device,backend", PARAMS[::2])
def test_strided_rows_and_channels_last(device, backend):
    """x and the branch read through their row strides, and a (B, C, H, W) pair stored
    torch.channels_last passed as (B, H, W, C) views (VMamba's channel-first blocks): all as
    on contiguous tensors."""
    x, branch, *p = _inputs((6, 50), 24, 40, device, FP32, BF16, seed=2)
    with torch.no_grad():
        want = norm_mlp_residual(x, branch, *p, dtype=BF16, backend=backend)
        wide_x = torch.cat([x, x], dim=-1)[..., 24:]
        wide_b = torch.cat([branch, branch, branch], dim=-1)[..., 48:]
        assert not wide_x.is_contiguous() and not wide_b.is_contiguous()
        got = norm_mlp_residual(wide_x, wide_b, *p, dtype=BF16, backend=backend)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        xm = x.reshape(6, 5, 10, 24).permute(0, 3, 1, 2).contiguous(
            memory_format=torch.channels_last)
        bm = branch.reshape(6, 5, 10, 24).permute(0, 3, 1, 2).contiguous(
            memory_format=torch.channels_last)
        got = norm_mlp_residual(xm.permute(0, 2, 3, 1), bm.permute(0, 2, 3, 1), *p, dtype=BF16,
                                backend=backend)
        torch.testing.assert_close(got.reshape(6, 50, 24), want, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", PARAMS[::2])
def test_no_hidden_units_adds_the_bias(device, backend):
    """H = 0: fc2's product is empty, so the sum gains fc2's bias (rounded to bf16)."""
    x, branch, nw, nb, w1, b1, w2, b2 = _inputs((3, 4), 5, 0, device, FP32, BF16)
    with torch.no_grad():
        got = norm_mlp_residual(x, branch, nw, nb, w1, b1, w2, b2, dtype=BF16, backend=backend)
    torch.testing.assert_close(got, x + branch.float() + b2.to(BF16).float(), rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", PARAMS[::2])
def test_opcheck_and_compile(device, backend):
    x, branch, nw, nb, w1, b1, w2, b2 = _inputs((3, 5), 16, 40, device, FP32, BF16)
    op = torch.ops.pyssm.norm_mlp_residual_triton.default
    x2d, b2d = x.reshape(15, 16), branch.reshape(15, 16)
    torch.library.opcheck(op, (x2d, b2d, nw, nb, w1, b1, w2, b2, 1e-5, "gelu", BF16, FP32))
    torch.library.opcheck(op, (x2d, b2d, None, None, w1, None, w2, None, 1e-6, "quick_gelu",
                               FP32, BF16))

    def fn(x, branch):
        return norm_mlp_residual(x, branch, nw, nb, w1, b1, w2, b2, dtype=BF16,
                                 backend=backend).sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, branch), fn(x, branch))


@pytest.mark.parametrize("backend", [None, "triton", "reference"])
def test_bad_arguments(backend):
    x, branch = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    nw, w1, w2 = torch.randn(4), torch.randn(8, 4), torch.randn(4, 8)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"branch must have shape \(2, 5, 4\)"):
            norm_mlp_residual(x, branch[:, :3], nw, None, w1, None, w2, None, backend=backend)
        with pytest.raises(ValueError, match=r"fc2_weight must have shape \(4, H\)"):
            norm_mlp_residual(x, branch, nw, None, w1, None, torch.randn(6, 8), None,
                              backend=backend)
        with pytest.raises(ValueError, match=r"norm_weight must have shape \(4,\)"):
            norm_mlp_residual(x, branch, torch.randn(5), None, w1, None, w2, None,
                              backend=backend)
        with pytest.raises(ValueError, match=r"fc1_weight must have shape \(H, 4\)"):
            norm_mlp_residual(x, branch, nw, None, torch.randn(8, 3), None, w2, None,
                              backend=backend)
        with pytest.raises(TypeError, match="branch must be a floating-point tensor"):
            norm_mlp_residual(x, branch.long(), nw, None, w1, None, w2, None, backend=backend)
        with pytest.raises(TypeError, match="^dtype must be a floating-point dtype"):
            norm_mlp_residual(x, branch, nw, None, w1, None, w2, None, dtype=torch.int32,
                              backend=backend)
        with pytest.raises(TypeError, match="out_dtype must be a floating-point dtype"):
            norm_mlp_residual(x, branch, nw, None, w1, None, w2, None, out_dtype=torch.int8,
                              backend=backend)
        with pytest.raises(ValueError, match="activation must be one of"):
            norm_mlp_residual(x, branch, nw, None, w1, None, w2, None, activation="relu",
                              backend=backend)
        with pytest.raises(ValueError, match="backend must be one of"):
            norm_mlp_residual(x, branch, nw, None, w1, None, w2, None, backend="cuda")
    with pytest.raises(RuntimeError, match="norm_mlp_residual is an inference op"):
        norm_mlp_residual(x, branch, nw.requires_grad_(), None, w1, None, w2, None,
                          backend=backend)


def test_triton_refuses_float64_and_auto_takes_the_reference():
    x, branch = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    w1, w2 = torch.randn(5, 4), torch.randn(4, 5)
    if norm_mlp_residual_triton.available():
        with pytest.raises(TypeError, match="float64 runs on backend='reference'"):
            norm_mlp_residual(x, branch, None, None, w1, None, w2, None, backend="triton")
    s = x + branch
    want = s + F.gelu(F.layer_norm(s, (4,)) @ w1.double().t()) @ w2.double().t()
    torch.testing.assert_close(norm_mlp_residual(x, branch, None, None, w1, None, w2, None), want)
