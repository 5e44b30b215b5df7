"""Pre-norm blocks run with their residual stream carried unsummed, in training.

A pre-norm block maps x to ``s + mlp(norm2(s))`` with ``s = x + attn(norm1(x))``; the second
norm already reads its two addends and writes their sum itself (``norm.add``). Run block by
block, the block's last sum costs an elementwise pass of its own, and in the backward the
stream's gradient is a second one: the next block reads x twice (norm1, and its own residual
add), so autograd sums the two gradients it gets. Where autograd records, the encoders hand a
block's output on as the pair ``(mlp branch, s)`` instead (``forward_unsummed`` on their blocks):
the next block's norm1 adds the two itself, in the pass that normalises (``norm.add``, as norm2
does), and that op's backward adds the gradient of the sum it returns to its own, in the same
pass. So a stage of ``depth`` blocks has one stream add and one gradient sum instead of ``depth``
of each (a ViT's final norm takes the last pair too, so it has none). The values are the same:
each sum is the one add it was, only made in another kernel.

Inference keeps the block-by-block forward, whose in-place MLP add (``add_mlp``) is already one
pass. ``PYSSM_RESIDUAL_PAIRS=0`` (read at each call) keeps it in training too: the benchmarks'
comparison. Blocks with forward hooks run as modules, so that their hooks see their outputs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn

from pyssm.models.mlp import hooked, records


def carry_unsummed(blocks: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``blocks`` (a container of blocks with ``forward_unsummed``) should run on the
    unsummed stream: autograd records (``x`` or a parameter of the blocks needs a gradient),
    PYSSM_RESIDUAL_PAIRS is not "0" and no forward hook would miss a block's call."""
    if os.environ.get("PYSSM_RESIDUAL_PAIRS", "") == "0" or not records(x, blocks):
        return False
    return not hooked(blocks, *blocks.children())


def run_unsummed(blocks: Iterable[nn.Module], x: torch.Tensor,
                 **kwargs) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The blocks in turn on the stream x: their output as ``(branch, s)``, whose sum is what
    running them one after the other returns (``branch`` None: no block ran, ``s`` is x).
    ``kwargs`` go to each block's ``forward_unsummed``."""
    branch, s = None, x
    for block in blocks:
        branch, s = block.forward_unsummed(branch, s, **kwargs)
    return branch, s


def summed(branch: torch.Tensor | None, s: torch.Tensor) -> torch.Tensor:
    """The stream that ``(branch, s)`` stands for."""
    return s if branch is None else s + branch
