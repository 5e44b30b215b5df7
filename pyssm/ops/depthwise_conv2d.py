"""depthwise_conv2d: VMamba's SS2D convolution, a K x K depthwise convolution with "same"
padding over a channels-last map, with its bias and SiLU fused in.

    x (B, H, W, C), weight (C, 1, K, K) (nn.Conv2d(C, C, K, padding=K // 2, groups=C)'s weight,
    K odd), bias (C,) or None:
    y[b, h, w, c] = act(bias[c] + sum_{i, j} weight[c, 0, i, j]
                                            * x[b, h + i - K//2, w + j - K//2, c])
    with x zero outside the map; act = SiLU (activation="silu") or none; y in out_dtype (default
    x's dtype). Accumulates in float32 (float64 for float64).

Backends: ``triton`` (depthwise_conv2d_triton.py; on CPU tensors Triton's interpreter, for the
tests), ``reference`` (torch's ``F.conv2d`` and ``F.silu``), or None / ``"auto"``: Triton on CUDA
tensors once verified on a GPU (``_extension.UNVERIFIED_CUDA``; ``PYSSM_UNVERIFIED_CUDA=1`` runs
it before), the reference otherwise and for float64, with ``PYSSM_BACKEND=reference`` or with
``PYSSM_TRITON=0``. The reference is torch's own (cuDNN's) convolution: unfused, not slow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyssm.ops import _checks, _triton, depthwise_conv2d_triton

BACKENDS = _triton.BACKENDS
ACTIVATIONS = (None, "silu")
MAX_KERNEL = 7


def depthwise_conv2d_reference(x, weight, bias=None, *, activation=None, out_dtype=None):
    """Pure-PyTorch depthwise_conv2d (module docstring) in float32 (float64 for float64)."""
    acc = _checks.acc_dtype(x.dtype)
    K = weight.shape[-1]
    y = F.conv2d(x.permute(0, 3, 1, 2).to(acc), weight.to(acc),
                 None if bias is None else bias.to(acc), padding=K // 2, groups=x.shape[-1])
    if activation == "silu":
        y = F.silu(y)
    return y.permute(0, 2, 3, 1).to(out_dtype or x.dtype)


def check_depthwise_conv2d(x, weight, bias, activation, out_dtype) -> None:
    _checks.floating(x, "x")
    _checks.rank(x, 4, "x", "(B, H, W, C), channels-last")
    C = x.shape[3]
    _checks.floating(weight, "weight")
    _checks.rank(weight, 4, "weight", "(C, 1, K, K)")
    K = weight.shape[-1]
    if K % 2 == 0 or K > MAX_KERNEL:
        raise ValueError(f"weight must have an odd kernel size K <= {MAX_KERNEL} (same "
                         f"padding), got shape {tuple(weight.shape)}")
    _checks.shape(weight, (C, 1, K, K), "weight", "(C, 1, K, K) with C the channels of x")
    _checks.same_device(weight, x, "weight", "x")
    if bias is not None:
        _checks.floating(bias, "bias")
        _checks.shape(bias, (C,), "bias", "(C,) with C the channels of x")
        _checks.same_device(bias, x, "bias", "x")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    _checks.float_dtype(out_dtype, "out_dtype")


def uses_triton(x, weight, bias=None, out_dtype=None, backend=None) -> bool:
    """Whether depthwise_conv2d with these arguments runs its Triton kernels (the encoders
    call torch's own convolution, in the model's dtype, when it would not: the reference
    accumulates in float32, which a bf16 model under autocast does not need)."""
    dtypes = [t.dtype for t in (x, weight, bias) if t is not None]
    dtypes += [out_dtype] if out_dtype is not None else []
    return _triton.use_triton("depthwise_conv2d", x.device, dtypes, backend)


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     activation: str | None = None, out_dtype: torch.dtype | None = None,
                     backend: str | None = None) -> torch.Tensor:
    """The depthwise convolution of the module docstring; differentiable in x, weight and
    bias. x is read channels-last: a (B, C, H, W) tensor stored torch.channels_last passes as
    ``x.permute(0, 2, 3, 1)`` without a copy."""
    check_depthwise_conv2d(x, weight, bias, activation, out_dtype)
    if not uses_triton(x, weight, bias, out_dtype, backend):
        return depthwise_conv2d_reference(x, weight, bias, activation=activation,
                                          out_dtype=out_dtype)
    return torch.ops.pyssm.depthwise_conv2d_triton(
        x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
        activation == "silu", out_dtype or x.dtype)


# ---- the op, its fake and its gradient ---------------------------------------------------------

@torch.library.custom_op("pyssm::depthwise_conv2d_triton", mutates_args=())
def _depthwise_conv2d_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             silu: bool, out_dtype: torch.dtype) -> torch.Tensor:
    return depthwise_conv2d_triton.forward(x, weight, bias, silu, out_dtype)


@_depthwise_conv2d_triton.register_fake
def _(x, weight, bias, silu, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("pyssm::depthwise_conv2d_triton_backward", mutates_args=())
def _depthwise_conv2d_triton_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                      bias: torch.Tensor | None, silu: bool
                                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx in x's dtype, dweight float32, dbias (C,) float32)."""
    return depthwise_conv2d_triton.backward(dy, x, weight, bias, silu)


@_depthwise_conv2d_triton_backward.register_fake
def _(dy, x, weight, bias, silu):
    return (x.new_empty(x.shape), weight.new_empty(weight.shape, dtype=torch.float32),
            x.new_empty(x.shape[3], dtype=torch.float32))


def _setup(ctx, inputs, output):
    x, weight, bias, silu, _ = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.silu = silu


def _backward(ctx, dy):
    x, weight, bias = ctx.saved_tensors
    dx, dw, db = torch.ops.pyssm.depthwise_conv2d_triton_backward(
        dy.contiguous(), x, weight, bias, ctx.silu)
    return (dx, dw.to(weight.dtype), None if bias is None else db.to(bias.dtype), None, None)


_depthwise_conv2d_triton.register_autograd(_backward, setup_context=_setup)
