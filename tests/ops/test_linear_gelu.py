"""linear_gelu (an MLP's fc1 and its exact GELU in one op) against float64, on the Triton kernel
(compiled on a GPU; Triton's interpreter on CPU tensors elsewhere) and the reference."""

import pytest
import torch
import torch.nn.functional as F
from float64_bound import as_multiplied, assert_within_twice_torchs
from triton_params import PARAMS

from pyssm.ops import linear_gelu_triton
from pyssm.ops.linear_gelu import activate, linear_gelu, linear_gelu_reference

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# (leading dims of x, K, N): one row and one output; odd sizes below a tile; N above one 128
# tile; K from 256 on (the 64-wide K step) with a partial last step; rows over one 128 tile
SHAPES = [((1,), 1, 1), ((3, 5), 7, 9), ((2,), 96, 130), ((3,), 300, 20), ((1, 131), 33, 40)]


def _inputs(lead, K, N, device, dtype, wdtype=FP32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g).to(dtype).to(device)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(wdtype).to(device)
    b = (torch.randn(N, generator=g) * 0.5).to(wdtype).to(device)
    return x, w, b


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("lead,K,N", SHAPES)
@pytest.mark.parametrize("dtype,out_dtype", [(FP32, None), (BF16, None), (FP16, FP32),
                                             (BF16, FP32)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_and_gradients_against_float64(device, backend, lead, K, N, dtype, out_dtype,
                                               with_bias):
    x, w, b = _inputs(lead, K, N, device, dtype)
    b = b if with_bias else None
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    got = linear_gelu(x, w, b, out_dtype=out_dtype, backend=backend)
    own = linear_gelu_reference(x, w, b, out_dtype=out_dtype)  # torch's ops, same roundings
    leaves64 = [t.detach().cpu().double().requires_grad_() for t in leaves]
    x64, w64 = leaves64[:2]
    b64 = leaves64[2] if with_bias else None
    exact = F.gelu(F.linear(x64, as_multiplied(w64, dtype), as_multiplied(b64, dtype)))
    assert got.shape == (*lead, N) and got.dtype == (out_dtype or dtype)
    # the cotangent reaches both in got's dtype (rounded there): its rounding is in the floor
    assert_within_twice_torchs(got, own, exact, leaves, leaves64,
                               grad_rel=max(1e-5, torch.finfo(got.dtype).eps))


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("lead,K,N", [SHAPES[1], SHAPES[3]])
@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("activation", ["gelu_tanh", "quick_gelu"])
def test_other_activations_against_float64(device, backend, lead, K, N, dtype, activation):
    """SigLIP's tanh GELU and CLIP's quick GELU: the values and gradients as the exact GELU's
    are held, against the float64 activation."""
    x, w, b = _inputs(lead, K, N, device, dtype, seed=4)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    got = linear_gelu(x, w, b, activation=activation, backend=backend)
    own = linear_gelu_reference(x, w, b, activation=activation)
    leaves64 = [t.detach().cpu().double().requires_grad_() for t in leaves]
    a = F.linear(leaves64[0], *(as_multiplied(t, dtype) for t in leaves64[1:]))
    exact = activate(a, activation)  # (torch's float64 ops)
    assert_within_twice_torchs(got, own, exact, leaves, leaves64,
                               grad_rel=max(1e-5, torch.finfo(got.dtype).eps))


@pytest.mark.parametrize("device,backend", PARAMS[::2])
def test_rounded_once_as_autocast_rounds_the_operands(device, backend):
    """bf16 x, float32 weight and bias: each output is the float64 GELU of the products of the
    bf16-rounded operands, rounded once to bf16 (within one bf16 ulp: the float32 sum's own
    error can move a value across a rounding boundary), and the unfused autocast composition
    (fc1 rounded, then GELU rounded) is never closer on the whole."""
    x, w, b = _inputs((4, 37), 96, 70, device, BF16, seed=3)
    got = linear_gelu(x, w, b, backend=backend).cpu().double()
    a = F.linear(x.cpu().double(), w.cpu().to(BF16).double(), b.cpu().to(BF16).double())
    exact = F.gelu(a)
    ulp = torch.finfo(BF16).eps * exact.abs().clamp_min(torch.finfo(BF16).tiny)
    assert ((got - exact).abs() <= ulp).all()
    twice = F.gelu(a.to(BF16).double()).to(BF16).double()
    assert (got - exact).abs().sum() < (twice - exact).abs().sum()


@pytest.mark.parametrize("device,backend", PARAMS[::2])
def test_strided_and_channels_last_inputs(device, backend):
    """x read through its row stride (a slice of a wider tensor), and a (B, C, H, W) map stored
    torch.channels_last passed as its (B, H, W, C) view, as VMamba's channel-first MLP does."""
    x, w, b = _inputs((6, 50), 24, 11, device, BF16, seed=2)
    wide = torch.cat([x, x], dim=-1)[..., 24:]  # rows 48 apart, unit stride along K
    assert not wide.is_contiguous()
    want = linear_gelu(x, w, b, backend=backend)  # the same kernel on a contiguous copy
    torch.testing.assert_close(want, linear_gelu_reference(x, w, b), rtol=0.02, atol=1e-5)
    torch.testing.assert_close(linear_gelu(wide, w, b, backend=backend), want, rtol=0, atol=0)
    m = torch.randn(2, 24, 5, 3, device=device).to(BF16).contiguous(
        memory_format=torch.channels_last)
    view = m.permute(0, 2, 3, 1)
    assert view.is_contiguous()
    torch.testing.assert_close(linear_gelu(view, w, b, backend=backend),
                               linear_gelu(view.contiguous(), w, b, backend=backend),
                               rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", PARAMS[::2])
def test_opcheck_and_compile(device, backend):
    x, w, b = _inputs((3, 5), 16, 12, device, BF16)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    op = torch.ops.pyssm.linear_gelu_triton.default
    torch.library.opcheck(op, (x.reshape(15, 16), w, b, BF16, "gelu"))
    torch.library.opcheck(op, (x.reshape(15, 16), w, None, FP32, "quick_gelu"))

    def fn(x):
        return linear_gelu(x, w, b, backend=backend).float().sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), fn(x))


@pytest.mark.parametrize("backend", [None, "triton", "reference"])
def test_bad_arguments(backend):
    x, w = torch.randn(2, 5, 4), torch.randn(6, 4)
    with pytest.raises(ValueError, match="x must have at least one dimension"):
        linear_gelu(torch.tensor(1.0), w, backend=backend)
    with pytest.raises(ValueError, match=r"weight must have shape \(N, 4\)"):
        linear_gelu(x, torch.randn(6, 3), backend=backend)
    with pytest.raises(ValueError, match="weight must have 2 dimensions"):
        linear_gelu(x, torch.randn(6, 4, 1), backend=backend)
    with pytest.raises(ValueError, match="bias must have shape"):
        linear_gelu(x, w, torch.randn(5), backend=backend)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        linear_gelu(x.long(), w, backend=backend)
    with pytest.raises(TypeError, match="out_dtype must be a floating-point dtype"):
        linear_gelu(x, w, out_dtype=torch.int32, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        linear_gelu(x, w, backend="cuda")
    with pytest.raises(ValueError, match="activation must be one of"):
        linear_gelu(x, w, activation="relu", backend=backend)


def test_triton_refuses_float64_and_auto_takes_the_reference():
    x, w = torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 4)
    if linear_gelu_triton.available():
        with pytest.raises(TypeError, match="float64 runs on backend='reference'"):
            linear_gelu(x, w, backend="triton")
    torch.testing.assert_close(linear_gelu(x, w), linear_gelu_reference(x, w))
    torch.testing.assert_close(linear_gelu(x, w), F.gelu(x @ w.double().t()))
