"""The (device, backend) parameters of the Triton ops' tests: Triton's interpreter on CPU
tensors (where triton was imported with TRITON_INTERPRET=1, as tests/conftest.py does on
machines without a GPU), torch's reference ops, and the compiled kernels on a CUDA device
(marked ``cuda``). ``PARAMS[::2]`` is the two that run the kernels."""

from __future__ import annotations

import os

import pytest
import torch

from pyssm.ops import _triton

INTERPRETER = pytest.mark.skipif(
    not _triton.available() or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
    reason="Triton on CPU tensors needs triton imported with TRITON_INTERPRET=1 (no GPU)")
CUDA = [pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available() or not _triton.available(),
    reason="no CUDA device or no triton")]
PARAMS = [pytest.param("cpu", "triton", id="triton-interpreter", marks=INTERPRETER),
          pytest.param("cpu", "reference", id="reference"),
          pytest.param("cuda", "triton", id="cuda", marks=CUDA)]

# The kernels' two places: Triton's interpreter on CPU tensors, or the compiled Triton kernels
# and the CUDA ones on a GPU (marked cuda: the device check's CUDA tests)
KERNEL_DEVICES = [pytest.param("cpu", id="cpu-triton-interpreter", marks=INTERPRETER),
                  pytest.param("cuda", id="cuda", marks=CUDA)]
# the switches that would turn a fused path off (README.md, "Switches"; the device check sets
# some after a failed smoke)
FUSED_PATH_SWITCHES = ("PYSSM_BACKEND", "PYSSM_TRITON", "PYSSM_LINEAR_GELU",
                       "PYSSM_LINEAR_RESIDUAL", "PYSSM_MLP_RESIDUAL", "PYSSM_NORM_MLP",
                       "PYSSM_MLP_GELU", "PYSSM_NORM_LINEAR", "PYSSM_RESIDUAL_PAIRS",
                       "PYSSM_QKVPACKED", "PYSSM_SS2D_STATES")


def every_fused_path(monkeypatch) -> None:
    """Clears FUSED_PATH_SWITCHES, so that a broken kernel fails a test as in its op's tests,
    and lets in the CUDA and Triton kernels not yet verified on a GPU (PYSSM_UNVERIFIED_CUDA)."""
    for name in FUSED_PATH_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYSSM_UNVERIFIED_CUDA", "1")
