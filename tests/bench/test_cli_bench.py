"""Each `pyssm bench` subcommand with --quick on the CPU writes valid JSON and plots;
`pyssm profile encoder` writes its table and trace. Small subsets keep these short."""

import json
import sys

import pytest

from pyssm.cli import main

FAST = ["--quick", "--device", "cpu", "--repeats", "1", "--warmup", "1", "--budget-s", "0.01",
        "--no-progress"]
ENCODERS = "vmamba_tiny_s1l8,vit_tiny_patch16"


def _json(path):
    result = json.loads(path.read_text())
    assert result["env"]["device"] == "cpu" and result["env"]["torch"]
    return result


def _png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


def test_bench_kernels(tmp_path, capsys):
    assert main(["bench", "kernels", *FAST, "--ops", "cross_scan,attention",
                 "--out", str(tmp_path)]) == 0
    rows = _json(tmp_path / "kernels.json")["rows"]
    ops = {r["op"] for r in rows}
    assert ops == {"ceiling", "cross_scan", "cross_merge", "attention", "attention_qkv",
                   "attention_decode", "attention_window", "attention_softcap",
                   "attention_prefix", "attention_vision_windows", "attention_hd256"}
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in rows)
    def runs(op):   # the (provider, mode) pairs of op's rows
        return {(r["provider"], r["mode"]) for r in rows if r["op"] == op}

    def both_modes(*providers):
        return {(p, m) for p in providers for m in ("forward", "full")}

    assert runs("attention_qkv") == both_modes("pyssm-cpu", "pyssm-unbound", "pyssm-copied",
                                               "sdpa-default (timm)")
    assert {r["provider"] for r in rows if r["op"] == "attention_decode"} == {
        "pyssm-cpu", "pyssm-gathered", "sdpa-default (masked)"}
    assert runs("attention_window") == both_modes("pyssm-cpu", "pyssm-cpu-causal",
                                                  "sdpa-default (masked)")
    assert runs("attention_softcap") == both_modes("pyssm-cpu", "pyssm-cpu-uncapped",
                                                   "eager (capped)")
    assert runs("attention_vision_windows") == both_modes(
        "pyssm-cpu", "pyssm-cpu-per-window", "sdpa-default (per window)")
    assert runs("attention_prefix") == both_modes("pyssm-cpu", "pyssm-cpu-causal",
                                                  "sdpa-default (masked)")
    assert runs("attention_hd256") == both_modes("pyssm-cpu", "pyssm-cpu-one-piece",
                                                 "sdpa-default (masked)")
    assert any("of_copy" in r for r in rows if r["op"] == "cross_scan")
    assert any("of_matmul" in r for r in rows if r["op"] == "attention")
    assert "| attention |" in capsys.readouterr().out


def test_bench_kernels_rejects_an_unknown_op(tmp_path):
    with pytest.raises(SystemExit, match="--ops: unknown"):
        main(["bench", "kernels", *FAST, "--ops", "nope", "--out", str(tmp_path)])


def test_bench_encoders_notes_missing_providers(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)     # not installed: a row, not a crash
    monkeypatch.setitem(sys.modules, "vmamba", None)
    assert main(["bench", "encoders", *FAST, "--encoders", ENCODERS,
                 "--out", str(tmp_path)]) == 0
    result = _json(tmp_path / "encoders.json")
    rows = result["rows"]
    by = {(r["op"], r["provider"], r["mode"], r["res"]) for r in rows}
    assert ("vmamba_tiny_s1l8", "pyssm", "forward", 96) in by
    assert {r["status"] for r in rows if r["provider"] in ("timm", "official")} == {
        "not installed", "not installed (official VMamba's vmamba.py is not importable)"}
    ours = [r for r in rows if r["provider"] == "pyssm"]
    assert all(r["img_s"] > 0 and r["tokens"] > 0 for r in ours)
    assert {f["encoder"] for f in result["fits"]} == {"vmamba_tiny_s1l8", "vit_tiny_patch16"}
    assert result["crossovers"][0]["how"] in ("measured", "always", "extrapolated", "never")
    for name in ("throughput_vs_resolution", "memory_vs_resolution", "cost_vs_tokens"):
        _png(tmp_path / f"{name}.png")


def test_bench_encoders_times_timm_with_pyssm_blocks(tmp_path):
    """With timm installed, the ViT rows include timm's model with its blocks swapped for
    pyssm's (at the first resolution under --quick), measured as the others are."""
    pytest.importorskip("timm")
    assert main(["bench", "encoders", *FAST, "--encoders", "vit_tiny_patch16",
                 "--out", str(tmp_path)]) == 0
    rows = _json(tmp_path / "encoders.json")["rows"]
    swapped = [r for r in rows if r["provider"] == "timm-pyssm-blocks"]
    assert {r["mode"] for r in swapped} == {"forward", "step"}
    assert all(r["status"] == "ok" and r["img_s"] > 0 for r in swapped)
    assert {r["res"] for r in swapped} == {min(r["res"] for r in rows)}


def test_bench_vlm(tmp_path):
    assert main(["bench", "vlm", *FAST, "--encoders", "vit_tiny_patch16",
                 "--new-tokens", "3", "--out", str(tmp_path)]) == 0
    (row,) = _json(tmp_path / "vlm.json")["rows"]
    assert row["status"] == "ok", row["status"]
    assert row["ttft_ms"] > 0 and row["encode_ms"] > 0 and row["prefill_ms"] > 0
    assert row["decode_tok_s"] > 0 and row["prompt_tokens"] > row["tokens"]
    _png(tmp_path / "vlm_latency.png")


def test_bench_all_with_a_study(tmp_path):
    study = tmp_path / "study"
    study.mkdir()
    (study / "results.json").write_text(json.dumps({
        "budget_config": {"img_size": 64},
        "summary": [{"encoder": "vit_tiny_patch16", "objective": "classification",
                     "encoder_img_s": 50.0, "test/overall": [0.4, 0.05]},
                    {"encoder": "resnet_x", "objective": "dense", "encoder_img_s": 20.0,
                     "test/overall": [0.3, float("nan")]}]}))
    out = tmp_path / "out"
    assert main(["bench", "all", *FAST, "--encoders", "vit_tiny_patch16",
                 "--new-tokens", "2", "--study", str(study), "--out", str(out)]) == 0
    for name in ("kernels", "encoders", "vlm"):
        _json(out / f"{name}.json")
    report = (out / "report.md").read_text()
    assert "## Kernels" in report and "## Encoders" in report and "## VLM" in report
    assert "vit_tiny_patch16 / classification (this run, 64 px)" in report
    assert "resnet_x / dense (the study's own timing)" in report
    _png(out / "accuracy_vs_throughput.png")


def test_compare_command(tmp_path, capsys):
    from pyssm.bench.results import write_results

    row = {"op": "ss2d", "provider": "pyssm-cpu", "mode": "forward", "res": 32, "status": "ok"}
    a = write_results("k", [dict(row, ms=4.0)], {"device": "cpu"}, tmp_path / "a")
    b = write_results("k", [dict(row, ms=1.0)], {"device": "cpu"}, tmp_path / "b")
    assert main(["bench", "compare", str(a), str(b)]) == 0
    assert "0.250" in capsys.readouterr().out
    assert main(["bench", "compare", str(a), str(tmp_path / "none.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_profile_encoder(tmp_path, capsys):
    assert main(["profile", "encoder", "vit_tiny_patch16", "--img-size", "32", "--batch", "1",
                 "--steps", "1", "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ncu --clock-control none" in out and "self CPU time" in out
    table = (tmp_path / "profile-vit_tiny_patch16-32px.md").read_text()
    assert "| kernel / op |" in table
    trace = json.loads((tmp_path / "trace-vit_tiny_patch16-32px.json").read_text())
    assert trace["traceEvents"]


def test_python_m_pyssm_bench_help():
    import subprocess

    done = subprocess.run([sys.executable, "-m", "pyssm.bench", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "kernels" in done.stdout and "compare" in done.stdout


def test_bench_encoders_times_timms_rotary_vits_with_pyssm_attention(tmp_path):
    """timm's rotary ViTs (EVA-02 here) as timm builds them and with swap_attention, measured
    as the others are; bench all, whose VLM benchmark builds pyssm's encoders, refuses them."""
    pytest.importorskip("timm")
    assert main(["bench", "encoders", *FAST, "--encoders", "eva02_base_patch14_224",
                 "--out", str(tmp_path)]) == 0
    rows = _json(tmp_path / "encoders.json")["rows"]
    assert {(r["provider"], r["mode"]) for r in rows} == {
        (p, m) for p in ("timm", "timm-pyssm-attention") for m in ("forward", "step")}
    assert all(r["status"] == "ok" and r["img_s"] > 0 for r in rows)
    assert {r["tokens"] for r in rows} == {(64 // 14) ** 2}   # (CPU: the first resolution)
    with pytest.raises(SystemExit, match="unknown"):
        main(["bench", "all", *FAST, "--encoders", "eva02_base_patch14_224",
              "--out", str(tmp_path)])
