"""linear_residual: an MLP's fc2 added into the block's float32 residual sum in place (bf16,
inference) as pyssm's one Triton pass, against torch eager (cuBLAS's fc2 writing its bf16
output, then the in-place add reading it with the sum) and torch.compile of the same function.

Bytes (the minimum, the same for every provider): h read (2 B an element of the hidden layer),
the sum read and written (4 + 4 B an element of the width); W is small and stays in the L2.
Every call adds into the same sum (as the encoders' blocks do, once each), so the values grow
with the repeats; the time does not depend on them. GPU: the fc2 of VMamba-T's stage 1 (K 384,
N 96: memory-bound) and stage 3 (K 1536, N 384) at 224 px x 128, ViT-S/16's (K 1536, N 384)
and ViT-B/16's (K 3072, N 768: bound by FLOPs) at 224 px x 128. CPU: torch only (the Triton
kernel runs on CPU tensors only in Triton's interpreter, for the tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyssm.bench import harness
from pyssm.ops.linear_residual import linear_residual_

NOTES = [
    "linear_residual: fc2 + the residual add into a float32 sum, in place, bf16 inference; GB/s "
    "over the minimum bytes (the hidden layer read, the sum read and written once), TFLOP/s "
    "over 2 M K N.",
]


def torch_linear_residual(s, h, w, b):
    return s.add_(F.linear(h, w, b))


def pyssm_linear_residual(s, h, w, b):
    return linear_residual_(s, h, w, b, backend="triton")


def cases(device: torch.device, quick: bool = False) -> list[harness.Case]:
    out = []
    for label, rows, n, k in harness.mlp_sizes(device, quick):  # fc2: hidden k -> width n
        def make(rows=rows, k=k, n=n):
            return (torch.randn(rows, n, device=device),
                    torch.randn(rows, k, device=device, dtype=torch.bfloat16),
                    *harness.bf16_linear(n, k, device))

        providers = harness.triton_providers(pyssm_linear_residual, torch_linear_residual,
                                             device, quick)
        out.append(harness.Case(
            op="linear_residual",
            size={"shape": label.format(fc="fc2"), "M": rows, "K": k, "N": n},
            make_inputs=make, providers=providers, modes=("forward",), dtype="bf16+fp32",
            bytes={"forward": rows * (2 * k + 8 * n)}, flops={"forward": 2 * rows * k * n}))
    return out
