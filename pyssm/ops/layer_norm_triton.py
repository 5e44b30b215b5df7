"""Triton kernels of ``pyssm.ops.layer_norm``: LayerNorm over the last dimension of a row-major
(M, N) view, with an optional residual added first, forward and backward.

Bytes per element of the VMamba / ViT block glue this replaces (fp32 residual stream, bf16
branch, bf16 output for the next GEMM), where torch runs add, layer_norm and a cast:
    torch: add (read 4 + 2, write 4), layer_norm (read 4, write 4), cast (read 4, write 2): 24 B
    here:  read 4 + 2, write 4 (the new residual) + 2 (the normalised output):              12 B
The forward keeps a tile of rows in registers and makes one pass over memory. The backward
recomputes the normalised input from the forward's inputs (never from a rounded copy) and the
saved per-row mean and 1/std, and reduces the weight and bias gradients per program into a
(programs, N) float32 buffer that torch sums (no atomics, so the result is deterministic).

Two numbers at VMamba-T's stage-1 block, 224 px x 64 (200,704 rows of 96, bf16 branch, float32
stream; pyssm/bench/layer_norm.py): forward 12 B x 19.3 M = 231 MB, **55 us** at the H200's
measured 4.2 TB/s copy; forward + backward 26 B per element, 501 MB, **120 us**. Arithmetic
is ~10 flops per element: memory-bound. torch's add, LayerNorm and cast move 24 B per element
forward (110 us at copy speed, in three launches). Prediction, not measured yet: the forward at
70-85% of copy (65-80 us), forward + backward 150-200 us; torch.compile, which fuses the same
three ops, about the same; the gain is in eager mode, which is how the encoders usually run.

With ``gelu`` the exact GELU is applied to the affine output before its one rounding (VMamba's
v2 stem: conv, LayerNorm, GELU, conv). Under autocast torch writes that LayerNorm in float32,
runs the GELU on it in place and casts it to bf16 for the next convolution: read 2, write 4,
read 4 + write 4, read 4 + write 2, 20 B per element; here read 2, write 2, the same values
(computed in float32, rounded once). VMamba-T at 224 px x 128: 77 M elements of 48 channels at
112 x 112, 1.23 GB less traffic a batch (~290 us at 4.3 TB/s, 4.6% of the encoder's floor in
profiles/roofline_model); the fused pass itself is 308 MB, ~72 us at that rate. Prediction,
not measured yet (pyssm/bench/layer_norm.py's stem row): 85-105 us, against 550-700 us for
torch eager's cast, norm, GELU and cast (28 B per element, 2.2 GB). The backward recomputes the
affine output and multiplies dy by the GELU's derivative there, and takes 4 elements a thread.
Tiles: whole rows, ~8 elements per thread; registers per variant from bench/triton_compile.py
(Triton's own ptxas for sm_80 / sm_90, no GPU needed): forward 40-56, backward 64-128, no
spills at N 96 to 4096.

On CPU tensors the kernels run in Triton's interpreter (pyssm/ops/_triton.py).
"""

from __future__ import annotations

import torch

from pyssm.ops._triton import (available, check_device, gelu, gelu_grad, jit,  # noqa: F401
                               reduction_programs, rounded, tl, triton)


@jit
def _fwd(X, R, W, B, Y, S, MEAN, RSTD, M, N, sx, sr, sy, ss, eps,
         HAS_R: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
         STORE_S: tl.constexpr, GELU: tl.constexpr, BLOCK_M: tl.constexpr,
         BLOCK_N: tl.constexpr, BY_BITS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    s = tl.load(X + r64 * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_R:
        s += tl.load(R + r64 * sr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if STORE_S:
        tl.store(S + r64 * ss + cols[None, :], rounded(s, S.dtype.element_ty, BY_BITS),
                 mask=mask)
    mean = tl.sum(s, axis=1) / N
    d = tl.where(mask, s - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(d * d, axis=1) / N + eps)
    y = d * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if GELU:
        y = gelu(y)
    tl.store(Y + r64 * sy + cols[None, :], rounded(y, Y.dtype.element_ty, BY_BITS), mask=mask)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@jit
def _bwd(X, R, W, B, DY, DS, MEAN, RSTD, DX, DR, DW, DB, M, N, rows_per_program,
         sx, sr, sdy, sds, sdx, sdr,
         HAS_R: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_DS: tl.constexpr,
         STORE_DR: tl.constexpr, GELU: tl.constexpr, BLOCK_M: tl.constexpr,
         BLOCK_N: tl.constexpr, BY_BITS: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if GELU and HAS_B:
        b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)  # (a 2-d accumulator summed once at the end
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)  # took 142 registers at N 96 instead of 80)
    first = pid * rows_per_program
    end = tl.minimum(first + rows_per_program, M)
    for start in range(first, end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        rmask = rows < end
        mask = rmask[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)[:, None]
        s = tl.load(X + r64 * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_R:
            s += tl.load(R + r64 * sr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(DY + r64 * sdy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if GELU:  # through the GELU first, at the affine output recomputed
            pre = xhat
            if HAS_W:
                pre = pre * w[None, :]
            if HAS_B:
                pre = pre + b[None, :]
            dy = tl.where(mask, dy * gelu_grad(pre), 0.0)
        wdy = dy
        if HAS_W:
            wdy = dy * w[None, :]
        c1 = tl.sum(xhat * wdy, axis=1) / N
        c2 = tl.sum(wdy, axis=1) / N
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(DS + r64 * sds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + r64 * sdx + cols[None, :], rounded(dx, DX.dtype.element_ty, BY_BITS),
                 mask=mask)
        if STORE_DR:
            tl.store(DR + r64 * sdr + cols[None, :], rounded(dx, DR.dtype.element_ty, BY_BITS),
                     mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(DW + pid * N + cols, dw, mask=cmask)
    tl.store(DB + pid * N + cols, db, mask=cmask)


def _tiles(N: int, gelu_backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): whole rows, about 8 elements per thread. More per thread
    raised the backward past 200 registers at N 96 (ptxas, sm_90, Triton 3.8); at 8 the
    forward takes 40-48 and the backward 70-80 for N 96 to 1000, 128 at 4096 and 8192 (no
    spills). Rows wider than 8192 hold 16 or more per thread and spill in the backward. The
    backward through the GELU holds the affine output and its derivative too: at 8 per thread
    its float32 variant spilled 8 B on sm_80 at N 48 and 64, so it takes 4."""
    block_n = triton.next_power_of_2(N)
    block_m = max(1, (512 if gelu_backward else 1024) // block_n)
    warps = min(16, max(4, block_m * block_n // 256))
    return block_m, block_n, warps


def forward(x2, r2, weight, bias, eps: float, out_dtype: torch.dtype, s_dtype,
            gelu: bool = False):
    """x2, r2: (M, N) with unit stride along N. Returns y (GELU'd when ``gelu``), s (or an
    empty tensor), mean, rstd."""
    M, N = x2.shape
    check_device(x2.device, "layer_norm")
    y = torch.empty((M, N), dtype=out_dtype, device=x2.device)
    s = torch.empty((M, N) if s_dtype is not None else (0,), dtype=s_dtype or x2.dtype,
                    device=x2.device)
    mean = torch.empty(M, dtype=torch.float32, device=x2.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x2.device)
    if M == 0:
        return y, s, mean, rstd
    block_m, block_n, warps = _tiles(N)
    dummy = x2
    _fwd[(triton.cdiv(M, block_m),)](
        x2, r2 if r2 is not None else dummy, weight if weight is not None else dummy,
        bias if bias is not None else dummy, y, s if s_dtype is not None else dummy, mean, rstd,
        M, N, x2.stride(0), r2.stride(0) if r2 is not None else 0, y.stride(0),
        s.stride(0) if s_dtype is not None else 0, eps,
        HAS_R=r2 is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        STORE_S=s_dtype is not None, GELU=gelu, BLOCK_M=block_m, BLOCK_N=block_n,
        BY_BITS=x2.device.type == "cpu", num_warps=warps)
    return y, s, mean, rstd


def backward(dy2, ds2, x2, r2, weight, bias, mean, rstd, dx_dtype, dr_dtype, gelu: bool = False):
    """Gradients (dx, dr or None, dw (N,) float32, db (N,) float32) of a forward that normalised
    x2 + r2 (r2 None: x2 alone, which may be the forward's float32 sum itself), then applied the
    GELU when ``gelu`` (the bias is read only then). dx in dx_dtype; dr, the same values, in
    dr_dtype (None: no residual, so no dr)."""
    M, N = x2.shape
    check_device(x2.device, "layer_norm")
    dx = torch.empty((M, N), dtype=dx_dtype, device=x2.device)
    store_dr = dr_dtype is not None and dr_dtype != dx_dtype
    dr = torch.empty((M, N), dtype=dr_dtype, device=x2.device) if store_dr else None
    block_m, block_n, warps = _tiles(N, gelu)
    programs = reduction_programs(x2.device, triton.cdiv(M, block_m)) if M else 1
    rows_per_program = triton.cdiv(triton.cdiv(max(M, 1), programs), block_m) * block_m
    programs = triton.cdiv(max(M, 1), rows_per_program)
    dw = torch.empty((programs, N), dtype=torch.float32, device=x2.device)
    db = torch.empty((programs, N), dtype=torch.float32, device=x2.device)
    dummy = x2
    _bwd[(programs,)](
        x2, r2 if r2 is not None else dummy, weight if weight is not None else dummy,
        bias if bias is not None and gelu else dummy, dy2, ds2 if ds2 is not None else dummy, mean, rstd, dx, dr if store_dr else dummy, dw, db,
        M, N, rows_per_program, x2.stride(0), r2.stride(0) if r2 is not None else 0,
        dy2.stride(0), ds2.stride(0) if ds2 is not None else 0, dx.stride(0),
        dr.stride(0) if store_dr else 0,
        HAS_R=r2 is not None, HAS_W=weight is not None, HAS_B=bias is not None and gelu,
        HAS_DS=ds2 is not None, STORE_DR=store_dr, GELU=gelu, BLOCK_M=block_m, BLOCK_N=block_n,
        BY_BITS=x2.device.type == "cpu", num_warps=warps)
    if dr_dtype is not None and not store_dr:
        dr = dx
    return dx, dr, dw.sum(0), db.sum(0)
