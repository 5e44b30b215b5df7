"""Float64 implementations of DESIGN.md's math written independently of pyssm: scan orders
from the index table, the scan as an explicit recurrence per channel with group g = c // D,
softmax attention row by row. Slow on purpose; use small sizes."""

from __future__ import annotations

import math

import torch


def scan_positions(H: int, W: int, k: int) -> list[int]:
    """pixel index h*W + w visited at each scan position l, for direction k."""
    order = [0] * (H * W)
    for h in range(H):
        for w in range(W):
            l = {0: h * W + w, 1: w * H + h, 2: (H - 1 - h) * W + (W - 1 - w),
                 3: (W - 1 - w) * H + (H - 1 - h)}[k]
            order[l] = h * W + w
    return order


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    B, C, H, W = x.shape
    flat = x.double().reshape(B, C, H * W)
    return torch.stack([flat[:, :, scan_positions(H, W, k)] for k in range(4)], dim=1)


def cross_merge(ys: torch.Tensor) -> torch.Tensor:
    B, K, C, H, W = ys.shape
    flat = ys.double().reshape(B, K, C, H * W)
    out = torch.zeros(B, C, H * W, dtype=torch.float64)
    for k in range(4):
        for l, pixel in enumerate(scan_positions(H, W, k)):
            out[:, :, pixel] += flat[:, k, :, l]
    return out


def selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """y, or with return_last_state (y, the state after the last position (batch, K*D, N))."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    # Differentiable (autograd through the loops): the tests take gradients of it too.
    batch, channels, L = u.shape
    groups, N = B.shape[1], A.shape[1]
    per_group = channels // groups
    columns, states = [], []
    for c in range(channels):
        g = c // per_group
        bias = delta_bias[c].double() if delta_bias is not None else 0.0
        skip = D[c].double() if D is not None else 0.0
        h = torch.zeros(batch, N, dtype=torch.float64)
        steps = []
        for l in range(L):
            pre = delta[:, c, l] + bias
            # threshold 30: log(1 + e^x) - x < 1e-13 beyond it, far below the tests' 1e-10
            dt = torch.nn.functional.softplus(pre, threshold=30.0) if delta_softplus else pre
            h = torch.exp(dt[:, None] * A[c][None, :]) * h + (dt * u[:, c, l])[:, None] * B[:, g, :, l]
            steps.append((C[:, g, :, l] * h).sum(-1) + skip * u[:, c, l])
        columns.append(torch.stack(steps, -1) if steps else u.new_zeros(batch, 0))
        states.append(h)
    y = torch.stack(columns, 1) if columns else u.new_zeros(batch, 0, L)
    if return_last_state:
        return y, torch.stack(states, 1) if states else u.new_zeros(batch, 0, N)
    return y


def ss2d(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, channels_first=False):
    x = x.double()
    x_bdhw = x if channels_first else x.permute(0, 3, 1, 2)
    B, D, H, W = x_bdhw.shape
    R, N = dt_projs_weight.shape[2], A_logs.shape[1]
    pixels = x_bdhw.reshape(B, D, H * W)
    y = 0
    for k in range(4):
        order = scan_positions(H, W, k)
        u = pixels[:, :, order]                                        # (B, D, L) scan order
        z = torch.einsum("cd,bdl->bcl", x_proj_weight[k].double(), u)  # per pixel projection
        dt, Bk, Ck = z[:, :R], z[:, R:R + N], z[:, R + N:]
        delta = torch.einsum("dr,brl->bdl", dt_projs_weight[k].double(), dt)
        yk = selective_scan(u, delta, -torch.exp(A_logs[k * D:(k + 1) * D].double()),
                            Bk[:, None], Ck[:, None], Ds[k * D:(k + 1) * D].double(),
                            dt_projs_bias[k].double(), delta_softplus=True)
        inverse = [0] * (H * W)
        for l, pixel in enumerate(order):
            inverse[pixel] = l
        y = y + yk[:, :, inverse]  # back to pixel order
    y = y.reshape(B, D, H, W)
    return y if channels_first else y.permute(0, 2, 3, 1)


def attention(q, k, v, causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0):
    """q (B, Sq, H, d), k, v (B, Sk, Hk, d) -> out (B, Sq, H, d), lse (B, H, Sq). Query i sees
    key j when j <= i + Sk - Sq (causal) and i + Sk - Sq - left <= j <= i + Sk - Sq + right
    for window_size (left, right), a side of -1 unbounded; softcap > 0: each score s is
    softcap * tanh(s / softcap)."""
    left, right = window_size
    q, k, v = q.double(), k.double(), v.double()
    B, Sq, H, d = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    out = torch.zeros(B, Sq, H, d, dtype=torch.float64)
    lse = torch.full((B, H, Sq), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            hk = h // (H // Hk)
            for i in range(Sq):
                diag = i + Sk - Sq
                keys = [j for j in range(Sk) if (not causal or j <= diag)
                        and (left < 0 or j >= diag - left) and (right < 0 or j <= diag + right)]
                if not keys:
                    continue
                s = torch.stack([(q[b, i, h] * k[b, j, hk]).sum() * scale for j in keys])
                if softcap:
                    s = softcap * torch.tanh(s / softcap)
                m = s.max()
                lse[b, h, i] = m + torch.log(torch.exp(s - m).sum())
                p = torch.exp(s - lse[b, h, i])
                out[b, i, h] = (p[:, None] * v[b, keys, hk]).sum(0)
    return out, lse
