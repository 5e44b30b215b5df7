"""The ceilings every other row is read against, measured in the same run on the same device:
memory bandwidth (``y.copy_(x)`` between two tensors far larger than the cache, the destination
allocated beforehand so page faults do not count: read once, written once)
and matrix-product throughput (torch.mm of large square matrices in the benchmark dtype).

A kernel row's "of copy ceiling" is its GB/s over the copy's; "of matmul ceiling" its TFLOP/s
over the matmul's. Neither is a hard limit (a kernel can beat clone() a little, and cuBLAS is
not the tensor cores' peak), but both are what this device delivers today, in this process.
"""

from __future__ import annotations

import torch

from pyssm.bench import harness

NOTES = [
    "copy: y.copy_(x) into a preallocated y, GB/s = 2 x bytes / median time; matmul: torch.mm of n x n, "
    "TFLOP/s = 2 n^3 / median time. Later rows' 'of copy / matmul ceiling' divide by these.",
]


def cases(device: torch.device, quick: bool = False) -> list[harness.Case]:
    gpu = device.type == "cuda"
    copy_mb = (1024 if not quick else 512) if gpu else (64 if not quick else 32)
    n, dtype = (8192, torch.bfloat16) if gpu else (1024 if not quick else 512, torch.float32)
    elems = copy_mb * 2**20 // 4
    return [
        harness.Case(op="ceiling", size={"what": "copy", "MB": copy_mb},
                     make_inputs=lambda: (torch.randn(elems, device=device),
                                          torch.empty(elems, device=device)),
                     providers=[harness.Provider("torch", lambda x, y: y.copy_(x))],
                     modes=("forward",),
                     dtype="float32", bytes={"forward": 2 * elems * 4}),
        harness.Case(op="ceiling", size={"what": "matmul", "n": n},
                     make_inputs=lambda: (torch.randn(n, n, device=device, dtype=dtype),
                                          torch.randn(n, n, device=device, dtype=dtype)),
                     providers=[harness.Provider("torch", torch.mm)], modes=("forward",),
                     dtype=str(dtype).removeprefix("torch."), flops={"forward": 2 * n**3}),
    ]


def values(rows: list[dict]) -> dict:
    """{"copy_gbps": ..., "matmul_tflops": ...} from the ceiling rows (missing: absent)."""
    out = {}
    for row in rows:
        if row.get("op") == "ceiling" and row.get("what") == "copy" and row.get("gbps"):
            out["copy_gbps"] = row["gbps"]
        if row.get("op") == "ceiling" and row.get("what") == "matmul" and row.get("tflops"):
            out["matmul_tflops"] = row["tflops"]
    return out


def add_fractions(rows: list[dict], ceiling: dict) -> None:
    """Adds "of_copy" and "of_matmul" to the rows with GB/s or TFLOP/s."""
    for row in rows:
        if row.get("op") == "ceiling":
            continue
        if row.get("gbps") and ceiling.get("copy_gbps"):
            row["of_copy"] = row["gbps"] / ceiling["copy_gbps"]
        if row.get("tflops") and ceiling.get("matmul_tflops"):
            row["of_matmul"] = row["tflops"] / ceiling["matmul_tflops"]
