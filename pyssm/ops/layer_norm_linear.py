"""layer_norm_linear: a LayerNorm over the last dimension and the linear layer that reads it, as
one op.

    x (..., K), norm_weight (K,) or None, norm_bias (K,) or None, weight (N, K) (nn.Linear(K,
    N)'s), bias (N,) or None, dtype (the product's; default x's dtype):
    h = (x - mean(x)) / sqrt(var(x) + eps) * norm_weight + norm_bias, in float32 (float64 for
    float64 x), rounded to dtype,
    y = h weight^T + bias with weight and bias rounded to dtype first when it is 16-bit and the
    products summed in float32 (float64 for float64), rounded to dtype.

The same values as ``layer_norm(x, ..., out_dtype=dtype)`` and then ``F.linear`` under autocast
(pyssm's norms writing the matmul dtype, then a 16-bit product); in one pass that never writes
h (layer_norm_linear_triton.py).

Backends: ``triton`` (layer_norm_linear_triton.py; on CPU tensors Triton's interpreter, for the
tests), ``reference`` (layer_norm's reference and torch's F.linear), or None / ``"auto"``:
Triton on CUDA tensors once verified on a GPU (``_extension.UNVERIFIED_CUDA``;
``PYSSM_UNVERIFIED_CUDA=1`` runs it before), the reference otherwise and for float64, with
``PYSSM_BACKEND=reference`` or with ``PYSSM_TRITON=0``. Differentiable in x and every
parameter on both backends (the Triton op's backward recomputes the reference and
differentiates it; the encoders take this op in inference only, see pyssm.models.vmamba).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyssm.ops import _checks, _triton, layer_norm_linear_triton
from pyssm.ops.layer_norm import layer_norm_reference
from pyssm.ops.linear_gelu import check_linear_gelu, kernel_operands, linear_operands

BACKENDS = _triton.BACKENDS


def layer_norm_linear_reference(x, norm_weight, norm_bias, weight, bias=None, *, eps=1e-5,
                                dtype=None):
    """Pure-PyTorch layer_norm_linear (module docstring)."""
    dt = dtype or x.dtype
    h = layer_norm_reference(x, norm_weight, norm_bias, eps, out_dtype=dt)
    acc = _checks.acc_dtype(dt)
    w, b = linear_operands(dt, weight, bias, acc)
    return F.linear(h.to(acc), w, b).to(dt)


def check_layer_norm_linear(x, norm_weight, norm_bias, weight, bias, dtype) -> None:
    check_linear_gelu(x, weight, bias, None)  # x, and the linear layer's weight and bias
    for t, name in ((norm_weight, "norm_weight"), (norm_bias, "norm_bias")):
        _checks.channel_vector(t, x, name, "K")
    _checks.float_dtype(dtype, "dtype")


def uses_triton(x, norm_weight, norm_bias, weight, bias=None, dtype=None, backend=None) -> bool:
    """Whether layer_norm_linear with these arguments runs its Triton kernel."""
    dtypes = [t.dtype for t in (x, norm_weight, norm_bias, weight, bias) if t is not None]
    dtypes += [dtype] if dtype is not None else []
    return _triton.use_triton("layer_norm_linear", x.device, dtypes, backend)


def layer_norm_linear(x: torch.Tensor, norm_weight: torch.Tensor | None,
                      norm_bias: torch.Tensor | None, weight: torch.Tensor,
                      bias: torch.Tensor | None = None, *, eps: float = 1e-5,
                      dtype: torch.dtype | None = None,
                      backend: str | None = None) -> torch.Tensor:
    """F.linear(LayerNorm(x)) of the module docstring, (..., N) in ``dtype`` (x's)."""
    check_layer_norm_linear(x, norm_weight, norm_bias, weight, bias, dtype)
    if not uses_triton(x, norm_weight, norm_bias, weight, bias, dtype, backend):
        return layer_norm_linear_reference(x, norm_weight, norm_bias, weight, bias, eps=eps,
                                           dtype=dtype)
    y = torch.ops.pyssm.layer_norm_linear_triton(_triton.rows(x), norm_weight, norm_bias,
                                                 weight, bias, float(eps), dtype or x.dtype)
    return y.view(*x.shape[:-1], weight.shape[0])


# ---- the op, its fake and its gradient ---------------------------------------------------------

@torch.library.custom_op("pyssm::layer_norm_linear_triton", mutates_args=())
def _layer_norm_linear_triton(x2d: torch.Tensor, norm_weight: torch.Tensor | None,
                              norm_bias: torch.Tensor | None, weight: torch.Tensor,
                              bias: torch.Tensor | None, eps: float,
                              dtype: torch.dtype) -> torch.Tensor:
    return layer_norm_linear_triton.forward(x2d, norm_weight, norm_bias, eps,
                                            *kernel_operands(dtype, weight, bias))


@_layer_norm_linear_triton.register_fake
def _(x2d, norm_weight, norm_bias, weight, bias, eps, dtype):
    return x2d.new_empty((x2d.shape[0], weight.shape[0]), dtype=dtype)


def _setup(ctx, inputs, output):
    x2d, norm_weight, norm_bias, weight, bias, ctx.eps, ctx.dtype = inputs
    ctx.save_for_backward(x2d, norm_weight, norm_bias, weight, bias)


def _backward(ctx, dy):
    """The reference recomputed and differentiated (torch's ops; the inputs' own dtypes)."""
    saved = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_() for t in saved]
        y = layer_norm_linear_reference(*leaves, eps=ctx.eps, dtype=ctx.dtype)
        wanted = [(i, t) for i, t in enumerate(leaves)
                  if t is not None and ctx.needs_input_grad[i]]
        grads = torch.autograd.grad(y, [t for _, t in wanted], dy, allow_unused=True)
    out = [None] * 7
    for (i, t), g in zip(wanted, grads):
        out[i] = torch.zeros_like(t) if g is None else g
    return tuple(out)


_layer_norm_linear_triton.register_autograd(_backward, setup_context=_setup)
