"""Triton kernel of ``pyssm.ops.linear_residual``: an MLP's second layer added into the block's
residual sum in the same pass, s += round(h W^T + b), s updated in place.

Why: under autocast the encoders' fc2 writes its bf16 output, then the block's residual add
reads it with the float32 sum and writes the sum (pyssm.models.mlp.add_mlp, in place): 2 + 2 + 4
+ 4 B per element of the block's width. Here the product's tile is rounded to h's dtype in
registers (what fc2 returns) and added to the sum read from memory: 4 + 4 B, and one launch
instead of two. bench/roofline_model.py puts the residual add at 0.08 of VMamba-T's inference
floor and 0.07-0.08 of the ViTs' (profiles/roofline_model/2026-12-06.md); this removes about 40%
of it.

Two numbers at VMamba-T's stage-1 MLP, 224 px x 128 (M = 401,408 rows, K 384, N 96, bf16 h,
float32 s): h 308 MB read, s 154 MB read and written, W 74 KB (held in the L2); 29.6 GFLOP (37 us
of tensor cores at 790 TFLOP/s), so memory-bound: 616 MB, **143 us** at the H200's measured
4.3 TB/s, against cuBLAS's fc2 (308 + 77 MB, 90 us) plus the add (77 + 308 MB, 90 us): 180 us.
At ViT-B/16's (M 25,216, K 3072, N 768) the product is bound by FLOPs (119 GFLOP, 150 us),
and whether the Triton product keeps up with cuBLAS's there is for the benchmark to say
(`linear_residual` table). Prediction, not measured yet: 150-200 us at VMamba-T stage 1
against 200-260 us unfused.

The product is linear_gelu's (``_triton.linear_tile`` and ``linear_tiles``: the same tiles, on
tensor cores for 16-bit h). W and the bias come in h's dtype: the op rounds them first, as CUDA
autocast rounds them for F.linear. Each output element is read and written by one program
(the N tiles of a row block are distinct columns), so the in-place update needs no atomics.
On CPU tensors the kernel runs in Triton's interpreter (pyssm/ops/_triton.py).
"""

from __future__ import annotations

import torch

from pyssm.ops._triton import (available, check_device, jit, linear_tile,  # noqa: F401
                               linear_tiles, program_tile, rounded, tl, triton)


@jit
def _fwd(X, Wt, BIAS, S, M, N, K, stride_xm, stride_sm, HAS_BIAS: tl.constexpr,
         IEEE: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CPU: tl.constexpr):
    rows, cols = program_tile(N, BLOCK_M, BLOCK_N)
    acc = linear_tile(X, Wt, BIAS, rows, cols, M, N, K, stride_xm, HAS_BIAS, IEEE, EVEN_K,
                      BLOCK_M, BLOCK_N, BLOCK_K, CPU, False)
    # the product as F.linear returns it (rounded to h's dtype), then the promoted add
    y = rounded(acc, X.dtype.element_ty, CPU).to(tl.float32)
    ptrs = S + rows.to(tl.int64)[:, None] * stride_sm + cols[None, :]
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    s = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, rounded(s + y, S.dtype.element_ty, CPU), mask=mask)


def forward_(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             s2d: torch.Tensor) -> None:
    """s2d += round(x2d weight^T + bias) in place. x2d (M, K) and s2d (M, N) with unit stride
    along their last dimension; weight (N, K) contiguous and bias (N,), both in x2d's dtype."""
    M, K = x2d.shape
    N = weight.shape[0]
    check_device(x2d.device, "linear_residual")
    if M == 0 or N == 0:
        return
    fp32 = x2d.dtype == torch.float32
    block_m, block_n, block_k, warps = linear_tiles(N, K, fp32)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _fwd[grid](x2d, weight, bias if bias is not None else weight, s2d, M, N, K, x2d.stride(0),
               s2d.stride(0), HAS_BIAS=bias is not None, EVEN_K=K % block_k == 0, IEEE=fp32,
               BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
               CPU=x2d.device.type == "cpu", num_warps=warps, num_stages=3)
