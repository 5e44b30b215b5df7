"""Triton kernel of ``pyssm.ops.norm_mlp_residual``: a pre-norm block's second half in one
pass, out = s + round(MLP(round(LN(s)))) with s = x + branch, neither s nor the normalised s
written to memory.

Why: in inference the blocks' second half was two passes, the norm's (branch and the stream x
read, their sum s and its norm h written: ``layer_norm`` with a residual) and
``mlp_residual_``'s (h and s read, s written). At VMamba-T's stage-1 MLP, 224 px x 128 (M =
401,408 rows, C 96, H 384; a bf16 branch into a float32 stream): 77 + 154 MB read and 154 + 77
MB written, then 77 + 154 MB read and 154 MB written: 847 MB, 197 us at the H200's measured 4.3
TB/s. Here: the branch and x read (77 + 154 MB) and the output written (154 MB): 385 MB, 90
us, with the two products' 59 GFLOP (75-89 us of tensor cores, as mlp_residual_'s) beside it.
bench/roofline_model.py puts the fusion at VMamba-T's MLPs up to 256 wide (stages 1 and 2).
Prediction, not measured yet: 120-170 us at stage 1 against 200-280 us for layer_norm and
mlp_residual_ (their own predictions).

A program takes BLOCK_M rows whole (C up to MAX_WIDTH, padded to a power of two) and is
``mlp_residual_triton``'s otherwise (the output tile in float32 registers, the hidden layer
BLOCK_H units at a time). Its prologue reads the rows' x and branch once, sums them in float32,
takes the mean and then the variance of the centred values (as the layer_norm kernel does),
applies the norm's weight and bias and rounds to the products' dtype (the value the norm would
have written): that tile stays in registers as fc1's A operand for every hidden step, so fc1
is one product a step, with no K loop. At the end the sum is formed again at the output's
columns (x and the branch read again, from the L2), rounded to the promoted dtype of x and the
branch (the sum the norm would have written), and the rounded MLP output added to it, as
mlp_residual_ adds; the result is rounded to the output's dtype (that of the sum, or bf16 for
a VMamba stage's end that only the downsampling reads). The output goes to its own buffer (x
is not updated in place: a caller may hold it). On CPU
tensors the kernel runs in Triton's interpreter (pyssm/ops/_triton.py), which multiplies 16-bit
values as float32.
"""

from __future__ import annotations

import torch

from pyssm.ops._triton import (activation, available, check_device, jit,  # noqa: F401
                               mma, rounded, tl, triton)


@jit
def _sums(X, R, rows, M, C, cols, stride_xm, stride_rm, FULL: tl.constexpr):
    """x[rows, cols] + r[rows, cols] in float32 (0 past C; rows past M read row (r % M)):
    the residual sum as layer_norm forms it."""
    r64 = (rows % M).to(tl.int64)[:, None]
    x_ptrs = X + r64 * stride_xm + cols[None, :]
    r_ptrs = R + r64 * stride_rm + cols[None, :]
    if FULL:
        return tl.load(x_ptrs).to(tl.float32) + tl.load(r_ptrs).to(tl.float32)
    mask = (cols < C)[None, :]
    return (tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
            + tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32))


@jit
def _fwd(X, R, NW, NB, W1, B1, W2, B2, OUT, M, C, H, stride_xm, stride_rm, stride_om, eps,
         HAS_NW: tl.constexpr, HAS_NB: tl.constexpr, HAS_B1: tl.constexpr,
         HAS_B2: tl.constexpr, S_OF_R: tl.constexpr, IEEE: tl.constexpr, EVEN_C: tl.constexpr,
         EVEN_H: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
         BLOCK_H: tl.constexpr, CPU: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)  # the whole width (BLOCK_C >= C)
    cmask = cols < C
    # the norm, its rows whole in registers: the mean, then the variance of the centred values
    # (as the layer_norm kernel computes it), then the affine map and the rounding to the
    # products' dtype (the value the norm would have written; 0 past C, where W1's rows read 0)
    s = _sums(X, R, rows, M, C, cols, stride_xm, stride_rm, EVEN_C)
    mean = tl.sum(s, axis=1) / C
    d = tl.where(cmask[None, :], s - mean[:, None], 0.0)
    hn = d * tl.rsqrt(tl.sum(d * d, axis=1) / C + eps)[:, None]
    if HAS_NW:
        hn = hn * tl.load(NW + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_NB:
        hn = hn + tl.load(NB + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    h = rounded(hn, W1.dtype.element_ty, CPU)
    hs = tl.arange(0, BLOCK_H)
    # W2^T's (BLOCK_H, BLOCK_C) slice: W2 is (C, H) contiguous, its columns past C read column
    # 0's (in bounds; the store is masked)
    w2_ptrs = W2 + (cols % C).to(tl.int64)[None, :] * H + hs[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        units = h0 + hs
        # W1^T's (BLOCK_C, BLOCK_H) slice: W1 is (H, C) contiguous, its rows past H read row
        # (h % H)'s, its columns past C read 0
        w1_ptrs = W1 + (units % H).to(tl.int64)[None, :] * C + cols[:, None]
        if EVEN_C:
            w1 = tl.load(w1_ptrs)
        else:
            w1 = tl.load(w1_ptrs, mask=cmask[:, None], other=0.0)
        a = mma(h, w1, tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32), IEEE, CPU)
        if HAS_B1:
            a += tl.load(B1 + units % H).to(tl.float32)[None, :]
        # the hidden tile as linear_gelu writes it: the activation, rounded to the products'
        # dtype
        g = rounded(activation(a, ACT), W1.dtype.element_ty, CPU)
        if EVEN_H:
            w2 = tl.load(w2_ptrs)
        else:  # units past H: their W2 rows read as 0
            w2 = tl.load(w2_ptrs, mask=(units < H)[:, None], other=0.0)
        acc = mma(g, w2, acc, IEEE, CPU)
        w2_ptrs += BLOCK_H
    if HAS_B2:
        acc += tl.load(B2 + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    # fc2's output as F.linear returns it (rounded to the products' dtype), then the add to
    # the sum as the norm wrote it (rounded to the promoted dtype of x and the branch, S_OF_R:
    # the branch's; read again, not held), the result rounded to the output's dtype
    y = rounded(acc, W1.dtype.element_ty, CPU).to(tl.float32)
    s = _sums(X, R, rows, M, C, cols, stride_xm, stride_rm, EVEN_C)
    if S_OF_R:
        s = rounded(s, R.dtype.element_ty, CPU).to(tl.float32)
    else:
        s = rounded(s, X.dtype.element_ty, CPU).to(tl.float32)
    mask = (rows < M)[:, None] & cmask[None, :]
    tl.store(OUT + rows.to(tl.int64)[:, None] * stride_om + cols[None, :],
             rounded(s + y, OUT.dtype.element_ty, CPU), mask=mask)


# the widest C the kernel takes (its rows whole in registers); wider, pyssm.ops.norm_mlp_residual
# runs layer_norm and then mlp_residual_ (two passes)
MAX_WIDTH = 256


def tiles(C: int, fp32: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_C, BLOCK_H, num_warps) for C up to MAX_WIDTH, BLOCK_C the power of two
    from 16 that holds it. 16-bit products: 64 rows up to 128 wide, 32 rows above, the hidden
    layer 32 units a step, 8 warps. Triton 3.8's ptxas (bench/triton_compile.py, 2026-12-06):
    233 / 250 registers on sm_80 / sm_90 at 96 wide, 248 / 254 at 128, 255 / 246 at 192 and
    255 / 255 at 256, none spilling; 128 rows spilled 64-448 B up to 128 wide (1.0-1.6 KB
    above), and 4 warps 56-1720 B. The rows a program takes are how often W1 and W2 are read
    from the L2: 64 rows at VMamba-T's stage 1 (M = 401,408 at 224 px x 128) read their 147 KB
    6,272 times, 0.92 GB, twice mlp_residual_'s 128 rows; whether that costs more than the
    0.46 GB of DRAM traffic the fusion saves there is for the device check's benchmark rows.
    Float32 (IEEE products on the CUDA cores, not the encoders' path): 32 rows, 16 units a
    step, 4 warps up to 128 wide (254 registers), 8 above (254 / 239 on sm_80 / sm_90 at 256;
    4 warps spilled 120 / 80 B there, found by compiling the tests' launches)."""
    block_c = max(16, triton.next_power_of_2(C))
    if fp32:
        return 32, block_c, 16, (4 if block_c <= 128 else 8)
    return (64 if block_c <= 128 else 32), block_c, 32, 8


def forward(x2d: torch.Tensor, r2d: torch.Tensor, norm_weight: torch.Tensor | None,
            norm_bias: torch.Tensor | None, eps: float, w1: torch.Tensor, b1: torch.Tensor | None,
            w2: torch.Tensor, b2: torch.Tensor | None, out_dtype: torch.dtype,
            act: int = 0) -> torch.Tensor:
    """out (M, C) in out_dtype: round(x2d + r2d) + round(round(act(round(LN(x2d + r2d)) w1^T +
    b1)) w2^T + b2), the sum rounded to the promoted dtype of x2d and r2d. x2d and r2d (M, C),
    C up to MAX_WIDTH, with unit stride along C; the norm's weight and bias (C,) (any float
    dtype, applied in float32); w1 (H, C), w2 (C, H) contiguous and the biases in the
    products' dtype. ``act``: the activation's index in pyssm.ops.linear_gelu.ACTIVATIONS."""
    M, C = x2d.shape
    H = w1.shape[0]
    check_device(x2d.device, "norm_mlp_residual")
    if C > MAX_WIDTH:
        raise ValueError(f"norm_mlp_residual's kernel takes rows up to {MAX_WIDTH} wide, got "
                         f"C = {C} (pyssm.ops.norm_mlp_residual runs two passes there)")
    out = torch.empty((M, C), dtype=out_dtype, device=x2d.device)
    if M == 0 or C == 0:
        return out
    if H == 0:  # no hidden units: the MLP's output is its bias (or 0), the sum as the norm's
        s = (x2d.float() + r2d.float()).to(torch.promote_types(x2d.dtype, r2d.dtype)).float()
        return out.copy_(s if b2 is None else s + b2.float())
    block_m, block_c, block_h, warps = tiles(C, w1.dtype == torch.float32)
    _fwd[(triton.cdiv(M, block_m),)](
        x2d, r2d, norm_weight if norm_weight is not None else w1,
        norm_bias if norm_bias is not None else w1, w1, b1 if b1 is not None else w1, w2,
        b2 if b2 is not None else w2, out, M, C, H, x2d.stride(0), r2d.stride(0), out.stride(0),
        float(eps), HAS_NW=norm_weight is not None, HAS_NB=norm_bias is not None,
        HAS_B1=b1 is not None, HAS_B2=b2 is not None,
        S_OF_R=torch.promote_types(x2d.dtype, r2d.dtype) != x2d.dtype,
        IEEE=w1.dtype == torch.float32,
        EVEN_C=C == block_c, EVEN_H=H % block_h == 0, ACT=act, BLOCK_M=block_m,
        BLOCK_C=block_c, BLOCK_H=block_h, CPU=x2d.device.type == "cpu", num_warps=warps,
        num_stages=3)
    return out
