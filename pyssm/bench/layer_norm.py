"""layer_norm: the residual add and LayerNorm of a pre-norm block, as the encoders run it under
bf16 autocast (a bf16 branch output added to the float32 residual stream, the norm's output in
bf16 for the next matrix product), against torch eager and torch.compile of the same function.

    torch:  s = x + r; y = layer_norm(s).to(bf16)       (3 kernels: add, norm, cast)
    pyssm:  layer_norm(x, w, b, residual=r, out_dtype=bf16, return_residual=True)  (1 kernel)

Bytes (the minimum, counted the same for every provider): forward reads x (2 B) and r (4 B),
writes y (2 B) and s (4 B): 12 B per element; forward + backward adds dy read (2 B), x and r
read again (6 B), dx and dr written (6 B): 26 B per element. "full" takes gradients from y only
(the harness gives one output a cotangent), so the backward's dr also carries nothing from s.
GPU: VMamba-T's stage-1 block at 224 px x 64 (200,704 rows of 96), its stage-3 block (12,544
rows of 384), ViT-B/16 at 224 px x 128 (25,216 rows of 768), VMamba-T at 1024 px x 3 (196,608
rows of 96). CPU: torch only (the Triton kernels run on CPU tensors only in Triton's
interpreter, for the tests).

Case "stem": VMamba's v2 stem norm and GELU (its first convolution's bf16 output in, bf16 out for
the second convolution), in --quick too:
    torch:  F.gelu(layer_norm(x.float())).to(bf16)    (as autocast runs it: cast, norm, GELU, cast)
    pyssm:  layer_norm(x, w, b, out_dtype=bf16, activation="gelu")   (1 kernel)
Bytes: forward reads x and writes y, 4 B per element; forward + backward adds dy and x read and
dx written, 10 B. GPU: VMamba-T at 224 px x 128 (1,605,632 rows of 48).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyssm.bench import harness
from pyssm.ops.layer_norm import layer_norm

NOTES = [
    "layer_norm: a bf16 branch x added to a float32 residual r, normalised, y in bf16; GB/s "
    "over the minimum bytes (12 B per element forward, 26 B forward + backward), the same "
    "bytes for every provider. The stem row (norm + GELU): bf16 x, no residual, bf16 y; 4 B "
    "per element forward, 10 B forward + backward.",
    "torch-compile: torch.compile (inductor) of the torch function, compiled in the untimed "
    "first call; in full sweeps only (not --quick: the compiles would crowd the device check).",
]


def torch_add_norm(x, r, w, b):
    s = x + r
    return F.layer_norm(s, s.shape[-1:], w, b, 1e-6).to(torch.bfloat16)


def pyssm_add_norm(x, r, w, b):
    y, _ = layer_norm(x, w, b, 1e-6, residual=r, out_dtype=torch.bfloat16, return_residual=True,
                      backend="triton")
    return y


def torch_norm_gelu(x, w, b):
    return F.gelu(F.layer_norm(x.float(), x.shape[-1:], w, b, 1e-6)).to(torch.bfloat16)


def pyssm_norm_gelu(x, w, b):
    return layer_norm(x, w, b, 1e-6, out_dtype=torch.bfloat16, activation="gelu",
                      backend="triton")


def stem_case(device: torch.device, quick: bool = False) -> harness.Case:
    rows = 128 * 112 * 112 if device.type == "cuda" else 4096
    label = "VMamba-T stem, 224 px x 128" if device.type == "cuda" else "stem, small"

    def make():
        return (torch.randn(rows, 48, device=device, dtype=torch.bfloat16),
                1 + 0.1 * torch.randn(48, device=device), 0.1 * torch.randn(48, device=device))

    return harness.Case(
        op="layer_norm", size={"shape": label + " (norm + GELU)", "rows": rows, "N": 48},
        make_inputs=make, providers=harness.triton_providers(pyssm_norm_gelu, torch_norm_gelu,
                                                             device, quick),
        modes=("forward", "full"), dtype="bf16", bytes={"forward": 4 * rows * 48,
                                                        "full": 10 * rows * 48})


def cases(device: torch.device, quick: bool = False) -> list[harness.Case]:
    gpu = device.type == "cuda"
    if gpu:
        sizes = [("VMamba-T s1, 224 px x 64", 64 * 56 * 56, 96),
                 ("ViT-B/16, 224 px x 128", 128 * 197, 768),
                 ("VMamba-T s3, 224 px x 64", 64 * 14 * 14, 384),
                 ("VMamba-T s1, 1024 px x 3", 3 * 256 * 256, 96)][: 1 if quick else 4]
    else:
        sizes = [("small", 2048, 96), ("ViT width", 512, 768)][: 1 if quick else 2]
    out = []
    for label, rows, width in sizes:
        def make(rows=rows, width=width):
            return (torch.randn(rows, width, device=device, dtype=torch.bfloat16),
                    torch.randn(rows, width, device=device),
                    1 + 0.1 * torch.randn(width, device=device),
                    0.1 * torch.randn(width, device=device))

        providers = harness.triton_providers(pyssm_add_norm, torch_add_norm, device, quick)
        elements = rows * width
        out.append(harness.Case(
            op="layer_norm", size={"shape": label, "rows": rows, "N": width},
            make_inputs=make, providers=providers, modes=("forward", "full"), dtype="bf16+fp32",
            bytes={"forward": 12 * elements, "full": 26 * elements}))
    return out + [stem_case(device, quick)]
