"""Module replacement, the way pyssm's integrations put their modules into other libraries'
models (``pyssm.integrations.timm``, ``pyssm.integrations.transformers``)."""

from __future__ import annotations

from typing import Callable

from torch import nn


def swap_modules(model: nn.Module, classes: tuple[type, ...],
                 make: Callable[[nn.Module], nn.Module]) -> int:
    """Replaces (in place) every submodule of ``model`` whose type is exactly one of ``classes``
    (not a subclass, whose forward may differ) by ``make(module)``; returns how many."""
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) in classes]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(module))
    return len(targets)
