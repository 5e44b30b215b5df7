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
