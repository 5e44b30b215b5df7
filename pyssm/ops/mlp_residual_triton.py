"""Triton kernel of ``pyssm.ops.mlp_residual_``: a whole MLP added into the block's residual
sum in one pass, s += round(round(GELU(x W1^T + b1)) W2^T + b2), s updated in place, the
hidden layer never written to memory.

Why: in inference the encoders' MLP is two passes, linear_gelu (x read, the 4x-wide hidden
layer written) and linear_residual_ (the hidden layer read, s read and written). At the narrow
widths of VMamba's first two stages the hidden layer is most of the bytes and the products are
cheap, so keeping it on chip removes most of the MLP's traffic.

Two numbers at VMamba-T's stage-1 MLP, 224 px x 128 (M = 401,408 rows, C 96, H 384, bf16 x,
float32 s): unfused, x 77 MB read and the hidden layer 308 MB written (linear_gelu), then the
hidden layer read and s read and written (linear_residual_: 308 + 154 + 154 MB): 1.0 GB, 233 us
at the H200's measured 4.3 TB/s. Fused: x 77 MB, s 154 + 154 MB: 385 MB, 90 us; the two products
are 59 GFLOP, 75 us of tensor cores at 790 TFLOP/s (89 us with fc2's 96 outputs padded to a
128-wide tile), so the kernel is about balanced between the two and its floor is ~90 us, 0.39
of the unfused floor. Prediction, not measured yet: 110-160 us against linear_gelu +
linear_residual_'s 230-330 us (their own predictions). Where the width is above 256 the output
takes several column tiles and each recomputes the hidden layer (2x the FLOPs at 384 wide), and
the products are already near the tensor cores' rate unfused: the encoders take this kernel up
to 256 wide (pyssm.models.mlp.FUSED_MLP_WIDTH) and the two passes above it.

A program holds a BLOCK_M x BLOCK_N tile of the output (all of it up to 256 wide) in float32
registers and walks the hidden layer BLOCK_H units at a time (``tiles``): the BLOCK_M x BLOCK_H
tile of fc1's product (``_triton.linear_tile``, the K loop over the input width), plus b1, the
activation, rounded to x's dtype (the value linear_gelu would have written), then multiplied
by W2's BLOCK_H x BLOCK_N slice into the output tile on tensor cores. Then b2, the rounding to
x's dtype (what fc2 returns under autocast) and the promoted add into s, as linear_residual_.
x's row tile is read once from DRAM (its reloads for each hidden step hit the L1 / L2); W1, W2
and the biases (96 x 384 x 2 x 2 B = 147 KB at stage 1) stay in the L2, read once a program
(the unfused pair reads them about as often: each of its programs reads a weight slice). Each
output element is read and written by one program, so the update needs no atomics. On CPU
tensors the kernel runs in Triton's interpreter (pyssm/ops/_triton.py), which multiplies
16-bit values as float32.
"""

from __future__ import annotations

import torch

from pyssm.ops._triton import (activation, available, check_device, jit,  # noqa: F401
                               linear_tile, mma, program_tile, rounded, tl, triton)

# the widest output one program holds (more: column tiles, each recomputing the hidden layer)
MAX_BLOCK_N = 256


@jit
def _fwd(X, W1, B1, W2, B2, S, M, C, H, N, stride_xm, stride_sm, HAS_B1: tl.constexpr,
         HAS_B2: tl.constexpr, IEEE: tl.constexpr, EVEN_C: tl.constexpr, EVEN_H: tl.constexpr,
         ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
         BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, CPU: tl.constexpr):
    rows, cols = program_tile(N, BLOCK_M, BLOCK_N)
    hs = tl.arange(0, BLOCK_H)
    # W2^T's (BLOCK_H, BLOCK_N) slice: W2 is (N, H) contiguous, its columns past N read column
    # 0's (in bounds; the store is masked)
    w2_ptrs = W2 + (cols % N).to(tl.int64)[None, :] * H + hs[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        units = h0 + hs
        a = linear_tile(X, W1, B1, rows, units, M, H, C, stride_xm, HAS_B1, IEEE, EVEN_C,
                        BLOCK_M, BLOCK_H, BLOCK_C, CPU, False)
        # the hidden tile as linear_gelu writes it: the activation, rounded to x's dtype
        g = rounded(activation(a, ACT), X.dtype.element_ty, CPU)
        if EVEN_H:
            w2 = tl.load(w2_ptrs)
        else:  # units past H: their W2 rows read as 0 (their a is unit (h % H)'s)
            w2 = tl.load(w2_ptrs, mask=(units < H)[:, None], other=0.0)
        acc = mma(g, w2, acc, IEEE, CPU)
        w2_ptrs += BLOCK_H
    if HAS_B2:
        acc += tl.load(B2 + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    # fc2's output as F.linear returns it (rounded to x's dtype), then the promoted add
    y = rounded(acc, X.dtype.element_ty, CPU).to(tl.float32)
    ptrs = S + rows.to(tl.int64)[:, None] * stride_sm + cols[None, :]
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    s = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, rounded(s + y, S.dtype.element_ty, CPU), mask=mask)


def tiles(N: int, fp32: bool = False) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_H, BLOCK_C, num_warps) for an output N wide. 16-bit x: the
    whole output up to MAX_BLOCK_N (a power of two from 16) in 128 rows, 64 from 129 wide; the
    hidden layer and the input 32 at a time; 8 warps. Triton 3.8's ptxas (bench/triton_compile.py):
    128 x 128 takes 255 / 249 registers on sm_80 / sm_90 and 64 x 256 255, none spilling;
    64 x 128 on 4 warps with 64 hidden units a step spilled 448 / 416 B, and 128 x 256 1.4 KB.
    The rows a program takes are how often W1 and W2 are read (from the L2): at stage 1, 128
    rows read them 3,136 times, 462 MB. Float32 x (IEEE products on the CUDA cores, not the
    encoders' path): 32 x up to 64 x 32 x 16, 4 warps."""
    if fp32:
        return 32, min(64, max(16, triton.next_power_of_2(N))), 32, 16, 4
    block_n = min(MAX_BLOCK_N, max(16, triton.next_power_of_2(N)))
    return (128 if block_n <= 128 else 64), block_n, 32, 32, 8


def forward_(x2d: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
             b2: torch.Tensor | None, s2d: torch.Tensor, act: int = 0) -> None:
    """s2d += round(round(act(x2d w1^T + b1)) w2^T + b2) in place. x2d (M, C) and s2d (M, N)
    with unit stride along their last dimension; w1 (H, C), w2 (N, H) contiguous and the
    biases, all in x2d's dtype. ``act``: the activation's index in
    pyssm.ops.linear_gelu.ACTIVATIONS."""
    M, C = x2d.shape
    H, N = w1.shape[0], w2.shape[0]
    check_device(x2d.device, "mlp_residual_")
    if M == 0 or N == 0:
        return
    if H == 0:  # no hidden units: fc2's product is 0, its bias alone is added
        if b2 is not None:
            s2d.add_(b2)
        return
    fp32 = x2d.dtype == torch.float32
    block_m, block_n, block_h, block_c, warps = tiles(N, fp32)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _fwd[grid](x2d, w1, b1 if b1 is not None else w1, w2, b2 if b2 is not None else w2, s2d,
               M, C, H, N, x2d.stride(0), s2d.stride(0), HAS_B1=b1 is not None,
               HAS_B2=b2 is not None, IEEE=fp32, EVEN_C=C % block_c == 0,
               EVEN_H=H % block_h == 0, ACT=act, BLOCK_M=block_m, BLOCK_N=block_n,
               BLOCK_H=block_h, BLOCK_C=block_c, CPU=x2d.device.type == "cpu",
               num_warps=warps, num_stages=3)
