"""Shared test setup: poisoned allocations, devices, backends.

Every test runs with torch's deterministic mode, which fills each uninitialised allocation
(torch.empty, and at::empty inside pyssm's C++ kernels) with NaN, so a kernel that leaves an
output element unwritten fails the comparison instead of passing on leftover memory.
CUDA cases carry the ``cuda`` marker and skip cleanly without a GPU or without a kernel.
"""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, pyssm's Triton kernels run on CPU tensors in Triton's interpreter, which Triton
# picks when it is imported with TRITON_INTERPRET=1 (so before pyssm, timm or transformers
# import it). On a GPU they are compiled and their CPU-tensor cases skip.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pyssm  # noqa: E402
from pyssm import _extension


@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)


def _cuda_ok() -> bool:
    return torch.cuda.is_available()


def backend_params(op: str) -> list:
    """(device, backend) cases for ``op``: the CPU kernel and the reference on the CPU, and the
    CUDA kernel on a GPU (skipped when absent or not built yet)."""
    cuda_marks = [pytest.mark.cuda]
    if not _cuda_ok():
        cuda_marks.append(pytest.mark.skip(reason="no CUDA device"))
    elif not _extension.has_kernel(op, "cuda"):
        cuda_marks.append(pytest.mark.skip(reason=f"pyssm has no CUDA kernel for {op} yet"))
    return [
        pytest.param("cpu", "cpu", id="cpu"),
        pytest.param("cpu", "reference", id="reference"),
        pytest.param("cuda", "cuda", id="cuda", marks=cuda_marks),
    ]


def pytest_report_header(config):
    return f"pyssm {pyssm.__version__}, torch {torch.__version__}, extension: {_extension.status()}"


def pytest_addoption(parser):
    parser.addoption("--triton-launches", metavar="PATH", default=None,
                     help="record each Triton kernel launch made in Triton's interpreter to "
                          "PATH (JSON), for bench/triton_compile.py --launches PATH")


def pytest_configure(config):
    if config.getoption("--triton-launches"):
        from pyssm.ops import _triton

        if not (_triton.available() and _triton.interpreting()):
            raise pytest.UsageError("--triton-launches records the launches Triton's "
                                    "interpreter makes: it needs triton and no GPU "
                                    "(TRITON_INTERPRET=1)")
        import triton_launches

        triton_launches.start()


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--triton-launches")
    if path:
        import triton_launches

        count = triton_launches.write(path)
        print(f"\n{count} distinct Triton launches recorded in {path}")
