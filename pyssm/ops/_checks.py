"""Argument checks shared by the op wrappers and their fake (meta) functions.

Each error names the argument and what was expected: TypeError for dtypes, ValueError for
ranks and shapes, RuntimeError for devices (as torch itself does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def floating(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float64, float32, float16 or bfloat16), "
            f"got {t.dtype}")


def rank(t: torch.Tensor, n: int, name: str, layout: str) -> None:
    if t.dim() != n:
        raise ValueError(f"{name} must have {n} dimensions {layout}, got shape {tuple(t.shape)}")


def shape(t: torch.Tensor, expected: Sequence[int], name: str, layout: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(
            f"{name} must have shape {tuple(expected)} {layout}, got {tuple(t.shape)}")


def same_device(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    if t.device != ref.device:
        raise RuntimeError(
            f"{name} is on {t.device} but {ref_name} is on {ref.device}; all tensors must be on "
            f"the same device")


def float_dtype(dtype: torch.dtype | None, name: str) -> None:
    """An output or product dtype argument: None or a floating-point dtype."""
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point dtype, got {dtype}")


def channel_vector(t: torch.Tensor | None, x: torch.Tensor, name: str, width: str) -> None:
    """A norm's weight or bias: None, or a floating (x.shape[-1],) tensor on x's device;
    ``width`` is the letter the message names that length by."""
    if t is None:
        return
    floating(t, name)
    shape(t, x.shape[-1:], name, f"({width},) with {width} the last dimension of x")
    same_device(t, x, name, "x")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of every pyssm op: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32
