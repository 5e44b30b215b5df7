"""pyssm's Triton kernels (layer_norm, depthwise_conv2d, linear_gelu, linear_residual_, mlp_gelu,
mlp_residual_, norm_mlp_residual, layer_norm_linear) once, on the GPU, before the rest of the
device check: they have run only in Triton's interpreter, and the encoder benchmarks take them
through the models' norms (VMamba's into its projections), VMamba's convolutions and the MLPs'
fc1 and fc2 (the whole MLP up to 256 wide, with its norm and residual add, and in training).
bench/device_check.sh runs this under a short limit and, where it fails, turns off for the later
steps what failed: all of them (PYSSM_TRITON=0: the models use torch's ops), linear_gelu
(PYSSM_LINEAR_GELU=0: the MLPs run fc1 and then the GELU), linear_residual_
(PYSSM_LINEAR_RESIDUAL=0: fc2 and then the residual add), mlp_gelu (PYSSM_MLP_GELU=0:
training MLPs run as their layers), mlp_residual_ or norm_mlp_residual (PYSSM_MLP_RESIDUAL=0:
MLPs up to 256 wide in the two passes, after their norms) or layer_norm_linear
(PYSSM_NORM_LINEAR=0: VMamba's norms, then their projections), so a Triton compile error or
fault costs one short step, not the encoder benchmarks.

    python bench/triton_smoke.py  # exit 0: ok or skipped (no GPU, no triton); otherwise a sum
                                  # of 1 (layer_norm or depthwise_conv2d failed), 2 (linear_gelu),
                                  # 4 (linear_residual_), 8 (mlp_gelu), 16 (mlp_residual_ or
                                  # norm_mlp_residual),
                                  # 32 (layer_norm_linear)
    PYSSM_TRITON_SMOKE_DEVICE=cpu TRITON_INTERPRET=1 python bench/triton_smoke.py  # a dry run
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

from pyssm.ops import layer_norm_triton
from pyssm.ops.depthwise_conv2d import depthwise_conv2d, depthwise_conv2d_reference
from pyssm.ops.layer_norm import layer_norm, layer_norm_reference
from pyssm.ops.layer_norm_linear import layer_norm_linear
from pyssm.ops.linear_gelu import linear_gelu
from pyssm.ops.linear_residual import linear_residual_
from pyssm.ops.mlp_gelu import mlp_gelu
from pyssm.ops.mlp_residual import mlp_residual_
from pyssm.ops.norm_mlp_residual import norm_mlp_residual


def _relative(pairs) -> float:
    """The largest error relative to each reference's largest value; inf for a NaN."""
    errs = [((a.double() - e).abs().max() / e.abs().max().clamp_min(1e-6)).item()
            for a, e in pairs]
    return max(err if err == err else float("inf") for err in errs)


BOUND = 2e-2  # bf16 outputs and x gradients: ~3 significant digits


def _run(part, device) -> float:
    """part's worst relative error; inf if it raised (a compile error or a fault)."""
    try:
        return part(device)
    except Exception as exc:  # noqa: BLE001 (reported, and the part counts as failed)
        print(f"{part.__name__.strip('_')}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        return float("inf")


def _check(label: str, device, got, want, leaves=()) -> float:
    """The worst relative error of the outputs ``got`` against their float64 ``want`` and, where
    ``leaves`` are given, of the gradients to them of both under one random cotangent each
    (``want`` computed from float64 copies of ``leaves``); printed under ``label``."""
    pairs = list(zip(got, want))
    if leaves:
        cots = [torch.randn_like(w) for w in want]
        pairs += zip(
            torch.autograd.grad(sum((g.double() * c).sum() for g, c in zip(got, cots)), leaves),
            torch.autograd.grad(sum((w * c).sum() for w, c in zip(want, cots)), leaves))
    if device == "cuda":
        torch.cuda.synchronize()
    err = _relative(pairs)
    print(f"{label}: max relative error {err:.2e}", flush=True)
    return err


def _norm_and_conv(device) -> float:
    worst = 0.0
    for rows, width in ((4099, 96), (257, 768), (33, 1000)):
        x = torch.randn(rows, width, device=device, dtype=torch.bfloat16, requires_grad=True)
        r = torch.randn(rows, width, device=device, requires_grad=True)
        w = (1 + 0.1 * torch.randn(width, device=device)).requires_grad_()
        b = (0.1 * torch.randn(width, device=device)).requires_grad_()
        got = layer_norm(x, w, b, 1e-6, residual=r, out_dtype=torch.bfloat16,
                         return_residual=True, backend="triton")
        want = layer_norm_reference(*(t.double() for t in (x, w, b)), 1e-6, residual=r.double(),
                                    return_residual=True)
        worst = max(worst, _check(f"layer_norm ({rows}, {width})", device, got, want,
                                  (x, r, w, b)))
    # VMamba's stem: the norm and GELU in one pass, bf16 in and out, no residual
    x = torch.randn(2053, 48, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(48, device=device)).requires_grad_()
    b = (0.1 * torch.randn(48, device=device)).requires_grad_()
    y = layer_norm(x, w, b, 1e-6, out_dtype=torch.bfloat16, activation="gelu", backend="triton")
    y64 = layer_norm_reference(*(t.double() for t in (x, w, b)), 1e-6, activation="gelu")
    worst = max(worst, _check("layer_norm + gelu (2053, 48)", device, [y], [y64], (x, w, b)))
    for shape in ((2, 17, 13, 96), (1, 9, 30, 192)):
        x = torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(shape[-1], 1, 3, 3, device=device) / 3).requires_grad_()
        b = (0.1 * torch.randn(shape[-1], device=device)).requires_grad_()
        y = depthwise_conv2d(x, w, b, activation="silu", backend="triton")
        y64 = depthwise_conv2d_reference(x.double(), w.double(), b.double(), activation="silu")
        worst = max(worst, _check(f"depthwise_conv2d {shape}", device, [y], [y64], (x, w, b)))
    return worst


def _linear_products(device, shapes):
    """(label, x, w, b, the float64 product of x and the bf16-rounded w, b) for (rows, k, n)."""
    for rows, k, n in shapes:
        x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=device) / k ** 0.5
        b = 0.1 * torch.randn(n, device=device)
        a64 = F.linear(x.double(), w.to(torch.bfloat16).double(), b.to(torch.bfloat16).double())
        yield f"({rows}, {k}) -> {n}", x, w, b, a64


def _linear_gelu(device) -> float:
    worst = 0.0  # VMamba-T s1's fc1, ViT-B's (inference: the encoders take no backward)
    for label, x, w, b, a64 in _linear_products(device, ((4099, 96, 384), (300, 768, 3072))):
        y = linear_gelu(x, w, b, backend="triton")
        worst = max(worst, _check(f"linear_gelu {label}", device, [y], [F.gelu(a64)]))
    return worst


def _linear_residual(device) -> float:
    worst = 0.0  # VMamba-T s1's fc2, ViT-B's, into a float32 sum
    for label, h, w, b, a64 in _linear_products(device, ((4099, 384, 96), (300, 3072, 768))):
        s = torch.randn(a64.shape, device=device)
        s64 = s.double() + a64
        with torch.no_grad():
            linear_residual_(s, h, w, b, backend="triton")
        worst = max(worst, _check(f"linear_residual_ {label}", device, [s], [s64]))
    return worst


def _mlp_gelu(device) -> float:
    worst = 0.0  # the whole MLP with its backward (training): VMamba-T s1's, ViT-B's
    for rows, width, hidden in ((4099, 96, 384), (300, 768, 3072)):
        x = torch.randn(rows, width, device=device, dtype=torch.bfloat16, requires_grad=True)
        w1 = (torch.randn(hidden, width, device=device) / width ** 0.5).requires_grad_()
        b1 = (0.1 * torch.randn(hidden, device=device)).requires_grad_()
        w2 = (torch.randn(width, hidden, device=device) / hidden ** 0.5).requires_grad_()
        b2 = (0.1 * torch.randn(width, device=device)).requires_grad_()
        y = mlp_gelu(x, w1, b1, w2, b2, backend="triton")
        y64 = F.linear(F.gelu(F.linear(x.double(), w1.double(), b1.double())), w2.double(),
                       b2.double())
        worst = max(worst, _check(f"mlp_gelu ({rows}, {width}) -> {hidden}", device, [y], [y64],
                                  (x, w1, b1, w2, b2)))
    return worst


def _mlp_residual(device) -> float:
    worst = 0.0  # the whole MLP added into a float32 sum (inference): VMamba-T s1's and s2's
    for rows, width, hidden in ((4099, 96, 384), (1001, 192, 768)):
        x = torch.randn(rows, width, device=device, dtype=torch.bfloat16)
        w1 = torch.randn(hidden, width, device=device) / width ** 0.5
        b1 = 0.1 * torch.randn(hidden, device=device)
        w2 = torch.randn(width, hidden, device=device) / hidden ** 0.5
        b2 = 0.1 * torch.randn(width, device=device)
        s = torch.randn(rows, width, device=device)
        bf = [t.to(torch.bfloat16).double() for t in (w1, b1, w2, b2)]
        s64 = s.double() + F.linear(F.gelu(F.linear(x.double(), bf[0], bf[1])), bf[2], bf[3])
        with torch.no_grad():
            mlp_residual_(s, x, w1, b1, w2, b2, backend="triton")
        worst = max(worst, _check(f"mlp_residual_ ({rows}, {width}) -> {hidden}", device, [s],
                                  [s64]))
        # the same MLP with the residual add and the norm before it (norm_mlp_residual): a
        # bf16 branch into the float32 stream
        branch = torch.randn(rows, width, device=device, dtype=torch.bfloat16)
        stream = torch.randn(rows, width, device=device) * 2 + 1
        nw = 1 + 0.2 * torch.randn(width, device=device)
        nb = 0.1 * torch.randn(width, device=device)
        with torch.no_grad():
            out = norm_mlp_residual(stream, branch, nw, nb, w1, b1, w2, b2, eps=1e-6,
                                    dtype=torch.bfloat16, backend="triton")
        sum64 = stream.double() + branch.double()
        h64 = F.layer_norm(sum64, (width,), nw.double(), nb.double(), 1e-6)
        out64 = sum64 + F.linear(F.gelu(F.linear(h64, bf[0], bf[1])), bf[2], bf[3])
        with torch.no_grad():  # (a VMamba stage's end: the output in bf16)
            out16 = norm_mlp_residual(stream, branch, nw, nb, w1, b1, w2, b2, eps=1e-6,
                                      dtype=torch.bfloat16, out_dtype=torch.bfloat16,
                                      backend="triton")
        worst = max(worst, _check(f"norm_mlp_residual ({rows}, {width}) -> {hidden}", device,
                                  [out, out16], [out64, out64]))
    return worst


def _layer_norm_linear(device) -> float:
    worst = 0.0  # VMamba-T s1's out_norm -> out_proj (float32 in, bf16 product), s3's
    for rows, k, n in ((4099, 96, 96), (1001, 384, 384)):
        x = torch.randn(rows, k, device=device) * 2 + 3
        nw, nb = 1 + 0.2 * torch.randn(k, device=device), 0.1 * torch.randn(k, device=device)
        w = torch.randn(n, k, device=device) / k ** 0.5
        y = layer_norm_linear(x, nw, nb, w, eps=1e-6, dtype=torch.bfloat16, backend="triton")
        h64 = F.layer_norm(x.double(), (k,), nw.double(), nb.double(), 1e-6)
        y64 = F.linear(h64, w.to(torch.bfloat16).double())
        worst = max(worst, _check(f"layer_norm_linear ({rows}, {k}) -> {n}", device, [y],
                                  [y64]))
    return worst


def main() -> int:
    device = os.environ.get("PYSSM_TRITON_SMOKE_DEVICE", "cuda")
    if (device == "cuda" and not torch.cuda.is_available()) or not layer_norm_triton.available():
        print("triton smoke: skipped (no CUDA device or no triton)")
        return 0
    torch.manual_seed(0)
    worst = _run(_norm_and_conv, device)
    worst_fc1 = _run(_linear_gelu, device)
    worst_fc2 = _run(_linear_residual, device)
    worst_mlp = _run(_mlp_gelu, device)
    worst_whole = _run(_mlp_residual, device)
    worst_norm = _run(_layer_norm_linear, device)
    status = (int(not worst < BOUND) + 2 * int(not worst_fc1 < BOUND)  # (NaN fails too)
              + 4 * int(not worst_fc2 < BOUND) + 8 * int(not worst_mlp < BOUND)
              + 16 * int(not worst_whole < BOUND) + 32 * int(not worst_norm < BOUND))
    print(f"triton smoke: {'ok' if status == 0 else 'FAILED'} (layer_norm and depthwise_conv2d "
          f"worst {worst:.2e}, linear_gelu worst {worst_fc1:.2e}, linear_residual_ worst "
          f"{worst_fc2:.2e}, mlp_gelu worst {worst_mlp:.2e}, mlp_residual_ and "
          f"norm_mlp_residual worst {worst_whole:.2e}, layer_norm_linear worst "
          f"{worst_norm:.2e}, bound {BOUND:.0e})")
    return status


if __name__ == "__main__":
    sys.exit(main())
