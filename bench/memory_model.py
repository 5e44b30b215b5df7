"""An encoder's inference peak memory per image, traced on the CPU with the CUDA ops' own
allocations stood in: what the GPU's peak would be, for a machine without one.

On the CPU the encoders run CPU kernels whose temporaries are not the GPU's (the ss2d CPU
kernel's copies, the CPU attention's score matrix, torch's separate convolution and SiLU), and
those set the CPU's peak. Here the three ops the GPU runs as pyssm kernels are replaced by
stand-ins that allocate what the CUDA path allocates and compute nothing useful:
  - ss2d (csrc/ss2d/ss2d_cuda.cpp, 16-bit x): z (B L, 4 (R + 2N)) in float32, y (B, H, W, D)
    zeroed in float32, returned as float32 (out_float32) or cast;
  - VMamba's depthwise convolution + SiLU (the Triton kernel): its output only;
  - attention (flash): its output only.
Everything else (norms on their reference path, GEMMs, the modules' own code) runs as it is, so
the trace counts what the model code keeps alive. Peak = torch.profiler's allocation records
summed in order (pyssm.bench.harness.cpu_peak_mb), above what is live before the step, over the
batch, in float32.

--bf16: the GPU's bf16-autocast inference instead, under CPU autocast (whose matrix products and
convolutions return bf16 as CUDA's do) with CUDA autocast's choices where the two differ stood
in: pyssm's norms return what they return under CUDA autocast (bf16 before a matrix product,
float32 elsewhere), and the Triton ops the GPU runs in 16-bit inference allocate only their
outputs: layer_norm (y, and the sum where returned), linear_gelu (the hidden layer),
linear_residual_ and mlp_residual_ (nothing: they add into the sum), layer_norm_linear (the
projection) and norm_mlp_residual (the block's output). Comparable with ANCHORS.md's official
peaks (17 / 88 / 354 MB an image at 224 / 512 / 1024 px for VMamba-T), which the issue's target
divides by four.

    python bench/memory_model.py [--encoder vmamba_tiny_s1l8] [--img-size 224] [--batch 8]
                                 [--as-batch 128] [--bf16]

--as-batch: make the inference's batch slicing (pyssm.models.mlp.CHUNK_BYTES) decide as it
would for that batch size, so a small traced batch stands for the benchmark's.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from roofline_model import cuda_out_dtype, stood_in  # (bench/, beside this script)

import pyssm.models.mlp as mlp_module
import pyssm.models.norms as norms_module
import pyssm.models.vit as vit_module
import pyssm.models.vmamba as vmamba_module
from pyssm.bench.harness import cpu_peak_mb
from pyssm.models import create_encoder


def ss2d_stand_in(x, x_proj_weight, *args, channels_first=True, out_float32=False, **kwargs):
    B, D, H, W = x.shape if channels_first else x.permute(0, 3, 1, 2).shape
    z = torch.empty(B * H * W, x_proj_weight.shape[0] * x_proj_weight.shape[1])
    y = torch.zeros(B, H, W, D)
    del z
    out = y.permute(0, 3, 1, 2) if channels_first else y
    return out if out_float32 else out.to(x.dtype)


def conv_silu_stand_in(x, weight, bias, activation="silu", out_dtype=None, backend=None):
    y = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=weight.shape[-1] // 2,
                 groups=weight.shape[0])
    F.silu(y, inplace=True)
    return y.permute(0, 2, 3, 1)


def attention_stand_in(qkv, **kwargs):
    B, N, _, heads, d = qkv.shape
    return qkv.new_empty(B, N, heads, d)


def layer_norm_stand_in(x, weight=None, bias=None, eps=1e-5, *, residual=None, out_dtype=None,
                        return_residual=False, activation=None, backend=None):
    s_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty(x.shape, dtype=out_dtype or s_dtype)
    return (y, torch.empty(x.shape, dtype=s_dtype)) if return_residual else y


def linear_gelu_stand_in(x, weight, bias=None, *, out_dtype=None, activation="gelu",
                         backend=None):
    return torch.empty(*x.shape[:-1], weight.shape[0], dtype=out_dtype or x.dtype)


def linear_residual_stand_in(s, x, weight, bias=None, *, backend=None):
    return s


def layer_norm_linear_stand_in(x, norm_weight, norm_bias, weight, bias=None, *, eps=1e-5,
                               dtype=None, backend=None):
    return torch.empty(*x.shape[:-1], weight.shape[0], dtype=dtype or x.dtype)


def mlp_residual_stand_in(s, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *,
                          activation="gelu", backend=None):
    return s


def norm_mlp_residual_stand_in(x, branch, norm_weight, norm_bias, fc1_weight, fc1_bias,
                               fc2_weight, fc2_bias, *, eps=1e-5, activation="gelu",
                               dtype=None, out_dtype=None, backend=None):
    return torch.empty(x.shape, dtype=out_dtype or torch.promote_types(x.dtype, branch.dtype))


def peak_mb_per_image(encoder: str, img_size: int, batch: int, as_batch: int | None = None,
                      bf16: bool = False, **overrides) -> float:
    """Inference's peak MB an image (module docstring); ``bf16``: under emulated CUDA bf16
    autocast, else in float32."""
    stand_ins = [(vmamba_module, "ss2d", ss2d_stand_in),
                 (vmamba_module, "depthwise_conv2d", conv_silu_stand_in),
                 (vmamba_module, "uses_triton", lambda *a, **k: True),
                 (vit_module, "attention_qkvpacked", attention_stand_in)]
    if as_batch:
        stand_ins.append((mlp_module, "CHUNK_BYTES", mlp_module.CHUNK_BYTES * batch // as_batch))
    if bf16:
        stand_ins += [(norms_module, "layer_norm", layer_norm_stand_in),
                      (norms_module, "_out_dtype", cuda_out_dtype),
                      (mlp_module, "linear_gelu", linear_gelu_stand_in),
                      (mlp_module, "linear_gelu_uses_triton", lambda *a, **k: True),
                      (mlp_module, "linear_residual_", linear_residual_stand_in),
                      (mlp_module, "linear_residual_uses_triton", lambda *a, **k: True),
                      (vmamba_module, "layer_norm_linear", layer_norm_linear_stand_in),
                      (vmamba_module, "layer_norm_linear_uses_triton", lambda *a, **k: True),
                      (mlp_module, "mlp_residual_", mlp_residual_stand_in),
                      (mlp_module, "mlp_residual_uses_triton", lambda *a, **k: True),
                      (mlp_module, "norm_mlp_residual", norm_mlp_residual_stand_in),
                      (mlp_module, "norm_mlp_residual_uses_triton", lambda *a, **k: True)]
    with stood_in(stand_ins):  # (put back on the way out)
        torch.manual_seed(0)
        model = create_encoder(encoder, img_size=img_size, **overrides).eval()
        images = torch.randn(batch, 3, img_size, img_size)

        def step():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return model(images)

        step()
        return cpu_peak_mb(step) / batch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="vmamba_tiny_s1l8")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--as-batch", type=int, default=128)
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 autocast as on the GPU (CUDA autocast's choices stood in)")
    args = parser.parse_args(argv)
    mb = peak_mb_per_image(args.encoder, args.img_size, args.batch, args.as_batch, args.bf16)
    print(f"{args.encoder} {args.img_size} px, batch {args.batch} (slicing as for "
          f"{args.as_batch}), {'bf16 autocast' if args.bf16 else 'float32'}, the CUDA ops' "
          f"allocations stood in: peak {mb:.2f} MB an image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
