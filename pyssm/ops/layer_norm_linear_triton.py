"""Triton kernel of ``pyssm.ops.layer_norm_linear``: a LayerNorm and the linear layer that reads
it in one pass, y = round(round(LN(x)) W^T + b), the normalised x never written to memory.

Why: VMamba's SS2D module normalises twice into a projection, the block's norm into in_proj
and out_norm (over the float32 output of the ss2d core) into out_proj. Each norm reads its
input and writes the normalised tensor in the matmul dtype, and the projection reads that back:
at VMamba-T's stage 1, 224 px x 128 (M = 401,408 rows, K = N = 96), 154 MB read and 77 MB
written by the norm, 77 MB read and 77 MB written by the projection: 385 MB, 90 us at the
H200's measured 4.3 TB/s. Here: 154 MB read and 77 MB written, 231 MB, 54 us; the product is
7.4 GFLOP (9 us of tensor cores), so the pass stays bound by memory. bench/roofline_model.py
puts the two fusions at about 1.6 GB of VMamba-T's 16.6 GB inference batch
(profiles/roofline_model/). Prediction, not measured yet: 60-80 us at stage 1 against 100-130
us for the norm and cuDNN's 1 x 1 convolution.

A program takes BLOCK_M rows and BLOCK_N outputs: two passes over its rows' K inputs (BLOCK_K
at a time) for the mean and then the variance (the variance of the centred values, as the
layer_norm kernel computes it), then the product's K loop, which normalises each x tile in
registers (times the norm's weight, plus its bias), rounds it to W's dtype (the value the norm
would have written) and multiplies it on tensor cores (float32 accumulation). Then the bias and
one rounding to y's dtype. The rows are read three times, from DRAM once (a program's 128 x K
float32 tile is at most 384 KB at K = 768, mostly in the L2 on the later reads); the N tiles of
a row block are launch-order neighbours, so those reads come from the L2 too. On CPU tensors
the kernel runs in Triton's interpreter (pyssm/ops/_triton.py), which multiplies 16-bit values
as float32.
"""

from __future__ import annotations

import torch

from pyssm.ops._triton import (available, check_device, jit, mma,  # noqa: F401
                               program_tile, rounded, tl, triton)


@jit
def _row_loads(X, rows, M, K, k0, stride_xm, ks, EVEN_K: tl.constexpr):
    """x[rows, k0:k0 + BLOCK_K] as float32 (0 past K; rows past M read row (r % M))."""
    ptrs = X + (rows % M).to(tl.int64)[:, None] * stride_xm + (k0 + ks)[None, :]
    if EVEN_K:
        return tl.load(ptrs).to(tl.float32)
    return tl.load(ptrs, mask=(k0 + ks < K)[None, :], other=0.0).to(tl.float32)


@jit
def _fwd(X, NW, NB, W, B, Y, M, K, N, stride_xm, eps, HAS_NW: tl.constexpr,
         HAS_NB: tl.constexpr, HAS_B: tl.constexpr, IEEE: tl.constexpr, EVEN_K: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
         CPU: tl.constexpr):
    rows, cols = program_tile(N, BLOCK_M, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        total += tl.sum(_row_loads(X, rows, M, K, k0, stride_xm, ks, EVEN_K), axis=1)
    mean = total / K
    squares = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = _row_loads(X, rows, M, K, k0, stride_xm, ks, EVEN_K)
        d = tl.where((k0 + ks < K)[None, :], x - mean[:, None], 0.0)
        squares += tl.sum(d * d, axis=1)
    rstd = tl.rsqrt(squares / K + eps)
    # W^T's (BLOCK_K, BLOCK_N) tile: W is (N, K) contiguous, its rows past N read row 0's
    w_ptrs = W + (cols % N).to(tl.int64)[None, :] * K + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = _row_loads(X, rows, M, K, k0, stride_xm, ks, EVEN_K)
        h = (x - mean[:, None]) * rstd[:, None]
        kmask = k0 + ks < K
        if HAS_NW:
            h = h * tl.load(NW + k0 + ks, mask=kmask, other=0.0).to(tl.float32)[None, :]
        if HAS_NB:
            h = h + tl.load(NB + k0 + ks, mask=kmask, other=0.0).to(tl.float32)[None, :]
        # the norm's output as it would be written: rounded to the product's dtype (inputs
        # past K meet W's zero rows below)
        a = rounded(h, W.dtype.element_ty, CPU)
        if EVEN_K:
            b = tl.load(w_ptrs)
        else:
            b = tl.load(w_ptrs, mask=kmask[:, None], other=0.0)
        acc = mma(a, b, acc, IEEE, CPU)
        w_ptrs += BLOCK_K
    if HAS_B:
        acc += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows.to(tl.int64)[:, None] * N + cols[None, :],
             rounded(acc, Y.dtype.element_ty, CPU),
             mask=(rows < M)[:, None] & (cols < N)[None, :])


def tiles(N: int, fp32: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps). 16-bit products: 128 rows x up to 128 outputs (a
    power of two from 16), the inputs 32 at a time, 8 warps; float32 (IEEE products on the CUDA
    cores): 32 x up to 64 x 16, 4 warps. bench/triton_compile.py reports the registers."""
    block_n = max(16, triton.next_power_of_2(N))
    if fp32:
        return 32, min(64, block_n), 16, 4
    return 128, min(128, block_n), 32, 8


def forward(x2d: torch.Tensor, norm_weight: torch.Tensor | None,
            norm_bias: torch.Tensor | None, eps: float, weight: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
    """y (M, N) in weight's dtype from x2d (M, K) with unit stride along K: the norm's weight
    and bias (K,) (any float dtype, applied in float32), weight (N, K) contiguous and bias (N,)
    in the product's dtype."""
    M, K = x2d.shape
    N = weight.shape[0]
    check_device(x2d.device, "layer_norm_linear")
    y = torch.empty((M, N), dtype=weight.dtype, device=x2d.device)
    if M == 0 or N == 0:
        return y
    if K == 0:  # no inputs: the product is 0
        return y.copy_(bias.expand(M, N)) if bias is not None else y.zero_()
    fp32 = weight.dtype == torch.float32
    block_m, block_n, block_k, warps = tiles(N, fp32)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _fwd[grid](x2d, norm_weight if norm_weight is not None else weight,
               norm_bias if norm_bias is not None else weight, weight,
               bias if bias is not None else weight, y, M, K, N, x2d.stride(0), float(eps),
               HAS_NW=norm_weight is not None, HAS_NB=norm_bias is not None,
               HAS_B=bias is not None, IEEE=fp32, EVEN_K=K % block_k == 0, BLOCK_M=block_m,
               BLOCK_N=block_n, BLOCK_K=block_k, CPU=x2d.device.type == "cpu",
               num_warps=warps, num_stages=3)
    return y
