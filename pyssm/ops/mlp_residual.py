"""mlp_residual_: a whole MLP added into the block's residual sum, in place, for inference.

    s (..., C2), x (..., C), fc1_weight (H, C), fc1_bias (H,) or None, fc2_weight (C2, H),
    fc2_bias (C2,) or None (nn.Linear(C, H)'s and nn.Linear(H, C2)'s):
    h = GELU(x fc1_weight^T + fc1_bias) rounded to x's dtype (the activation as linear_gelu's:
    "gelu", "gelu_tanh" or "quick_gelu"),
    s += h fc2_weight^T + fc2_bias rounded to x's dtype, the add in the promoted dtype of s and
    that (float32 for a float32 s), rounded to s's dtype,
    with the weights and biases rounded to x's dtype first when x is 16-bit and the products
    summed in float32 (float64 for float64), as CUDA autocast runs the two F.linear's.

The same values as ``linear_gelu`` (out_dtype x's) and then ``linear_residual_``, and as torch's
fc1, GELU, fc2 and add under autocast with the hidden layer rounded once instead of twice; in
one pass (mlp_residual_triton.py) that never writes the hidden layer.

An inference op: it updates s in place and records nothing for autograd, so it refuses to run
where autograd would record; there use ``s + mlp_gelu(...)``.

Backends: ``triton`` (mlp_residual_triton.py; on CPU tensors Triton's interpreter, for the
tests), ``reference`` (linear_gelu's and linear_residual_'s references: torch's ops), or None /
``"auto"``: Triton on CUDA tensors once verified on a GPU (``_extension.UNVERIFIED_CUDA``;
``PYSSM_UNVERIFIED_CUDA=1`` runs it before), the reference otherwise and for float64, with
``PYSSM_BACKEND=reference`` or with ``PYSSM_TRITON=0``.
"""

from __future__ import annotations

import torch

from pyssm.ops import _triton, mlp_residual_triton
from pyssm.ops.linear_gelu import (ACTIVATIONS, check_activation, kernel_operands,
                                   linear_gelu_reference)
from pyssm.ops.linear_residual import check_sum, linear_residual_reference_, update_rows_
from pyssm.ops.mlp_gelu import check_mlp_gelu

BACKENDS = _triton.BACKENDS


def mlp_residual_reference_(s, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *,
                            activation="gelu"):
    """Pure-PyTorch mlp_residual_ (module docstring): s updated in place and returned."""
    hidden = linear_gelu_reference(x, fc1_weight, fc1_bias, activation=activation)
    return linear_residual_reference_(s, hidden, fc2_weight, fc2_bias)


def check_mlp_residual(s, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias) -> None:
    check_mlp_gelu(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    check_sum("mlp_residual_", s, x, fc2_weight.shape[0],
              dict(x=x, fc1_weight=fc1_weight, fc1_bias=fc1_bias, fc2_weight=fc2_weight,
                   fc2_bias=fc2_bias),
              "s + mlp_gelu(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)")


def uses_triton(s, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, backend=None) -> bool:
    """Whether mlp_residual_ with these arguments runs its Triton kernel."""
    dtypes = [t.dtype for t in (s, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
              if t is not None]
    return _triton.use_triton("mlp_residual", x.device, dtypes, backend)


def mlp_residual_(s: torch.Tensor, x: torch.Tensor, fc1_weight: torch.Tensor,
                  fc1_bias: torch.Tensor | None, fc2_weight: torch.Tensor,
                  fc2_bias: torch.Tensor | None, *, activation: str = "gelu",
                  backend: str | None = None) -> torch.Tensor:
    """s += fc2(GELU(fc1(x))) in place (module docstring); returns s."""
    check_mlp_residual(s, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    check_activation(activation)
    if not uses_triton(s, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, backend):
        return mlp_residual_reference_(s, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                       activation=activation)
    x2d, params = _triton.rows(x), (fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    return update_rows_(s, lambda s2d: torch.ops.pyssm.mlp_residual_triton(x2d, *params, s2d,
                                                                           activation))


# ---- the op and its fake -------------------------------------------------------------------------

@torch.library.custom_op("pyssm::mlp_residual_triton", mutates_args=("s2d",))
def _mlp_residual_triton(x2d: torch.Tensor, fc1_weight: torch.Tensor,
                         fc1_bias: torch.Tensor | None, fc2_weight: torch.Tensor,
                         fc2_bias: torch.Tensor | None, s2d: torch.Tensor,
                         activation: str) -> None:
    mlp_residual_triton.forward_(
        x2d, *kernel_operands(x2d.dtype, fc1_weight, fc1_bias, fc2_weight, fc2_bias), s2d,
        act=ACTIVATIONS.index(activation))


@_mlp_residual_triton.register_fake
def _(x2d, fc1_weight, fc1_bias, fc2_weight, fc2_bias, s2d, activation):
    return None
