"""The scripts the device check runs on a GPU, run here on the CPU kernels (their CPU modes), so
that a broken script is found before it costs device time: bench/sanitize_cases.py,
bench/ncu_cases.py, bench/hopper_smoke.py, and bench/device_check.sh's syntax."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(args, **env):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


def test_sanitize_cases_run_on_the_cpu_kernels():
    done = run([sys.executable, "bench/sanitize_cases.py"], PYSSM_SANITIZE_DEVICE="cpu")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for op in ("cross_scan", "selective_scan", "ss2d", "attention"):
        assert f"ok   {op}" in done.stdout, done.stdout[-2000:]


def test_ncu_cases_run_on_the_cpu_kernels():
    done = run([sys.executable, "bench/ncu_cases.py"], PYSSM_NCU_DEVICE="cpu")
    assert done.returncode == 0, done.stderr[-2000:]
    assert ("ncu cases: ss2d fwd + bwd, attention fwd + bwd (dQ by TMA, by atomics), "
            "selective_scan fwd + bwd: done") in done.stdout


def test_hopper_smoke_skips_without_an_sm90_gpu():
    done = run([sys.executable, "bench/hopper_smoke.py"], PYSSM_HOPPER_SMOKE_DEVICE="cpu")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "hopper smoke: skipped" in done.stdout


@pytest.mark.parametrize("script", ["bench/device_check.sh", "bench/cuda_tests.sh"])
def test_device_shell_scripts_parse(script):
    done = run(["bash", "-n", script])
    assert done.returncode == 0, done.stderr
