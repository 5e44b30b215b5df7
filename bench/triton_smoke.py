"""pyssm's Triton kernels (layer_norm, depthwise_conv2d) once, on the GPU, before the rest of
the device check: they have run only in Triton's interpreter, and the encoder benchmarks take
them through the models' norms and VMamba's convolutions. bench/device_check.sh runs this under a short limit and turns them off
(PYSSM_TRITON=0: the models' norms use torch's) for the later steps when it does not print
"ok", so a Triton compile error or fault costs one short step, not the encoder benchmarks.

    python bench/triton_smoke.py       # exit 0: ok or skipped (no GPU, no triton), 1: failed
    PYSSM_TRITON_SMOKE_DEVICE=cpu TRITON_INTERPRET=1 python bench/triton_smoke.py  # a dry run
"""

from __future__ import annotations

import os
import sys

import torch

from pyssm.ops import layer_norm_triton
from pyssm.ops.depthwise_conv2d import depthwise_conv2d, depthwise_conv2d_reference
from pyssm.ops.layer_norm import layer_norm, layer_norm_reference


def _relative(pairs) -> float:
    return max(((a.double() - e).abs().max() / e.abs().max().clamp_min(1e-6)).item()
               for a, e in pairs)


def main() -> int:
    device = os.environ.get("PYSSM_TRITON_SMOKE_DEVICE", "cuda")
    if (device == "cuda" and not torch.cuda.is_available()) or not layer_norm_triton.available():
        print("triton smoke: skipped (no CUDA device or no triton)")
        return 0
    torch.manual_seed(0)
    worst = 0.0
    for rows, width in ((4099, 96), (257, 768), (33, 1000)):
        x = torch.randn(rows, width, device=device, dtype=torch.bfloat16, requires_grad=True)
        r = torch.randn(rows, width, device=device, requires_grad=True)
        w = (1 + 0.1 * torch.randn(width, device=device)).requires_grad_()
        b = (0.1 * torch.randn(width, device=device)).requires_grad_()
        kw = dict(residual=r, out_dtype=torch.bfloat16, return_residual=True)
        y, s = layer_norm(x, w, b, 1e-6, backend="triton", **kw)
        y64, s64 = layer_norm_reference(*(t.double() for t in (x, w, b)), 1e-6, residual=r.double(),
                                        return_residual=True)
        gy, gs = torch.randn_like(y64), torch.randn_like(s64)
        got = torch.autograd.grad((y.double() * gy).sum() + (s.double() * gs).sum(), (x, r, w, b))
        want = torch.autograd.grad((y64 * gy).sum() + (s64 * gs).sum(), (x, r, w, b))
        if device == "cuda":
            torch.cuda.synchronize()
        err = _relative([(y, y64), (s, s64), *zip(got, want)])
        worst = max(worst, err)
        print(f"layer_norm ({rows}, {width}): max relative error {err:.2e}", flush=True)
    for shape in ((2, 17, 13, 96), (1, 9, 30, 192)):
        x = torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(shape[-1], 1, 3, 3, device=device) / 3).requires_grad_()
        b = (0.1 * torch.randn(shape[-1], device=device)).requires_grad_()
        y = depthwise_conv2d(x, w, b, activation="silu", backend="triton")
        y64 = depthwise_conv2d_reference(x.double(), w.double(), b.double(), activation="silu")
        gy = torch.randn_like(y64)
        got = torch.autograd.grad((y.double() * gy).sum(), (x, w, b))
        want = torch.autograd.grad((y64 * gy).sum(), (x, w, b))
        if device == "cuda":
            torch.cuda.synchronize()
        err = _relative([(y, y64), *zip(got, want)])
        worst = max(worst, err)
        print(f"depthwise_conv2d {shape}: max relative error {err:.2e}", flush=True)
    ok = worst < 2e-2  # bf16 output and x gradient: ~3 significant digits
    print(f"triton smoke: {'ok' if ok else 'FAILED'} (worst {worst:.2e}, bound 2e-2)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
