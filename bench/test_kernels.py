"""The kernel microbenchmarks through pytest-benchmark (the `benchmark` fixture):

    python -m pytest bench/test_kernels.py --benchmark-only [--benchmark-json out.json]
    python -m pytest bench/test_kernels.py --device cuda --benchmark-compare

One test per op and backend on the smallest size of each op's sweep in pyssm.bench (the same
inputs `pyssm bench kernels` times). On a GPU each call synchronises, so the wall time pytest-
benchmark measures is the kernel's; for CUDA-event timing and the full sweeps use
`pyssm bench kernels`. Backends without a kernel are skipped with the reason.
"""

import pytest
import torch

from pyssm import _extension
from pyssm.bench import (attention, cross_scan, depthwise_conv2d, layer_norm,
                         layer_norm_linear, linear_gelu, linear_residual, mlp_gelu, mlp_residual,
                         norm_mlp_residual, selective_scan, ss2d, ss2d_module)

MODULES = {"ss2d": ss2d, "ss2d_module": ss2d_module, "selective_scan": selective_scan,
           "cross_scan": cross_scan, "attention": attention, "layer_norm": layer_norm,
           "depthwise_conv2d": depthwise_conv2d, "linear_gelu": linear_gelu,
           "linear_residual": linear_residual, "mlp_gelu": mlp_gelu,
           "mlp_residual": mlp_residual, "norm_mlp_residual": norm_mlp_residual,
           "layer_norm_linear": layer_norm_linear}


def _device(request) -> torch.device:
    name = request.config.getoption("--device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda: torch sees no CUDA device")
    return torch.device(name)


@pytest.mark.parametrize("op", list(MODULES))
@pytest.mark.parametrize("mode", ["forward", "full"])
def test_kernel(benchmark, request, op, mode):
    device = _device(request)
    case = MODULES[op].cases(device, quick=True)[0]
    provider = next(p for p in case.providers if p.name.startswith("pyssm"))
    if provider.fn is None:
        pytest.skip(f"{op} on {device.type}: {provider.status}")
    if mode not in case.modes:
        pytest.skip(f"{op} is timed in {case.modes} only")
    inputs = case.make_inputs()
    if mode == "full":
        inputs = tuple(t.requires_grad_() if isinstance(t, torch.Tensor)
                       and t.is_floating_point() else t for t in inputs)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        if mode == "forward":
            with torch.no_grad():
                out = provider.fn(*inputs)
        else:
            out = provider.fn(*inputs)
            out.backward(torch.ones_like(out))
        sync()
        return out

    benchmark.extra_info.update(op=op, mode=mode, device=device.type, **case.size,
                                kernel=_extension.has_kernel(op, device.type))
    out = benchmark(step)
    assert torch.isfinite(out).all()
