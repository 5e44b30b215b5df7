"""Result files (atomic JSON + markdown) and `compare`'s ratios."""

import json

import pytest

from pyssm.bench.compare import compare, compare_files
from pyssm.bench.results import atomic_write, load_results, row_key, write_results


def _row(op, provider, ms, **size):
    return {"op": op, "provider": provider, "mode": "forward", **size, "dtype": "float32",
            "device": "cpu", "status": "ok", "ms": ms, "repeats": 3}


def test_write_results_round_trips(tmp_path):
    rows = [_row("ss2d", "pyssm-cpu", 1.5, res=32), _row("ss2d", "reference", None, res=32)]
    path = write_results("kernels", rows, {"device": "cpu"}, tmp_path, ["a note"],
                         extra={"fits": [1, 2]})
    result = load_results(path)
    assert result["rows"] == rows and result["fits"] == [1, 2]
    assert result["notes"] == ["a note"]
    assert "| ss2d | pyssm-cpu |" in (tmp_path / "kernels.md").read_text()
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_atomic_write_replaces_whole_files(tmp_path):
    path = tmp_path / "x.json"
    atomic_write(path, "old")
    atomic_write(path, b"new bytes")
    assert path.read_bytes() == b"new bytes"


def test_load_results_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot read"):
        load_results(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        load_results(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(ValueError, match="not a pyssm benchmark result"):
        load_results(tmp_path / "other.json")


def test_row_key_ignores_results_not_sizes():
    a = _row("ss2d", "pyssm-cpu", 1.0, res=64, batch=2)
    b = dict(_row("ss2d", "pyssm-cpu", 9.0, res=64, batch=2), gbps=3.0, repeats=10)
    assert row_key(a) == row_key(b)
    assert row_key(a) != row_key(_row("ss2d", "pyssm-cpu", 1.0, res=64, batch=4))


def test_compare_gives_the_ratio_of_matching_rows():
    a = {"rows": [_row("ss2d", "pyssm-cpu", 2.0, res=32), _row("ss2d", "pyssm-cpu", 8.0, res=64),
                  _row("attention", "sdpa", 3.0, N=65), _row("x", "y", None, n=1)]}
    b = {"rows": [_row("ss2d", "pyssm-cpu", 1.0, res=32), _row("ss2d", "pyssm-cpu", 16.0, res=64),
                  _row("cross_scan", "copy", 1.0, n=5), _row("x", "y", 4.0, n=1)]}
    result = compare(a, b)
    ratios = {(r["op"], r["size"]): r["ratio"] for r in result["rows"]}
    assert ratios[("ss2d", "res=32")] == pytest.approx(0.5)
    assert ratios[("ss2d", "res=64")] == pytest.approx(2.0)
    assert ratios[("x", "n=1")] is None  # A has no time: no ratio, not a crash
    assert result["geomean"] == pytest.approx(1.0)
    assert (result["only_a"], result["only_b"]) == (1, 1)


def test_compare_files_prints_a_table(tmp_path):
    pa = write_results("k", [_row("ss2d", "pyssm-cpu", 2.0, res=32)], {"device": "cpu"},
                       tmp_path / "a")
    pb = write_results("k", [_row("ss2d", "pyssm-cpu", 3.0, res=32)], {"device": "cpu"},
                       tmp_path / "b")
    text = compare_files(str(pa), str(pb))
    assert "1.500" in text and "1 rows matched" in text


def test_compare_files_names_what_differs_between_the_environments(tmp_path):
    env = {"device": "cuda", "gpu": "NVIDIA H200", "torch": "2.11.0+cu130", "triton": "3.6.0",
           "pyssm_git": "abc", "date": "2026-11-28"}
    row = [_row("ss2d", "pyssm-cuda", 2.0, res=32)]
    pa = write_results("k", row, env, tmp_path / "a")
    same = write_results("k", row, dict(env, pyssm_git="def", date="2026-12-06"), tmp_path / "b")
    assert "differ" not in compare_files(str(pa), str(same))  # the code and the date may differ
    other = write_results("k", row, dict(env, gpu="NVIDIA H100 80GB HBM3", triton="3.8.0"),
                          tmp_path / "c")
    text = compare_files(str(pa), str(other))
    assert "gpu: NVIDIA H200 -> NVIDIA H100 80GB HBM3" in text
    assert "triton: 3.6.0 -> 3.8.0" in text and "torch:" not in text
    older = write_results("k", row, {k: v for k, v in env.items() if k != "triton"},
                          tmp_path / "d")
    assert "triton: 3.6.0 -> None" in compare_files(str(pa), str(older))
