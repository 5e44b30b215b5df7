"""Triton kernel of ``pyssm.ops.linear_gelu``: an MLP's first layer and its exact GELU in one
pass, y = GELU(x W^T + b), the GELU applied in float32 to the accumulator and the result
rounded once.

Why: the encoders' MLPs run fc1 through cuBLAS, whose GELU epilogue is the tanh approximation
and not the exact GELU the checkpoints were trained with, and then the GELU as a second pass
over the 4x-wide hidden layer: read and written again in bf16.
bench/roofline_model.py puts that pass at 0.13 of VMamba-T's inference floor and 0.15 of
ViT-S's (profiles/roofline_model/2026-12-05.md).

Two numbers at VMamba-T's stage-1 MLP, 224 px x 128 (M = 401,408 rows, K 96, N 384, bf16):
x 77 MB read, y 308 MB written, W 74 KB (held in the L2); 29.6 GFLOP (37 us of tensor cores
at 790 TFLOP/s), so memory-bound: 385 MB, **90 us** at the H200's measured 4.3 TB/s, against
cuBLAS's fc1 (the same 90 us) plus the GELU pass (616 MB, 143 us). At ViT-B/16's (M 25,216,
K 768, N 3072) the product is bound by FLOPs (119 GFLOP, 150 us at that rate), and whether this
kernel's GEMM keeps up with cuBLAS's there is for the benchmark to say (`linear_gelu` table).
Prediction, not measured yet: 90-130 us at VMamba-T stage 1 against 230-280 us unfused.

Tiles (``_triton.linear_tiles``, shared with ``linear_residual``): BLOCK_M rows x BLOCK_N outputs a program, the K loop BLOCK_K at a time on
tensor cores (tl.dot, float32 accumulation); a program's N tiles are its neighbours in launch
order, so x's rows are read from DRAM once and from the L2 by the others. W and the bias come
in x's dtype: the op rounds them first, as CUDA autocast rounds them for F.linear (the encoders'
Mlp keeps that cast while the weights are unchanged). Float32 x multiplies in IEEE float32 (not
TF32, on the CUDA cores: not the encoders' path). On CPU tensors the kernel runs in Triton's
interpreter (pyssm/ops/_triton.py), whose dot does not take bf16 operands: there the same
16-bit values are multiplied as float32 (exact products, float32 sums), so the tests check the
indexing, the rounding and the epilogue, and the tensor-core dot is checked on a GPU
(tests/ops/test_linear_gelu.py's CUDA tests).
"""

from __future__ import annotations

import torch

from pyssm.ops._triton import (activation, available, check_device, jit,  # noqa: F401
                               linear_tile, linear_tiles, program_tile, rounded, tl,
                               training_tiles, triton)


@jit
def _fwd(X, Wt, BIAS, Y, PRE, M, N, K, stride_xm, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
         EVEN_K: tl.constexpr, STORE_PRE: tl.constexpr, ACT: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
         CPU: tl.constexpr):
    rows, cols = program_tile(N, BLOCK_M, BLOCK_N)
    acc = linear_tile(X, Wt, BIAS, rows, cols, M, N, K, stride_xm, HAS_BIAS, IEEE, EVEN_K,
                      BLOCK_M, BLOCK_N, BLOCK_K, CPU, False)
    if STORE_PRE:  # the pre-activation too, for a backward (pyssm.ops.mlp_gelu)
        tl.store(PRE + rows.to(tl.int64)[:, None] * N + cols[None, :],
                 rounded(acc, PRE.dtype.element_ty, CPU),
                 mask=(rows < M)[:, None] & (cols < N)[None, :])
    # (this order, the GELU before the store's offsets and mask, as before PRE: computing them
    # first took sm_80's bf16 variants from 243-255 registers and no spills to 296-376 B)
    acc = activation(acc, ACT)
    rows64 = rows.to(tl.int64)
    tl.store(Y + rows64[:, None] * N + cols[None, :], rounded(acc, Y.dtype.element_ty, CPU),
             mask=(rows < M)[:, None] & (cols < N)[None, :])


def forward(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            out_dtype: torch.dtype, pre: torch.Tensor | None = None, act: int = 0) -> torch.Tensor:
    """x2d (M, K) with unit stride along K; weight (N, K) contiguous and bias (N,), both in
    x2d's dtype (the op rounds them, as autocast does); y (M, N) in out_dtype. ``pre``: an
    (M, N) contiguous tensor the pre-activation x W^T + b is written to as well, rounded to its
    dtype (pyssm.ops.mlp_gelu keeps it for the GELU's gradient). ``act``: the activation's index
    in pyssm.ops.linear_gelu.ACTIVATIONS (0, the exact GELU)."""
    M, K = x2d.shape
    N = weight.shape[0]
    check_device(x2d.device, "linear_gelu")
    y = torch.empty((M, N), dtype=out_dtype, device=x2d.device)
    if M == 0 or N == 0:
        return y
    fp32 = x2d.dtype == torch.float32
    block_m, block_n, block_k, warps = (linear_tiles if pre is None else training_tiles)(N, K,
                                                                                        fp32)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _fwd[grid](x2d, weight, bias if bias is not None else weight, y, y if pre is None else pre,
               M, N, K, x2d.stride(0), HAS_BIAS=bias is not None, EVEN_K=K % block_k == 0,
               STORE_PRE=pre is not None, ACT=act, IEEE=fp32, BLOCK_M=block_m,
               BLOCK_N=block_n, BLOCK_K=block_k, CPU=x2d.device.type == "cpu",
               num_warps=warps, num_stages=3)
    return y
