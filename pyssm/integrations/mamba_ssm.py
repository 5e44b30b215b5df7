"""A drop-in for ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` on pyssm's ops.

    from pyssm.integrations.mamba_ssm import selective_scan_fn
    y = selective_scan_fn(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True)

u, delta (batch, D, L); A (D, N) real; B, C either (D, N) (not input-dependent), (batch, N, L)
or (batch, G, N, L); D (D,); z (batch, D, L) gates the output as ``y * silu(z)``. The output has
u's dtype. What pyssm does not compute says so: a complex A, and ``return_last_state``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyssm.ops import selective_scan


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
    if return_last_state:
        raise NotImplementedError(
            "return_last_state=True: pyssm's selective scan recomputes its states and does not "
            "return the last one; use mamba_ssm for stateful decoding")
    if A.is_complex():
        raise NotImplementedError("A is complex: pyssm's selective scan is real-valued")
    batch, _, length = u.shape
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have the shape of u {tuple(u.shape)}, got {tuple(z.shape)}")
    out = selective_scan(u, delta, A, _as_groups(B, "B", batch, length),
                         _as_groups(C, "C", batch, length), D, delta_bias, delta_softplus,
                         out_float32=u.dtype != torch.float64, backend=backend)
    if z is not None:  # gated in the accumulation dtype, rounded once
        out = out * F.silu(z.to(out.dtype))
    return out.to(u.dtype)
