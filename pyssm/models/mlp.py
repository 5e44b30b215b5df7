"""The encoders' MLP, fc1 -> GELU -> fc2 (timm's ``Mlp``: state dict keys ``fc1.*``, ``fc2.*``),
and the GELU it and VMamba's stem use.

Where autograd records nothing (inference, or a frozen encoder under ``torch.no_grad``), that
GELU runs in place on its input, a layer's fresh output that nothing else reads: the same
values (the same kernel, writing into its input's buffer), one activation alive instead of two.
The MLP's hidden layer is 4x the block's width, so that is where an encoder's inference peaks
(VMamba-T stage 1 at 224 px: 2.4 MB an image for each hidden tensor in bf16); VMamba's stem
applies it to a float32 LayerNorm output at half the input resolution.
"""

from __future__ import annotations

import torch
from torch import nn


class GELU(nn.GELU):
    """``nn.GELU`` that overwrites its input where autograd records nothing: only for inputs
    nothing else reads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return super().forward(x)
        return torch.ops.aten.gelu_(x, approximate=self.approximate)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, linear: type[nn.Linear] = nn.Linear):
        super().__init__()
        self.fc1, self.act, self.fc2 = linear(dim, hidden), GELU(), linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
