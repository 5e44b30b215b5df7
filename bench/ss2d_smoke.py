"""pyssm's d_state-1 ss2d kernels (v3: the forward, and the backward's summary and main
passes) and its x_proj kernel for 16-bit x (both ways) once, on the GPU, before the rest of the
device check: they have run only in the CPU emulation, and every later step (tests, benchmarks,
encoders) takes them at VMamba's shapes. bench/device_check.sh runs this under a short limit
and, from its exit status, turns off what failed for the later steps (PYSSM_SS2D_FWD=v2,
PYSSM_SS2D_BWD=v1, PYSSM_SS2D_XPROJ=gemm, PYSSM_SS2D_STATES=0), so a fault or a wrong result
costs one short step, not the benchmark tables that follow in the same process.

    python bench/ss2d_smoke.py     # exit 0: ok or skipped (no GPU); else the sum of 1: the
                                   # forward failed, 2: the backward failed, 4: x_proj (bf16 x,
                                   # either way) failed, 8: the backward from the forward's
                                   # states (training) failed; anything over 15: a crash
    PYSSM_SS2D_SMOKE_DEVICE=cpu python bench/ss2d_smoke.py   # a dry run on the CPU kernels

Each is checked against the float64 CPU kernel on the same inputs, relative to the largest
reference value: the scans with fp32 x, x_proj with bf16 x and an fp32 output (its gradient
dx comes back in bf16, hence the looser backward bound).
"""

from __future__ import annotations

import math
import os
import sys

import torch

from pyssm import ops
from pyssm.bench.harness import env_overrides

# (B, H, W, D, dt_rank): one chunk a scan at VMamba-T's width; a batch of one in chunks with
# two channel blocks and dt_rank 12 (the 16-wide register weights); dt_rank 24 (VMamba-T
# stage 3's: the backward's dt_projs_weight in shared memory, dpre out, the GEMMs)
SHAPES = [(4, 23, 19, 96, 6), (1, 40, 33, 40, 12), (4, 14, 14, 64, 24)]
# a batch whose blocks fill up to 132 SMs at 2 an SM (68 x 4 x 2): the forward keeps its tile
# states and the backward's main kernel runs alone from them (PYSSM_SS2D_STATES)
STATES_SHAPES = [(68, 9, 13, 40, 6)]
FWD_TOL, BWD_TOL, XPROJ_BWD_TOL = 5e-4, 2e-4, 1e-2


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


def forward_error(device, dtype) -> float:
    worst = 0.0
    for shape in SHAPES:
        x, ws = make(*shape, device, dtype)
        got = ops.ss2d(x, *ws, out_float32=True, backend=device)
        want = ops.ss2d(x.double().cpu(), *(w.double().cpu() for w in ws), backend="cpu")
        worst = max(worst, relative(got, want))
    return worst


def backward_error(device, dtype, shapes=SHAPES, states=False) -> float:
    """fp32: the scans' backward; bf16 x (fp32 weights, an fp32 output and gradient): x_proj's
    recomputation, its adjoint and dW_x's GEMM besides. ``states``: the training path that
    keeps the forward's tile states (else PYSSM_SS2D_STATES=0: the summary pass)."""
    with env_overrides({"PYSSM_SS2D_STATES": "1" if states else "0"}):
        return _backward_error(device, dtype, shapes)


def _backward_error(device, dtype, shapes) -> float:
    worst = 0.0
    for shape in shapes:
        x, ws = make(*shape, device, dtype)
        dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(device)
        low = dtype != torch.float32

        def grads(dev, exact):
            ts = [t.detach().to(dev, torch.float64 if exact else t.dtype).requires_grad_()
                  for t in (x, *ws)]
            out = ops.ss2d(*ts, out_float32=low and not exact, backend="cpu" if exact else dev)
            return torch.autograd.grad(out, ts, dy.to(dev, out.dtype))

        for got, want in zip(grads(device, False), grads("cpu", True)):
            worst = max(worst, relative(got, want))
    return worst


def main() -> int:
    device = os.environ.get("PYSSM_SS2D_SMOKE_DEVICE", "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        print("ss2d smoke: skipped (no CUDA device)")
        return 0

    def sync(value):
        if device == "cuda":
            torch.cuda.synchronize()
        return value

    fwd = sync(forward_error(device, torch.float32))
    bwd = sync(backward_error(device, torch.float32))
    xfwd = sync(forward_error(device, torch.bfloat16))
    xbwd = sync(backward_error(device, torch.bfloat16))
    # (not when the backward's v3 or the states are off already: nothing to check)
    kept = (os.environ.get("PYSSM_SS2D_BWD") != "v1"
            and os.environ.get("PYSSM_SS2D_STATES") != "0")
    sbwd = sync(backward_error(device, torch.float32, STATES_SHAPES, True)) if kept else 0.0
    status = ((1 if not fwd <= FWD_TOL else 0) | (2 if not bwd <= BWD_TOL else 0)
              | (4 if not (xfwd <= FWD_TOL and xbwd <= XPROJ_BWD_TOL) else 0)
              | (8 if not sbwd <= BWD_TOL else 0))
    words = ", ".join(w for bit, w in ((1, "FORWARD WRONG"), (2, "BACKWARD WRONG"),
                                       (4, "X_PROJ WRONG"), (8, "STATES WRONG"))
                      if status & bit) or "ok"
    kernels = (f"; forward {os.environ.get('PYSSM_SS2D_FWD', 'v3')}, backward "
               f"{os.environ.get('PYSSM_SS2D_BWD', 'v3')}, x_proj "
               f"{os.environ.get('PYSSM_SS2D_XPROJ', 'kernel')}" if device == "cuda" else
               f"; {device} kernels")
    print(f"ss2d smoke: {words} (forward {fwd:.1e} of {FWD_TOL:.0e}, backward {bwd:.1e} of "
          f"{BWD_TOL:.0e}; bf16 x: forward {xfwd:.1e} of {FWD_TOL:.0e}, backward {xbwd:.1e} of "
          f"{XPROJ_BWD_TOL:.0e}; from the forward's states {sbwd:.1e} of {BWD_TOL:.0e}"
          f"{kernels})")
    return status


if __name__ == "__main__":
    sys.exit(main())
