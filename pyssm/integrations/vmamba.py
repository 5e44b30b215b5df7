"""Drop-ins for official VMamba (MzeroMiko/VMamba): its ``cross_scan_fn``, ``cross_merge_fn``
(csm_triton) and ``selective_scan_fn`` (csms6s) signatures, computed by pyssm's ops.

To run the official VMamba code on pyssm's kernels, bind these names where it looks them up
(its ``vmamba.py`` imports them at module level), before building the model::

    import vmamba                                   # the official classification/models/vmamba.py
    from pyssm.integrations import vmamba as pv
    vmamba.cross_scan_fn, vmamba.cross_merge_fn = pv.cross_scan_fn, pv.cross_merge_fn
    vmamba.selective_scan_fn = pv.selective_scan_fn

Layouts as in the official code: cross_scan_fn takes x (B, C, H, W) (``in_channel_first``) or
(B, H, W, C), and with ``one_by_one`` a separate copy per direction, (B, 4, C, H, W) or
(B, H, W, 4, C); it returns (B, 4, C, L) (``out_channel_first``) or (B, L, 4, C).
cross_merge_fn takes the scan-ordered (B, 4, C, H, W) (``out_channel_first``) or
(B, H, W, 4, C) and returns (B, C, L) (``in_channel_first``) or (B, L, C), summed over the
directions unless ``one_by_one``. ``scans``: 0 the four cross2d orders (pyssm's kernels), 1 the
row-major order four times, 2 row-major and its reverse twice each, 3 the row-major orders of
x rotated by 0, 90, 180 and 270 degrees (the last three in plain PyTorch).
"""

from __future__ import annotations

import torch

from pyssm.ops import cross_merge, cross_scan, selective_scan

_SCANS = (0, 1, 2, 3)


def _check_scans(scans):
    if scans not in _SCANS:
        raise ValueError(f"scans must be one of {_SCANS} (0 cross2d, 1 unidirectional, "
                         f"2 bidirectional, 3 rot90), got {scans!r}")


def _orders(x: torch.Tensor, scans: int) -> list[torch.Tensor]:
    """The four scan-ordered sequences (B, C, L) of x (B, C, H, W) for a scans mode."""
    row = x.flatten(2)
    if scans == 0:
        col = x.transpose(2, 3).flatten(2)
        return [row, col, row.flip(-1), col.flip(-1)]
    if scans == 1:
        return [row] * 4
    if scans == 2:
        return [row, row, row.flip(-1), row.flip(-1)]
    return [torch.rot90(x, k, dims=(2, 3)).flatten(2) for k in range(4)]


def _unorders(ys: torch.Tensor, H: int, W: int, scans: int) -> list[torch.Tensor]:
    """Each direction of ys (B, 4, C, L) mapped back to row-major pixel order (B, C, L)."""
    B, _, C, L = ys.shape
    if scans == 0:
        return [ys[:, 0], ys[:, 1].reshape(B, C, W, H).transpose(2, 3).flatten(2),
                ys[:, 2].flip(-1), ys[:, 3].flip(-1).reshape(B, C, W, H).transpose(2, 3).flatten(2)]
    if scans == 1:
        return [ys[:, k] for k in range(4)]
    if scans == 2:
        return [ys[:, 0], ys[:, 1], ys[:, 2].flip(-1), ys[:, 3].flip(-1)]
    grids = [(H, W), (W, H), (H, W), (W, H)]  # rot90 by k swaps the grid's sides for odd k
    return [torch.rot90(ys[:, k].reshape(B, C, *grids[k]), -k, dims=(2, 3)).flatten(2)
            for k in range(4)]


def cross_scan_fn(x: torch.Tensor, in_channel_first=True, out_channel_first=True,
                  one_by_one=False, scans=0, force_torch=False):
    """Official VMamba's cross_scan_fn (layouts in the module docstring)."""
    _check_scans(scans)
    if one_by_one:
        xk = x if in_channel_first else x.permute(0, 3, 4, 1, 2)   # (B, 4, C, H, W)
        if xk.dim() != 5 or xk.shape[1] != 4:
            raise ValueError(f"one_by_one x must be (B, 4, C, H, W) or (B, H, W, 4, C), got "
                             f"{tuple(x.shape)}")
        ys = torch.stack([_orders(xk[:, k], scans)[k] for k in range(4)], dim=1)
    else:
        if x.dim() != 4:
            raise ValueError(f"x must be (B, C, H, W) or (B, H, W, C), got {tuple(x.shape)}")
        xc = x if in_channel_first else x.permute(0, 3, 1, 2)
        if scans == 0 and not force_torch:
            ys = cross_scan(xc)
        else:
            ys = torch.stack(_orders(xc, scans), dim=1)
    return ys if out_channel_first else ys.permute(0, 3, 1, 2)   # (B, L, 4, C)


def cross_merge_fn(y: torch.Tensor, in_channel_first=True, out_channel_first=True,
                   one_by_one=False, scans=0, force_torch=False):
    """Official VMamba's cross_merge_fn (layouts in the module docstring)."""
    _check_scans(scans)
    if y.dim() != 5:
        raise ValueError(f"y must be (B, 4, C, H, W) or (B, H, W, 4, C), got {tuple(y.shape)}")
    yk = y if out_channel_first else y.permute(0, 3, 4, 1, 2)       # (B, 4, C, H, W)
    if yk.shape[1] != 4:
        raise ValueError(f"y must hold 4 directions, got shape {tuple(y.shape)}")
    B, _, C, H, W = yk.shape
    if one_by_one:
        out = torch.stack(_unorders(yk.flatten(3), H, W, scans), dim=1)      # (B, 4, C, L)
        return out if in_channel_first else out.permute(0, 3, 1, 2)          # (B, L, 4, C)
    if scans == 0 and not force_torch:
        out = cross_merge(yk)
    else:
        out = sum(_unorders(yk.flatten(3), H, W, scans))
    return out if in_channel_first else out.transpose(1, 2)                 # (B, L, C)


def selective_scan_fn(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True,
                      oflex=True, backend=None):
    """Official VMamba's csms6s.selective_scan_fn: B, C (batch, K, N, L) (or (batch, N, L) for
    K = 1); the output is float32 with ``oflex`` (as the oflex kernel), u's dtype otherwise.
    ``backend``: a pyssm backend ("cuda", "cpu", "reference"), "torch" for the reference, or
    the official names ("oflex", "mamba", "core"), which mean pyssm's own kernel."""
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    if backend == "torch":
        backend = "reference"
    elif backend in ("oflex", "mamba", "core"):
        backend = None
    return selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus, out_float32=oflex,
                          backend=backend)
