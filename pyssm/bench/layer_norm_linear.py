"""layer_norm_linear: a LayerNorm and the projection reading it (VMamba's norm -> in_proj and
out_norm -> out_proj; float32 in, bf16 product, inference) as pyssm's one Triton pass, against
torch eager (LayerNorm in float32, the cast, the bf16 product) and torch.compile of the same
function.

Bytes (the minimum, the same for every provider): x read (4 B an element of the input), y
written (2 B an element of the output); the normalised x never reaches memory and the weights
stay in the L2. GPU: VMamba-T's stage-1 projections (96 -> 96) and stage-3 (384 -> 384) at
224 px x 128. CPU: torch only (the Triton kernel runs on CPU tensors only in Triton's
interpreter, for the tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyssm.bench import harness
from pyssm.ops.layer_norm_linear import layer_norm_linear

NOTES = [
    "layer_norm_linear: LayerNorm (float32 in) and the linear layer reading it (bf16 product), "
    "inference; GB/s over the minimum bytes (x read, y written once), TFLOP/s over 2 M K N.",
]


def torch_layer_norm_linear(x, nw, nb, w):
    h = F.layer_norm(x, x.shape[-1:], nw, nb, 1e-6).to(torch.bfloat16)
    return F.linear(h, w)


def pyssm_layer_norm_linear(x, nw, nb, w):
    return layer_norm_linear(x, nw, nb, w, eps=1e-6, dtype=torch.bfloat16, backend="triton")


def sizes(device: torch.device, quick: bool) -> list[tuple[str, int, int, int]]:
    """(label, rows, K, N): VMamba-T's projections on a GPU (the first under --quick), a small
    one on the CPU."""
    if device.type == "cuda":
        return [("VMamba-T s1 out_norm -> out_proj, 224 px x 128", 128 * 56 * 56, 96, 96),
                ("VMamba-T s3 out_norm -> out_proj, 224 px x 128", 128 * 14 * 14, 384,
                 384)][: 1 if quick else 2]
    return [("small", 4096, 96, 96)]


def cases(device: torch.device, quick: bool = False) -> list[harness.Case]:
    out = []
    for label, rows, k, n in sizes(device, quick):
        def make(rows=rows, k=k, n=n):
            return (torch.randn(rows, k, device=device), 1 + 0.1 * torch.randn(k, device=device),
                    0.1 * torch.randn(k, device=device), harness.bf16_linear(n, k, device)[0])

        providers = harness.triton_providers(pyssm_layer_norm_linear, torch_layer_norm_linear,
                                             device, quick)
        out.append(harness.Case(
            op="layer_norm_linear", size={"shape": label, "M": rows, "K": k, "N": n},
            make_inputs=make, providers=providers, modes=("forward",), dtype="fp32->bf16",
            bytes={"forward": rows * (4 * k + 2 * n)}, flops={"forward": 2 * rows * k * n}))
    return out
