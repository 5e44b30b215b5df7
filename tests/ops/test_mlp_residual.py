"""mlp_residual_ (a whole MLP added into the residual sum in place) against float64, on the
Triton kernel (compiled on a GPU; Triton's interpreter on CPU tensors elsewhere) and the
reference."""

import pytest
import torch
import torch.nn.functional as F
from float64_bound import err, multiplied64
from triton_params import PARAMS

from pyssm.ops import mlp_residual_triton
from pyssm.ops.linear_gelu import ACTIVATIONS, activate, linear_gelu
from pyssm.ops.linear_residual import linear_residual_
from pyssm.ops.mlp_residual import mlp_residual_, mlp_residual_reference_

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# (leading dims, C, H, N): one of each; odd sizes below a tile (H not a multiple of the hidden
# step, C not of the input step); VMamba's 96 -> 384 -> 96 (fc2's 96 outputs in a 128 tile);
# 160 wide (a 256 tile, 8 warps, the 32-unit hidden step); 300 wide (two column tiles of 256,
# each recomputing the hidden layer); rows over one 64 tile
SHAPES = [((1,), 1, 1, 1), ((3, 5), 7, 37, 9), ((2, 33), 96, 384, 96), ((70,), 40, 70, 160),
          ((3,), 24, 50, 300), ((1, 131), 33, 64, 40)]


def _inputs(lead, C, H, N, device, dtype, s_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, C, generator=g).to(dtype).to(device)
    w1 = (torch.randn(H, C, generator=g) / C ** 0.5).to(device)
    b1 = (torch.randn(H, generator=g) * 0.5).to(device)
    w2 = (torch.randn(N, H, generator=g) / max(H, 1) ** 0.5).to(device)
    b2 = (torch.randn(N, generator=g) * 0.5).to(device)
    s = (torch.randn(*lead, N, generator=g) * 3 + 1).to(s_dtype).to(device)
    return s, x, w1, b1, w2, b2


def _exact(s, x, w1, b1, w2, b2, activation="gelu"):
    """float64 math on the op's operands (the weights rounded to x's dtype), no roundings of
    the hidden layer or the product: what the op's own roundings are measured against."""
    d = x.dtype
    hidden = activate(F.linear(x.cpu().double(), multiplied64(w1, d), multiplied64(b1, d)),
                      activation)
    return s.cpu().double() + F.linear(hidden, multiplied64(w2, d), multiplied64(b2, d))


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("lead,C,H,N", SHAPES)
@pytest.mark.parametrize("dtype,s_dtype", [(FP32, FP32), (BF16, FP32), (FP16, FP32),
                                           (BF16, BF16)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_against_float64(device, backend, lead, C, H, N, dtype, s_dtype, with_bias):
    """Every element of s updated, within twice the error of torch's own ops in the same dtypes
    (the reference) against float64, plus a floor of float32 rounding."""
    s, x, w1, b1, w2, b2 = _inputs(lead, C, H, N, device, dtype, s_dtype)
    if not with_bias:
        b1 = b2 = None
    exact = _exact(s, x, w1, b1, w2, b2)
    own = mlp_residual_reference_(s.clone(), x, w1, b1, w2, b2)
    got = s.clone()
    with torch.no_grad():
        out = mlp_residual_(got, x, w1, b1, w2, b2, backend=backend)
    assert out is got and got.dtype == s_dtype and got.shape == s.shape
    assert torch.isfinite(got).all()
    assert err(got, exact) <= 2 * err(own, exact) + 1e-5 * (1 + exact.abs().max().item())


@pytest.mark.parametrize("device,backend", PARAMS[::2])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_equals_linear_gelu_then_linear_residual(device, backend, activation):
    """bf16 x into a float32 sum, each activation: the values of the two ops it fuses (the
    hidden layer rounded to bf16 as linear_gelu writes it, fc2's product rounded to bf16 as
    linear_residual_ adds it), to within one bf16 ulp of the product (the float32 sums over
    the hidden layer are made in another order), and not those of an unrounded hidden layer."""
    s, x, w1, b1, w2, b2 = _inputs((4, 37), 96, 200, 70, device, BF16, FP32, seed=3)
    with torch.no_grad():
        hidden = linear_gelu(x, w1, b1, activation=activation, backend=backend)
        want = linear_residual_(s.clone(), hidden, w2, b2, backend=backend).cpu().double()
        got = mlp_residual_(s.clone(), x, w1, b1, w2, b2, activation=activation,
                            backend=backend).cpu().double()
    y = want - s.cpu().double()
    ulp = torch.finfo(BF16).eps * y.abs().clamp_min(torch.finfo(BF16).tiny)
    assert ((got - want).abs() <= ulp + 1e-6 * want.abs()).all()
    # and the roundings are there: on average the float64 MLP is much further from the op than
    # the two ops are (most elements equal theirs exactly)
    exact = _exact(s, x, w1, b1, w2, b2, activation)
    assert (got - exact).abs().mean() > 10 * (got - want).abs().mean()
    assert (got == want).double().mean() > 0.9


@pytest.mark.parametrize("device,backend", PARAMS[::2])
def test_strided_channels_last_and_copied_sums(device, backend):
    """x read through its row stride; a sum updated through its row stride; a (B, C, H, W) map
    stored torch.channels_last passed as its (B, H, W, C) view (VMamba's channel-first MLP),
    updated in place; and a sum with no (M, N) row view (transposed) updated through a copy:
    all as on contiguous tensors."""
    s, x, w1, b1, w2, b2 = _inputs((6, 50), 24, 40, 11, device, BF16, FP32, seed=2)
    p = (w1, b1, w2, b2)
    with torch.no_grad():
        want = mlp_residual_(s.clone(), x, *p, backend=backend)
        wide = torch.cat([x, x], dim=-1)[..., 24:]
        assert not wide.is_contiguous()
        torch.testing.assert_close(mlp_residual_(s.clone(), wide, *p, backend=backend), want,
                                   rtol=0, atol=0)
        sm = s.clone().reshape(6, 5, 10, 11).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last
        assert sm.is_contiguous(memory_format=torch.channels_last)
        view = sm.permute(0, 2, 3, 1)
        mlp_residual_(view, x.reshape(6, 5, 10, 24), *p, backend=backend)
        torch.testing.assert_close(sm.permute(0, 2, 3, 1).reshape(6, 50, 11), want, rtol=0,
                                   atol=0)
        rows = torch.cat([s, s], dim=-1)[..., 11:]  # the sum's rows 22 apart, updated in place
        mlp_residual_(rows, x, *p, backend=backend)
        torch.testing.assert_close(rows, want, rtol=0, atol=0)
        st = s.reshape(300, 11).t().contiguous().t()  # (300, 11) with stride (1, 300)
        mlp_residual_(st, x.reshape(300, 24), *p, backend=backend)
        torch.testing.assert_close(st.reshape(6, 50, 11), want, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", PARAMS[::2])
def test_no_hidden_units_adds_the_bias(device, backend):
    """H = 0: fc2's product is empty, so s gains fc2's bias (rounded to x's dtype)."""
    s, x, w1, b1, w2, b2 = _inputs((3, 4), 5, 0, 6, device, BF16, FP32)
    with torch.no_grad():
        got = mlp_residual_(s.clone(), x, w1, b1, w2, b2, backend=backend)
    torch.testing.assert_close(got, s + b2.to(BF16).float(), rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", PARAMS[::2])
def test_opcheck_and_compile(device, backend):
    s, x, w1, b1, w2, b2 = _inputs((3, 5), 16, 40, 12, device, BF16, FP32)
    op = torch.ops.pyssm.mlp_residual_triton.default
    s2d = s.reshape(15, 12)
    torch.library.opcheck(op, (x.reshape(15, 16), w1, b1, w2, b2, s2d.clone(), "gelu"))
    torch.library.opcheck(op, (x.reshape(15, 16), w1, None, w2, None, s2d.clone(),
                               "quick_gelu"))

    def fn(s, x):
        return mlp_residual_(s, x, w1, b1, w2, b2, backend=backend).sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        a, c = s.clone(), s.clone()
        torch.testing.assert_close(compiled(a, x), fn(c, x))
    torch.testing.assert_close(a, c)


@pytest.mark.parametrize("backend", [None, "triton", "reference"])
def test_bad_arguments(backend):
    s, x = torch.randn(2, 5, 6), torch.randn(2, 5, 4)
    w1, w2 = torch.randn(8, 4), torch.randn(6, 8)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"s must have shape \(2, 5, 6\)"):
            mlp_residual_(s[:, :4], x, w1, None, w2, None, backend=backend)
        with pytest.raises(ValueError, match=r"fc1_weight must have shape \(H, 4\)"):
            mlp_residual_(s, x, torch.randn(8, 3), None, w2, None, backend=backend)
        with pytest.raises(ValueError, match=r"fc2_weight must have shape \(C2, 8\)"):
            mlp_residual_(s, x, w1, None, torch.randn(6, 7), None, backend=backend)
        with pytest.raises(ValueError, match="fc2_bias must have shape"):
            mlp_residual_(s, x, w1, None, w2, torch.randn(5), backend=backend)
        with pytest.raises(TypeError, match="s must be a floating-point tensor"):
            mlp_residual_(s.long(), x, w1, None, w2, None, backend=backend)
        with pytest.raises(ValueError, match="activation must be one of"):
            mlp_residual_(s, x, w1, None, w2, None, activation="relu", backend=backend)
        with pytest.raises(ValueError, match="backend must be one of"):
            mlp_residual_(s, x, w1, None, w2, None, backend="cuda")
        both = torch.randn(2, 5, 10)  # s and x in one buffer: written while read
        with pytest.raises(ValueError, match="s must not share memory with x"):
            mlp_residual_(both[..., :6], both[..., 6:], w1, None, w2, None, backend=backend)
    with pytest.raises(RuntimeError, match="mlp_residual_ is an inference op"):
        mlp_residual_(s, x, w1, None, w2.requires_grad_(), None, backend=backend)


def test_triton_refuses_float64_and_auto_takes_the_reference():
    s, x = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    w1, w2 = torch.randn(5, 4), torch.randn(2, 5)
    if mlp_residual_triton.available():
        with pytest.raises(TypeError, match="float64 runs on backend='reference'"):
            mlp_residual_(s.clone(), x, w1, None, w2, None, backend="triton")
    want = s + F.gelu(x @ w1.double().t()) @ w2.double().t()
    torch.testing.assert_close(mlp_residual_(s.clone(), x, w1, None, w2, None), want)
