"""layer_norm: LayerNorm over the last dimension, with an optional residual added first and the
output in the dtype the next layer reads: the glue of every VMamba and ViT block in one pass.

    s = x + residual                        (float32, or float64 for float64 inputs)
    y = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias
    y = gelu(y)                             (activation="gelu": the exact, erf GELU)
    returns y in out_dtype, or (y, s) with return_residual=True (s in the promoted dtype of x
    and residual)

Backends: ``triton`` (the kernels of layer_norm_triton.py: on CUDA tensors compiled, on CPU
tensors run by Triton's interpreter, which the tests use), ``reference`` (torch's own ops:
add, ``F.layer_norm``, ``F.gelu``, a cast), or None / ``"auto"``: Triton for CUDA tensors once its kernels
have passed pyssm's tests on a GPU (``_extension.UNVERIFIED_CUDA``; ``PYSSM_UNVERIFIED_CUDA=1``
runs them before that), the reference otherwise, and always for float64.
``PYSSM_BACKEND=reference`` or ``PYSSM_TRITON=0`` makes the automatic choice the reference. The
reference is torch's native LayerNorm, so the fallback is unfused, not slow: no warning.

Unlike pyssm's C++ ops, this one is defined in Python (``torch.library.custom_op``, namespace
``pyssm``) with a fake and an autograd formula, so it works under ``torch.compile``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyssm.ops import _checks, _triton, layer_norm_triton

BACKENDS = _triton.BACKENDS


def _s_dtype(x: torch.Tensor, residual: torch.Tensor | None) -> torch.dtype:
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


def _gelu(y: torch.Tensor) -> torch.Tensor:
    """F.gelu(y), in place on y (a fresh tensor nothing else reads) where autograd records
    nothing."""
    if torch.is_grad_enabled() and y.requires_grad:
        return F.gelu(y)
    return torch.ops.aten.gelu_(y)


def layer_norm_reference(x, weight=None, bias=None, eps=1e-5, *, residual=None, out_dtype=None,
                         return_residual=False, activation=None):
    """Pure-PyTorch layer_norm (the module docstring), accumulating in float32 (float64 for
    float64 inputs). It is also the encoders' path wherever the Triton kernels do not run, so it
    launches no more kernels than torch's own add and LayerNorm: a 16-bit x and a float32
    residual are added by one promoting add, and without a residual and a cast torch's
    LayerNorm (which accumulates in float32 for 16-bit inputs) runs on x directly, and the GELU
    follows it in that dtype."""
    act = _gelu if activation == "gelu" else (lambda y: y)
    s_dtype = _s_dtype(x, residual)
    acc = _checks.acc_dtype(s_dtype)
    params = [t.dtype for t in (weight, bias) if t is not None]
    if residual is None and (out_dtype or x.dtype) == x.dtype and all(d == x.dtype
                                                                      for d in params):
        return act(F.layer_norm(x, x.shape[-1:], weight, bias, eps).to(x.dtype))
    if residual is None:
        s = x.to(acc)
    elif s_dtype == acc:  # exact: the narrower input is widened inside the add
        s = x + residual
    else:
        s = x.to(acc) + residual.to(acc)
    y = F.layer_norm(s, s.shape[-1:], None if weight is None else weight.to(acc),
                     None if bias is None else bias.to(acc), eps)
    y = act(y).to(out_dtype or s_dtype)
    return (y, s.to(s_dtype)) if return_residual else y


ACTIVATIONS = (None, "gelu")


def check_layer_norm(x, weight, bias, residual, out_dtype, return_residual,
                     activation=None) -> None:
    _checks.floating(x, "x")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the one normalised), got a scalar")
    for t, name in ((weight, "weight"), (bias, "bias")):
        _checks.channel_vector(t, x, name, "N")
    if residual is not None:
        _checks.floating(residual, "residual")
        _checks.shape(residual, x.shape, "residual", "the shape of x")
        _checks.same_device(residual, x, "residual", "x")
    elif return_residual:
        raise ValueError("return_residual=True needs a residual (without one, s is x itself)")
    _checks.float_dtype(out_dtype, "out_dtype")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or 'gelu' (the exact GELU), "
                         f"got {activation!r}")


def _use_triton(x, weight, bias, residual, out_dtype, backend) -> bool:
    dtypes = [t.dtype for t in (x, weight, bias, residual) if t is not None]
    dtypes += [out_dtype] if out_dtype is not None else []
    return _triton.use_triton("layer_norm", x.device, dtypes, backend)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, *,
               residual: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
               return_residual: bool = False, activation: str | None = None,
               backend: str | None = None):
    """LayerNorm of ``x + residual`` over the last dimension, then ``activation`` (None or
    "gelu") (module docstring). ``out_dtype`` defaults to the promoted dtype of x and residual.
    Differentiable in x, residual, weight and bias."""
    check_layer_norm(x, weight, bias, residual, out_dtype, return_residual, activation)
    if not _use_triton(x, weight, bias, residual, out_dtype, backend):
        return layer_norm_reference(x, weight, bias, eps, residual=residual, out_dtype=out_dtype,
                                    return_residual=return_residual, activation=activation)
    out_dtype = out_dtype or _s_dtype(x, residual)
    y, s, _, _ = torch.ops.pyssm.layer_norm_triton(
        _triton.rows(x), _triton.rows(residual), weight, bias, float(eps), out_dtype,
        return_residual, activation == "gelu")
    y = y.view(x.shape)
    return (y, s.view(x.shape)) if return_residual else y


# ---- the op, its fake and its gradient ---------------------------------------------------------

@torch.library.custom_op("pyssm::layer_norm_triton", mutates_args=())
def _layer_norm_triton(x: torch.Tensor, residual: torch.Tensor | None,
                       weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                       out_dtype: torch.dtype, store_residual: bool, gelu: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    s_dtype = _s_dtype(x, residual) if store_residual else None
    return layer_norm_triton.forward(x, residual, weight, bias, eps, out_dtype, s_dtype, gelu)


@_layer_norm_triton.register_fake
def _(x, residual, weight, bias, eps, out_dtype, store_residual, gelu):
    M, N = x.shape
    s_shape = (M, N) if store_residual else (0,)
    return (x.new_empty((M, N), dtype=out_dtype), x.new_empty(s_shape, dtype=_s_dtype(x, residual)),
            x.new_empty(M, dtype=torch.float32), x.new_empty(M, dtype=torch.float32))


@torch.library.custom_op("pyssm::layer_norm_triton_backward", mutates_args=())
def _layer_norm_triton_backward(dy: torch.Tensor, ds: torch.Tensor | None, x: torch.Tensor,
                                residual: torch.Tensor | None, weight: torch.Tensor | None,
                                bias: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
                                dx_dtype: torch.dtype, dr_dtype: torch.dtype, has_residual: bool,
                                gelu: bool
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dresidual or empty when it equals dx, dweight (N,) float32, dbias (N,) float32) of a
    forward that normalised x + residual (residual None: x, possibly that sum itself), then
    applied the GELU when ``gelu`` (bias: read only then)."""
    dx, dr, dw, db = layer_norm_triton.backward(
        dy, ds, x, residual, weight, bias, mean, rstd, dx_dtype,
        dr_dtype if has_residual else None, gelu)
    empty = x.new_empty((0,))
    return dx, (dr if dr is not None and dr is not dx else empty), dw, db


@_layer_norm_triton_backward.register_fake
def _(dy, ds, x, residual, weight, bias, mean, rstd, dx_dtype, dr_dtype, has_residual, gelu):
    M, N = x.shape
    separate = has_residual and dr_dtype != dx_dtype
    return (x.new_empty((M, N), dtype=dx_dtype),
            x.new_empty((M, N) if separate else (0,), dtype=dr_dtype),
            x.new_empty(N, dtype=torch.float32), x.new_empty(N, dtype=torch.float32))


def _setup(ctx, inputs, output):
    x, residual, weight, bias = inputs[:4]
    ctx.gelu = inputs[7]
    _, s, mean, rstd = output
    if residual is not None and s.numel() and s.dtype == torch.float32:
        # the returned float32 sum is exactly what was normalised: keep it (4 B per element)
        # rather than both inputs (6 B for a bf16 branch and a float32 stream, as torch's add
        # and LayerNorm keep 4)
        ctx.save_for_backward(s, None, weight, bias if ctx.gelu else None, mean, rstd)
    else:
        ctx.save_for_backward(x, residual, weight, bias if ctx.gelu else None, mean, rstd)
    ctx.grad_dtypes = (x.dtype, residual.dtype if residual is not None else x.dtype)
    ctx.has_residual = residual is not None
    ctx.has_bias = bias is not None
    ctx.param_dtypes = (None if weight is None else weight.dtype,
                        None if bias is None else bias.dtype)
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, ds, _dmean, _drstd):
    x, residual, weight, bias, mean, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x, dtype=ctx.grad_dtypes[0])
    ds = None if ds is None or ds.numel() == 0 else ds.contiguous()
    dx, dr, dw, db = torch.ops.pyssm.layer_norm_triton_backward(
        dy.contiguous(), ds, x, residual, weight, bias, mean, rstd, *ctx.grad_dtypes,
        ctx.has_residual, ctx.gelu)
    if ctx.has_residual and dr.numel() == 0:
        dr = dx
    w_dtype, b_dtype = ctx.param_dtypes
    return (dx, dr if ctx.has_residual else None,
            dw.to(w_dtype) if w_dtype is not None else None,
            db.to(b_dtype) if ctx.has_bias else None, None, None, None, None)


_layer_norm_triton.register_autograd(_backward, setup_context=_setup)
