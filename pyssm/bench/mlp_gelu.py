"""mlp_gelu: a whole MLP (fc1 -> exact GELU -> fc2) in a bf16-autocast training step, as pyssm's
op (linear_gelu's pass keeping the pre-activation, cuBLAS's fc2, and a backward whose first
pass forms the GELU's gradient without fc2's input gradient stored), against torch eager under
autocast (fc1, the GELU and fc2 as three kernels, and their backwards) and torch.compile of the
same function. The parameters are float32, their gradients too, as an encoder's are.

Bytes (a floor, the same for every provider): x, y, dy and dx once each (2 B an element of the
width) and one hidden-layer tensor written in the forward and read back in the backward (2 B an
element of the hidden layer, each way); the backward alone: dy and x read, dx written, the
hidden tensor read. GPU: the MLPs of VMamba-T's stage 1 (C 96, hidden 384: memory-bound) and
stage 3, ViT-S/16's and ViT-B/16's (C 768, hidden 3072: bound by FLOPs) at 224 px x 128 (the
first two under --quick). CPU: torch only (the Triton kernels run on CPU tensors only in
Triton's interpreter, for the tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyssm.bench import harness
from pyssm.ops.mlp_gelu import mlp_gelu

NOTES = [
    "mlp_gelu: fc1 + exact GELU + fc2 with their backward, bf16 autocast, float32 parameters; "
    "GB/s over a floor (x, y, dy, dx and one saved hidden layer once each way), TFLOP/s over "
    "12 M C H (full) and 8 M C H (backward).",
]


def torch_mlp_gelu(x, w1, b1, w2, b2):
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def pyssm_mlp_gelu(x, w1, b1, w2, b2):
    return mlp_gelu(x, w1, b1, w2, b2, backend="triton")


def cases(device: torch.device, quick: bool = False) -> list[harness.Case]:
    out = []
    for label, rows, c, h in harness.mlp_sizes(device, quick):
        def make(rows=rows, c=c, h=h):
            w1, b1 = (t.float() for t in harness.bf16_linear(h, c, device))
            w2, b2 = (t.float() for t in harness.bf16_linear(c, h, device))
            return torch.randn(rows, c, device=device, dtype=torch.bfloat16), w1, b1, w2, b2

        providers = harness.triton_providers(pyssm_mlp_gelu, torch_mlp_gelu, device, quick)
        out.append(harness.Case(
            op="mlp_gelu", size={"shape": label.format(fc="MLP"), "M": rows, "K": c, "N": h},
            make_inputs=make, providers=providers, modes=("backward", "full"), dtype="bf16",
            bytes={"backward": 2 * rows * (3 * c + h), "full": 2 * rows * (4 * c + 2 * h)},
            flops={"backward": 8 * rows * c * h, "full": 12 * rows * c * h}))
    return out
