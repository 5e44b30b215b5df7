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
batch, in float32 (CPU autocast differs from CUDA's in what its norms return).

    python bench/memory_model.py [--encoder vmamba_tiny_s1l8] [--img-size 224] [--batch 8]
                                 [--as-batch 128]

--as-batch: make the inference's batch slicing (pyssm.models.mlp.CHUNK_BYTES) decide as it
would for that batch size, so a small traced batch stands for the benchmark's.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import pyssm.models.mlp as mlp_module
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


def attention_stand_in(q, k, v, **kwargs):
    return torch.empty_like(q)


def peak_mb_per_image(encoder: str, img_size: int, batch: int, as_batch: int | None = None,
                      **overrides) -> float:
    saved = (vmamba_module.ss2d, vmamba_module.depthwise_conv2d, vmamba_module.uses_triton,
             vit_module.attention, mlp_module.CHUNK_BYTES)
    try:
        vmamba_module.ss2d = ss2d_stand_in
        vmamba_module.depthwise_conv2d = conv_silu_stand_in
        vmamba_module.uses_triton = lambda *a, **k: True
        vit_module.attention = attention_stand_in
        if as_batch:
            mlp_module.CHUNK_BYTES = mlp_module.CHUNK_BYTES * batch // as_batch
        torch.manual_seed(0)
        model = create_encoder(encoder, img_size=img_size, **overrides).eval()
        images = torch.randn(batch, 3, img_size, img_size)

        def step():
            with torch.no_grad():
                return model(images)

        step()
        return cpu_peak_mb(step) / batch
    finally:
        (vmamba_module.ss2d, vmamba_module.depthwise_conv2d, vmamba_module.uses_triton,
         vit_module.attention, mlp_module.CHUNK_BYTES) = saved


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="vmamba_tiny_s1l8")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--as-batch", type=int, default=128)
    args = parser.parse_args(argv)
    mb = peak_mb_per_image(args.encoder, args.img_size, args.batch, args.as_batch)
    print(f"{args.encoder} {args.img_size} px, batch {args.batch} (slicing as for "
          f"{args.as_batch}), float32, the CUDA ops' allocations stood in: "
          f"peak {mb:.2f} MB an image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
