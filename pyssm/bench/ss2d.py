"""ss2d cost versus resolution: pyssm's fused kernel against the same computation from pyssm's
unfused pieces (cross_scan, selective_scan, cross_merge and two einsums) and the pure-PyTorch
reference; forward, backward and both.

GPU (bf16 x, fp32 weights as a module holds them): the stage-1 SS2D core of VMamba-T s1l8
(D = 96, dt_rank 6), S s2l15 (D 192, 6) and B s2l15 (D 256, 8), d_state 1, image R px -> an
R/4 x R/4 grid, batch 64 / 12 / 3 at 224 / 512 / 1024 (ANCHORS.md "Official SS2D pieces"),
with the official VMamba-T module's times beside; and VMamba-T's stages 3 (D 384, dt_rank 24,
an R/16 grid) and 4 (D 768, dt_rank 48, R/32), where the backward's v3 forms dt_projs_weight's
gradient by GEMMs (dt_rank over 16), beside v1 (224 px only under --quick).
CPU (float32): a small sweep, D = 32, N = 1, R = 2, grids 8 / 16 / 32, batch 2.
"""

from __future__ import annotations

import math
import os

import torch

from pyssm.bench import harness
from pyssm.bench.results import ANCHOR_LABEL
from pyssm import ops

# ANCHORS.md: official VMamba-T s1l8 SS2D module (stage-1 block's op), bf16 autocast, H200.
ANCHOR_MS = {224: {"forward": 2.418, "full": 7.136},
             512: {"forward": 2.156, "full": 6.468},
             1024: {"forward": 2.212, "full": 6.765}}
NOTES = [
    "GB/s: x read + y written once, in x's dtype, over the median time (the op's minimum traffic).",
    f"anchor {ANCHOR_LABEL}: the official VMamba-T s1l8 SS2D module, which also runs "
    "in_proj, the depthwise conv, SiLU, out_norm and out_proj around this op, so it is not the "
    "same op: vs anchor = anchor ms / measured ms overstates what the op saves in the module.",
    "The reference is a Python loop over L = H*W (slow by design, timed with few repeats).",
]


def ss2d_inputs(batch, grid, dim, dstate, rank, dtype, device):
    """x (B, H, W, D) in ``dtype`` and the five weights in float32, VMamba-style init."""
    def f32(*shape):
        return torch.randn(*shape, device=device)
    dt = torch.exp(torch.empty(4, dim, device=device).uniform_(math.log(1e-3), math.log(1e-1)))
    return (torch.randn(batch, grid, grid, dim, device=device, dtype=dtype),
            f32(4, rank + 2 * dstate, dim) * dim ** -0.5,              # x_proj_weight
            f32(4, dim, rank) * rank ** -0.5,                          # dt_projs_weight
            dt + torch.log(-torch.expm1(-dt)),                         # dt_projs_bias
            torch.log(torch.arange(1, dstate + 1, device=device, dtype=torch.float32)
                      ).repeat(4 * dim, 1),                            # A_logs
            torch.ones(4 * dim, device=device))                        # Ds


def ss2d_from_pieces(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, *, backend):
    """The same computation from pyssm's unfused ops, as official VMamba's forward_corev2 runs
    it: cross_scan (four copies of x), the x_proj and dt projections as einsums (a (B, 4D, L)
    delta), selective_scan (fp32 out), cross_merge. What the fused op saves is the difference."""
    B, H, W, D = x.shape
    R, N, L = dt_projs_weight.shape[2], A_logs.shape[1], H * W
    xs = ops.cross_scan(x.permute(0, 3, 1, 2).contiguous(), backend=backend)   # (B, 4, D, L)
    z = torch.einsum("bkdl,kcd->bkcl", xs, x_proj_weight.to(xs.dtype))
    dts, Bs, Cs = torch.split(z, [R, N, N], dim=2)
    delta = torch.einsum("bkrl,kdr->bkdl", dts, dt_projs_weight.to(xs.dtype))
    ys = ops.selective_scan(xs.reshape(B, 4 * D, L), delta.reshape(B, 4 * D, L),
                            -torch.exp(A_logs), Bs.contiguous(), Cs.contiguous(), Ds,
                            dt_projs_bias.reshape(-1), delta_softplus=True, out_float32=True,
                            backend=backend)
    y = ops.cross_merge(ys.reshape(B, 4, D, H, W), backend=backend)            # (B, D, L)
    return y.reshape(B, D, H, W).permute(0, 2, 3, 1).to(x.dtype)


def cases(device: torch.device, quick: bool = False) -> list[harness.Case]:
    kernel = device.type
    ours = harness.pyssm_provider("ss2d", kernel, lambda *a: ops.ss2d(*a, backend=kernel))
    pieces = harness.pyssm_provider(
        "selective_scan", kernel, lambda *a: ss2d_from_pieces(*a, backend=kernel))
    pieces = harness.Provider(f"pyssm-{kernel}-unfused", pieces.fn, pieces.status)
    # the fused kernels with each scan in one chunk (one pass, fewer blocks) instead of the
    # chunks that give ~2 blocks of 8 warps per SM (two passes where the batch alone does not):
    # which side of that trade wins is for the GPU to say. In the backward the forward then
    # keeps its tile states at every batch and the main kernel runs alone from them, over the
    # few blocks of one chunk a scan. (csrc/ss2d/ss2d_cuda.cpp reads PYSSM_SS2D_BLOCKS_PER_SM
    # at every call.)
    one_chunk = harness.Provider(f"pyssm-{kernel}-1chunk", ours.fn, ours.status,
                                 modes=("forward", "backward"),
                                 env={"PYSSM_SS2D_BLOCKS_PER_SM": "0"})
    # the general forward (v2: a thread per channel walks each chunk, ~16 blocks per SM, two
    # passes) beside the d_state-1 one (v3) that `ours` runs at these shapes
    v2 = harness.Provider(f"pyssm-{kernel}-fwd-v2", ours.fn, ours.status, modes=("forward",),
                          env={"PYSSM_SS2D_FWD": "v2"})
    # the backward's v1 kernels (a thread per channel walks each chunk) beside v3's (the
    # default at d_state 1)
    bwd_v1 = harness.Provider(f"pyssm-{kernel}-bwd-v1", ours.fn, ours.status,
                              modes=("backward", "full"), env={"PYSSM_SS2D_BWD": "v1"})
    # training without the forward's tile states (PYSSM_SS2D_STATES=0): the backward's
    # summary pass and carries over v1's chunking, as before the states, where `ours` keeps
    # them (batches whose blocks fill the GPU in one chunk a scan: 224 px x 64 here)
    no_states = harness.Provider(f"pyssm-{kernel}-no-states", ours.fn, ours.status,
                                 modes=("backward", "full"), env={"PYSSM_SS2D_STATES": "0"})
    # v3's main kernel after v1's summary pass: which half of the change did what
    bwd_v1_summary = harness.Provider(f"pyssm-{kernel}-bwd-v1-summary", ours.fn, ours.status,
                                      modes=("backward",), env={"PYSSM_SS2D_BWD": "v1-summary"})
    # v3's variant for dt_rank over 16 (dt_projs_weight in shared memory, dpre out and two
    # GEMMs) at the stage-1 ranks too, where the register variant runs by default (and spills)
    bwd_wide = harness.Provider(f"pyssm-{kernel}-bwd-v3-wide", ours.fn, ours.status,
                                modes=("backward",), env={"PYSSM_SS2D_BWD": "v3-wide"})
    if os.environ.get("PYSSM_SS2D_BWD") == "v1":
        # v3's backward is off (the device check sets this when its smoke failed): the rows
        # that would run its kernels anyway stay off, so that a fault cannot end the run
        off = "skipped: PYSSM_SS2D_BWD=v1 is set (v3's backward off)"
        bwd_v1_summary, bwd_wide, no_states = (harness.Provider(p.name, None, off, modes=p.modes)
                                               for p in (bwd_v1_summary, bwd_wide, no_states))
    # x_proj as before the tensor-core kernel: x cast to float32, then an fp32 GEMM (forward
    # and the backward's recomputation)
    xproj_gemm = harness.Provider(f"pyssm-{kernel}-xproj-gemm", ours.fn, ours.status,
                                  modes=("forward", "full"), env={"PYSSM_SS2D_XPROJ": "gemm"})
    reference = harness.Provider("reference", lambda *a: ops.ss2d(*a, backend="reference"))
    # on a GPU the reference's Python loop launches ~10 kernels per pixel: time it at 224 px
    # and VMamba-T's stage 1 only, where it finishes in seconds
    too_slow = harness.Provider("reference", None,
                                "skipped on a GPU above 224 px, for S / B and for the later "
                                "stages (slow)")
    if device.type == "cuda":
        dstate, dtype = 1, torch.bfloat16
        # (model, stage, d_inner, dt_rank): stage 1 of VMamba-T s1l8 (d_inner 96), S s2l15
        # (192) and B s2l15 (256), then T's stages 3 and 4; dt_rank ceil(d_model / 16); the
        # reference only for T's stage 1
        models = [("T", 1, 96, 6), ("S", 1, 192, 6), ("B", 1, 256, 8),
                  ("T", 3, 384, 24), ("T", 4, 768, 48)]
        sizes = [(224, 64), (512, 12), (1024, 3)][: 1 if quick else 3]
    else:
        dstate, dtype = 1, torch.float32
        models = [("T", 1, 32, 2)]
        sizes = [(32, 2), (64, 2), (128, 2)][: 2 if quick else 3]
    out = []
    for (model, stage, dim, rank), (res, batch) in ((m, sz) for m in models for sz in sizes):
        grid = res // (4 * 2 ** (stage - 1))
        first = stage == 1
        anchors = (ANCHOR_MS.get(res, {}) if device.type == "cuda" and model == "T" and first
                   else {})
        slow = device.type == "cuda" and (res > 224 or model != "T" or not first)
        xy_bytes = 2 * batch * grid * grid * dim * dtype.itemsize
        if device.type != "cuda":
            variants = []
        elif first:
            variants = [one_chunk, v2, xproj_gemm, no_states, bwd_v1, bwd_v1_summary,
                        bwd_wide]
        else:  # the later stages: the backward's v3 (dpre and two GEMMs) against v1
            variants = [no_states, bwd_v1]
        out.append(harness.Case(
            op="ss2d", size={"model": model, "stage": stage, "res": res,
                             "grid": f"{grid}x{grid}", "batch": batch, "D": dim,
                             "d_state": dstate, "dt_rank": rank},
            make_inputs=lambda b=batch, g=grid, d=dim, r=rank: ss2d_inputs(b, g, d, dstate, r,
                                                                           dtype, device),
            providers=[ours] + variants + [pieces, too_slow if slow else reference],
            modes=("forward", "backward", "full"),
            dtype=str(dtype).removeprefix("torch."),
            bytes={"forward": xy_bytes},
            extra=lambda provider, mode, a=anchors: {"anchor_ms": a.get(mode)}))
    return out
