"""linear_gelu: an MLP's first layer and its GELU (exact, or tanh or quick) as one op.

    x (..., K), weight (N, K) (nn.Linear(K, N)'s), bias (N,) or None:
    y = GELU(x weight^T + bias), GELU(a) = a (1 + erf(a / sqrt 2)) / 2 (nn.GELU's default;
    activation="gelu_tanh": F.gelu(a, approximate="tanh"), SigLIP's; "quick_gelu":
    a sigmoid(1.702 a), OpenAI CLIP's),
    with weight and bias rounded to x's dtype first when x is 16-bit (as CUDA autocast rounds
    F.linear's), the products summed in float32 (float64 for float64), the GELU applied to that
    sum and y rounded once to out_dtype (default x's dtype).

Against fc1 and then GELU in torch (under autocast): the same products, with y rounded once
instead of twice (fc1's output, then the GELU's).

Backends: ``triton`` (linear_gelu_triton.py; on CPU tensors Triton's interpreter, for the
tests), ``reference`` (torch's F.linear and F.gelu in float32), or None / ``"auto"``: Triton on
CUDA tensors once verified on a GPU (``_extension.UNVERIFIED_CUDA``; ``PYSSM_UNVERIFIED_CUDA=1``
runs it before), the reference otherwise and for float64, with ``PYSSM_BACKEND=reference`` or
with ``PYSSM_TRITON=0``. Differentiable in x, weight and bias on both backends (the Triton op's
backward is torch's ops in float32, recomputing the pre-activation; the encoders take this op in
inference only, see pyssm.models.mlp).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyssm.ops import _checks, _triton, linear_gelu_triton

BACKENDS = _triton.BACKENDS
LOW = (torch.float16, torch.bfloat16)
# the activations the MLP ops take; a kernel's ACT is the index
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")
# the two that are F.gelu's, by its ``approximate`` argument
GELU_APPROXIMATE = {"gelu": "none", "gelu_tanh": "tanh"}
QUICK_GELU_SCALE = 1.702  # quick_gelu(a) = a sigmoid(1.702 a)


def activate(a: torch.Tensor, activation: str = "gelu") -> torch.Tensor:
    """The MLP activation of a, in torch's ops (as torch's modules compute it)."""
    if activation == "quick_gelu":
        return a * torch.sigmoid(QUICK_GELU_SCALE * a)
    return F.gelu(a, approximate=GELU_APPROXIMATE[activation])


def activation_backward(dy: torch.Tensor, a: torch.Tensor, activation: str = "gelu"):
    """dy times the activation's derivative at a, in torch's ops."""
    if activation == "quick_gelu":
        s = torch.sigmoid(QUICK_GELU_SCALE * a)
        return dy * (s + QUICK_GELU_SCALE * a * s * (1 - s))
    return torch.ops.aten.gelu_backward(dy, a, approximate=GELU_APPROXIMATE[activation])


def check_activation(activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def linear_operands(x_dtype, weight, bias, acc):
    """weight and bias as the op multiplies them: rounded to x's dtype for 16-bit x, in acc."""
    rnd = x_dtype if x_dtype in LOW else acc
    return weight.to(rnd).to(acc), None if bias is None else bias.to(rnd).to(acc)


def kernel_operands(dt: torch.dtype, *ts: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Weights and biases as the Triton linear kernels take them: in x's dtype dt (autocast's
    rounding for 16-bit x), contiguous; None stays None."""
    return [None if t is None else t.to(dt).contiguous() for t in ts]


def linear_gelu_reference(x, weight, bias=None, *, out_dtype=None, activation="gelu"):
    """Pure-PyTorch linear_gelu (module docstring) in float32 (float64 for float64)."""
    acc = _checks.acc_dtype(x.dtype)
    w, b = linear_operands(x.dtype, weight, bias, acc)
    return activate(F.linear(x.to(acc), w, b), activation).to(out_dtype or x.dtype)


def check_linear_gelu(x, weight, bias, out_dtype) -> None:
    _checks.floating(x, "x")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., K), got a 0-d tensor")
    K = x.shape[-1]
    _checks.floating(weight, "weight")
    _checks.rank(weight, 2, "weight", "(N, K), nn.Linear's")
    if weight.shape[1] != K:
        raise ValueError(f"weight must have shape (N, {K}) with K = x.shape[-1], got "
                         f"{tuple(weight.shape)}")
    _checks.same_device(weight, x, "weight", "x")
    if bias is not None:
        _checks.floating(bias, "bias")
        _checks.shape(bias, (weight.shape[0],), "bias", "(N,) with N = weight.shape[0]")
        _checks.same_device(bias, x, "bias", "x")
    _checks.float_dtype(out_dtype, "out_dtype")


def uses_triton(x, weight, bias=None, out_dtype=None, backend=None) -> bool:
    """Whether linear_gelu with these arguments runs its Triton kernel."""
    dtypes = [t.dtype for t in (x, weight, bias) if t is not None]
    dtypes += [out_dtype] if out_dtype is not None else []
    return _triton.use_triton("linear_gelu", x.device, dtypes, backend)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                out_dtype: torch.dtype | None = None, activation: str = "gelu",
                backend: str | None = None) -> torch.Tensor:
    """GELU(x weight^T + bias) of the module docstring, (..., N)."""
    check_linear_gelu(x, weight, bias, out_dtype)
    check_activation(activation)
    if not uses_triton(x, weight, bias, out_dtype, backend):
        return linear_gelu_reference(x, weight, bias, out_dtype=out_dtype, activation=activation)
    y = torch.ops.pyssm.linear_gelu_triton(_triton.rows(x), weight, bias, out_dtype or x.dtype,
                                           activation)
    return y.reshape(*x.shape[:-1], weight.shape[0])


# ---- the op, its fake and its gradient ---------------------------------------------------------

@torch.library.custom_op("pyssm::linear_gelu_triton", mutates_args=())
def _linear_gelu_triton(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        out_dtype: torch.dtype, activation: str) -> torch.Tensor:
    return linear_gelu_triton.forward(x2d, *kernel_operands(x2d.dtype, weight, bias), out_dtype,
                                      act=ACTIVATIONS.index(activation))


@_linear_gelu_triton.register_fake
def _(x2d, weight, bias, out_dtype, activation):
    return x2d.new_empty((x2d.shape[0], weight.shape[0]), dtype=out_dtype)


def _setup(ctx, inputs, output):
    x2d, weight, bias, _, ctx.activation = inputs
    ctx.save_for_backward(x2d, weight, bias)


def _backward(ctx, dy):
    """Torch's ops in float32: the pre-activation a recomputed, g = dy GELU'(a)."""
    x2d, weight, bias = ctx.saved_tensors
    acc = torch.float32
    w, b = linear_operands(x2d.dtype, weight, bias, acc)
    xa = x2d.to(acc)
    g = activation_backward(dy.to(acc), F.linear(xa, w, b), ctx.activation)  # dy GELU'(a)
    dx = (g @ w).to(x2d.dtype)
    dw = (g.t() @ xa).to(weight.dtype)
    db = None if bias is None else g.sum(0).to(bias.dtype)
    return dx, dw, db, None, None


_linear_gelu_triton.register_autograd(_backward, setup_context=_setup)
