"""The hot CUDA kernels, each launched once at its benchmark shape, for Nsight Compute:

    ncu --clock-control none --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats -k regex:'ss2d|summary_kernel|main_kernel|flash' \\
        python bench/ncu_cases.py

ss2d forward and backward at VMamba-T stage 1 (64 x 56 x 56, D 96, N 1, R 6, bf16) and flash
attention forward and backward at ViT-B/16 224 px (197 tokens, 12 heads, head_dim 64, bf16,
batch 128). The device check runs it after the benchmarks (bench/device_check.sh).
PYSSM_NCU_DEVICE=cpu runs the same calls at batch 2 on the CPU kernels (a check of this script)."""

from __future__ import annotations

import os

import torch

from pyssm import ops


def main() -> None:
    torch.manual_seed(0)
    dev, bf16 = os.environ.get("PYSSM_NCU_DEVICE", "cuda"), torch.bfloat16
    B_ss2d, B_attn = (64, 128) if dev == "cuda" else (2, 2)
    D, R, N = 96, 6, 1
    x = torch.randn(B_ss2d, 56, 56, D, device=dev, dtype=bf16, requires_grad=True)
    ws = [torch.randn(4, R + 2 * N, D, device=dev) * D ** -0.5,
          torch.randn(4, D, R, device=dev) * R ** -0.5,
          torch.randn(4, D, device=dev) * 0.5 - 3,
          torch.log(torch.rand(4 * D, N, device=dev) + 0.5),
          torch.randn(4 * D, device=dev)]
    ws = [w.requires_grad_() for w in ws]
    y = ops.ss2d(x, *ws, backend=dev)
    y.backward(torch.randn_like(y))

    q, k, v = (torch.randn(B_attn, 197, 12, 64, device=dev, dtype=bf16, requires_grad=True)
               for _ in range(3))
    o = ops.attention(q, k, v, backend=dev)
    o.backward(torch.randn_like(o))
    if dev == "cuda":
        torch.cuda.synchronize()
    print("ncu cases: ss2d fwd + bwd, attention fwd + bwd: done")


if __name__ == "__main__":
    main()
