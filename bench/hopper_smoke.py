"""The Hopper attention kernels (sm_90) once, alone, before the rest of the device check: the
forward and backward at head_dim 64, 80 and 128, small, against the reference (at 64 also on
one fused qkv: q, k, v read at a token stride, dq, dk, dv written into one gradient). A hang or
fault of a kernel that has never run must cost one short step, not every later one (the tests,
sanitizers and benchmarks all take the Hopper path by default on an sm_90 GPU), so
bench/device_check.sh runs this under a short limit and turns the path off
(PYSSM_FLASH_SM90=0) for the later steps when it does not print "ok" (after one more try
with the backward's dQ added by atomics, PYSSM_FLASH_SM90_DQ=atomic, which keeps the path
when only the TMA reduce-adds fail).

    python bench/hopper_smoke.py       # exit 0: ok or skipped (not an sm_90 GPU), 1: failed
"""

from __future__ import annotations

import os
import sys

import torch

from pyssm import ops


def main() -> int:
    device = os.environ.get("PYSSM_HOPPER_SMOKE_DEVICE", "cuda")
    if device != "cuda" or not torch.cuda.is_available():
        print("hopper smoke: skipped (no CUDA device)")
        return 0
    if torch.cuda.get_device_capability() != (9, 0):
        print(f"hopper smoke: skipped (sm_{''.join(map(str, torch.cuda.get_device_capability()))}"
              ", not sm_90)")
        return 0
    os.environ["PYSSM_FLASH_SM90"] = "1"
    torch.manual_seed(0)
    worst = 0.0
    for head_dim, causal, packed in ((64, False, False), (64, True, False), (80, True, False),
                                     (128, False, False), (64, False, True)):
        qkv = torch.randn(2, 197, 3, 4, head_dim, device="cuda", dtype=torch.bfloat16,
                          requires_grad=True)
        if packed:
            out = ops.attention_qkvpacked(qkv, causal=causal, backend="cuda")
        else:
            out = ops.attention(*(t.contiguous() for t in qkv.unbind(2)), causal=causal,
                                backend="cuda")
        exact_in = qkv.detach().double().requires_grad_()
        want = ops.attention(*exact_in.unbind(2), causal=causal, backend="reference")
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, qkv, g)[0].unbind(2)
        exact = torch.autograd.grad(want, exact_in, g.double())[0].unbind(2)
        pairs = [(out, want), *zip(got, exact)]
        torch.cuda.synchronize()
        # error relative to each tensor's largest exact value (bf16 keeps ~3 digits)
        err = max(((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
                  for a, b in pairs)
        worst = max(worst, err)
        print(f"head_dim {head_dim} causal {causal}{' qkvpacked' if packed else ''}: max "
              f"relative error {err:.3g}", flush=True)
        if not err < 0.05:  # (NaN fails too)
            print(f"hopper smoke: FAILED (head_dim {head_dim}: relative error {err:.3g})")
            return 1
    dq = os.environ.get("PYSSM_FLASH_SM90_DQ") or "tma"
    print(f"hopper smoke: ok (max relative error {worst:.3g}; backward dQ by {dq})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
