"""The compiled extension loads, and pyssm still imports and works when it does not."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import pyssm
from pyssm import _extension
from pyssm.ops import _backend


def test_extension_loaded():
    """CI builds pyssm._C; a test run without it would silently test only the references."""
    if os.environ.get("PYSSM_ALLOW_NO_EXTENSION") == "1":
        pytest.skip("PYSSM_ALLOW_NO_EXTENSION=1")
    assert _extension.available(), _extension.load_error()
    for op in ("cross_scan", "cross_merge", "selective_scan", "ss2d", "attention"):
        assert _extension.has_kernel(op, "cpu"), op
        assert _extension.has_kernel(f"{op}_backward" if op not in ("cross_scan", "cross_merge")
                                     else op, "cpu")


def test_import_without_extension_falls_back_and_explains():
    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["pyssm._C"] = None  # what a missing or unloadable library looks like
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import pyssm, torch
        assert any("pip install --no-build-isolation" in str(w.message) for w in caught), caught
        x = torch.randn(1, 2, 3, 4)
        assert pyssm.cross_scan(x).shape == (1, 4, 2, 12)
        assert pyssm.extension_status()["loaded"] is False
        try:
            pyssm.cross_scan(x, backend="cpu")
        except RuntimeError as e:
            assert "did not load" in str(e) and "pip install" in str(e), e
        else:
            raise AssertionError("forced cpu backend without the extension did not raise")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "PYSSM_BACKEND": ""})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_schema_list_matches_the_registrations():
    """_extension.SCHEMA (what a current pyssm._C must define) names every op of
    csrc/registration.cpp, so that a library built from an older csrc/ is caught."""
    source = (Path(__file__).resolve().parents[1] / "csrc" / "registration.cpp").read_text()
    defined = re.findall(r'm\.def\(\s*"(\w+)\(', source)
    assert defined and sorted(defined) == sorted(_extension.SCHEMA)


def test_stale_extension_falls_back_and_explains():
    """A pyssm._C without one of SCHEMA's ops (built before the op was added) is not used: the
    warning names the missing op and the rebuild, and the references run."""
    script = textwrap.dedent("""
        import warnings
        from pyssm import _extension
        _extension._loaded, _extension._error = False, None
        _extension.SCHEMA = _extension.SCHEMA + ("an_op_from_the_future",)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _extension._load()
        assert not _extension.available()
        assert "an_op_from_the_future" in _extension.load_error()
        assert any("pip install --no-build-isolation" in str(w.message) for w in caught)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_backend_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("PYSSM_BACKEND", raising=False)
    assert _backend.resolve("ss2d", cpu, None) == ("cpu" if _extension.available() else "reference")
    assert _backend.resolve("ss2d", cpu, "reference") == "reference"
    monkeypatch.setenv("PYSSM_BACKEND", "reference")
    assert _backend.resolve("ss2d", cpu, None) == "reference"
    assert _backend.resolve("ss2d", cpu, "cpu" if _extension.available() else "reference") in (
        "cpu", "reference")
    monkeypatch.setenv("PYSSM_BACKEND", "triton")
    with pytest.raises(ValueError, match="PYSSM_BACKEND must be one of"):
        _backend.resolve("ss2d", cpu, None)
    with pytest.raises(ValueError, match="backend must be one of"):
        pyssm.ss2d(torch.randn(1, 2, 2, 1), torch.randn(4, 3, 1), torch.randn(4, 1, 1),
                   torch.randn(4, 1), torch.randn(4, 1), torch.randn(4), backend="fast")
    with pytest.raises(ValueError, match="backend='cuda' cannot run pyssm.ops.cross_scan on "
                                         "tensors on cpu"):
        pyssm.cross_scan(torch.randn(1, 2, 3, 4), backend="cuda")


def test_env_backend_is_used(monkeypatch):
    """PYSSM_BACKEND=reference really runs the reference (it has no C++ input checks)."""
    monkeypatch.setenv("PYSSM_BACKEND", "reference")
    calls = []
    module = sys.modules["pyssm.ops.cross_scan"]  # the attribute pyssm.ops.cross_scan is the op
    monkeypatch.setattr(module, "cross_scan_reference", lambda x: calls.append(x) or x)
    pyssm.ops.cross_scan(torch.randn(1, 2, 3, 4))
    assert len(calls) == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_auto_falls_back_with_a_warning_when_no_kernel():
    missing = [op for op in ("selective_scan", "ss2d", "attention")
               if not _extension.has_kernel(op, "cuda")]
    if not missing:
        pytest.skip("every op has a CUDA kernel")
    op = missing[0]
    assert _backend.resolve(op, torch.device("cuda"), "reference") == "reference"
    with pytest.raises(RuntimeError, match="no CUDA kernel"):
        _backend.resolve(op, torch.device("cuda"), "cuda")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_mismatched_devices_are_named(backend):
    """Tensors on two devices (meta stands in for a GPU here) raise and name both."""
    meta = torch.device("meta")
    u = torch.randn(1, 2, 5)
    with pytest.raises(RuntimeError, match="delta is on meta but u is on cpu"):
        pyssm.selective_scan(u, u.to(meta), torch.randn(2, 1), torch.randn(1, 1, 1, 5),
                             torch.randn(1, 1, 1, 5), backend=backend)
    x = torch.randn(1, 3, 3, 2)
    with pytest.raises(RuntimeError, match="A_logs is on meta but x is on cpu"):
        pyssm.ss2d(x, torch.randn(4, 3, 2), torch.randn(4, 2, 1), torch.randn(4, 2),
                   torch.randn(8, 1, device=meta), torch.randn(8), backend=backend)
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="v is on meta but q is on cpu"):
        pyssm.attention(q, q, q.to(meta), backend=backend)


def test_unverified_cuda_kernels_are_not_chosen_automatically(monkeypatch):
    """A CUDA kernel that has not passed the tests on a GPU runs only when asked for."""
    monkeypatch.setattr(_extension, "available", lambda: True)
    monkeypatch.setattr(_extension, "has_kernel", lambda op, dev: True)
    monkeypatch.delenv("PYSSM_BACKEND", raising=False)
    monkeypatch.delenv("PYSSM_UNVERIFIED_CUDA", raising=False)
    monkeypatch.setattr(_backend, "_warned", set())
    cuda = torch.device("cuda")  # a device object only: nothing runs
    op = sorted(_extension.UNVERIFIED_CUDA)[0]
    with pytest.warns(RuntimeWarning, match="has not yet passed"):
        assert _backend.resolve(op, cuda, None) == "reference"
    assert _backend.resolve(op, cuda, "cuda") == "cuda"
    monkeypatch.setenv("PYSSM_UNVERIFIED_CUDA", "1")
    assert _backend.resolve(op, cuda, None) == "cuda"
    other = "verified_op"  # not in the set: its (here pretended) kernel is chosen as usual
    assert other not in _extension.UNVERIFIED_CUDA
    monkeypatch.delenv("PYSSM_UNVERIFIED_CUDA")
    assert _backend.resolve(other, cuda, None) == "cuda"
