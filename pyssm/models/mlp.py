"""The encoders' MLP, fc1 -> GELU -> fc2 (timm's ``Mlp``: state dict keys ``fc1.*``, ``fc2.*``),
the GELU it and VMamba's stem use, and the blocks' second residual add around it.

Where autograd records nothing (inference, or a frozen encoder under ``torch.no_grad``), that
GELU runs in place on its input, a layer's fresh output that nothing else reads: the same
values (the same kernel, writing into its input's buffer), one activation alive instead of two.
The MLP's hidden layer is 4x the block's width, so that is where an encoder's inference peaks
(VMamba-T stage 1 at 224 px: 2.4 MB an image for each hidden tensor in bf16); VMamba's stem
applies it to a float32 LayerNorm output at half the input resolution. ``add_mlp`` goes
further there: the MLP's output is added into the block's own residual sum in place, a quarter
of the batch at a time, so only a quarter of the hidden layer is ever alive.
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


# the slices of the batch add_mlp runs the MLP in, where it runs it in place
INFERENCE_CHUNKS = 4


def add_mlp(mlp: nn.Module, h: torch.Tensor, s: torch.Tensor, x: torch.Tensor,
            drop_path: nn.Module | None = None) -> torch.Tensor:
    """``s + drop_path(mlp(h))``: a pre-norm block's second residual add, with ``s`` the block's
    sum after its first branch and ``h`` its norm, ``x`` the block's input. Where autograd
    records nothing, drop path is the identity and ``s`` has storage of its own (not ``x``'s),
    the MLP's output is added into ``s`` in place, INFERENCE_CHUNKS slices of the batch at a
    time: the same values, a quarter of the 4x-wide hidden layer alive instead of all of it.
    (Under torch.compile the plain sum: the compiler plans the buffers itself.)"""
    recording = torch.is_grad_enabled() and (h.requires_grad or s.requires_grad)
    identity = drop_path is None or not drop_path.training or getattr(drop_path, "p", 0) == 0
    if (torch.compiler.is_compiling() or recording or not identity
            or s.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()):
        out = mlp(h)
        return s + (out if drop_path is None else drop_path(out))
    for hc, sc in zip(h.chunk(INFERENCE_CHUNKS), s.chunk(INFERENCE_CHUNKS)):
        sc.add_(mlp(hc))
    return s
