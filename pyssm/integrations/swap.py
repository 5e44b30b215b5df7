"""Module replacement, the way pyssm's integrations put their modules into other libraries'
models (``pyssm.integrations.timm``, ``pyssm.integrations.transformers``)."""

from __future__ import annotations

from typing import Callable

from torch import nn

from pyssm.models.norms import LayerNorm


# the hooks a module keeps (torch.nn.Module's dicts of them)
HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
              "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
              "_backward_pre_hooks")


def swap_modules(model: nn.Module, classes: tuple[type, ...],
                 make: Callable[[nn.Module], nn.Module],
                 when: Callable[[nn.Module], bool] | None = None) -> int:
    """Replaces (in place) every submodule of ``model`` whose type is exactly one of ``classes``
    (not a subclass, whose forward may differ), and for which ``when(module)`` holds where
    given, by ``make(module)``; returns how many. The new module takes over the old one's hooks
    (the same dicts, so the hooks' handles still remove them): a feature-extraction hook, or
    transformers' output recorders installed at an earlier forward, see the new module's calls."""
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) in classes and (when is None or when(module))]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = make(module)
        for hooks in HOOK_DICTS:
            if hasattr(module, hooks):
                setattr(new, hooks, getattr(module, hooks))
        setattr(parent, child, new)
    return len(targets)


def shared_layer_norm(norm: nn.LayerNorm) -> LayerNorm:
    """pyssm's LayerNorm over ``norm``'s parameters (the same Parameter objects, so a module
    holding it keeps the state dict's keys and shares the weights)."""
    out = LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=False, bias=False)
    out.weight, out.bias = norm.weight, norm.bias   # (None without an affine part)
    return out
