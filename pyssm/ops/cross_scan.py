"""cross_scan: (B, C, H, W) -> (B, 4, C, H*W), the four SS2D scan orders (DESIGN.md).

Direction k visits pixel (h, w) at scan position l:
  k = 0 row-major h*W + w;  k = 1 column-major w*H + h;  k = 2, 3 the reverses of 0, 1.
Its adjoint, and so its backward, is ``cross_merge``.
"""

from __future__ import annotations

import torch

from pyssm import _extension
from pyssm.ops import _backend, _checks


def cross_scan_reference(x: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch cross_scan. x: (B, C, H, W) -> (B, 4, C, H*W)."""
    row = x.flatten(2)
    col = x.transpose(2, 3).flatten(2)
    return torch.stack([row, col, row.flip(-1), col.flip(-1)], dim=1)


def check_cross_scan(x: torch.Tensor) -> None:
    _checks.floating(x, "x")
    _checks.rank(x, 4, "x", "(B, C, H, W)")


def cross_scan(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """The four SS2D scan orders of x (B, C, H, W), as (B, 4, C, H*W). Differentiable."""
    check_cross_scan(x)
    if _backend.resolve("cross_scan", x.device, backend) == "reference":
        return cross_scan_reference(x)
    return torch.ops.pyssm.cross_scan(x)


if _extension.available():

    @torch.library.register_fake("pyssm::cross_scan")
    def _cross_scan_fake(x):
        check_cross_scan(x)
        B, C, H, W = x.shape
        return x.new_empty((B, 4, C, H * W))

    def _cross_scan_setup(ctx, inputs, output):
        ctx.hw = tuple(inputs[0].shape[2:])

    def _cross_scan_backward(ctx, grad):
        B, _, C, _ = grad.shape
        return torch.ops.pyssm.cross_merge(grad.reshape(B, 4, C, *ctx.hw)).reshape(B, C, *ctx.hw)

    torch.library.register_autograd(
        "pyssm::cross_scan", _cross_scan_backward, setup_context=_cross_scan_setup)
