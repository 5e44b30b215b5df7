"""norm_mlp_residual: a pre-norm block's second half, the residual add (a bf16 branch into the
float32 stream), the LayerNorm and a whole MLP added back (bf16 products, inference), as
pyssm's one Triton pass, against pyssm's two passes (layer_norm with the residual, then
mlp_residual_: the sum and its norm written and read), torch eager (the add, F.layer_norm, the
cast, fc1, GELU, fc2, the add) and torch.compile of the same function.

Bytes (the minimum, the same for every provider): x read (4 B an element of the width), the
branch read (2 B) and the output written (4 B); the sum, its norm and the hidden layer never
reach memory, and the weights stay in the L2 (read from it once a 64-row program at 96 and 128
wide, once a 32-row program above: norm_mlp_residual_triton.tiles). GPU: the MLPs the encoders
fuse whole (up to 256 wide) at 224 px x 128: VMamba-T's stage 1 (96 -> 384 -> 96) and stage 2
(192 -> 768 -> 192), VMamba-B's stage 1 (128 -> 512 -> 128). CPU: torch only (the Triton
kernel runs on CPU tensors only in Triton's interpreter, for the tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyssm.bench import harness
from pyssm.bench.mlp_residual import whole_mlp_cases
from pyssm.ops.layer_norm import layer_norm
from pyssm.ops.mlp_residual import mlp_residual_
from pyssm.ops.norm_mlp_residual import norm_mlp_residual

NOTES = [
    "norm_mlp_residual: a bf16 branch added into the float32 stream, LayerNorm, fc1 + GELU + "
    "fc2 and the add, bf16 inference; GB/s over the minimum bytes (x and the branch read, the "
    "output written once), TFLOP/s over 4 M C H; pyssm-two-pass: layer_norm with the residual "
    "then mlp_residual_ (the sum and its norm written and read), the encoders' path with "
    "PYSSM_NORM_MLP=0.",
]


def torch_norm_mlp_residual(x, branch, nw, nb, w1, b1, w2, b2):
    s = x + branch
    h = F.layer_norm(s, s.shape[-1:], nw, nb).to(torch.bfloat16)
    return s + F.linear(F.gelu(F.linear(h, w1, b1)), w2, b2)


def pyssm_norm_mlp_residual(x, branch, nw, nb, w1, b1, w2, b2):
    return norm_mlp_residual(x, branch, nw, nb, w1, b1, w2, b2, dtype=torch.bfloat16,
                             backend="triton")


def pyssm_two_pass(x, branch, nw, nb, w1, b1, w2, b2):
    h, s = layer_norm(branch, nw, nb, residual=x, out_dtype=torch.bfloat16,
                      return_residual=True, backend="triton")
    return mlp_residual_(s, h, w1, b1, w2, b2, backend="triton")


def cases(device: torch.device, quick: bool = False) -> list[harness.Case]:
    def inputs(rows, c, h):
        return (torch.randn(rows, c, device=device),
                torch.randn(rows, c, device=device, dtype=torch.bfloat16),
                1 + 0.1 * torch.randn(c, device=device), 0.1 * torch.randn(c, device=device),
                *harness.bf16_linear(h, c, device), *harness.bf16_linear(c, h, device))

    return whole_mlp_cases("norm_mlp_residual", device, quick, inputs, pyssm_norm_mlp_residual,
                           torch_norm_mlp_residual, pyssm_two_pass)
