"""Triton kernels of ``pyssm.ops.depthwise_conv2d``: a K x K depthwise convolution ("same"
padding) over a channels-last (B, H, W, C) map, with the bias and SiLU of VMamba's SS2D fused
in, forward and backward.

Two numbers at VMamba-T's stage-1 SS2D, 224 px x 64 (B 64, 56 x 56, C 96, K 3, bf16):
- forward: x read once, y written once: 4 B x 19.3 M = 77 MB, **18 us** at the H200's measured
  4.2 TB/s copy; the nine taps re-read neighbours from L1 / L2, not DRAM. Arithmetic: 9 FMA and
  one sigmoid per element, far below the memory time. cuDNN's depthwise convolution and a
  separate SiLU move 8 B per element (two passes).
- backward: kernel 1 re-forms the pre-activation a from x (9 FMA, L1 re-reads), g = dy SiLU'(a)
  stored in float32, the bias and weight gradients summed per program (no atomics); kernel 2
  dx = the transposed convolution of g. Bytes: x 2 + dy 2 + g 4 written, g 4 read + dx 2
  written: 14 B per element, 270 MB, **64 us**. Only x is kept from the forward (torch keeps
  the convolution's input and output).
Prediction, not measured yet: forward 25-40 us and forward + backward 100-150 us at that shape.

Tiles: BLOCK_P pixels (consecutive in (b, h, w) order) x BLOCK_C channels, 2-4 elements per
thread (``_tiles``); ptxas (bench/triton_compile.py, sm_80 / sm_90): forward 32 / 56 registers,
the backward's kernels 111 / 110 and 32 / 55, no spills. On CPU tensors the kernels run in
Triton's interpreter (pyssm/ops/_triton.py).
"""

from __future__ import annotations

import torch

from pyssm.ops._triton import (available, check_device, jit, reduction_programs,  # noqa: F401
                               rounded, tl, triton)


@jit
def _tap(X, p64, h, w, c, pmask, cmask, H, W, C, di: tl.constexpr, dj: tl.constexpr):
    """X at pixel (h + di, w + dj) of each pixel's map, for a tile of pixels and channels, in
    float32; zero outside the map."""
    hh = h + di
    ww = w + dj
    ok = pmask & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
    q = p64 + (di * W + dj)
    return tl.load(X + q[:, None] * C + c[None, :], mask=ok[:, None] & cmask[None, :],
                   other=0.0).to(tl.float32)


@jit
def _conv_tile(X, Wt, p64, h, w, c, pmask, cmask, H, W, C, K: tl.constexpr,
               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """sum over the K x K taps of x[pixel + tap] * weight[c, tap], zero outside the image."""
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for i in tl.static_range(K):
        for j in tl.static_range(K):
            xv = _tap(X, p64, h, w, c, pmask, cmask, H, W, C, i - K // 2, j - K // 2)
            wv = tl.load(Wt + c * (K * K) + (i * K + j), mask=cmask, other=0.0).to(tl.float32)
            acc += xv * wv[None, :]
    return acc


@jit
def _fwd(X, Wt, BIAS, Y, P, H, W, C, K: tl.constexpr, HAS_BIAS: tl.constexpr,
         SILU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
         BY_BITS: tl.constexpr):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pmask = p < P
    cmask = c < C
    w = p % W
    h = (p // W) % H
    p64 = p.to(tl.int64)
    a = _conv_tile(X, Wt, p64, h, w, c, pmask, cmask, H, W, C, K, BLOCK_P, BLOCK_C)
    if HAS_BIAS:
        a += tl.load(BIAS + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if SILU:
        a = a * tl.sigmoid(a)
    tl.store(Y + p64[:, None] * C + c[None, :], rounded(a, Y.dtype.element_ty, BY_BITS),
             mask=pmask[:, None] & cmask[None, :])


@jit
def _bwd_g(X, Wt, BIAS, DY, G, DW, DB, P, H, W, C, pixels_per_program,
           K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, TAPS: tl.constexpr,
           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """g = dy * SiLU'(a) (float32) and this program's share of the weight / bias gradients."""
    pid = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    tap = tl.arange(0, TAPS)
    dw = tl.zeros((TAPS, BLOCK_C), dtype=tl.float32)  # rows: the K*K taps (padded to TAPS)
    db = tl.zeros((BLOCK_C,), dtype=tl.float32)
    first = pid * pixels_per_program
    end = tl.minimum(first + pixels_per_program, P)
    for start in range(first, end, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        pmask = p < end
        mask = pmask[:, None] & cmask[None, :]
        w = p % W
        h = (p // W) % H
        p64 = p.to(tl.int64)
        g = tl.load(DY + p64[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
        if SILU:
            a = _conv_tile(X, Wt, p64, h, w, c, pmask, cmask, H, W, C, K, BLOCK_P, BLOCK_C)
            if HAS_BIAS:
                a += tl.load(BIAS + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
            sig = tl.sigmoid(a)
            g = g * sig * (1.0 + a * (1.0 - sig))
        g = tl.where(mask, g, 0.0)
        tl.store(G + p64[:, None] * C + c[None, :], g, mask=mask)
        db += tl.sum(g, axis=0)
        for i in tl.static_range(K):
            for j in tl.static_range(K):
                xv = _tap(X, p64, h, w, c, pmask, cmask, H, W, C, i - K // 2, j - K // 2)
                part = tl.sum(xv * g, axis=0)
                dw += tl.where(tap[:, None] == i * K + j, part[None, :], 0.0)
    tl.store(DW + (pid * (K * K) + tap[:, None]) * C + c[None, :], dw,
             mask=(tap[:, None] < K * K) & cmask[None, :])
    tl.store(DB + pid * C + c, db, mask=cmask)


@jit
def _bwd_dx(G, Wt, DX, P, H, W, C, K: tl.constexpr, BLOCK_P: tl.constexpr,
            BLOCK_C: tl.constexpr, BY_BITS: tl.constexpr):
    """dx[pixel] = sum over taps of weight[c, tap] * g[pixel - tap] (the transposed
    convolution), zero where pixel - tap is outside the image."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pmask = p < P
    cmask = c < C
    w = p % W
    h = (p // W) % H
    p64 = p.to(tl.int64)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for i in tl.static_range(K):
        for j in tl.static_range(K):
            gv = _tap(G, p64, h, w, c, pmask, cmask, H, W, C, K // 2 - i, K // 2 - j)
            wv = tl.load(Wt + c * (K * K) + (i * K + j), mask=cmask, other=0.0).to(tl.float32)
            acc += gv * wv[None, :]
    tl.store(DX + p64[:, None] * C + c[None, :], rounded(acc, DX.dtype.element_ty, BY_BITS),
             mask=pmask[:, None] & cmask[None, :])


def _tiles(C: int, per_thread: int) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps): a pixel's channels in one block up to 128 (VMamba's 96:
    one contiguous 192-byte read per pixel and tap), ``per_thread`` elements per thread of 4
    warps. Triton keeps all nine taps' loads in flight, so registers grow ~9x with it (ptxas
    sm_90, bench/triton_compile.py): at 8 the forward took 137 and the backward's first kernel
    255 with a spill; the forward and dx kernels take 4 (56 and ~70), the first backward
    kernel, which also holds the taps for the weight gradient, 2 (110)."""
    block_c = min(128, triton.next_power_of_2(C))
    block_p = max(1, per_thread * 128 // block_c)
    return block_p, block_c, 4


def forward(x, weight, bias, silu: bool, out_dtype):
    """x (B, H, W, C) contiguous; weight (C, 1, K, K) contiguous; y (B, H, W, C) in out_dtype."""
    B, H, W, C = x.shape
    K = weight.shape[-1]
    check_device(x.device, "depthwise_conv2d")
    y = torch.empty((B, H, W, C), dtype=out_dtype, device=x.device)
    P = B * H * W
    if P == 0 or C == 0:
        return y
    block_p, block_c, warps = _tiles(C, 4)
    grid = (triton.cdiv(P, block_p), triton.cdiv(C, block_c))
    _fwd[grid](x, weight, bias if bias is not None else weight, y, P, H, W, C, K=K,
               HAS_BIAS=bias is not None, SILU=silu, BLOCK_P=block_p, BLOCK_C=block_c,
               BY_BITS=x.device.type == "cpu", num_warps=warps)
    return y


def backward(dy, x, weight, bias, silu: bool):
    """(dx in x's dtype, dweight (C, 1, K, K) float32, dbias (C,) float32)."""
    B, H, W, C = x.shape
    K = weight.shape[-1]
    check_device(x.device, "depthwise_conv2d")
    P = B * H * W
    dx = torch.empty_like(x)
    if P == 0 or C == 0:
        return dx, torch.zeros(weight.shape, device=x.device), torch.zeros(C, device=x.device)
    block_p, block_c, warps = _tiles(C, 2)
    tiles = triton.cdiv(P, block_p)
    programs = reduction_programs(x.device, tiles, triton.cdiv(C, block_c))
    per_program = triton.cdiv(tiles, programs) * block_p
    programs = triton.cdiv(P, per_program)
    g = torch.empty((B, H, W, C), dtype=torch.float32, device=x.device)
    dw = torch.empty((programs, K * K, C), dtype=torch.float32, device=x.device)
    db = torch.empty((programs, C), dtype=torch.float32, device=x.device)
    grid = (programs, triton.cdiv(C, block_c))
    _bwd_g[grid](x, weight, bias if bias is not None else weight, dy, g, dw, db, P, H, W, C,
                 per_program, K=K, HAS_BIAS=bias is not None, SILU=silu,
                 TAPS=triton.next_power_of_2(K * K), BLOCK_P=block_p, BLOCK_C=block_c,
                 num_warps=warps)
    block_p, block_c, warps = _tiles(C, 4)
    _bwd_dx[(triton.cdiv(P, block_p), triton.cdiv(C, block_c))](
        g, weight, dx, P, H, W, C, K=K, BLOCK_P=block_p, BLOCK_C=block_c,
        BY_BITS=x.device.type == "cpu", num_warps=warps)
    dweight = dw.sum(0).t().reshape(C, 1, K, K)
    return dx, dweight, db.sum(0)
