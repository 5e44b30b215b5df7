"""The encoders' MLP, fc1 -> GELU -> fc2 (timm's ``Mlp``: state dict keys ``fc1.*``, ``fc2.*``),
the GELU it and VMamba's stem use, and the blocks' second residual add around it.

Where autograd records nothing (inference, or a frozen encoder under ``torch.no_grad``), that
GELU runs in place on its input, a layer's fresh output that nothing else reads: the same
values (the same kernel, writing into its input's buffer), one activation alive instead of two.
The MLP's hidden layer is 4x the block's width, so that is where an encoder's inference peaks
(VMamba-T stage 1 at 224 px: 2.4 MB an image for each hidden tensor in bf16); VMamba's stem
applies it to a float32 LayerNorm output at half the input resolution. ``add_mlp`` goes
further there: the MLP's output is added into the block's own residual sum in place, in slices
of the batch when the hidden layer is large, so only a quarter of it is ever alive.
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


# add_mlp in place: the batch in slices whose hidden layer is at most CHUNK_BYTES, at most
# INFERENCE_CHUNKS of them (VMamba-T stage 1, 128 images at 224 px: 308 MB of bf16 hidden
# layer, 4 slices; small hidden layers stay whole, where more launches would cost more than
# the memory is worth)
INFERENCE_CHUNKS, CHUNK_BYTES = 4, 64 * 2**20


def batch_slices(nbytes: float) -> int:
    """How many slices of the batch to run an inference step in whose largest activation is
    ``nbytes``: up to INFERENCE_CHUNKS, so that a slice's is at most CHUNK_BYTES."""
    return int(min(INFERENCE_CHUNKS, max(1, -(-nbytes // CHUNK_BYTES))))


def _same_buffer(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b are views of one buffer; meta tensors (which have no data, so every
    data_ptr is 0) compare by their storage object."""
    sa, sb = a.untyped_storage(), b.untyped_storage()
    if a.device.type == "meta" or b.device.type == "meta":
        return sa._cdata == sb._cdata
    return sa.data_ptr() == sb.data_ptr()


def add_mlp(mlp: nn.Module, h: torch.Tensor, s: torch.Tensor, x: torch.Tensor,
            drop_path: nn.Module | None = None) -> torch.Tensor:
    """``s + drop_path(mlp(h))``: a pre-norm block's second residual add, with ``s`` the block's
    sum after its first branch and ``h`` its norm, ``x`` the block's input. Where autograd
    records nothing, drop path is the identity and ``s`` has storage of its own (not ``x``'s),
    the MLP's output is added into ``s`` in place, a slice of the batch at a time (up to
    INFERENCE_CHUNKS, see CHUNK_BYTES): the same values, no second sum allocated, and a quarter
    of a large 4x-wide hidden layer alive instead of all of it. (Under torch.compile the plain
    sum: the compiler plans the buffers itself.)"""
    recording = torch.is_grad_enabled() and (
        h.requires_grad or s.requires_grad or any(p.requires_grad for p in mlp.parameters()))
    identity = drop_path is None or not drop_path.training or getattr(drop_path, "p", 0) == 0
    if torch.compiler.is_compiling() or recording or not identity or _same_buffer(s, x):
        out = mlp(h)
        return s + (out if drop_path is None else drop_path(out))
    fc1 = getattr(mlp, "fc1", None)
    ratio = fc1.out_features / fc1.in_features if isinstance(fc1, nn.Linear) else 4
    chunks = batch_slices(h.numel() * ratio * h.element_size())
    for hc, sc in zip(h.chunk(chunks), s.chunk(chunks)):
        sc.add_(mlp(hc))
    return s
