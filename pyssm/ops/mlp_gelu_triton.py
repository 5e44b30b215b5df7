"""Triton kernel of ``pyssm.ops.mlp_gelu``'s backward: fc2's input gradient and the GELU's in one
pass, da = (dy W2) * GELU'(a), with dy W2 summed in float32 and da rounded once, and fc1's bias
gradient summed from the float32 da in the same pass (a row tile's column sums; the op adds
the tiles' rows). (The forward is linear_gelu's kernel, which writes the pre-activation a
beside the hidden layer h.)

Why: a training step's MLP in torch writes fc2's input gradient dh (M x 4C) in bf16, the
GELU's backward reads it back with a and writes da, and fc1's bias gradient reads da again:
dh's write and read and that read (3 x 2 B an element of the hidden layer) are what this pass
saves, and the forward (linear_gelu's kernel writing a beside h) saves the GELU's read of a.
bench/roofline_model.py --train put the GELU and its backward at 0.08 of VMamba-T's
training-step floor and 0.12 of ViT-S's; with this op the floors rise 4.6% and 16%
(profiles/roofline_model/2026-12-06-train.md).

Two numbers at VMamba-T's stage-1 MLP, 224 px x 64 (M = 200,704 rows, C 96, hidden 384, bf16):
dy read 39 MB, a read and da written 154 MB each, W2 74 KB (held in the L2), the bias tiles
4.8 MB (3,136 row tiles x 384 floats): 352 MB, **82 us** at the H200's measured 4.3 TB/s; 14.8 GFLOP (19 us of tensor cores),
so memory-bound. Torch's three passes: cuBLAS's dgrad (39 MB read, 154 MB written), the GELU's
backward (462 MB) and the bias sum (154 MB): 809 MB, ~190 us. Prediction, not measured yet:
80-120 us against 190-230 us. At ViT-B/16's (C 768, hidden 3072) the product is bound by
FLOPs, as linear_gelu's forward is there. The tanh and quick GELUs (activation_grad's other
two) add a few instructions an element to the epilogue, not bytes.

The tile product is ``_triton.linear_tile`` with dy as x and W2 as the weight, read as stored
(C, hidden) for its transpose (no copy), in ``_triton.training_tiles`` (smaller than linear_gelu's: this epilogue holds a and
GELU'(a) beside the product), with linear_gelu's interpreter caveat (on CPU tensors the 16-bit
values are multiplied as float32).
"""

from __future__ import annotations

import torch

from pyssm.ops._triton import (activation_grad, check_device, jit, linear_tile,  # noqa: F401
                               program_tile, rounded, tl, training_tiles, triton)


@jit
def _dgrad(DY, W2, PRE, DA, DB, M, N, K, stride_dym, IEEE: tl.constexpr,
           EVEN_K: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr,
           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CPU: tl.constexpr):
    rows, cols = program_tile(N, BLOCK_M, BLOCK_N)
    dh = linear_tile(DY, W2, W2, rows, cols, M, N, K, stride_dym, False, IEEE, EVEN_K,
                     BLOCK_M, BLOCK_N, BLOCK_K, CPU, True)  # (W2 as stored: (K, N))
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    a = tl.load(PRE + offs, mask=mask, other=0.0).to(tl.float32)
    # (rows past M hold row 0's product: zeroed before the column sums)
    da = tl.where(mask, dh * activation_grad(a, ACT), 0.0)
    tl.store(DA + offs, rounded(da, DA.dtype.element_ty, CPU), mask=mask)
    # fc1's bias gradient: this row tile's float32 column sums, one row of DB a row tile
    tile_m = tl.program_id(0) // tl.cdiv(N, BLOCK_N)
    tl.store(DB + tile_m * N + cols, tl.sum(da, axis=0), mask=cols < N)


def backward(dy: torch.Tensor, w2: torch.Tensor, pre: torch.Tensor,
             act: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """dy (M, C) with unit stride along C; w2 (C, hidden) contiguous, fc2's weight as stored,
    in dy's dtype; pre (M, hidden) contiguous, the saved pre-activation. Returns da (M, hidden)
    in pre's dtype and the float32 column sums of da (before its rounding) a row tile,
    (row tiles, hidden): their sum over the tiles is fc1's bias gradient. ``act``: the
    activation's index in pyssm.ops.linear_gelu.ACTIVATIONS."""
    M, K = dy.shape
    N = w2.shape[1]
    check_device(dy.device, "mlp_gelu")
    fp32 = dy.dtype == torch.float32
    block_m, block_n, block_k, warps = training_tiles(N, K, fp32)
    da = torch.empty((M, N), dtype=pre.dtype, device=dy.device)
    db = torch.empty((triton.cdiv(M, block_m), N), dtype=torch.float32, device=dy.device)
    if M == 0 or N == 0:
        return da, db
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _dgrad[grid](dy, w2, pre, da, db, M, N, K, dy.stride(0), EVEN_K=K % block_k == 0,
                 ACT=act, IEEE=fp32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                 CPU=dy.device.type == "cpu", num_warps=warps, num_stages=3)
    return da, db
