"""linear_residual_ (an MLP's fc2 added into the residual sum in place) against float64, on the
Triton kernel (compiled on a GPU; Triton's interpreter on CPU tensors elsewhere) and the
reference."""

import pytest
import torch
import torch.nn.functional as F
from float64_bound import err, multiplied64
from triton_params import PARAMS

from pyssm.ops import linear_residual_triton
from pyssm.ops.linear_residual import linear_residual_, linear_residual_reference_

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# (leading dims, K, N): one row and one output; odd sizes below a tile; N above one 128 tile;
# K from 256 on (the 64-wide K step) with a partial last step; rows over one 128 tile
SHAPES = [((1,), 1, 1), ((3, 5), 7, 9), ((2,), 96, 130), ((3,), 300, 20), ((1, 131), 33, 40)]


def _inputs(lead, K, N, device, dtype, s_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g).to(dtype).to(device)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(device)
    b = (torch.randn(N, generator=g) * 0.5).to(device)
    s = (torch.randn(*lead, N, generator=g) * 3 + 1).to(s_dtype).to(device)
    return s, x, w, b


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("lead,K,N", SHAPES)
@pytest.mark.parametrize("dtype,s_dtype", [(FP32, FP32), (BF16, FP32), (FP16, FP32),
                                           (BF16, BF16), (FP16, FP16)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_against_float64(device, backend, lead, K, N, dtype, s_dtype, with_bias):
    """Every element of s updated, within twice the error of torch's own ops in the same dtypes
    (the reference) against float64, plus a floor of float32 rounding."""
    s, x, w, b = _inputs(lead, K, N, device, dtype, s_dtype)
    b = b if with_bias else None
    exact = s.cpu().double() + F.linear(x.cpu().double(), multiplied64(w, dtype),
                                        multiplied64(b, dtype))
    own = linear_residual_reference_(s.clone(), x, w, b)
    got = s.clone()
    with torch.no_grad():
        out = linear_residual_(got, x, w, b, backend=backend)
    assert out is got and got.dtype == s_dtype and got.shape == s.shape
    assert torch.isfinite(got).all()
    assert err(got, exact) <= 2 * err(own, exact) + 1e-5 * (1 + exact.abs().max().item())


@pytest.mark.parametrize("device,backend", PARAMS[::2])
def test_the_product_is_rounded_as_fc2_returns_it(device, backend):
    """bf16 x into a float32 sum: s + y with y the product rounded to bf16 (what fc2 returns
    under autocast), not the float32 product; within one bf16 ulp of y (the float32 sum of the
    products can move a value across a rounding boundary)."""
    s, x, w, b = _inputs((4, 37), 96, 70, device, BF16, FP32, seed=3)
    y = F.linear(x.cpu().double(), multiplied64(w, BF16), multiplied64(b, BF16))
    got = linear_residual_(s.clone(), x, w, b, backend=backend).cpu().double()
    ulp = torch.finfo(BF16).eps * y.abs().clamp_min(torch.finfo(BF16).tiny)
    rounded = s.cpu().double() + y.to(BF16).double()
    assert ((got - rounded).abs() <= ulp + 1e-6 * rounded.abs()).all()
    # and the rounding is there: without it, the sums would be closer to the float64 ones
    assert (got - (s.cpu().double() + y)).abs().max() > 1e-4


@pytest.mark.parametrize("device,backend", PARAMS[::2])
def test_strided_channels_last_and_copied_sums(device, backend):
    """x read through its row stride; a sum updated through its row stride; a (B, C, H, W) map
    stored torch.channels_last passed as its (B, H, W, C) view (VMamba's channel-first MLP),
    updated in place; and a sum with no (M, N) row view (transposed) updated through a copy:
    all as on contiguous tensors."""
    s, x, w, b = _inputs((6, 50), 24, 11, device, BF16, FP32, seed=2)
    want = linear_residual_(s.clone(), x, w, b, backend=backend)
    wide = torch.cat([x, x], dim=-1)[..., 24:]
    assert not wide.is_contiguous()
    torch.testing.assert_close(linear_residual_(s.clone(), wide, w, b, backend=backend), want,
                               rtol=0, atol=0)
    sm = s.clone().reshape(6, 5, 10, 11).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last
    assert sm.is_contiguous(memory_format=torch.channels_last)
    view = sm.permute(0, 2, 3, 1)
    assert view.is_contiguous() and view.data_ptr() == sm.data_ptr()
    linear_residual_(view, x.reshape(6, 5, 10, 24), w, b, backend=backend)
    torch.testing.assert_close(sm.permute(0, 2, 3, 1).reshape(6, 50, 11), want, rtol=0, atol=0)
    rows = torch.cat([s, s], dim=-1)[..., 11:]  # the sum's rows 22 apart, updated in place
    linear_residual_(rows, x, w, b, backend=backend)
    torch.testing.assert_close(rows, want, rtol=0, atol=0)
    st = s.reshape(300, 11).t().contiguous().t()  # (300, 11) with stride (1, 300)
    linear_residual_(st, x.reshape(300, 24), w, b, backend=backend)
    torch.testing.assert_close(st.reshape(6, 50, 11), want, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", PARAMS[::2])
def test_opcheck_and_compile(device, backend):
    s, x, w, b = _inputs((3, 5), 16, 12, device, BF16, FP32)
    op = torch.ops.pyssm.linear_residual_triton.default
    torch.library.opcheck(op, (x.reshape(15, 16), w, b, s.reshape(15, 12).clone()))
    torch.library.opcheck(op, (x.reshape(15, 16), w, None, s.reshape(15, 12).clone()))

    def fn(s, x):
        return linear_residual_(s, x, w, b, backend=backend).sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        a, c = s.clone(), s.clone()
        torch.testing.assert_close(compiled(a, x), fn(c, x))
    torch.testing.assert_close(a, c)


@pytest.mark.parametrize("backend", [None, "triton", "reference"])
def test_bad_arguments(backend):
    s, x, w = torch.randn(2, 5, 6), torch.randn(2, 5, 4), torch.randn(6, 4)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"s must have shape \(2, 5, 6\)"):
            linear_residual_(s[:, :4], x, w, backend=backend)
        with pytest.raises(ValueError, match=r"weight must have shape \(N, 4\)"):
            linear_residual_(s, x, torch.randn(6, 3), backend=backend)
        with pytest.raises(ValueError, match="bias must have shape"):
            linear_residual_(s, x, w, torch.randn(5), backend=backend)
        with pytest.raises(TypeError, match="s must be a floating-point tensor"):
            linear_residual_(s.long(), x, w, backend=backend)
        with pytest.raises(ValueError, match="backend must be one of"):
            linear_residual_(s, x, w, backend="cuda")
        both = torch.randn(2, 5, 10)  # s and x in one buffer: written while read
        with pytest.raises(ValueError, match="s must not share memory with x"):
            linear_residual_(both[..., :6], both[..., 6:], w, backend=backend)
    with pytest.raises(RuntimeError, match="linear_residual_ is an inference op"):
        linear_residual_(s, x, w.requires_grad_(), backend=backend)


def test_triton_refuses_float64_and_auto_takes_the_reference():
    s, x, w = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64), \
        torch.randn(2, 4)
    if linear_residual_triton.available():
        with pytest.raises(TypeError, match="float64 runs on backend='reference'"):
            linear_residual_(s.clone(), x, w, backend="triton")
    torch.testing.assert_close(linear_residual_(s.clone(), x, w), s + x @ w.double().t())
