"""selective_scan: the mamba / VMamba selective state-space scan with K groups (DESIGN.md).

Shapes: u, delta (batch, K*D, L); A (K*D, N); B, C (batch, K, N, L), group g shared by the
D consecutive channels g*D ... g*D + D - 1 (K = 1 is plain mamba); D, delta_bias (K*D,).
Per channel c (group g = c // D) and state n:

    dt_l   = softplus(delta[c, l] + delta_bias[c])     (softplus only if delta_softplus)
    h_l    = exp(dt_l * A[c, n]) * h_{l-1} + dt_l * B[g, n, l] * u[c, l],   h_{-1} = 0
    y[c,l] = sum_n C[g, n, l] * h_l[n] + D[c] * u[c, l]

Accumulates in float32 (float64 for float64 u); returns u's dtype, or float32 with
``out_float32=True``. With ``return_last_state=True`` it returns ``(y, h_{L-1})``, the state
after the last position as (batch, K*D, N) in the accumulation dtype (zeros at L = 0): mamba's
``return_last_state``, for a prefill before step-by-step decoding. That state is
differentiable: its gradient enters the backward's adjoint recurrence at the last position
(the CUDA kernels that write it and take its gradient are instantiations of their own,
``selective_scan_with_state`` in the schema).
"""

from __future__ import annotations

import torch

from pyssm import _extension
from pyssm.ops import _backend, _checks


def softplus_exact(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x) with no threshold (torch's softplus switches to x above 20)."""
    return x.clamp_min(0) + torch.log1p(torch.exp(-x.abs()))


def selective_scan_reference(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False,
                             *, out_float32=False, return_last_state=False):
    """Pure-PyTorch selective scan, a Python loop over L. Same arguments as selective_scan."""
    acc = _checks.acc_dtype(u.dtype)
    batch, channels, L = u.shape
    groups, N = B.shape[1], A.shape[1]
    u_, dt = u.to(acc), delta.to(acc)
    if delta_bias is not None:
        dt = dt + delta_bias.to(acc)[:, None]
    if delta_softplus:
        dt = softplus_exact(dt)
    per_group = channels // groups
    Bc = B.to(acc).repeat_interleave(per_group, dim=1)  # (batch, K*D, N, L)
    Cc = C.to(acc).repeat_interleave(per_group, dim=1)
    decay = torch.exp(dt[..., None] * A.to(acc)[None, :, None, :])  # (batch, K*D, L, N)
    drive = (dt * u_)[..., None] * Bc.transpose(2, 3)             # (batch, K*D, L, N)
    h = u_.new_zeros(batch, channels, N)
    ys = []
    for step in range(L):
        h = decay[:, :, step] * h + drive[:, :, step]
        ys.append((h * Cc[:, :, :, step]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u_.new_zeros(batch, channels, 0)
    if D is not None:
        y = y + D.to(acc)[:, None] * u_
    y = y.to(torch.float32 if out_float32 else u.dtype)
    return (y, h) if return_last_state else y


def check_selective_scan(u, delta, A, B, C, D, delta_bias) -> None:
    for t, name in ((u, "u"), (delta, "delta"), (A, "A"), (B, "B"), (C, "C")):
        _checks.floating(t, name)
    _checks.rank(u, 3, "u", "(batch, K*D, L)")
    _checks.rank(delta, 3, "delta", "(batch, K*D, L)")
    _checks.rank(A, 2, "A", "(K*D, N)")
    _checks.rank(B, 4, "B", "(batch, K, N, L)")
    _checks.rank(C, 4, "C", "(batch, K, N, L)")
    batch, channels, L = u.shape
    groups, N = B.shape[1], A.shape[1]
    _checks.shape(delta, u.shape, "delta", "(batch, K*D, L), the shape of u")
    _checks.shape(A, (channels, N), "A", "(K*D, N) with K*D the channels of u")
    if groups < 1 or channels % groups != 0:
        raise ValueError(f"B has {groups} groups (dim 1), which must be >= 1 and divide the "
                         f"{channels} channels of u")
    _checks.shape(B, (batch, groups, N, L), "B", "(batch, K, N, L)")
    _checks.shape(C, (batch, groups, N, L), "C", "(batch, K, N, L), the shape of B")
    for t, name in ((delta, "delta"), (A, "A"), (B, "B"), (C, "C")):
        _checks.same_device(t, u, name, "u")
    for t, name in ((D, "D"), (delta_bias, "delta_bias")):
        if t is not None:
            _checks.floating(t, name)
            _checks.shape(t, (channels,), name, "(K*D,)")
            _checks.same_device(t, u, name, "u")


def selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, *,
                   out_float32=False, return_last_state=False, backend=None):
    """The selective scan y (batch, K*D, L) of the module docstring, or with
    ``return_last_state`` ``(y, last_state)``, last_state (batch, K*D, N) in the accumulation
    dtype. Differentiable in every float tensor argument, through both outputs."""
    check_selective_scan(u, delta, A, B, C, D, delta_bias)
    op = "selective_scan_with_state" if return_last_state else "selective_scan"
    if _backend.resolve(op, u.device, backend) == "reference":
        with _backend.without_autocast(u.device):
            return selective_scan_reference(u, delta, A, B, C, D, delta_bias, delta_softplus,
                                            out_float32=out_float32,
                                            return_last_state=return_last_state)
    if return_last_state:
        y, last = torch.ops.pyssm.selective_scan_with_state(u, delta, A, B, C, D, delta_bias,
                                                             delta_softplus, out_float32)
        return y, last
    return torch.ops.pyssm.selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus,
                                          out_float32)


if _extension.available():

    @torch.library.register_fake("pyssm::selective_scan")
    def _selective_scan_fake(u, delta, A, B, C, D, delta_bias, delta_softplus, out_float32):
        check_selective_scan(u, delta, A, B, C, D, delta_bias)
        return u.new_empty(u.shape, dtype=torch.float32 if out_float32 else u.dtype)

    @torch.library.register_fake("pyssm::selective_scan_with_state")
    def _selective_scan_with_state_fake(u, delta, A, B, C, D, delta_bias, delta_softplus,
                                        out_float32):
        check_selective_scan(u, delta, A, B, C, D, delta_bias)
        acc = _checks.acc_dtype(u.dtype)
        return (u.new_empty(u.shape, dtype=torch.float32 if out_float32 else u.dtype),
                u.new_empty((*u.shape[:2], A.shape[1]), dtype=acc))

    @torch.library.register_fake("pyssm::selective_scan_backward")
    def _selective_scan_backward_fake(dout, u, delta, A, B, C, D, delta_bias, delta_softplus,
                                      dlast_state=None):
        check_selective_scan(u, delta, A, B, C, D, delta_bias)
        _checks.shape(dout, u.shape, "dout", "(batch, K*D, L), the shape of u")
        if dlast_state is not None:
            _checks.shape(dlast_state, (*u.shape[:2], A.shape[1]), "dlast_state",
                          "(batch, K*D, N), the shape of the last state")
        dD = torch.empty_like(D) if D is not None else u.new_empty((0,))
        dbias = torch.empty_like(delta_bias) if delta_bias is not None else u.new_empty((0,))
        return (torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A),
                torch.empty_like(B), torch.empty_like(C), dD, dbias)

    def _selective_scan_setup(ctx, inputs, output):
        u, delta, A, B, C, D, delta_bias, delta_softplus, _ = inputs
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias)
        ctx.delta_softplus = delta_softplus

    def _selective_scan_backward(ctx, grad, dlast=None):
        u, delta, A, B, C, D, delta_bias = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, dbias = torch.ops.pyssm.selective_scan_backward(
            grad, u, delta, A, B, C, D, delta_bias, ctx.delta_softplus, dlast)
        return (du, ddelta, dA, dB, dC, dD if D is not None else None,
                dbias if delta_bias is not None else None, None, None)

    torch.library.register_autograd(
        "pyssm::selective_scan", _selective_scan_backward, setup_context=_selective_scan_setup)
    # (autograd hands the backward zeros for an output whose gradient is unused)
    torch.library.register_autograd(
        "pyssm::selective_scan_with_state", _selective_scan_backward,
        setup_context=_selective_scan_setup)
