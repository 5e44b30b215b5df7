"""depthwise_conv2d (VMamba's depthwise convolution + bias + SiLU, channels-last) against
float64, on the Triton kernels (compiled on a GPU; Triton's interpreter on CPU tensors
elsewhere) and the reference."""

import pytest
import torch
from float64_bound import assert_within_twice_torchs
from triton_params import PARAMS

from pyssm.ops import depthwise_conv2d_triton
from pyssm.ops.depthwise_conv2d import depthwise_conv2d, depthwise_conv2d_reference

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# (B, H, W, C, K): a 1 x 1 map, odd and non-square maps, C below / at / above a block of 128
SHAPES = [(1, 1, 1, 3, 3), (2, 7, 5, 5, 3), (1, 3, 11, 96, 3), (2, 6, 4, 130, 3),
          (1, 5, 5, 7, 5), (3, 4, 3, 2, 1)]


def _inputs(B, H, W, C, K, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, W, C, generator=g).to(dtype).to(device)
    w = (torch.randn(C, 1, K, K, generator=g) / K).to(device)
    b = (torch.randn(C, generator=g) * 0.5).to(device)
    return x, w, b


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("B,H,W,C,K", SHAPES)
@pytest.mark.parametrize("dtype,out_dtype", [(FP32, None), (BF16, None), (FP16, FP32),
                                             (BF16, FP32)])
@pytest.mark.parametrize("activation,with_bias", [("silu", True), (None, False)])
def test_forward_and_gradients_against_float64(device, backend, B, H, W, C, K, dtype, out_dtype,
                                               activation, with_bias):
    x, w, b = _inputs(B, H, W, C, K, device, dtype)
    b = b if with_bias else None
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    kw = dict(activation=activation, out_dtype=out_dtype)
    got = depthwise_conv2d(x, w, b, backend=backend, **kw)
    own = depthwise_conv2d_reference(x, w, b, **kw)  # torch's ops, same dtypes
    leaves64 = [t.detach().cpu().double().requires_grad_() for t in leaves]
    x64, w64 = leaves64[:2]
    b64 = leaves64[2] if with_bias else None
    exact = depthwise_conv2d_reference(x64, w64, b64, activation=activation)
    assert got.shape == x.shape and got.dtype == (out_dtype or dtype)
    assert_within_twice_torchs(got, own, exact, leaves, leaves64)


@pytest.mark.parametrize("device,backend", PARAMS[::2])
def test_channels_last_module_layout_and_determinism(device, backend):
    """A (B, C, H, W) map stored torch.channels_last, as VMamba keeps its activations, passes
    as a permuted view; two runs give identical outputs and gradients (no atomics)."""
    conv = torch.nn.Conv2d(12, 12, 3, padding=1, groups=12).to(device)
    x = torch.randn(2, 12, 9, 7, device=device).contiguous(memory_format=torch.channels_last)
    runs = []
    for _ in range(2):
        xi = x.detach().requires_grad_()
        y = depthwise_conv2d(xi.permute(0, 2, 3, 1), conv.weight, conv.bias, activation="silu",
                             backend=backend).permute(0, 3, 1, 2)
        runs.append((y, *torch.autograd.grad(y.square().sum(), (xi, conv.weight, conv.bias))))
    torch.testing.assert_close(runs[0][0], torch.nn.functional.silu(conv(x)), atol=1e-5,
                               rtol=1e-5)
    assert runs[0][0].is_contiguous(memory_format=torch.channels_last)
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("device,backend", PARAMS[::2])
def test_opcheck_and_compile(device, backend):
    x, w, b = _inputs(2, 5, 4, 6, 3, device, BF16)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    torch.library.opcheck(torch.ops.pyssm.depthwise_conv2d_triton.default, (x, w, b, True, BF16))
    torch.library.opcheck(torch.ops.pyssm.depthwise_conv2d_triton.default,
                          (x, w, None, False, FP32))

    def fn(x):
        return depthwise_conv2d(x, w, b, activation="silu", backend=backend).float().sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), fn(x))


@pytest.mark.parametrize("backend", [None, "triton", "reference"])
def test_bad_arguments(backend):
    x, w = torch.randn(2, 5, 5, 4), torch.randn(4, 1, 3, 3)
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        depthwise_conv2d(x[0], w, backend=backend)
    with pytest.raises(ValueError, match="odd kernel size"):
        depthwise_conv2d(x, torch.randn(4, 1, 2, 2), backend=backend)
    with pytest.raises(ValueError, match="weight must have shape"):
        depthwise_conv2d(x, torch.randn(3, 1, 3, 3), backend=backend)
    with pytest.raises(ValueError, match="bias must have shape"):
        depthwise_conv2d(x, w, torch.randn(5), backend=backend)
    with pytest.raises(ValueError, match="activation must be one of"):
        depthwise_conv2d(x, w, activation="gelu", backend=backend)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        depthwise_conv2d(x.long(), w, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        depthwise_conv2d(x, w, backend="cuda")


def test_triton_refuses_float64_and_auto_takes_the_reference():
    x, w = torch.randn(1, 3, 3, 2, dtype=torch.float64), torch.randn(2, 1, 3, 3)
    if depthwise_conv2d_triton.available():
        with pytest.raises(TypeError, match="float64 runs on backend='reference'"):
            depthwise_conv2d(x, w, backend="triton")
    torch.testing.assert_close(depthwise_conv2d(x, w), depthwise_conv2d_reference(x, w))
