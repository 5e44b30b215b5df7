"""torch.use_deterministic_algorithms(True) and pyssm's kernels. The CUDA kernels that add
floats by atomics (ss2d's forward and backward, selective_scan's backward, the flash attention
backward) say so through torch's own alert, as torch's nondeterministic CUDA ops do: an error
under deterministic mode, a warning with warn_only. The CPU kernels and the references are
deterministic and run under it. (conftest turns deterministic mode on with warn_only for every
test, to poison uninitialised memory; these tests turn it fully on.)"""

import pytest
import torch

from pyssm import _extension, ops


def _scan_inputs(device, dtype):
    u, delta = (torch.randn(2, 6, 33, device=device, dtype=dtype) for _ in range(2))
    A = -torch.rand(6, 4, device=device) - 0.1
    B, C = (torch.randn(2, 3, 4, 33, device=device, dtype=dtype) for _ in range(2))
    return [t.requires_grad_() for t in (u, delta, A, B, C)]


def _ss2d_inputs(device, dtype):
    D, N, R = 16, 1, 2
    x = torch.randn(1, 5, 4, D, device=device, dtype=dtype)
    ws = (torch.randn(4, R + 2 * N, D, device=device) * 0.1,
          torch.randn(4, D, R, device=device) * 0.1, torch.randn(4, D, device=device),
          torch.zeros(4 * D, N, device=device), torch.ones(4 * D, device=device))
    return [t.requires_grad_() for t in (x, *ws)]


def _attention_inputs(device, dtype):
    return [torch.randn(1, 70, 2, 64, device=device, dtype=dtype).requires_grad_()
            for _ in range(3)]


RUNS = {  # op -> (inputs, call)
    "ss2d": (_ss2d_inputs, lambda t, backend: ops.ss2d(*t, backend=backend)),
    "selective_scan": (_scan_inputs, lambda t, backend: ops.selective_scan(
        *t, delta_softplus=True, backend=backend)),
    "attention": (_attention_inputs, lambda t, backend: ops.attention(*t, backend=backend)),
}


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)   # (conftest's fixture restores its own setting)
    yield


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("op", list(RUNS))
def test_cpu_and_reference_run_under_deterministic_mode(op, backend, deterministic):
    if backend == "cpu" and not _extension.available():
        pytest.skip("extension not built")
    make, call = RUNS[op]
    inputs = make("cpu", torch.float32)
    out = call(inputs, backend)
    torch.autograd.grad(out.sum(), inputs)


CUDA_CASES = [  # op, dtype, the forward's alert (None: no atomics there), the backward's
    ("ss2d", torch.float32, "pyssm::ss2d on CUDA", "pyssm::ss2d_backward on CUDA"),
    ("selective_scan", torch.float32, None, "pyssm::selective_scan_backward on CUDA"),
    ("attention", torch.bfloat16, None, "pyssm::attention_backward on CUDA"),
]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("op,dtype,forward_alert,backward_alert", CUDA_CASES,
                         ids=[c[0] for c in CUDA_CASES])
def test_cuda_kernels_with_atomics_alert(op, dtype, forward_alert, backward_alert,
                                         deterministic):
    if not _extension.has_kernel(op, "cuda"):
        pytest.skip(f"no CUDA kernel for {op}")
    make, call = RUNS[op]
    inputs = make("cuda", dtype)
    if forward_alert is not None:
        with pytest.raises(RuntimeError, match=forward_alert):
            call(inputs, "cuda")
        torch.use_deterministic_algorithms(False)
        out = call(inputs, "cuda")
        torch.use_deterministic_algorithms(True)
    else:
        out = call(inputs, "cuda")   # no atomics in this forward: it runs
    with pytest.raises(RuntimeError, match=backward_alert):
        torch.autograd.grad(out.float().sum(), inputs)
    torch.use_deterministic_algorithms(True, warn_only=True)   # a warning instead
    with pytest.warns(UserWarning, match="does not have a deterministic implementation"):
        torch.autograd.grad(call(inputs, "cuda").float().sum(), inputs)
