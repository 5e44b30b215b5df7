"""pyssm's d_state-1 ss2d kernels (v3: the forward, and the backward's summary and main
passes) once, on the GPU, before the rest of the device check: they have run only in the CPU
emulation, and every later step (tests, benchmarks, encoders) takes them at VMamba's shapes.
bench/device_check.sh runs this under a short limit and, from its exit status, turns off what
failed for the later steps (PYSSM_SS2D_FWD=v2, PYSSM_SS2D_BWD=v1), so a fault or a wrong
result costs one short step, not the benchmark tables that follow in the same process.

    python bench/ss2d_smoke.py     # exit 0: ok or skipped (no GPU); 1: the forward failed;
                                   # 2: the backward failed; 3: both; anything else: a crash
    PYSSM_SS2D_SMOKE_DEVICE=cpu python bench/ss2d_smoke.py   # a dry run on the CPU kernels

Each is checked against the float64 CPU kernel on the same inputs: fp32 x (and bf16 x with an
fp32 output for the forward), relative to the largest reference value.
"""

from __future__ import annotations

import math
import os
import sys

import torch

from pyssm import ops

# (B, H, W, D, dt_rank): one chunk a scan at VMamba-T's width; a batch of one in chunks with
# two channel blocks and dt_rank 12 (the 16-wide register weights)
SHAPES = [(4, 23, 19, 96, 6), (1, 40, 33, 40, 12)]
FWD_TOL, BWD_TOL = 5e-4, 2e-4


def make(B, H, W, D, R, device, dtype):
    g = torch.Generator().manual_seed(B * 1000 + D)
    x = torch.randn(B, H, W, D, generator=g, dtype=torch.float64)
    ws = [torch.randn(4, R + 2, D, generator=g, dtype=torch.float64) / math.sqrt(D),
          torch.randn(4, D, R, generator=g, dtype=torch.float64) / math.sqrt(R),
          torch.randn(4, D, generator=g, dtype=torch.float64) * 0.5,
          torch.log(torch.rand(4 * D, 1, generator=g, dtype=torch.float64) * 2 + 0.1),
          torch.randn(4 * D, generator=g, dtype=torch.float64)]
    return x.to(device, dtype), [w.to(device, torch.float32) for w in ws]


def relative(got, want) -> float:
    return float((got.double().cpu() - want).abs().max() / want.abs().max().clamp_min(1e-12))


def forward_error(device) -> float:
    worst = 0.0
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            x, ws = make(*shape, device, dtype)
            got = ops.ss2d(x, *ws, out_float32=True, backend=device)
            want = ops.ss2d(x.double().cpu(), *(w.double().cpu() for w in ws), backend="cpu")
            worst = max(worst, relative(got, want))
    return worst


def backward_error(device) -> float:
    worst = 0.0
    for shape in SHAPES:
        x, ws = make(*shape, device, torch.float32)
        dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(device)

        def grads(dev, dtype, backend):
            ts = [t.detach().to(dev, dtype).requires_grad_() for t in (x, *ws)]
            out = ops.ss2d(*ts, backend=backend)
            return torch.autograd.grad(out, ts, dy.to(dev, dtype))

        for got, want in zip(grads(device, torch.float32, device),
                             grads("cpu", torch.float64, "cpu")):
            worst = max(worst, relative(got, want))
    return worst


def main() -> int:
    device = os.environ.get("PYSSM_SS2D_SMOKE_DEVICE", "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        print("ss2d smoke: skipped (no CUDA device)")
        return 0
    fwd = forward_error(device)
    if device == "cuda":
        torch.cuda.synchronize()
    bwd = backward_error(device)
    if device == "cuda":
        torch.cuda.synchronize()
    status = (1 if not fwd <= FWD_TOL else 0) | (2 if not bwd <= BWD_TOL else 0)
    words = {0: "ok", 1: "FORWARD WRONG", 2: "BACKWARD WRONG", 3: "FORWARD AND BACKWARD WRONG"}
    kernels = (f"; forward {os.environ.get('PYSSM_SS2D_FWD', 'v3')}, backward "
               f"{os.environ.get('PYSSM_SS2D_BWD', 'v3')}" if device == "cuda" else
               f"; {device} kernels")
    print(f"ss2d smoke: {words[status]} (forward {fwd:.1e} of {FWD_TOL:.0e}, "
          f"backward {bwd:.1e} of {BWD_TOL:.0e}{kernels})")
    return status


if __name__ == "__main__":
    sys.exit(main())
