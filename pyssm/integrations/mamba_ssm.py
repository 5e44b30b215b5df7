"""Drop-ins for mamba_ssm's ``selective_scan_fn`` (``mamba_ssm.ops.selective_scan_interface``) on
pyssm's ops, and for its decoding step ``selective_state_update``
(``mamba_ssm.ops.triton.selective_state_update``).

    from pyssm.integrations.mamba_ssm import selective_scan_fn, selective_state_update
    y = selective_scan_fn(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True)
    y, state = selective_scan_fn(..., return_last_state=True)       # a prefill
    y_t = selective_state_update(state, x_t, dt_t, A, B_t, C_t, D, z=z_t, dt_bias=bias,
                                 dt_softplus=True)                   # then one step at a time

selective_scan_fn: u, delta (batch, D, L); A (D, N) real; B, C either (D, N) (not
input-dependent), (batch, N, L) or (batch, G, N, L); D (D,); z (batch, D, L) gates the output as
``y * silu(z)``. The output has u's dtype; with ``return_last_state`` also the state after the
last position, (batch, D, N) in float32 (float64 for float64 u), as mamba returns it. A complex
A raises (pyssm's scan is real-valued).

selective_state_update advances ``state`` by one position in place and returns that position's
output, in pure PyTorch (one step is a few elementwise ops; mamba has a Triton kernel for it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyssm.ops import selective_scan
from pyssm.ops.selective_scan import softplus_exact


def _as_groups(M: torch.Tensor, name: str, batch: int, length: int) -> torch.Tensor:
    """mamba's B / C layouts -> pyssm's (batch, K, N, L)."""
    if M.is_complex():
        raise NotImplementedError(f"{name} is complex: pyssm's selective scan is real-valued")
    if M.dim() == 2:  # (D, N): one fixed vector per channel -> D groups of one channel
        return M[None, :, :, None].expand(batch, M.shape[0], M.shape[1], length)
    if M.dim() == 3:
        return M.unsqueeze(1)
    if M.dim() == 4:
        return M
    raise ValueError(f"{name} must be (D, N), (batch, N, L) or (batch, G, N, L), got "
                     f"{tuple(M.shape)}")


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, *, backend=None):
    """mamba_ssm's selective_scan_fn signature and results (see the module docstring)."""
    if A.is_complex():
        raise NotImplementedError("A is complex: pyssm's selective scan is real-valued")
    batch, _, length = u.shape
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have the shape of u {tuple(u.shape)}, got {tuple(z.shape)}")
    out = selective_scan(u, delta, A, _as_groups(B, "B", batch, length),
                         _as_groups(C, "C", batch, length), D, delta_bias, delta_softplus,
                         out_float32=u.dtype != torch.float64,
                         return_last_state=return_last_state, backend=backend)
    out, last_state = out if return_last_state else (out, None)
    if z is not None:  # gated in the accumulation dtype, rounded once
        out = out * F.silu(z.to(out.dtype))
    return (out.to(u.dtype), last_state) if return_last_state else out.to(u.dtype)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                           dt_softplus=False, state_batch_indices=None):
    """One step of the selective scan, mamba_ssm's ``selective_state_update``: ``state`` becomes
    ``exp(dt A) state + dt B x`` in place, and the result is ``(state C) + D x``, gated by
    ``silu(z)``, in x's dtype.

    Shapes (mamba's two layouts): state (batch, D, N), x, dt, z (batch, D), A (D, N), B, C
    (batch, N), D, dt_bias (D,); or with heads state (batch, H, D, N), x, dt, z (batch, H, D),
    A (H, D, N), B, C (batch, G, N) with G dividing H, D, dt_bias (H, D).
    ``state_batch_indices`` (batch,): the rows of ``state`` (a cache of more sequences) that
    the batch's sequences advance. Computed in float32 (float64 for a float64 state); the new
    state is stored in state's dtype and the output read from it, as mamba's reference does."""
    heads = x.dim() == 3
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be (batch, D) or (batch, H, D), got {tuple(x.shape)}")
    rows = state if state_batch_indices is None else state[state_batch_indices]
    want = (*x.shape, A.shape[-1])
    if rows.shape != want:
        raise ValueError(f"state must be {'(batch, H, D, N)' if heads else '(batch, D, N)'} "
                         f"matching x {tuple(x.shape)} and A {tuple(A.shape)}: {want}, got "
                         f"{tuple(rows.shape)}" + ("" if state_batch_indices is None else
                                                   " (its rows at state_batch_indices)"))
    if A.shape != want[1:]:
        raise ValueError(f"A must be {want[1:]} ({'(H, D, N)' if heads else '(D, N)'}), got "
                         f"{tuple(A.shape)}")
    for t, name in ((dt, "dt"), (z, "z")):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"{name} must have the shape of x {tuple(x.shape)}, got "
                             f"{tuple(t.shape)}")
    for t, name in ((D, "D"), (dt_bias, "dt_bias")):
        if t is not None and t.shape != x.shape[1:]:
            raise ValueError(f"{name} must be {tuple(x.shape[1:])}, got {tuple(t.shape)}")
    layout = "(batch, G, N) with G dividing H" if heads else "(batch, N)"
    for t, name in ((B, "B"), (C, "C")):
        ok = t.dim() == x.dim() and t.shape[0] == x.shape[0] and t.shape[-1] == A.shape[-1]
        if not ok or (heads and (t.shape[1] < 1 or x.shape[1] % t.shape[1] != 0)):
            raise ValueError(f"{name} must be {layout} with batch {x.shape[0]} and N "
                             f"{A.shape[-1]}, got {tuple(t.shape)}")
    acc = torch.float64 if state.dtype == torch.float64 else torch.float32
    step = dt.to(acc) + (dt_bias.to(acc) if dt_bias is not None else 0)
    if dt_softplus:
        step = softplus_exact(step)  # (the scan's: no threshold)
    Bx, Cx = B.to(acc), C.to(acc)
    if heads:  # group g serves heads g * H / G ... (g + 1) * H / G - 1
        Bx = Bx.repeat_interleave(x.shape[1] // B.shape[1], dim=1)
        Cx = Cx.repeat_interleave(x.shape[1] // C.shape[1], dim=1)
    xs = x.to(acc)
    new = (torch.exp(step[..., None] * A.to(acc)) * rows.to(acc)
           + (step * xs)[..., None] * Bx.unsqueeze(-2))
    if state_batch_indices is None:
        state.copy_(new)
        new = state.to(acc)
    else:
        state[state_batch_indices] = new.to(state.dtype)
        new = state[state_batch_indices].to(acc)
    out = (new * Cx.unsqueeze(-2)).sum(-1)
    if D is not None:
        out = out + xs * D.to(acc)
    if z is not None:
        out = out * F.silu(z.to(acc))
    return out.to(x.dtype)
