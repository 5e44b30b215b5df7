"""mlp_gelu: a whole MLP, fc1 -> GELU (exact, tanh or quick) -> fc2, as one differentiable op
for training.

    x (..., C), fc1_weight (H, C), fc1_bias (H,) or None, fc2_weight (C2, H), fc2_bias (C2,)
    or None (nn.Linear(C, H)'s and nn.Linear(H, C2)'s):
    a = x fc1_weight^T + fc1_bias,   h = GELU(a) rounded to x's dtype (the activation as
    linear_gelu's: "gelu", "gelu_tanh" or "quick_gelu"),
    y = h fc2_weight^T + fc2_bias rounded to x's dtype,
    with the weights and biases rounded to x's dtype first when x is 16-bit and the products
    summed in float32 (float64 for float64), as CUDA autocast runs the two F.linear's.
    Gradients into x, both weights and both biases (in their own dtypes), with the GELU's
    derivative taken at a rounded to x's dtype (the value autocast's fc1 hands the GELU).

Against fc1, GELU and fc2 in torch under autocast: the same values, with the hidden layer h
rounded once instead of twice (fc1's output, then the GELU's), and in the backward fc2's input
gradient dh never rounded (it is multiplied by GELU'(a) in float32 before it is stored).

Why one op: torch's training step writes fc1's output a, reads it in the GELU and writes h; in
the backward it writes dh, reads it back with a and writes the GELU's gradient da. Here the
forward is linear_gelu's kernel writing a and h in one pass, and the backward's first pass
(mlp_gelu_triton.py) forms da from dy, fc2's weight and a without dh ever stored: three
passes over the 4x-wide hidden layer fewer a step; that pass also sums fc1's bias gradient
from da before rounding it, sparing a fourth. The other products are cuBLAS's: fc2's forward,
dx = da W1 and the weight gradients; fc2's bias gradient is a sum of dy over the rows.

Backends: ``triton`` (the two kernels; on CPU tensors Triton's interpreter, for the tests),
``reference`` (torch's F.linear and F.gelu in float32, autograd's backward), or None /
``"auto"``: Triton on CUDA tensors once verified on a GPU (``_extension.UNVERIFIED_CUDA``;
``PYSSM_UNVERIFIED_CUDA=1`` runs it before), the reference otherwise and for float64, with
``PYSSM_BACKEND=reference`` or with ``PYSSM_TRITON=0``. The encoders' Mlp takes this op where
autograd records (training) and ``PYSSM_MLP_GELU`` is not ``0``; in inference it takes
linear_gelu and linear_residual_, which write no pre-activation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyssm.ops import _checks, _triton, linear_gelu_triton, mlp_gelu_triton
from pyssm.ops.linear_gelu import (ACTIVATIONS, activate, check_activation,  # noqa: F401
                                   kernel_operands, linear_operands)

BACKENDS = _triton.BACKENDS


def mlp_gelu_reference(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, activation="gelu"):
    """Pure-PyTorch mlp_gelu (module docstring) in float32 (float64 for float64)."""
    acc = _checks.acc_dtype(x.dtype)
    w1, b1 = linear_operands(x.dtype, fc1_weight, fc1_bias, acc)
    w2, b2 = linear_operands(x.dtype, fc2_weight, fc2_bias, acc)
    a = F.linear(x.to(acc), w1, b1)
    a_kept = a + (a.to(x.dtype).to(acc) - a).detach()  # a as kept for the backward
    # the value GELU(a), the derivative GELU'(a_kept)
    h = activate(a, activation)
    h = (activate(a_kept, activation) + (h - activate(a_kept, activation)).detach())
    h = h.to(x.dtype).to(acc)
    return F.linear(h, w2, b2).to(x.dtype)


def check_mlp_gelu(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias) -> None:
    _checks.floating(x, "x")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., C), got a 0-d tensor")
    C = x.shape[-1]
    for w, name in ((fc1_weight, "fc1_weight"), (fc2_weight, "fc2_weight")):
        _checks.floating(w, name)
        _checks.rank(w, 2, name, "(out_features, in_features), nn.Linear's")
        _checks.same_device(w, x, name, "x")
    if fc1_weight.shape[1] != C:
        raise ValueError(f"fc1_weight must have shape (H, {C}) with C = x.shape[-1], got "
                         f"{tuple(fc1_weight.shape)}")
    H = fc1_weight.shape[0]
    if fc2_weight.shape[1] != H:
        raise ValueError(f"fc2_weight must have shape (C2, {H}) with H = fc1_weight.shape[0], "
                         f"got {tuple(fc2_weight.shape)}")
    for b, w, name in ((fc1_bias, fc1_weight, "fc1_bias"), (fc2_bias, fc2_weight, "fc2_bias")):
        if b is not None:
            _checks.floating(b, name)
            _checks.shape(b, (w.shape[0],), name, f"({w.shape[0]},): the layer's out_features")
            _checks.same_device(b, x, name, "x")


def uses_triton(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, backend=None) -> bool:
    """Whether mlp_gelu with these arguments runs its Triton kernels."""
    dtypes = [t.dtype for t in (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias) if t is not None]
    return _triton.use_triton("mlp_gelu", x.device, dtypes, backend)


def mlp_gelu(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None,
             fc2_weight: torch.Tensor, fc2_bias: torch.Tensor | None, *,
             activation: str = "gelu", backend: str | None = None) -> torch.Tensor:
    """fc2(GELU(fc1(x))) of the module docstring, (..., C2) in x's dtype."""
    check_mlp_gelu(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    check_activation(activation)
    if not uses_triton(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, backend):
        return mlp_gelu_reference(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                  activation=activation)
    y, _, _ = torch.ops.pyssm.mlp_gelu_triton(_triton.rows(x), fc1_weight, fc1_bias,
                                              fc2_weight, fc2_bias, activation)
    return y.reshape(*x.shape[:-1], fc2_weight.shape[0])


# ---- the op, its fake and its gradient ---------------------------------------------------------

@torch.library.custom_op("pyssm::mlp_gelu_triton", mutates_args=())
def _mlp_gelu_triton(x2d: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None,
                     fc2_weight: torch.Tensor, fc2_bias: torch.Tensor | None, activation: str
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, a, h): the output, and the pre-activation and hidden layer the backward reads."""
    dt = x2d.dtype
    w1, b1, w2, b2 = kernel_operands(dt, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    a = x2d.new_empty((x2d.shape[0], w1.shape[0]))
    h = linear_gelu_triton.forward(x2d, w1, b1, dt, pre=a, act=ACTIVATIONS.index(activation))
    return F.linear(h, w2, b2), a, h


@_mlp_gelu_triton.register_fake
def _(x2d, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation):
    M, H = x2d.shape[0], fc1_weight.shape[0]
    return (x2d.new_empty((M, fc2_weight.shape[0])), x2d.new_empty((M, H)),
            x2d.new_empty((M, H)))


@torch.library.custom_op("pyssm::mlp_gelu_dgrad_triton", mutates_args=())
def _mlp_gelu_dgrad_triton(dy: torch.Tensor, w2: torch.Tensor, a: torch.Tensor,
                           activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(da, its column sums a row tile): da = (dy W2) GELU'(a), the backward's kernel, an op
    of its own so that autograd's tracers (torch.compile) see a fake of it."""
    return mlp_gelu_triton.backward(dy, w2, a, act=ACTIVATIONS.index(activation))


@_mlp_gelu_dgrad_triton.register_fake
def _(dy, w2, a, activation):
    M, N = a.shape
    block_m = _triton.training_tiles(N, dy.shape[1], dy.dtype == torch.float32)[0]
    return a.new_empty(a.shape), a.new_empty(((M + block_m - 1) // block_m, N),
                                             dtype=torch.float32)


def _setup(ctx, inputs, output):
    x2d, fc1_weight, fc1_bias, fc2_weight, fc2_bias, ctx.activation = inputs
    _, a, h = output
    ctx.mark_non_differentiable(a, h)
    ctx.save_for_backward(x2d, fc1_weight, fc1_bias, fc2_weight, fc2_bias, a, h)


def _backward(ctx, dy, _da, _dh):
    """da = (dy W2) GELU'(a) and fc1's bias gradient (float32 sums of the float32 da) by the
    kernel; the rest cuBLAS's products in x's dtype (float32 sums, as autocast's) and fc2's
    bias gradient a float32 sum of dy over the rows."""
    x2d, fc1_weight, fc1_bias, fc2_weight, fc2_bias, a, h = ctx.saved_tensors
    dt = x2d.dtype
    w1, w2 = kernel_operands(dt, fc1_weight, fc2_weight)
    dy = dy.to(dt)
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    da, db1_tiles = torch.ops.pyssm.mlp_gelu_dgrad_triton(dy, w2, a, ctx.activation)
    need = ctx.needs_input_grad  # (a frozen MLP: x's gradient alone; LoRA-style: no dx)
    dx = da @ w1 if need[0] else None
    dw1 = (da.t() @ x2d).to(fc1_weight.dtype) if need[1] else None
    db1 = db1_tiles.sum(0).to(fc1_bias.dtype) if need[2] else None
    dw2 = (dy.t() @ h).to(fc2_weight.dtype) if need[3] else None
    db2 = dy.sum(0, dtype=torch.float32).to(fc2_bias.dtype) if need[4] else None
    return dx, dw1, db1, dw2, db2, None


_mlp_gelu_triton.register_autograd(_backward, setup_context=_setup)
