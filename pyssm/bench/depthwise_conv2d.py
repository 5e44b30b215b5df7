"""depthwise_conv2d: VMamba's SS2D convolution (3 x 3 depthwise, bias, SiLU) on a channels-last
bf16 map, against torch eager (cuDNN's convolution on a channels_last tensor, then SiLU) and
torch.compile of the same function.

Bytes (the minimum, the same for every provider): forward x read and y written once, 4 B per
element; forward + backward adds dy and x read and dx written, 10 B per element (the weight and
bias gradients are tiny). pyssm's backward also writes and reads a float32 g (8 B more), so it
keeps no activation but x. GPU: VMamba-T's stage-1 SS2D (d_inner 96) at 224 px x 64
and 1024 px x 3, VMamba-S's (d_inner 192) at 224 px x 64. CPU: torch only (the Triton kernels
run on CPU tensors only in Triton's interpreter, for the tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyssm.bench import harness
from pyssm.ops.depthwise_conv2d import depthwise_conv2d

NOTES = [
    "depthwise_conv2d: 3 x 3 depthwise convolution + bias + SiLU, bf16, channels-last; GB/s "
    "over the minimum bytes (4 B per element forward, 10 B forward + backward).",
]


def torch_conv_silu(x, w, b):
    """x (B, H, W, C) bf16; cuDNN reads the permuted view as a channels_last tensor."""
    y = F.conv2d(x.permute(0, 3, 1, 2), w.to(x.dtype), b.to(x.dtype), padding=1,
                 groups=x.shape[-1])
    return F.silu(y).permute(0, 2, 3, 1)


def pyssm_conv_silu(x, w, b):
    return depthwise_conv2d(x, w, b, activation="silu", backend="triton")


def cases(device: torch.device, quick: bool = False) -> list[harness.Case]:
    gpu = device.type == "cuda"
    if gpu:
        sizes = [("VMamba-T s1, 224 px x 64", 64, 56, 96),
                 ("VMamba-S s1, 224 px x 64", 64, 56, 192),
                 ("VMamba-T s1, 1024 px x 3", 3, 256, 96)][: 1 if quick else 3]
    else:
        sizes = [("small", 2, 32, 96), ("wide", 2, 16, 192)][: 1 if quick else 2]
    out = []
    for label, batch, side, chans in sizes:
        def make(batch=batch, side=side, chans=chans):
            return (torch.randn(batch, side, side, chans, device=device, dtype=torch.bfloat16),
                    torch.randn(chans, 1, 3, 3, device=device) / 3,
                    0.1 * torch.randn(chans, device=device))

        providers = harness.triton_providers(pyssm_conv_silu, torch_conv_silu, device, quick)
        elements = batch * side * side * chans
        out.append(harness.Case(
            op="depthwise_conv2d", size={"shape": label, "B": batch, "HxW": f"{side}x{side}",
                                         "C": chans},
            make_inputs=make, providers=providers, modes=("forward", "full"), dtype="bf16",
            bytes={"forward": 4 * elements, "full": 10 * elements}))
    return out
