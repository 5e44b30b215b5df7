"""Loading of the compiled extension ``pyssm._C``.

``import pyssm`` never fails because of the extension: when ``_C`` is missing or does not load
(for example an "undefined symbol" after torch was upgraded), pyssm warns once, says how to
rebuild, and every op keeps working through its pure-PyTorch reference. Forcing a compiled
backend (``backend="cpu"`` / ``"cuda"`` or ``PYSSM_BACKEND``) then raises with the same reason.
"""

from __future__ import annotations

import warnings

import torch

REBUILD_HINT = (
    "rebuild it against the installed torch from the pyssm source tree with "
    "'pip install --no-build-isolation -e .' (or 'pip install --no-build-isolation .')"
)

# CUDA kernels that are built but have not yet passed pyssm's test suite on a GPU (no device
# check has run them): the automatic backend choice runs the reference instead, with a warning.
# backend="cuda" (what the CUDA tests and the device check use) or PYSSM_UNVERIFIED_CUDA=1 runs
# them. An op leaves this set in the commit that records its passing device check.
# 2026-11-28 on an H200 (profiles/nvidia-h200/device_check_runs.md): cross_scan, cross_merge,
# selective_scan and attention passed all their CUDA tests. Back in since: ss2d (its fused
# forward v2 and its autocast fix came after that run) and cross_scan (rewritten after it
# measured 2.3x slower than torch's own transpose; until its new kernel passes, the reference,
# the faster of the two there, runs) and attention (its forward v2, cp.async and ldmatrix,
# came after that run) and selective_scan (its forward v1.1 and backward v2 of 2026-12-04 came
# after that run; they were left out of this set then, an oversight found 2026-12-06; with
# them selective_scan_with_state, the same kernels' instantiations that also write the last
# state and take its gradient). All of them ran in the CPU emulation of tests/cuda_emulation,
# which checks their logic, not the GPU's behaviour.
# layer_norm, layer_norm_linear, depthwise_conv2d, linear_gelu, linear_residual, mlp_gelu,
# mlp_residual and norm_mlp_residual (Triton, pyssm/ops/*_triton.py) have run only in Triton's
# interpreter.
UNVERIFIED_CUDA = frozenset({"ss2d", "cross_scan", "attention", "selective_scan",
                             "selective_scan_with_state", "layer_norm", "layer_norm_linear",
                             "depthwise_conv2d", "linear_gelu", "linear_residual", "mlp_gelu",
                             "mlp_residual", "norm_mlp_residual"})

# Every op csrc/registration.cpp defines: a pyssm._C without one of them is stale
SCHEMA = ("cross_scan", "cross_merge", "selective_scan", "selective_scan_with_state",
          "selective_scan_backward", "ss2d",
          "ss2d_with_states", "ss2d_backward", "attention", "attention_backward",
          "attention_qkvpacked", "attention_qkvpacked_backward")

_loaded = False
_error: str | None = None
_kernels: dict[tuple[str, str], bool] = {}


def _load() -> None:
    global _loaded, _error
    try:
        from pyssm import _C  # noqa: F401  (loading registers torch.ops.pyssm.*)
    except (ImportError, OSError) as exc:  # missing, or built against another torch
        _error = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"pyssm's compiled extension pyssm._C could not be loaded ({_error}); pyssm falls "
            f"back to its pure-PyTorch reference ops. To get the CPU and CUDA kernels, "
            f"{REBUILD_HINT}.",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    missing = [op for op in SCHEMA if not hasattr(torch.ops.pyssm, op)]
    if missing:  # built from an older csrc/ (the editable install rebuilds nothing on import)
        _error = f"pyssm._C predates this source tree: it has no {', '.join(missing)}"
        warnings.warn(
            f"{_error}; pyssm falls back to its pure-PyTorch reference ops. To get the CPU and "
            f"CUDA kernels, {REBUILD_HINT}.",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    _loaded = True
    for op in SCHEMA:
        for key in ("CPU", "CUDA"):
            _kernels[(op, key.lower())] = torch._C._dispatch_has_kernel_for_dispatch_key(
                f"pyssm::{op}", key)


def available() -> bool:
    """True when ``pyssm._C`` loaded and its ops are registered."""
    return _loaded


def load_error() -> str | None:
    """Why ``pyssm._C`` did not load, or None."""
    return _error


def has_kernel(op: str, device_type: str) -> bool:
    """Whether ``pyssm._C`` has a kernel of ``op`` (and its backward) for ``device_type``."""
    return _kernels.get((op, device_type), False)


def status() -> dict[str, object]:
    """A summary for bug reports and the benchmark headers."""
    return {
        "loaded": _loaded,
        "error": _error,
        "kernels": sorted(f"{op}:{dev}" for (op, dev), ok in _kernels.items() if ok),
    }


_load()
