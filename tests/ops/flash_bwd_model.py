"""A float64 NumPy model of the CUDA flash-attention backward (csrc/attention/flash_bwd_kernel.cuh),
tile for tile: the same tile sizes, loop order, masks, causal skip, packed-sequence offsets,
grouped-query mapping and Delta / lse arithmetic, in float64 and without the warp-level split
(which only changes the order of sums). test_attention.py checks it against autograd through
the float64 reference, so the kernel's algorithm is checked without a GPU.

Kernels, in launch order:
  1. preprocess: Delta[row] = sum_d dO * O - dlse[row]  (per query row and head, fp32 on the GPU)
  2. main, one block per (key tile n0, kv head hk, sequence b): dK, dV of the tile's keys in
     registers; for each q head h of hk's group and each query tile m0 that can see the tile:
       P^T  = visible ? exp2(S^T * scale * log2(e) - lse * log2(e)) : 0,   S^T = K Q^T
       dV  += P^T dO;   dP^T = V dO^T;   dS^T = P^T * (dP^T - Delta)
       dK  += dS^T Q;   dQ_accum[rows of m0] += dS K       (atomicAdd, fp32)
     then dK * scale and dV are written once.
  3. convert: dQ = dQ_accum * scale in the input dtype.
"""

from __future__ import annotations

import math

import numpy as np

LOG2E = 1.4426950408889634
BLOCK_N = 64  # keys per block (flash_bwd_kernel.cuh: kBlockN)


def block_m(head_dim: int) -> int:
    """Query rows per tile (flash_bwd_kernel.cuh: BwdTraits::kBlockM)."""
    return 64 if head_dim <= 32 else 32


def pad_dim(head_dim: int) -> int:
    """The Q K^T and dO V^T reduction length: head_dim rounded up to 16 (72 -> 80)."""
    return (head_dim + 15) // 16 * 16


def flash_backward_model(q, k, v, out, dout, lse, dlse=None, *, causal=False, softmax_scale=None,
                         cu_seqlens=None, max_seqlen=None, block_m_=None, block_n=BLOCK_N):
    """Arrays as the op takes them (float64 NumPy): q, out, dout (B, Sq, H, d) or packed (T, H, d);
    k, v (B, Sk, Hk, d) or (T, Hk, d); lse, dlse (B, H, Sq) or (H, T). Returns dq, dk, dv."""
    varlen = cu_seqlens is not None
    d = q.shape[-1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    scale_log2 = scale * LOG2E
    bm = block_m_ or block_m(d)
    dp_ = pad_dim(d)
    # the kernels see flat (tokens, heads, d) tensors
    if varlen:
        cu = [int(x) for x in cu_seqlens]
        batch = len(cu) - 1
        seqlen_q = seqlen_k = max_seqlen if max_seqlen is not None else max(
            [b - a for a, b in zip(cu[:-1], cu[1:])], default=0)
        qf, kf, vf, of, dof = q, k, v, out, dout
        total_q = q.shape[0]
    else:
        batch, seqlen_q = q.shape[0], q.shape[1]
        seqlen_k = k.shape[1]
        qf, of, dof = (t.reshape(-1, *t.shape[2:]) for t in (q, out, dout))
        kf, vf = (t.reshape(-1, *t.shape[2:]) for t in (k, v))
        total_q = batch * seqlen_q
    heads, heads_k = qf.shape[1], kf.shape[1]
    group = heads // heads_k
    lse_flat = lse.reshape(-1)
    dlse_flat = None if dlse is None else dlse.reshape(-1)

    def stat_index(b, h, start, i):  # lse / Delta: (B, H, Sq) dense, (H, T) packed
        return h * total_q + start + i if varlen else (b * heads + h) * seqlen_q + i

    # 1. preprocess
    delta = np.zeros(lse_flat.shape)
    for token in range(total_q):
        for h in range(heads):
            if varlen:
                idx = h * total_q + token
            else:
                idx = ((token // seqlen_q) * heads + h) * seqlen_q + token % seqlen_q
            delta[idx] = np.dot(dof[token, h], of[token, h])
            if dlse_flat is not None:
                delta[idx] -= dlse_flat[idx]

    # 2. main
    dq_accum = np.zeros(qf.shape)
    dkf, dvf = np.zeros(kf.shape), np.zeros(vf.shape)

    def tile(src, start, length, first, rows, head):  # rows x pad_dim, zero past length / d
        t = np.zeros((rows, dp_))
        n = max(0, min(rows, length - first))
        t[:n, :d] = src[start + first:start + first + n, head]
        return t

    for b in range(batch):
        q_start = cu[b] if varlen else b * seqlen_q
        k_start = cu[b] if varlen else b * seqlen_k
        Sq = cu[b + 1] - cu[b] if varlen else seqlen_q
        Sk = Sq if varlen else seqlen_k
        for hk in range(heads_k):
            for n0 in range(0, seqlen_k, block_n):  # grid.x covers seqlen_k (max_seqlen packed)
                if n0 >= Sk:
                    continue  # the block returns at once
                K = tile(kf, k_start, Sk, n0, block_n, hk)
                V = tile(vf, k_start, Sk, n0, block_n, hk)
                dK = np.zeros((block_n, d))
                dV = np.zeros((block_n, d))
                keys = n0 + np.arange(block_n)[:, None]
                # causal: query i sees key j when j <= i + Sk - Sq; the first query that sees
                # key n0, rounded down to a tile
                m_begin = 0
                if causal:
                    m_begin = max(0, n0 - (Sk - Sq)) // bm * bm
                for h in range(hk * group, (hk + 1) * group):
                    for m0 in range(m_begin, Sq, bm):
                        Q = tile(qf, q_start, Sq, m0, bm, h)
                        dO = tile(dof, q_start, Sq, m0, bm, h)
                        rows = m0 + np.arange(bm)
                        valid = rows < Sq
                        lse2 = np.array([lse_flat[stat_index(b, h, q_start, i)] * LOG2E
                                         if ok else 0.0 for i, ok in zip(rows, valid)])
                        dlt = np.array([delta[stat_index(b, h, q_start, i)] if ok else 0.0
                                        for i, ok in zip(rows, valid)])
                        ST = K @ Q.T  # (keys, queries), reduction over the padded d
                        visible = (keys < Sk) & valid[None, :]
                        if causal:
                            visible &= keys <= rows[None, :] + Sk - Sq
                        with np.errstate(invalid="ignore", over="ignore"):
                            PT = np.where(visible, np.exp2(ST * scale_log2 - lse2[None, :]), 0.0)
                        dV += PT @ dO[:, :d]
                        dPT = V @ dO.T
                        dST = PT * (dPT - dlt[None, :])
                        dK += dST @ Q[:, :d]
                        dQ = dST.T @ K[:, :d]  # (queries, d): atomicAdd, valid rows only
                        n = int(valid.sum())
                        dq_accum[q_start + m0:q_start + m0 + n, h] += dQ[:n]
                nk = min(block_n, Sk - n0)
                dkf[k_start + n0:k_start + n0 + nk, hk] = dK[:nk] * scale
                dvf[k_start + n0:k_start + n0 + nk, hk] = dV[:nk]

    # 3. convert
    dqf = dq_accum * scale
    if varlen:
        return dqf, dkf, dvf
    return dqf.reshape(q.shape), dkf.reshape(k.shape), dvf.reshape(v.shape)
