"""The encoder registry: small factory functions registered by name, and create_encoder.

    from pyssm.models import create_encoder, list_encoders
    enc = create_encoder("vit_small_patch16", img_size=384, checkpoint="vit_s16.pth")

A factory is a config, not code: ``@register_encoder`` on a function returning the model.
``checkpoint`` is a path (.pth / .pt / .bin via torch.load(weights_only=True), or
.safetensors) or a state dict; the model's family filter (``checkpoint_filter``) maps the
official layout onto pyssm's and the load is strict, so a wrong checkpoint fails loudly.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import torch
from torch import nn

_ENCODERS: dict[str, Callable[..., nn.Module]] = {}


def register_encoder(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    if fn.__name__ in _ENCODERS:
        raise ValueError(f"encoder {fn.__name__!r} is already registered")
    _ENCODERS[fn.__name__] = fn
    return fn


def list_encoders(pattern: str = "") -> list[str]:
    """Registered encoder names containing ``pattern``."""
    return sorted(name for name in _ENCODERS if pattern in name)


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


def strip_wrapper_prefixes(key: str) -> str:
    """A state-dict key without the prefixes DDP ("module.") and torch.compile ("_orig_mod.")
    put in front of it."""
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def read_state_dict(checkpoint: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict:
    """A state dict from a path or mapping; unwraps {"model": ...} / {"state_dict": ...}."""
    if isinstance(checkpoint, Mapping):
        state = dict(checkpoint)
    else:
        path = os.fspath(checkpoint)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {path!r} does not exist")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "model_ema"):
        if key in state and isinstance(state[key], Mapping):
            state = dict(state[key])
            break
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)][:5]
        raise ValueError(f"checkpoint is not a state dict of tensors (entries {bad} are not "
                         f"tensors); expected a .pth whose 'model' entry is the state dict")
    return state


def load_checkpoint(model: nn.Module, checkpoint) -> nn.Module:
    """Loads ``checkpoint`` into ``model`` through its family's filter, strictly."""
    state = model.checkpoint_filter(read_state_dict(checkpoint))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not fit {type(model).__name__}: missing {len(missing)} keys "
            f"{missing[:6]}, unexpected {len(unexpected)} keys {unexpected[:6]}")
    return model


def create_encoder(name: str, img_size: int | tuple[int, int] = 224, checkpoint=None,
                   **kwargs) -> nn.Module:
    """The encoder ``name`` at ``img_size`` (pos-embeds resampled where needed), with the
    weights of ``checkpoint`` when given. Extra keyword arguments override its config."""
    if name not in _ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; registered: {', '.join(list_encoders())}")
    model = _ENCODERS[name](img_size=img_size, **kwargs)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model
