"""pyssm/ops/_triton.py: what the Triton ops share (here: when Triton's interpreter can run)."""

import pytest
import torch

from pyssm.ops import _triton, layer_norm


@pytest.mark.parametrize("triton_version,numpy_version,refused", [
    ("3.6.0", "2.4.0", True), ("3.6.1+gitabc", "2.4.6", True), ("3.5.1", "2.10.0", True),
    ("3.6.0", "2.3.5", False), ("3.6.0", "1.26.4", False), ("3.7.0", "2.4.6", False),
    ("3.8.0", "2.4.6", False), ("4.0.0", "3.0.0", False)])
def test_interpreter_problem_names_the_versions(triton_version, numpy_version, refused):
    problem = _triton.interpreter_problem(triton_version, numpy_version)
    if refused:
        assert triton_version in problem and numpy_version in problem
        assert "numpy<2.4" in problem
    else:
        assert problem is None


def test_cpu_triton_call_refused_clearly_where_the_interpreter_cannot_run(monkeypatch):
    if not (_triton.available() and _triton.interpreting()):
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    monkeypatch.setattr(_triton, "_installed_interpreter_problem",
                        lambda: "Triton 3.6.0's interpreter cannot run with NumPy 2.4.0")
    with pytest.raises(RuntimeError, match=r"pyssm\.ops\.layer_norm: .*NumPy 2\.4\.0"):
        layer_norm(torch.randn(3, 8), backend="triton")


def test_the_installed_versions_can_interpret():
    """Where the suite interprets its Triton kernels, the versions installed must allow it (a
    failure here explains hundreds of interpreter errors elsewhere)."""
    if not (_triton.available() and _triton.interpreting()):
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    assert _triton._installed_interpreter_problem() is None
