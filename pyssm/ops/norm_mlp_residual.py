"""norm_mlp_residual: a pre-norm block's second half in one op, for inference: the residual add,
the norm and the whole MLP added back.

    x (..., C) the block's stream, branch (..., C) its first branch's output, norm_weight (C,)
    or None, norm_bias (C,) or None, fc1_weight (H, C), fc1_bias (H,) or None, fc2_weight (C, H),
    fc2_bias (C,) or None (nn.LayerNorm(C)'s, nn.Linear(C, H)'s and nn.Linear(H, C)'s), dtype
    (the products'; default the promoted dtype of x and branch), out_dtype (the output's;
    default the promoted dtype of x and branch, s's):
    s = x + branch in float32 (float64 for float64), as layer_norm adds a residual,
    h = (s - mean(s)) / sqrt(var(s) + eps) * norm_weight + norm_bias rounded to dtype,
    out = round(s) + round(GELU(h fc1_weight^T + fc1_bias)) fc2_weight^T + fc2_bias (the
    hidden layer and the MLP's output rounded to dtype, the weights and biases rounded to dtype
    first when it is 16-bit and the products summed in float32, as CUDA autocast runs the two
    F.linear's; the activation as linear_gelu's: "gelu", "gelu_tanh" or "quick_gelu"), round(s)
    rounding s to the promoted dtype of x and branch, the add in float32, rounded to out_dtype.

The same values as ``layer_norm(branch, norm_weight, norm_bias, eps, residual=x,
out_dtype=dtype, return_residual=True)`` and then ``mlp_residual_`` of the MLP into that sum
(the encoders' ``norm2.add`` and ``add_mlp``); in one pass (norm_mlp_residual_triton.py) that
writes neither the sum, nor the normalised sum, nor the hidden layer, for C up to 256
(``norm_mlp_residual_triton.MAX_WIDTH``; wider, the kernel of each of those two ops, the MLPs
the encoders fuse whole being that narrow). x is not updated: the output is a new tensor, and
with out_dtype the cast a next layer would make of it comes in the same pass (VMamba's
downsampling convolution reads a stage's output in bf16 under autocast).

An inference op: it records nothing for autograd, so it refuses to run where autograd would
record; there use ``layer_norm`` and ``mlp_gelu``.

Backends: ``triton`` (norm_mlp_residual_triton.py; on CPU tensors Triton's interpreter, for the
tests), ``reference`` (layer_norm's and mlp_residual_'s references: torch's ops), or None /
``"auto"``: Triton on CUDA tensors once verified on a GPU (``_extension.UNVERIFIED_CUDA``;
``PYSSM_UNVERIFIED_CUDA=1`` runs it before), the reference otherwise and for float64, with
``PYSSM_BACKEND=reference`` or with ``PYSSM_TRITON=0``.
"""

from __future__ import annotations

import torch

from pyssm.ops import _checks, _triton, norm_mlp_residual_triton
from pyssm.ops.layer_norm import layer_norm, layer_norm_reference
from pyssm.ops.linear_gelu import ACTIVATIONS, check_activation, kernel_operands
from pyssm.ops.mlp_gelu import check_mlp_gelu
from pyssm.ops.mlp_residual import mlp_residual_, mlp_residual_reference_

BACKENDS = _triton.BACKENDS


def norm_mlp_residual_reference(x, branch, norm_weight, norm_bias, fc1_weight, fc1_bias,
                                fc2_weight, fc2_bias, *, eps=1e-5, activation="gelu",
                                dtype=None, out_dtype=None):
    """Pure-PyTorch norm_mlp_residual (module docstring): layer_norm's reference, then
    mlp_residual_'s into the sum it returns, then the cast to out_dtype."""
    s_dtype = torch.promote_types(x.dtype, branch.dtype)
    h, s = layer_norm_reference(branch, norm_weight, norm_bias, eps, residual=x,
                                out_dtype=dtype or s_dtype, return_residual=True)
    out = mlp_residual_reference_(s, h, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                  activation=activation)
    return out.to(out_dtype or s_dtype)


def check_norm_mlp_residual(x, branch, norm_weight, norm_bias, fc1_weight, fc1_bias,
                            fc2_weight, fc2_bias, dtype, out_dtype=None) -> None:
    _checks.floating(x, "x")
    _checks.floating(branch, "branch")
    _checks.shape(branch, x.shape, "branch", "(..., C): x's")
    _checks.same_device(branch, x, "branch", "x")
    check_mlp_gelu(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    C = x.shape[-1]
    if fc2_weight.shape[0] != C:
        raise ValueError(f"fc2_weight must have shape ({C}, H) with C = x.shape[-1] (the MLP's "
                         f"output is added to the stream), got {tuple(fc2_weight.shape)}")
    for t, name in ((norm_weight, "norm_weight"), (norm_bias, "norm_bias")):
        _checks.channel_vector(t, x, name, "C")
    _checks.float_dtype(dtype, "dtype")
    _checks.float_dtype(out_dtype, "out_dtype")
    tensors = (x, branch, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(
            "norm_mlp_residual is an inference op (it records nothing for autograd): call it "
            "under torch.no_grad() or torch.inference_mode(), or use layer_norm(branch, ..., "
            "residual=x, return_residual=True) and then s + mlp_gelu(h, ...) where gradients "
            "are needed")


def uses_triton(x, branch, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                dtype=None, backend=None, out_dtype=None) -> bool:
    """Whether norm_mlp_residual with these arguments runs its Triton kernel."""
    dtypes = [t.dtype for t in (x, branch, norm_weight, norm_bias, fc1_weight, fc1_bias,
                                fc2_weight, fc2_bias) if t is not None]
    dtypes += [d for d in (dtype, out_dtype) if d is not None]
    return _triton.use_triton("norm_mlp_residual", x.device, dtypes, backend)


def norm_mlp_residual(x: torch.Tensor, branch: torch.Tensor, norm_weight: torch.Tensor | None,
                      norm_bias: torch.Tensor | None, fc1_weight: torch.Tensor,
                      fc1_bias: torch.Tensor | None, fc2_weight: torch.Tensor,
                      fc2_bias: torch.Tensor | None, *, eps: float = 1e-5,
                      activation: str = "gelu", dtype: torch.dtype | None = None,
                      out_dtype: torch.dtype | None = None,
                      backend: str | None = None) -> torch.Tensor:
    """x + branch + MLP(LayerNorm(x + branch)) of the module docstring, (..., C) in out_dtype
    (default the promoted dtype of x and branch)."""
    check_norm_mlp_residual(x, branch, norm_weight, norm_bias, fc1_weight, fc1_bias,
                            fc2_weight, fc2_bias, dtype, out_dtype)
    check_activation(activation)
    if not uses_triton(x, branch, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight,
                       fc2_bias, dtype, backend, out_dtype):
        return norm_mlp_residual_reference(x, branch, norm_weight, norm_bias, fc1_weight,
                                           fc1_bias, fc2_weight, fc2_bias, eps=eps,
                                           activation=activation, dtype=dtype,
                                           out_dtype=out_dtype)
    s_dtype = torch.promote_types(x.dtype, branch.dtype)
    if x.shape[-1] > norm_mlp_residual_triton.MAX_WIDTH:  # two passes: the norm's, the MLP's
        h, s = layer_norm(branch, norm_weight, norm_bias, eps, residual=x,
                          out_dtype=dtype or s_dtype, return_residual=True, backend=backend)
        return mlp_residual_(s, h, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                             activation=activation, backend=backend).to(out_dtype or s_dtype)
    out = torch.ops.pyssm.norm_mlp_residual_triton(
        _triton.rows(x), _triton.rows(branch), norm_weight, norm_bias, fc1_weight, fc1_bias,
        fc2_weight, fc2_bias, float(eps), activation, dtype or s_dtype, out_dtype or s_dtype)
    return out.view(x.shape)


# ---- the op and its fake -------------------------------------------------------------------------

@torch.library.custom_op("pyssm::norm_mlp_residual_triton", mutates_args=())
def _norm_mlp_residual_triton(x2d: torch.Tensor, r2d: torch.Tensor,
                              norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None,
                              fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None,
                              fc2_weight: torch.Tensor, fc2_bias: torch.Tensor | None,
                              eps: float, activation: str, dtype: torch.dtype,
                              out_dtype: torch.dtype) -> torch.Tensor:
    return norm_mlp_residual_triton.forward(
        x2d, r2d, norm_weight, norm_bias, eps,
        *kernel_operands(dtype, fc1_weight, fc1_bias, fc2_weight, fc2_bias), out_dtype,
        act=ACTIVATIONS.index(activation))


@_norm_mlp_residual_triton.register_fake
def _(x2d, r2d, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps,
      activation, dtype, out_dtype):
    return x2d.new_empty(x2d.shape, dtype=out_dtype)
