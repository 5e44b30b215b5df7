"""layer_norm_linear (a LayerNorm and the linear layer reading it, in one pass) against float64,
on the Triton kernel (compiled on a GPU; Triton's interpreter on CPU tensors elsewhere) and the
reference."""

import pytest
import torch
import torch.nn.functional as F
from float64_bound import err, multiplied64
from triton_params import PARAMS

from pyssm.ops import layer_norm_linear_triton
from pyssm.ops.layer_norm import layer_norm
from pyssm.ops.layer_norm_linear import layer_norm_linear, layer_norm_linear_reference

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# (leading dims, K, N): one of each; odd sizes below a tile (K not a multiple of the input
# step); VMamba-T's stage-1 projections (96 -> 96) over more rows than one 128 tile; N over
# one 128 tile; K 300 (ten input steps, the last partial)
SHAPES = [((1,), 1, 1), ((3, 5), 7, 9), ((2, 133), 96, 96), ((3,), 40, 130), ((5, 7), 300, 20)]


def _inputs(lead, K, N, device, x_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # an offset and a spread per row, as the ss2d core's output has: the variance is of the
    # centred values
    x = torch.randn(*lead, K, generator=g) * 2 + torch.randn(*lead, 1, generator=g) * 5
    nw = 1 + 0.3 * torch.randn(K, generator=g)
    nb = 0.2 * torch.randn(K, generator=g)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    b = 0.5 * torch.randn(N, generator=g)
    return [t.to(device) for t in (x.to(x_dtype), nw, nb, w, b)]


def _exact(x, nw, nb, w, b, eps, dtype):
    """float64 math on the op's operands (the weights rounded to the product's dtype), with no
    rounding of the normalised x or the product."""
    h = F.layer_norm(x.cpu().double(), x.shape[-1:], None if nw is None else nw.cpu().double(),
                     None if nb is None else nb.cpu().double(), eps)
    return F.linear(h, multiplied64(w, dtype), multiplied64(b, dtype))


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("lead,K,N", SHAPES)
@pytest.mark.parametrize("x_dtype,dtype", [(FP32, FP32), (FP32, BF16), (BF16, BF16),
                                           (FP32, FP16)])
@pytest.mark.parametrize("affine", [True, False])
def test_against_float64(device, backend, lead, K, N, x_dtype, dtype, affine):
    """Every output within twice the error of torch's own ops in the same dtypes (the
    reference) against float64, plus a floor of float32 rounding."""
    x, nw, nb, w, b = _inputs(lead, K, N, device, x_dtype)
    if not affine:
        nw = nb = b = None
    exact = _exact(x, nw, nb, w, b, 1e-5, dtype)
    own = layer_norm_linear_reference(x, nw, nb, w, b, dtype=dtype)
    got = layer_norm_linear(x, nw, nb, w, b, dtype=dtype, backend=backend)
    assert got.dtype == dtype and got.shape == (*lead, N)
    assert torch.isfinite(got).all()
    assert err(got, exact) <= 2 * err(own, exact) + 1e-5 * (1 + exact.abs().max().item())


@pytest.mark.parametrize("device,backend", PARAMS[::2])
def test_equals_layer_norm_then_the_product(device, backend):
    """float32 x into a bf16 product (VMamba's out_norm over the ss2d core's output, then
    out_proj): the values of pyssm's layer_norm writing bf16 and a bf16 F.linear, to within one
    bf16 ulp of the output plus one of a normalised input times its largest weight (the
    statistics are summed in another order, which can move an h across a rounding boundary,
    and so are the products), most of them equal; and the norm's rounding is there."""
    x, nw, nb, w, b = _inputs((4, 37), 96, 80, device, FP32, seed=3)
    h = layer_norm(x, nw, nb, 1e-6, out_dtype=BF16, backend=backend)
    want = F.linear(h.float(), w.to(BF16).float(), b.to(BF16).float()).to(BF16).cpu().double()
    got = layer_norm_linear(x, nw, nb, w, b, eps=1e-6, dtype=BF16,
                            backend=backend).cpu().double()
    eps = torch.finfo(BF16).eps
    ulp = eps * want.abs().clamp_min(torch.finfo(BF16).tiny)
    flip = eps * h.abs().max().item() * w.abs().max().item()
    assert ((got - want).abs() <= ulp + flip).all()
    assert (got == want).double().mean() > 0.9
    exact = _exact(x, nw, nb, w, b, 1e-6, BF16)
    assert (got - exact).abs().mean() > 10 * (got - want).abs().mean()


@pytest.mark.parametrize("device,backend", PARAMS[::2])
def test_strided_rows_and_channels_last_maps(device, backend):
    """x read through its row stride, and a (B, C, H, W) map stored channels-last passed as its
    (B, H, W, C) view (VMamba's channel-first projections): as on contiguous x."""
    x, nw, nb, w, b = _inputs((6, 20), 24, 11, device, FP32, seed=2)
    want = layer_norm_linear(x, nw, nb, w, b, dtype=BF16, backend=backend)
    wide = torch.cat([x, x], dim=-1)[..., 24:]
    assert not wide.is_contiguous()
    torch.testing.assert_close(layer_norm_linear(wide, nw, nb, w, b, dtype=BF16,
                                                 backend=backend), want, rtol=0, atol=0)
    cf = x.reshape(6, 4, 5, 24).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    got = layer_norm_linear(cf.permute(0, 2, 3, 1), nw, nb, w, b, dtype=BF16, backend=backend)
    torch.testing.assert_close(got.reshape(6, 20, 11), want, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", PARAMS[::2])
def test_gradients_and_opcheck(device, backend):
    """The Triton op's gradients (the reference recomputed) into x and every parameter, against
    float64 autograd of the same math; opcheck; torch.compile."""
    x, nw, nb, w, b = _inputs((3, 5), 16, 12, device, FP32)
    leaves = [t.clone().requires_grad_() for t in (x, nw, nb, w, b)]
    y = layer_norm_linear(*leaves, dtype=FP32, backend=backend)
    cot = torch.randn(y.shape, device=device)
    grads = torch.autograd.grad(y, leaves, cot)
    leaves64 = [t.detach().cpu().double().requires_grad_() for t in (x, nw, nb, w, b)]
    y64 = layer_norm_linear_reference(*leaves64)
    wants = torch.autograd.grad(y64, leaves64, cot.cpu().double())
    for g, want in zip(grads, wants, strict=True):
        torch.testing.assert_close(g.cpu().double(), want, rtol=1e-4, atol=1e-4)
    op = torch.ops.pyssm.layer_norm_linear_triton.default
    x2d = x.reshape(15, 16)
    torch.library.opcheck(op, (x2d, nw, nb, w, b, 1e-5, BF16))
    torch.library.opcheck(op, (x2d, None, None, w, None, 1e-6, FP32))
    compiled = torch.compile(lambda t: layer_norm_linear(t, nw, nb, w, b, dtype=BF16,
                                                         backend=backend),
                             backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer_norm_linear(x, nw, nb, w, b, dtype=BF16,
                                                              backend=backend))


@pytest.mark.parametrize("backend", [None, "triton", "reference"])
def test_bad_arguments(backend):
    x, nw, w = torch.randn(2, 5, 4), torch.randn(4), torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"norm_weight must have shape \(4,\)"):
        layer_norm_linear(x, torch.randn(3), None, w, backend=backend)
    with pytest.raises(ValueError, match=r"norm_bias must have shape \(4,\)"):
        layer_norm_linear(x, nw, torch.randn(5), w, backend=backend)
    with pytest.raises(ValueError, match=r"weight must have shape \(N, 4\)"):
        layer_norm_linear(x, nw, None, torch.randn(6, 3), backend=backend)
    with pytest.raises(ValueError, match="bias must have shape"):
        layer_norm_linear(x, nw, None, w, torch.randn(5), backend=backend)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        layer_norm_linear(x.long(), nw, None, w, backend=backend)
    with pytest.raises(TypeError, match="dtype must be a floating-point dtype"):
        layer_norm_linear(x, nw, None, w, dtype=torch.int32, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        layer_norm_linear(x, nw, None, w, backend="cuda")


def test_triton_refuses_float64_and_auto_takes_the_reference():
    x, w = torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 4)
    if layer_norm_linear_triton.available():
        with pytest.raises(TypeError, match="float64 runs on backend='reference'"):
            layer_norm_linear(x, None, None, w, backend="triton")
    want = F.linear(F.layer_norm(x, (4,)), w.double())
    torch.testing.assert_close(layer_norm_linear(x, None, None, w), want)
