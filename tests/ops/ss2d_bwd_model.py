"""A float64 NumPy model of the fused CUDA ss2d backward (csrc/ss2d/ss2d_bwd_kernel.cuh), tile
for tile: the same chunks, tiles, carries, recurrences and reduction points, vectorised over
the channels (which only changes the order of the sums the kernel makes with atomics or in
shared memory). test_ss2d.py checks it against autograd through the float64 reference, so the
kernel's algorithm is checked without a GPU.

Per direction k, channel d, state n, the forward is (pixel order of direction k, DESIGN.md):
    dt_l = softplus(bias + w . zdt_l),  a_l = exp(dt_l A),  h_l = a_l h_{l-1} + dt_l u_l B_l,
    y_l += C_l . h_l + Ds u_l
and the adjoint g_l = dL/dh_l = dy_l C_l + a_{l+1} g_{l+1}.

Kernels, in launch order:
  1. summary, one block per (channel group, chunk, batch x direction): walks its chunk forward
     from a zero state; records the state entering each tile (from zero) and the sum of dt before
     it; ends with the chunk's decay exp(A sum dt), its end state from zero and its adjoint
     summary sum_l (prod_{m <= l} a_m) dy_l C_l (the a_s g_s the chunk hands to its left
     neighbour when nothing comes from its right).
  2. carry, one thread per (batch, direction, channel, state): the state entering each chunk
     (left to right) and the adjoint a_e g_e entering each chunk from its right (right to left).
  3. main, blocks as in 1: tiles from the chunk's last to its first; per tile the state entering
     it (tile state from zero + exp(A dtprefix) x chunk state), the forward recomputed inside
     the tile (dt and h kept in shared memory), dC reduced over the channels, then the positions
     backwards: du (added into dx, all four directions: atomics), dA / dDs / dbias in registers,
     dB terms and dpre written over h and dt in shared memory, reduced over the channels after
     the walk into dz (dt part: dpre times dt_projs_weight), and the dt_projs_weight gradient of
     the tile added into the thread's own slot of a (B, 4, chunks, D, R) scratch.
After the kernels: dx += dz @ x_proj_weight, dx_proj_weight = dz^T x, and the per-chunk partials
are summed over batch and chunks.
"""

from __future__ import annotations

import numpy as np


def pixel(k: int, l: int, H: int, W: int) -> int:
    """The row-major pixel direction k visits at scan position l (DESIGN.md)."""
    if k >= 2:
        l = H * W - 1 - l
    if k % 2 == 0:
        return l
    return (l % H) * W + l // H


def softplus(x):
    return np.maximum(x, 0.0) + np.log1p(np.exp(-np.abs(x)))


def tile_positions(dstate: int) -> int:
    """Positions per tile of the backward (ss2d.cuh: ss2d_bwd_tile): h of every position of a
    tile and channel lives in shared memory, so larger states take shorter tiles."""
    kmax = 1 if dstate == 1 else 4 if dstate <= 4 else 8 if dstate <= 8 else 16
    return {1: 16, 4: 16, 8: 8, 16: 4}[kmax]


def chunking(length: int, chunks: int, tile: int) -> tuple[int, int]:
    """(chunk_len, chunks): chunk_len a whole number of tiles (ss2d_cuda.cpp)."""
    per = -(-length // chunks)
    chunk_len = -(-per // tile) * tile
    return chunk_len, -(-length // chunk_len)


def ss2d_backward_model(dout, x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                        *, chunks=1, tile=None):
    """Channels-last float64 arrays as the op takes them; returns the six gradients."""
    B, H, W, D = x.shape
    L = H * W
    R = dt_projs_weight.shape[2]
    N = A_logs.shape[1]
    zw = R + 2 * N
    T = tile or tile_positions(N)
    clen, chunks = chunking(L, chunks, T)
    tpc = clen // T  # tiles per chunk

    xf = x.reshape(B, L, D)
    dyf = dout.reshape(B, L, D)
    z = (xf.reshape(B * L, D) @ x_proj_weight.reshape(4 * zw, D).T).reshape(B, L, 4, zw)
    A = -np.exp(A_logs).reshape(4, D, N)

    def tile_range(c, t):
        lo = c * clen + t * T
        return lo, min(lo + T, L, (c + 1) * clen)

    def position(b, k, l):
        pix = pixel(k, l, H, W)
        zj = z[b, pix, k]
        pre = dt_projs_bias[k] + dt_projs_weight[k] @ zj[:R]  # (D,)
        return pix, zj, softplus(pre), xf[b, pix], dyf[b, pix]

    # 1. summary
    shape = (B, 4, chunks, D, N)
    decay, fwd_local, adj_local = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    tile_h0 = np.zeros((B, 4, chunks, tpc, D, N))
    tile_dt = np.zeros((B, 4, chunks, tpc, D))
    for b in range(B):
        for k in range(4):
            for c in range(chunks):
                h = np.zeros((D, N))
                P = np.ones((D, N))
                adj = np.zeros((D, N))
                dtacc = np.zeros(D)
                for t in range(tpc):
                    lo, hi = tile_range(c, t)
                    if lo >= hi:
                        break
                    tile_h0[b, k, c, t] = h
                    tile_dt[b, k, c, t] = dtacc
                    for l in range(lo, hi):
                        _, zj, dt, u, dy = position(b, k, l)
                        a = np.exp(dt[:, None] * A[k])
                        h = a * h + (dt * u)[:, None] * zj[R:R + N]
                        P = P * a
                        adj = adj + P * dy[:, None] * zj[R + N:]
                        dtacc = dtacc + dt
                decay[b, k, c] = np.exp(A[k] * dtacc[:, None])
                fwd_local[b, k, c] = h
                adj_local[b, k, c] = adj

    # 2. carry
    h_in = np.zeros(shape)
    q_in = np.zeros(shape)
    for c in range(1, chunks):
        h_in[:, :, c] = decay[:, :, c - 1] * h_in[:, :, c - 1] + fwd_local[:, :, c - 1]
    for c in range(chunks - 2, -1, -1):
        q_in[:, :, c] = adj_local[:, :, c + 1] + decay[:, :, c + 1] * q_in[:, :, c + 1]

    # 3. main
    dx = np.zeros((B, L, D))
    dz = np.zeros((B, L, 4, zw))
    dtw_part = np.zeros((B, 4, chunks, D, R))
    dA_part, dD_part, dbias_part = np.zeros(shape), np.zeros((B, 4, chunks, D)), np.zeros(
        (B, 4, chunks, D))
    for b in range(B):
        for k in range(4):
            w = dt_projs_weight[k]
            for c in range(chunks):
                carry = q_in[b, k, c].copy()  # a_{j+1} g_{j+1} for the position being walked
                dA = np.zeros((D, N))
                dD = np.zeros(D)
                dbias = np.zeros(D)
                for t in range(tpc - 1, -1, -1):
                    lo, hi = tile_range(c, t)
                    if lo >= hi:
                        continue
                    hin = tile_h0[b, k, c, t] + np.exp(A[k] * tile_dt[b, k, c, t][:, None]) * \
                        h_in[b, k, c]
                    # forward inside the tile
                    pos = [position(b, k, l) for l in range(lo, hi)]
                    hs, h = [], hin
                    for (_, zj, dt, u, _) in pos:
                        h = np.exp(dt[:, None] * A[k]) * h + (dt * u)[:, None] * zj[R:R + N]
                        hs.append(h)
                    for j, (pix, _, _, _, dy) in enumerate(pos):
                        dz[b, pix, k, R + N:] += dy @ hs[j]  # dC: sum over channels
                    # backward inside the tile
                    dB_terms, dpres = [None] * len(pos), [None] * len(pos)
                    for j in range(len(pos) - 1, -1, -1):
                        pix, zj, dt, u, dy = pos[j]
                        Bj, Cj = zj[R:R + N], zj[R + N:]
                        g = dy[:, None] * Cj + carry
                        hprev = hs[j - 1] if j > 0 else hin
                        a = np.exp(dt[:, None] * A[k])
                        dx[b, pix] += Ds[k * D:(k + 1) * D] * dy + (g * Bj).sum(1) * dt
                        ddt = (g * (A[k] * a * hprev + Bj * u[:, None])).sum(1)
                        dA += g * dt[:, None] * a * hprev
                        dD += dy * u
                        dpre = ddt * -np.expm1(-dt)  # softplus' = sigmoid(pre) = 1 - exp(-dt)
                        dbias += dpre
                        dB_terms[j] = g * (dt * u)[:, None]
                        dpres[j] = dpre
                        carry = a * g
                    for j, (pix, zj, _, _, _) in enumerate(pos):
                        dz[b, pix, k, R:R + N] += dB_terms[j].sum(0)
                        dz[b, pix, k, :R] += dpres[j] @ w
                        dtw_part[b, k, c] += np.outer(dpres[j], zj[:R])
                dA_part[b, k, c] = dA
                dD_part[b, k, c] = dD
                dbias_part[b, k, c] = dbias

    dzf = dz.reshape(B * L, 4 * zw)
    dx = dx.reshape(B * L, D) + dzf @ x_proj_weight.reshape(4 * zw, D)
    d_x_proj_weight = (dzf.T @ xf.reshape(B * L, D)).reshape(4, zw, D)
    d_dt_projs_weight = dtw_part.sum((0, 2))
    d_bias = dbias_part.sum((0, 2))
    d_A_logs = (dA_part.sum((0, 2)) * A).reshape(4 * D, N)
    d_Ds = dD_part.sum((0, 2)).reshape(4 * D)
    return (dx.reshape(B, H, W, D), d_x_proj_weight, d_dt_projs_weight, d_bias, d_A_logs, d_Ds)
