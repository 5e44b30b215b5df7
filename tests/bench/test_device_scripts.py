"""The scripts the device check runs on a GPU, run here on the CPU kernels (their CPU modes), so
that a broken script is found before it costs device time: bench/sanitize_cases.py,
bench/ncu_cases.py, bench/hopper_smoke.py, bench/decode_smoke.py, bench/ss2d_smoke.py,
bench/triton_smoke.py's exit status, and bench/device_check.sh's syntax."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    assert ("ncu cases: ss2d fwd + bwd (stages 1 and 3), attention fwd + bwd (dQ by TMA, by "
            "atomics), flash-decoding, selective_scan fwd + bwd: done") in done.stdout


def test_decode_smoke_skips_without_a_gpu():
    done = run([sys.executable, "bench/decode_smoke.py"], PYSSM_DECODE_SMOKE_DEVICE="cpu")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "decode smoke: skipped" in done.stdout


def test_decode_smoke_cases_are_decode_shaped():
    """Every smoke call is one the CUDA forward gives the flash-decoding kernel (seqlen_q x
    heads / heads_k <= 16) and, on the CPU, agrees with the reference."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import decode_smoke
    finally:
        sys.path.pop(0)
    from pyssm import ops
    for name, q, k, v, kw in decode_smoke.cases("cpu"):
        seqlen_q = q.shape[1] if q.dim() == 4 else kw["max_seqlen"]
        assert seqlen_q * q.shape[-2] // k.shape[-2] <= 16, name
        got = ops.attention(q.float(), k.float(), v.float(), backend="cpu", **kw)
        want = ops.attention(q.double(), k.double(), v.double(), backend="reference", **kw)
        assert (got.double() - want).abs().max() < 1e-4, name


def test_hopper_smoke_skips_without_an_sm90_gpu():
    done = run([sys.executable, "bench/hopper_smoke.py"], PYSSM_HOPPER_SMOKE_DEVICE="cpu")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "hopper smoke: skipped" in done.stdout


def test_ss2d_smoke_runs_on_the_cpu_kernels():
    done = run([sys.executable, "bench/ss2d_smoke.py"], PYSSM_SS2D_SMOKE_DEVICE="cpu")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "ss2d smoke: ok" in done.stdout


def _ss2d_smoke_on_the_cpu(monkeypatch):
    """bench/ss2d_smoke.py as a module, set to check the CPU kernels."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import ss2d_smoke
    finally:
        sys.path.pop(0)
    monkeypatch.setenv("PYSSM_SS2D_SMOKE_DEVICE", "cpu")
    return ss2d_smoke


@pytest.mark.parametrize("wrong,status", [(torch.float32, 1), (torch.bfloat16, 4)],
                         ids=["forward", "x_proj"])
def test_ss2d_smoke_reports_what_is_wrong(monkeypatch, wrong, status):
    """The exit status says which part failed: a forward off by 1% for fp32 x gives 1 (the
    scan), for bf16 x 4 (x_proj, forward and backward)."""
    ss2d_smoke = _ss2d_smoke_on_the_cpu(monkeypatch)
    real = ss2d_smoke.ops.ss2d

    def off(x, *args, **kwargs):
        out = real(x, *args, **kwargs)
        return out * 1.01 if kwargs.get("out_float32") and x.dtype == wrong else out

    monkeypatch.setattr(ss2d_smoke.ops, "ss2d", off)
    assert ss2d_smoke.main() == status


def test_ss2d_smoke_reports_the_states_path_apart(monkeypatch):
    """A backward wrong only where the forward's states are kept (training with
    PYSSM_SS2D_STATES on) gives 8, and nothing else."""
    ss2d_smoke = _ss2d_smoke_on_the_cpu(monkeypatch)
    real = ss2d_smoke.ops.ss2d

    def off(x, *args, **kwargs):
        out = real(x, *args, **kwargs)
        kept = os.environ.get("PYSSM_SS2D_STATES") == "1" and x.requires_grad
        return out * 1.01 if kept and x.dtype == torch.float32 else out

    monkeypatch.setattr(ss2d_smoke.ops, "ss2d", off)
    assert ss2d_smoke.main() == 8


@pytest.mark.parametrize("norm_conv,fc1,fc2,mlp,whole,norm_linear,status", [
    (1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 0), (0.5, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1),
    (1e-3, float("nan"), 1e-3, 1e-3, 1e-3, 1e-3, 2), (1e-3, None, 1e-3, 1e-3, 1e-3, 1e-3, 2),
    (1e-3, 1e-3, 0.5, 1e-3, 1e-3, 1e-3, 4), (1e-3, 1e-3, 1e-3, None, 1e-3, 1e-3, 8),
    (1e-3, 1e-3, 1e-3, 1e-3, 0.5, 1e-3, 16), (1e-3, 1e-3, 1e-3, 1e-3, 1e-3, None, 32),
    (None, None, None, None, None, None, 63)])
def test_triton_smoke_reports_what_is_wrong(monkeypatch, capsys, norm_conv, fc1, fc2, mlp,
                                            whole, norm_linear, status):
    """The exit status says which part failed (a part's worst error over the bound, NaN, or
    an exception: None here): 1 layer_norm / depthwise_conv2d, 2 linear_gelu, 4
    linear_residual_, 8 mlp_gelu, 16 mlp_residual_, 32 layer_norm_linear, summed; each part
    stubbed (the real ones take ~50 s in Triton's interpreter)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import triton_smoke
    finally:
        sys.path.pop(0)
    if not triton_smoke.layer_norm_triton.available():
        pytest.skip("no triton")

    def part(value):
        def stub(device):
            if value is None:
                raise RuntimeError("a stubbed compile error")
            return value
        return stub

    monkeypatch.setenv("PYSSM_TRITON_SMOKE_DEVICE", "cpu")
    monkeypatch.setattr(triton_smoke, "_norm_and_conv", part(norm_conv))
    monkeypatch.setattr(triton_smoke, "_linear_gelu", part(fc1))
    monkeypatch.setattr(triton_smoke, "_linear_residual", part(fc2))
    monkeypatch.setattr(triton_smoke, "_mlp_gelu", part(mlp))
    monkeypatch.setattr(triton_smoke, "_mlp_residual", part(whole))
    monkeypatch.setattr(triton_smoke, "_layer_norm_linear", part(norm_linear))
    assert triton_smoke.main() == status
    assert ("triton smoke: ok" in capsys.readouterr().out) == (status == 0)


@pytest.mark.parametrize("script", ["bench/device_check.sh", "bench/cuda_tests.sh"])
def test_device_shell_scripts_parse(script):
    done = run(["bash", "-n", script])
    assert done.returncode == 0, done.stderr


def test_memory_model_runs_and_puts_the_ops_back():
    """bench/memory_model.py on a tiny VMamba and ViT, in float32 and under emulated bf16
    autocast: a positive peak, smaller in bf16, and the ops it stands in for are the real ones
    again afterwards."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import memory_model
    finally:
        sys.path.pop(0)
    mm = memory_model

    def current():
        return (mm.vmamba_module.ss2d, mm.vit_module.attention_qkvpacked, mm.mlp_module.CHUNK_BYTES,
                mm.norms_module.layer_norm, mm.norms_module._out_dtype,
                mm.mlp_module.linear_gelu, mm.mlp_module.linear_residual_)

    real = current()
    small = dict(depths=(1, 1, 1, 1), dims=16)
    fp32 = mm.peak_mb_per_image("vmamba_tiny_s1l8", 64, 2, 16, **small)
    bf16 = mm.peak_mb_per_image("vmamba_tiny_s1l8", 64, 2, 16, bf16=True, **small)
    assert 0 < bf16 < fp32
    assert mm.peak_mb_per_image("vit_small_patch16", 64, 2, depth=1) > 0
    assert mm.peak_mb_per_image("vit_small_patch16", 64, 2, bf16=True, depth=1) > 0
    assert current() == real

@pytest.mark.parametrize("setting", ["", "v1"])
def test_ss2d_table_keeps_v3_backward_rows_off_when_the_smoke_turned_it_off(setting, monkeypatch):
    """With PYSSM_SS2D_BWD=v1 (device_check.sh's answer to a failed ss2d smoke) the ss2d
    table's rows that would set their own PYSSM_SS2D_BWD and run v3's kernels anyway
    (v1-summary, v3-wide) do not run, nor does the no-states row (v1 keeps none: the same as
    the default row); without it they do, and v1's row runs either way."""
    from pyssm.bench import ss2d
    monkeypatch.setenv("PYSSM_SS2D_BWD", setting)
    for case in ss2d.cases(torch.device("cuda"), quick=True):
        runs = {p.name: p.fn is not None for p in case.providers}
        assert runs["pyssm-cuda-bwd-v1"]
        assert "pyssm-cuda-no-states" in runs
        for name in ("pyssm-cuda-bwd-v1-summary", "pyssm-cuda-bwd-v3-wide",
                     "pyssm-cuda-no-states"):
            if name in runs:
                assert runs[name] == (setting != "v1"), name
