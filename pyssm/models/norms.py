"""The encoders' LayerNorms on ``pyssm.ops.layer_norm``: ``nn.LayerNorm``'s parameters, state
dict keys and results, in fewer passes over memory.

- ``norm(x)`` is ``nn.LayerNorm``, output dtype included: under CUDA autocast float32, read
  straight from the 16-bit input (torch casts that to float32 in a pass of its own first).
- ``norm(x, for_matmul=True)`` returns the autocast dtype (else x's dtype) when the output only
  feeds a matrix product, which would round it to that dtype anyway: same values, half the bytes
  written.
- ``norm.add(x, residual)`` is ``s = x + residual; (norm(s), s)`` in one pass: the residual add
  of a pre-norm block fused with the next block half's norm.
- ``norm(x, activation="gelu")`` is ``F.gelu(norm(x))`` in the same pass (VMamba's stem).

``backend`` (the attribute, set by VMamba's ``set_backend``, or the argument, which ViT's
blocks pass from the model's per-call backend through ``triton_backend``): None for the
automatic choice, "reference" for torch's own ops, "triton" for the Triton kernels.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from pyssm.ops.layer_norm import layer_norm


def _out_dtype(x: torch.Tensor, for_matmul: bool) -> torch.dtype | None:
    """None (x's dtype) outside autocast and for float64. Under autocast: its dtype for a
    matrix product's input; otherwise what torch's own LayerNorm returns there: float32 on CUDA
    (autocast runs layer_norm in float32), the input's dtype on the CPU (it does not)."""
    device = x.device.type
    if x.dtype == torch.float64 or device not in ("cpu", "cuda"):
        return None
    if not torch.is_autocast_enabled(device):
        return None
    if for_matmul:
        return torch.get_autocast_dtype(device)
    return torch.float32 if device == "cuda" else None


def matmul_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype a matrix product or convolution would cast x to under autocast (None outside
    autocast, and for float64)."""
    return _out_dtype(x, True)


def triton_backend(model_backend: str | None) -> str | None:
    """The backend of the models' Triton ops (these norms, VMamba's depthwise convolution) for
    a model-wide pyssm backend: the reference for "reference" and "cpu" (torch's own ops are
    the CPU kernels), Triton for "cuda" (the reference with PYSSM_TRITON=0, the device check's
    switch after a failed Triton smoke), automatic otherwise."""
    if model_backend == "cuda" and os.environ.get("PYSSM_TRITON", "") == "0":
        return "reference"
    return {"reference": "reference", "cpu": "reference", "cuda": "triton"}.get(model_backend)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dimension, on pyssm's fused op (module docstring)."""

    backend: str | None = None

    def forward(self, x: torch.Tensor, *, for_matmul: bool = False,
                out_dtype: torch.dtype | None = None, activation: str | None = None,
                residual: torch.Tensor | None = None,
                backend: str | None = None) -> torch.Tensor:
        """norm(x), or norm(x + residual) with ``residual`` (the sum not returned)."""
        return layer_norm(x, self.weight, self.bias, self.eps, residual=residual,
                          out_dtype=out_dtype or _out_dtype(x, for_matmul),
                          activation=activation, backend=backend or self.backend)

    def add(self, x: torch.Tensor, residual: torch.Tensor, *, for_matmul: bool = False,
            backend: str | None = None):
        """(norm(x + residual), x + residual), the sum in the promoted dtype of the two."""
        return layer_norm(x, self.weight, self.bias, self.eps, residual=residual,
                          out_dtype=_out_dtype(x, for_matmul), return_residual=True,
                          backend=backend or self.backend)


class LayerNorm2d(LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) tensor; stored channels-last
    (torch.channels_last), it is read and written as a (B, H, W, C) view, without a copy."""

    def forward(self, x: torch.Tensor, *, for_matmul: bool = False,
                out_dtype: torch.dtype | None = None, activation: str | None = None,
                backend: str | None = None) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1), for_matmul=for_matmul,
                               out_dtype=out_dtype, activation=activation,
                               backend=backend).permute(0, 3, 1, 2)

    def add(self, x: torch.Tensor, residual: torch.Tensor, *, for_matmul: bool = False,
            backend: str | None = None):
        y, s = super().add(x.permute(0, 2, 3, 1), residual.permute(0, 2, 3, 1),
                           for_matmul=for_matmul, backend=backend)
        return y.permute(0, 3, 1, 2), s.permute(0, 3, 1, 2)
