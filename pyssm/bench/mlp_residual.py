"""mlp_residual: a whole MLP (fc1, GELU, fc2) added into the block's float32 residual sum in
place (bf16, inference) as pyssm's one Triton pass, against pyssm's two passes (linear_gelu,
then linear_residual_: the hidden layer written and read), torch eager (fc1, GELU, fc2, then
the in-place add) and torch.compile of the same function.

Bytes (the minimum, the same for every provider): x read (2 B an element of the width), the sum
read and written (4 + 4 B); the hidden layer never reaches memory and the weights stay in the
L2. Every call adds into the same sum (as the encoders' blocks do, once each), so the values
grow with the repeats; the time does not depend on them. GPU: the MLPs the encoders fuse whole
(up to 256 wide) at 224 px x 128: VMamba-T's stage 1 (96 -> 384 -> 96) and stage 2 (192 ->
768 -> 192), VMamba-B's stage 1 (128 -> 512 -> 128). CPU: torch only (the Triton kernel runs on
CPU tensors only in Triton's interpreter, for the tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyssm.bench import harness
from pyssm.ops.linear_gelu import linear_gelu
from pyssm.ops.linear_residual import linear_residual_
from pyssm.ops.mlp_residual import mlp_residual_

NOTES = [
    "mlp_residual: fc1 + GELU + fc2 + the residual add into a float32 sum, in place, bf16 "
    "inference; GB/s over the minimum bytes (x read, the sum read and written once), TFLOP/s "
    "over 2 M H (C + N); pyssm-two-pass: linear_gelu then linear_residual_ (the hidden layer "
    "written and read), the encoders' path above 256 wide.",
]


def torch_mlp_residual(s, x, w1, b1, w2, b2):
    return s.add_(F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2))


def pyssm_mlp_residual(s, x, w1, b1, w2, b2):
    return mlp_residual_(s, x, w1, b1, w2, b2, backend="triton")


def pyssm_two_pass(s, x, w1, b1, w2, b2):
    return linear_residual_(s, linear_gelu(x, w1, b1, backend="triton"), w2, b2,
                            backend="triton")


def sizes(device: torch.device, quick: bool) -> list[tuple[str, int, int, int]]:
    """(label, rows, width, hidden): the encoders' MLPs up to 256 wide on a GPU (the first
    under --quick), a small one on the CPU."""
    if device.type == "cuda":
        return [("VMamba-T s1 MLP, 224 px x 128", 128 * 56 * 56, 96, 384),
                ("VMamba-T s2 MLP, 224 px x 128", 128 * 28 * 28, 192, 768),
                ("VMamba-B s1 MLP, 224 px x 128", 128 * 56 * 56, 128, 512)][: 1 if quick else 3]
    return [("small", 4096, 96, 384)]


def whole_mlp_cases(op: str, device: torch.device, quick: bool, inputs, ours, torchs,
                    two_pass) -> list[harness.Case]:
    """The cases of an op that runs a whole MLP into the float32 stream (this one,
    norm_mlp_residual), at ``sizes``: ``inputs(rows, width, hidden)`` makes a call's arguments;
    10 B an element of the width moved at the least, 4 M C H FLOPs."""
    out = []
    for label, rows, c, h in sizes(device, quick):
        providers = harness.triton_providers(ours, torchs, device, quick, two_pass=two_pass)
        out.append(harness.Case(
            op=op, size={"shape": label, "M": rows, "C": c, "H": h},
            make_inputs=lambda rows=rows, c=c, h=h: inputs(rows, c, h), providers=providers,
            modes=("forward",), dtype="bf16+fp32", bytes={"forward": rows * 10 * c},
            flops={"forward": 4 * rows * c * h}))
    return out


def cases(device: torch.device, quick: bool = False) -> list[harness.Case]:
    def inputs(rows, c, h):
        return (torch.randn(rows, c, device=device),
                torch.randn(rows, c, device=device, dtype=torch.bfloat16),
                *harness.bf16_linear(h, c, device), *harness.bf16_linear(c, h, device))

    return whole_mlp_cases("mlp_residual", device, quick, inputs, pyssm_mlp_residual,
                           torch_mlp_residual, pyssm_two_pass)
