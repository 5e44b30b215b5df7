"""linear_residual_: an MLP's second layer added into the block's residual sum, in place.

    s (..., N), x (..., K), weight (N, K) (nn.Linear(K, N)'s), bias (N,) or None:
    s += y,   y = x weight^T + bias rounded to x's dtype,
    with weight and bias rounded to x's dtype first when x is 16-bit and the products summed
    in float32 (float64 for float64), all as CUDA autocast runs F.linear; then the add in the
    promoted dtype of s and y (float32 for a float32 s), rounded to s's dtype.

The same values as ``s.add_(F.linear(x, weight, bias))`` under autocast (a pre-norm block's
``s + mlp(h)``, pyssm.models.mlp.add_mlp), in one pass that reads s and writes it once, without
y written and read again.

An inference op: it updates s in place and records nothing for autograd, so it refuses to run
where autograd would record (grad mode on and any argument requiring grad); there use
``s + F.linear(x, weight, bias)``.

Backends: ``triton`` (linear_residual_triton.py; on CPU tensors Triton's interpreter, for the
tests), ``reference`` (torch's F.linear and add_), or None / ``"auto"``: Triton on CUDA tensors
once verified on a GPU (``_extension.UNVERIFIED_CUDA``; ``PYSSM_UNVERIFIED_CUDA=1`` runs it
before), the reference otherwise and for float64, with ``PYSSM_BACKEND=reference`` or with
``PYSSM_TRITON=0``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyssm.ops import _checks, _triton, linear_residual_triton
from pyssm.ops.linear_gelu import check_linear_gelu, kernel_operands, linear_operands

BACKENDS = _triton.BACKENDS


def linear_residual_reference_(s, x, weight, bias=None):
    """Pure-PyTorch linear_residual_ (module docstring): s updated in place and returned."""
    acc = _checks.acc_dtype(x.dtype)
    w, b = linear_operands(x.dtype, weight, bias, acc)
    return s.add_(F.linear(x.to(acc), w, b).to(x.dtype))


def check_sum(op: str, s, x, n: int, read: dict, instead: str) -> None:
    """The in-place ops' checks of the sum s they update: floating, (..., n) with x's leading
    dimensions, on x's device, sharing no memory with a tensor of ``read`` (name -> tensor or
    None), and no autograd recording (``instead``: what to call where gradients are needed)."""
    _checks.floating(s, "s")
    want = (*x.shape[:-1], n)
    _checks.shape(s, want, "s", f"(..., {n}): x's leading dimensions and the output width")
    _checks.same_device(s, x, "s", "x")
    eager = not torch.compiler.is_compiling() and s.device.type != "meta"
    for name, t in read.items():
        if eager and t is not None and s.numel() and t.numel() and (
                s.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()):
            raise ValueError(f"s must not share memory with {name} (s is written while {name} "
                             f"is read)")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (s, *read.values())):
        raise RuntimeError(
            f"{op} is an inference op (it updates s in place and records nothing for "
            f"autograd): call it under torch.no_grad() or torch.inference_mode(), or use "
            f"{instead} where gradients are needed")


def check_linear_residual(s, x, weight, bias) -> None:
    check_linear_gelu(x, weight, bias, None)
    check_sum("linear_residual_", s, x, weight.shape[0], dict(x=x, weight=weight, bias=bias),
              "s + F.linear(x, weight, bias)")


def uses_triton(s, x, weight, bias=None, backend=None) -> bool:
    """Whether linear_residual_ with these arguments runs its Triton kernel."""
    dtypes = [t.dtype for t in (s, x, weight, bias) if t is not None]
    return _triton.use_triton("linear_residual", x.device, dtypes, backend)


def update_rows_(s: torch.Tensor, update) -> torch.Tensor:
    """``update(s2d)`` on s as an (M, N) matrix with unit stride along N, which it updates in
    place: a view of s where its layout allows one, else a contiguous copy that is then copied
    back into s. Returns s."""
    s2d = rows_view(s)
    if s2d is not None:
        update(s2d)
        return s
    s2d = s.reshape(-1, s.shape[-1]).contiguous()
    update(s2d)
    return s.copy_(s2d.view(s.shape))


def rows_view(t: torch.Tensor) -> torch.Tensor | None:
    """t as an (M, N) view with unit stride along N, or None where no such view exists."""
    try:
        t2 = t.view(-1, t.shape[-1])
    except RuntimeError:
        return None
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else None


def linear_residual_(s: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None = None, *,
                     backend: str | None = None) -> torch.Tensor:
    """s += round(x weight^T + bias) in place (module docstring); returns s."""
    check_linear_residual(s, x, weight, bias)
    if not uses_triton(s, x, weight, bias, backend):
        return linear_residual_reference_(s, x, weight, bias)
    x2d = _triton.rows(x)
    return update_rows_(s, lambda s2d: torch.ops.pyssm.linear_residual_triton(x2d, weight, bias,
                                                                              s2d))


# ---- the op and its fake -------------------------------------------------------------------------

@torch.library.custom_op("pyssm::linear_residual_triton", mutates_args=("s2d",))
def _linear_residual_triton(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            s2d: torch.Tensor) -> None:
    linear_residual_triton.forward_(x2d, *kernel_operands(x2d.dtype, weight, bias), s2d)


@_linear_residual_triton.register_fake
def _(x2d, weight, bias, s2d):
    return None
