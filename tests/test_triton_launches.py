"""tests/triton_launches.py (the launches the CPU tests make in Triton's interpreter) and
``bench/triton_compile.py --launches``, which compiles them for a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import triton_launches
from pyssm.ops import _triton, layer_norm, linear_gelu

ROOT = Path(__file__).parents[1]
needs_interpreter = pytest.mark.skipif(
    not (_triton.available() and _triton.interpreting()),
    reason="needs triton and Triton's interpreter (TRITON_INTERPRET=1, no GPU)")


def _kernel(X, Y, M, N, eps, B, FLAG: tl.constexpr, BLOCK: tl.constexpr = 16):  # noqa: F821
    pass


@pytest.fixture
def fresh(monkeypatch):
    """An empty record for the test, the suite's own (--triton-launches) left as it was."""
    monkeypatch.setattr(triton_launches, "_records", set())
    monkeypatch.setattr(triton_launches, "_unrecordable", [])
    if _triton.available() and _triton.interpreting():
        from triton.runtime.interpreter import InterpretedFunction

        monkeypatch.setattr(InterpretedFunction, "run", InterpretedFunction.run)


def test_a_launch_is_recorded_as_the_gpu_would_specialise_it(fresh, tmp_path):
    x = torch.zeros(3, dtype=torch.bfloat16)
    triton_launches.record(_kernel, (x, x.float(), 1, 7, 1e-5, None), {"FLAG": True,
                                                                      "num_warps": 8})
    triton_launches.record(_kernel, (x, x.float(), 5, 2**40, 1e-5, None),
                           {"FLAG": True, "num_warps": 8})
    triton_launches.record(_kernel, (x, x.float(), 5, 9, 1e-5, None),  # same types as above
                           {"FLAG": True, "num_warps": 8, "num_stages": None})
    triton_launches.record(_kernel, (x, x.float(), 5, 9, 1e-5, "a string"), {"FLAG": True})
    assert triton_launches.write(tmp_path / "l.json") == 3
    data = json.loads((tmp_path / "l.json").read_text())
    first = next(r for r in data["launches"] if r["signature"]["M"] == "constexpr")
    assert list(first["signature"]) == ["X", "Y", "M", "N", "eps", "B", "FLAG", "BLOCK"]
    assert first["signature"] == {"X": "*bf16", "Y": "*fp32", "M": "constexpr", "N": "i32",
                                  "eps": "fp32", "B": "constexpr", "FLAG": "constexpr",
                                  "BLOCK": "constexpr"}
    assert first["constants"] == {"M": 1, "B": None, "FLAG": True, "BLOCK": 16}
    assert first["num_warps"] == 8
    wide = {r["signature"]["N"] for r in data["launches"]}
    assert wide == {"i32", "i64"}
    assert data["unrecordable"] == [f"{_kernel.__module__}._kernel: an argument of type str"]


def _compile(path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "triton_compile.py"),
                           "--launches", str(path), "--arch", "90"], env=env,
                          capture_output=True, text=True, timeout=600)


@needs_interpreter
def test_recorded_launches_compile_for_a_gpu_and_a_bad_one_fails(fresh, tmp_path):
    """An odd-width layer_norm and linear_gelu, recorded in the interpreter, compile for
    sm_90; the same linear_gelu launch with a K step of 8 (under tl.dot's 16) does not."""
    triton_launches.start()
    with torch.no_grad():
        layer_norm(torch.randn(5, 11, dtype=torch.bfloat16), backend="triton")
        linear_gelu(torch.randn(5, 24, dtype=torch.bfloat16),
                    torch.randn(20, 24, dtype=torch.bfloat16), backend="triton")
    assert triton_launches.write(tmp_path / "ok.json") == 2
    run = _compile(tmp_path / "ok.json")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "2 recorded launches x 1 archs compiled: 0 failed" in run.stdout

    data = json.loads((tmp_path / "ok.json").read_text())
    gelu = next(r for r in data["launches"] if r["kernel"].endswith("linear_gelu_triton._fwd"))
    assert gelu["constants"]["CPU"] is True  # as launched on the CPU; compiled with False
    gelu["constants"]["BLOCK_K"] = 8
    (tmp_path / "bad.json").write_text(json.dumps({"launches": [gelu], "unrecordable": []}))
    run = _compile(tmp_path / "bad.json")
    assert run.returncode == 1
    assert "FAILED" in run.stdout and "1 failed" in run.stdout
