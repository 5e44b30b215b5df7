"""The timing harness on the CPU: rows, statuses, derived columns, memory."""

import os
import sys

import pytest
import torch

from pyssm.bench import ceilings, harness
from pyssm.bench.env import NvmlSampler, environment


def _case(providers, modes=("forward", "full")):
    return harness.Case(op="toy", size={"n": 33}, providers=providers, modes=modes,
                        make_inputs=lambda: (torch.randn(33, 17),), dtype="float32",
                        bytes={"forward": 2 * 33 * 17 * 4}, flops={"forward": 1e6})


def test_rows_for_every_provider_and_mode_with_derived_columns():
    def broken(x):
        raise RuntimeError("no kernel for this")

    rows = harness.run_cases(
        [_case([harness.Provider("double", lambda x: 2 * x),
                harness.Provider("absent", None, "not installed"),
                harness.Provider("broken", broken)])],
        torch.device("cpu"), warmup=1, repeats=3, budget_s=0.05, verbose=False,
        progress=False)
    by = {(r["provider"], r["mode"]): r for r in rows}
    assert len(rows) == 6
    ok = by[("double", "forward")]
    assert ok["status"] == "ok" and ok["ms"] > 0 and ok["ms_p20"] <= ok["ms"] <= ok["ms_p80"]
    assert ok["gbps"] == pytest.approx(2 * 33 * 17 * 4 / ok["ms"] / 1e6)
    assert ok["tflops"] == pytest.approx(1e6 / ok["ms"] / 1e9)
    assert by[("double", "full")]["ms"] > 0  # forward + backward ran
    assert by[("absent", "forward")]["status"] == "not installed"
    assert "ms" not in by[("absent", "forward")]
    assert by[("broken", "full")]["status"].startswith("error: RuntimeError: no kernel")


def test_a_providers_environment_holds_through_forward_and_backward(monkeypatch):
    """Provider.env is set while the provider is measured, its backward included (a kernel
    switch read when the backward op runs, after the provider's function has returned), and
    restored after."""
    monkeypatch.setenv("PYSSM_TEST_SWITCH", "outer")
    seen = []

    class Spy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(("forward", os.environ.get("PYSSM_TEST_SWITCH")))
            return 2 * x

        @staticmethod
        def backward(ctx, g):
            seen.append(("backward", os.environ.get("PYSSM_TEST_SWITCH")))
            return 2 * g

    harness.run_cases([_case([harness.Provider("spy", Spy.apply,
                                               env={"PYSSM_TEST_SWITCH": "inner"})])],
                      torch.device("cpu"), warmup=1, repeats=2, budget_s=0.02, verbose=False,
                      progress=False, cpu_memory=False)
    assert {"forward", "backward"} == {step for step, _ in seen}
    assert all(value == "inner" for _, value in seen), seen
    assert os.environ["PYSSM_TEST_SWITCH"] == "outer"


def test_after_case_sees_partial_rows():
    seen = []
    harness.run_cases([_case([harness.Provider("id", lambda x: x + 0)], ("forward",))] * 2,
                      torch.device("cpu"), warmup=1, repeats=2, budget_s=0.02, verbose=False,
                      progress=False, after_case=lambda rows: seen.append(len(rows)))
    assert seen == [1, 2]


def test_cpu_peak_memory_counts_what_a_step_allocates():
    n = 1 << 20  # 4 MiB of float32 per tensor
    x = torch.randn(n)

    def step():
        a = x * 2          # 4 MiB
        b = a + 1          # 4 MiB, a still alive: 8 MiB at the peak
        del a
        return b.sum()

    assert harness.cpu_peak_mb(step) == pytest.approx(8.0, abs=0.1)


def test_ceilings_and_fractions():
    rows = harness.run_cases(ceilings.cases(torch.device("cpu"), quick=True),
                             torch.device("cpu"), warmup=1, repeats=2, budget_s=0.1,
                             verbose=False, progress=False)
    values = ceilings.values(rows)
    assert values["copy_gbps"] > 0 and values["matmul_tflops"] > 0
    kernel = [{"op": "k", "gbps": values["copy_gbps"] / 2, "tflops": values["matmul_tflops"]}]
    ceilings.add_fractions(kernel, values)
    assert kernel[0]["of_copy"] == pytest.approx(0.5)
    assert kernel[0]["of_matmul"] == pytest.approx(1.0)


def test_environment_and_nvml_without_a_gpu():
    env = environment(torch.device("cpu"))
    assert env["device"] == "cpu" and env["torch"] == torch.__version__
    assert "pyssm_git" in env and "date" in env
    import numpy
    assert env["numpy"] == numpy.__version__  # the versions a GPU run will be compared by
    assert env["timm"] is not None and env["transformers"] is not None
    from pyssm.bench.env import _version
    assert _version("surely-not-a-package-pyssm-knows") is None
    with NvmlSampler(torch.device("cpu")) as sampler:
        pass
    assert sampler.result() == {}


def test_missing_providers_are_rows_with_a_note(monkeypatch):
    from pyssm.bench import selective_scan

    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # import fails: not installed
    monkeypatch.setitem(sys.modules, "selective_scan_cuda_oflex", None)
    assert selective_scan._mamba_ssm_provider().status == "not installed"
    assert selective_scan._oflex_provider().status == "not installed"


def test_the_pytest_benchmark_microbenchmarks_run():
    """bench/test_kernels.py (pytest-benchmark) runs, each benchmark once, on the CPU."""
    import subprocess
    from pathlib import Path

    pytest.importorskip("pytest_benchmark")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(root / "bench" / "test_kernels.py"), "--benchmark-disable"],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert " passed" in done.stdout


def test_triton_providers_name_the_gpu_rows():
    """A Triton op's providers: on the CPU its kernel is a "GPU only" row (or "no triton") and
    pyssm's own two passes have none; on a CUDA device (no GPU needed to list them) the kernel,
    the two passes where given, torch, and torch.compile on full sweeps."""
    from pyssm.ops import _triton

    def ours(x):
        return x

    def torchs(x):
        return x + 0

    def two(x):
        return x * 1

    cpu = harness.triton_providers(ours, torchs, torch.device("cpu"), False, two_pass=two)
    assert [(p.name, p.fn) for p in cpu] == [("pyssm-triton", None), ("torch", torchs)]
    assert cpu[0].status == ("GPU only" if _triton.available() else "no triton")
    if not _triton.available():
        return
    gpu = harness.triton_providers(ours, torchs, torch.device("cuda"), False, two_pass=two)
    assert [p.name for p in gpu] == ["pyssm-triton", "pyssm-two-pass", "torch", "torch-compile"]
    assert [p.fn for p in gpu[:3]] == [ours, two, torchs]
    quick = harness.triton_providers(ours, torchs, torch.device("cuda"), True)
    assert [p.name for p in quick] == ["pyssm-triton", "torch"]
