"""cross_merge: (B, 4, C, H, W) in scan order -> (B, C, H*W) in pixel order (DESIGN.md).

Each direction k is mapped back from its scan order to row-major pixel order and the four
are summed. Its adjoint, and so its backward, is ``cross_scan``.
"""

from __future__ import annotations

import torch

from pyssm import _extension
from pyssm.ops import _backend, _checks


def cross_merge_reference(ys: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch cross_merge. ys: (B, 4, C, H, W) in scan order -> (B, C, H*W).
    Sums in float32 (float64 for float64) and rounds once to ys's dtype."""
    B, _, C, H, W = ys.shape
    y = ys.flatten(3).to(_checks.acc_dtype(ys.dtype))
    row = y[:, 0] + y[:, 2].flip(-1)
    col = (y[:, 1] + y[:, 3].flip(-1)).reshape(B, C, W, H).transpose(2, 3).flatten(2)
    return (row + col).to(ys.dtype)


def check_cross_merge(ys: torch.Tensor) -> None:
    _checks.floating(ys, "ys")
    _checks.rank(ys, 5, "ys", "(B, 4, C, H, W)")
    if ys.shape[1] != 4:
        raise ValueError(
            f"ys must have shape (B, 4, C, H, W) (4 directions), got {tuple(ys.shape)}")


def cross_merge(ys: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Sum of the four scan-ordered directions ys (B, 4, C, H, W), as (B, C, H*W)."""
    check_cross_merge(ys)
    if _backend.resolve("cross_merge", ys.device, backend) == "reference":
        return cross_merge_reference(ys)
    return torch.ops.pyssm.cross_merge(ys)


if _extension.available():

    @torch.library.register_fake("pyssm::cross_merge")
    def _cross_merge_fake(ys):
        check_cross_merge(ys)
        B, _, C, H, W = ys.shape
        return ys.new_empty((B, C, H * W))

    def _cross_merge_setup(ctx, inputs, output):
        ctx.hw = tuple(inputs[0].shape[3:])

    def _cross_merge_backward(ctx, grad):
        B, C, _ = grad.shape
        return torch.ops.pyssm.cross_scan(grad.reshape(B, C, *ctx.hw)).reshape(B, 4, C, *ctx.hw)

    torch.library.register_autograd(
        "pyssm::cross_merge", _cross_merge_backward, setup_context=_cross_merge_setup)
