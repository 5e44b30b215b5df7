"""linear_gelu: an MLP's fc1 and its exact GELU (bf16, inference) as pyssm's one Triton pass,
against torch eager (cuBLAS's fc1, then the GELU as a second pass over the hidden layer) and
torch.compile of the same function.

Bytes (the minimum, the same for every provider): x read and the hidden layer written once,
2 B per element each (W is small and stays in the L2). GPU: the fc1 of VMamba-T's stage 1
(K 96, N 384: memory-bound) and stage 3 (K 384, N 1536) at 224 px x 128, ViT-S/16's (K 384)
and ViT-B/16's (K 768, N 3072: bound by FLOPs) at 224 px x 128. CPU: torch only (the Triton
kernel runs on CPU tensors only in Triton's interpreter, for the tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyssm.bench import harness
from pyssm.ops.linear_gelu import linear_gelu

NOTES = [
    "linear_gelu: fc1 + exact GELU, bf16 inference; GB/s over the minimum bytes (x read and the "
    "hidden layer written once), TFLOP/s over 2 M K N.",
]


def torch_linear_gelu(x, w, b):
    return F.gelu(F.linear(x, w, b))


def pyssm_linear_gelu(x, w, b):
    return linear_gelu(x, w, b, backend="triton")


def cases(device: torch.device, quick: bool = False) -> list[harness.Case]:
    out = []
    for label, rows, k, n in harness.mlp_sizes(device, quick):  # fc1: width k -> hidden n
        def make(rows=rows, k=k, n=n):
            return (torch.randn(rows, k, device=device, dtype=torch.bfloat16),
                    *harness.bf16_linear(n, k, device))

        providers = harness.triton_providers(pyssm_linear_gelu, torch_linear_gelu, device, quick)
        out.append(harness.Case(
            op="linear_gelu", size={"shape": label.format(fc="fc1"), "M": rows, "K": k, "N": n},
            make_inputs=make, providers=providers, modes=("forward",), dtype="bf16",
            bytes={"forward": 2 * rows * (k + n)}, flops={"forward": 2 * rows * k * n}))
    return out
