"""Builds a harness of CUDA kernel sources for the CPU emulation (cuda_emulation.h) with g++,
once per test module (skipped without g++ or the CUDA headers), and small ctypes helpers."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def build(tmp_path_factory, source: str) -> ctypes.CDLL:
    include = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
    cxx = shutil.which("g++")
    if cxx is None or not (include / "cuda_runtime_api.h").exists():
        pytest.skip(f"needs g++ and the CUDA headers (looked in {include})")
    lib_path = tmp_path_factory.mktemp("cuda_emulation") / (Path(source).stem + ".so")
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-w", "-pthread",
           "-DPYSSM_CUDA_EMULATION", f"-I{include}", f"-I{ROOT / 'csrc'}", f"-I{HERE}",
           "-include", "cuda_emulation.h", str(HERE / source), "-o", str(lib_path)]
    built = subprocess.run(cmd, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-4000:]
    return ctypes.CDLL(str(lib_path))


def ptr(t: torch.Tensor | None):
    return ctypes.c_void_p(t.data_ptr() if t is not None and t.numel() else None)


def poisoned(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def sizes(*values) -> ctypes.Array:
    return (ctypes.c_int64 * len(values))(*values)
