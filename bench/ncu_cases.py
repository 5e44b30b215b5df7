"""The hot CUDA kernels, each launched once at its benchmark shape, for Nsight Compute:

    ncu --clock-control none --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats \\
        -k regex:'ss2d|xproj|n1_kernel|summary_kernel|main_kernel|flash|selective_scan' \\
        python bench/ncu_cases.py

ss2d forward and backward at VMamba-T stage 1 (64 x 56 x 56, D 96, N 1, R 6, bf16) and stage 3
(64 x 14 x 14, D 384, R 24: the backward's v3 over dt_rank 16); at batch 64 the forward keeps
its tile states, so each backward is v3's main pass alone (`n1_kernel`, its kGiven variant; the
summary pass, which runs only without the states, is not profiled here: the ss2d table's
`pyssm-cuda-no-states` rows time it); flash
attention forward and backward at ViT-B/16 224 px (197 tokens, 12 heads, head_dim 64, bf16,
batch 128), then its backward again with dQ by atomics (PYSSM_FLASH_SM90_DQ=atomic: the Hopper
backward's v1 beside v2's TMA reduce-adds), and the flash-decoding forward and its merge at the
attention_decode rows' shape (batch 16, 32 / 8 heads, hd128, 4096-slot caches); selective_scan
forward and backward at the oflex anchor's (64, 384, 3136), d_state 1, bf16. The device check
runs it after the benchmarks (bench/device_check.sh).
PYSSM_NCU_DEVICE=cpu runs the same calls at batch 2 on the CPU kernels (a check of this script)."""

from __future__ import annotations

import os

import torch

from pyssm import ops


def main() -> None:
    torch.manual_seed(0)
    dev, bf16 = os.environ.get("PYSSM_NCU_DEVICE", "cuda"), torch.bfloat16
    B_ss2d, B_attn = (64, 128) if dev == "cuda" else (2, 2)
    N = 1
    for grid, D, R in ((56, 96, 6), (14, 384, 24)):
        x = torch.randn(B_ss2d, grid, grid, D, device=dev, dtype=bf16, requires_grad=True)
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
    for dq in ("tma", "atomic"):
        os.environ["PYSSM_FLASH_SM90_DQ"] = dq
        o = ops.attention(q, k, v, backend=dev)
        o.backward(torch.randn_like(o))
    os.environ.pop("PYSSM_FLASH_SM90_DQ")

    # the flash-decoding forward and its merge at the attention_decode row's shape (batch 16,
    # 32 heads over 8, head_dim 128, caches of 4096 slots used 2048 ... 4096)
    B_dec, slots = (16, 4096) if dev == "cuda" else (2, 256)
    q = torch.randn(B_dec, 1, 32, 128, device=dev, dtype=bf16)
    k, v = (torch.randn(B_dec, slots, 8, 128, device=dev, dtype=bf16) for _ in range(2))
    used = torch.linspace(slots // 2, slots, B_dec, device=dev).round().int()
    ops.attention(q, k, v, seqused_k=used, backend=dev)

    B_scan, L = (64, 3136) if dev == "cuda" else (2, 256)
    u, delta = (torch.randn(B_scan, 384, L, device=dev, dtype=bf16, requires_grad=True)
                for _ in range(2))
    Bm, Cm = (torch.randn(B_scan, 4, 1, L, device=dev, dtype=bf16, requires_grad=True)
              for _ in range(2))
    A = (-torch.rand(384, 1, device=dev) - 0.5).requires_grad_()
    y = ops.selective_scan(u, delta, A, Bm, Cm, delta_softplus=True, out_float32=True,
                           backend=dev)
    y.backward(torch.randn_like(y))
    if dev == "cuda":
        torch.cuda.synchronize()
    print("ncu cases: ss2d fwd + bwd (stages 1 and 3), attention fwd + bwd (dQ by TMA, by "
          "atomics), flash-decoding, selective_scan fwd + bwd: done")


if __name__ == "__main__":
    main()
