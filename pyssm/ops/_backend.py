"""Backend choice for every op: ``cuda``, ``cpu`` (pyssm's compiled kernels) or ``reference``
(the pure-PyTorch implementation beside each op).

The choice comes from the op's ``backend=`` argument, else the ``PYSSM_BACKEND`` environment
variable, else automatically: the compiled kernel for the tensors' device when it exists (and,
for CUDA, has passed the tests on a GPU: _extension.UNVERIFIED_CUDA), the reference otherwise. A backend that is asked for and cannot run raises; only the automatic
choice falls back.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

from pyssm import _extension

BACKENDS = ("cuda", "cpu", "reference")
_warned: set[tuple[str, str]] = set()


def without_autocast(device: torch.device):
    """Autocast off, for the references: like the compiled kernels (csrc/registration.cpp),
    every op keeps its own precision under torch.autocast (float32 state and accumulation).
    Devices autocast does not know (meta tensors, for shapes) need nothing."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _kernel_backend(device: torch.device) -> str | None:
    return device.type if device.type in ("cpu", "cuda") else None


def resolve(op: str, device: torch.device, backend: str | None) -> str:
    """The backend that runs ``op`` on tensors on ``device``."""
    requested = backend if backend is not None else os.environ.get("PYSSM_BACKEND", "") or None
    source = "backend" if backend is not None else "PYSSM_BACKEND"
    if requested is None or requested == "auto":
        kernel = _kernel_backend(device)
        if kernel is not None and _extension.has_kernel(op, kernel):
            if (kernel == "cuda" and op in _extension.UNVERIFIED_CUDA
                    and os.environ.get("PYSSM_UNVERIFIED_CUDA", "") != "1"):
                if (op, "unverified") not in _warned:
                    _warned.add((op, "unverified"))
                    warnings.warn(f"pyssm.ops.{op}: running the pure-PyTorch reference on "
                                  f"{device}: the CUDA kernel is built but has not yet passed "
                                  f"pyssm's tests on a GPU; backend='cuda' or "
                                  f"PYSSM_UNVERIFIED_CUDA=1 runs it", RuntimeWarning,
                                  stacklevel=3)
                return "reference"
            return kernel
        if kernel == "cuda" and (op, kernel) not in _warned:
            _warned.add((op, kernel))
            why = (f"pyssm._C did not load ({_extension.load_error()})"
                   if not _extension.available() else "it has no CUDA kernel for this op yet")
            warnings.warn(f"pyssm.ops.{op}: running the pure-PyTorch reference on {device}: "
                          f"{why}", RuntimeWarning, stacklevel=3)
        return "reference"
    if requested not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS} or 'auto', got {requested!r}")
    if requested == "reference":
        return "reference"
    if _kernel_backend(device) != requested:
        raise ValueError(f"{source}={requested!r} cannot run pyssm.ops.{op} on tensors on "
                         f"{device}; move the tensors or choose another backend")
    if not _extension.available():
        raise RuntimeError(f"{source}={requested!r} needs pyssm's compiled extension, which did "
                           f"not load ({_extension.load_error()}); {_extension.REBUILD_HINT}")
    if not _extension.has_kernel(op, requested):
        raise RuntimeError(f"{source}={requested!r}: pyssm._C has no {requested.upper()} kernel "
                           f"for {op} (built without it); {_extension.REBUILD_HINT}")
    return requested
