"""cross_scan and cross_merge bandwidth, against torch's own clone of the same input tensor.

Both ops are pure data movement: cross_scan reads x (B, C, H, W) once and writes four copies,
cross_merge reads four and writes one, so at best they run at copy speed. Each size times
pyssm's kernel, the pure-PyTorch reference and ``x.clone()`` in the same run; "vs copy" is the
op's GB/s over the clone's.
GPU (bf16): VMamba-T stage-1 maps (B, 96, R/4, R/4) at R = 224 / 512 / 1024, batch 64 / 12 / 3,
and a stage-3 map (64, 384, 14, 14). CPU (float32): (2, 32, 32, 32) and (2, 64, 64, 64).
"""

from __future__ import annotations


import torch

from pyssm.bench import harness
from pyssm.bench.results import ANCHOR_LABEL
from pyssm import ops

NOTES = [
    "GB/s: bytes read + written once over the median time: 5 x the map for cross_scan and "
    "cross_merge (one map in, four out or the reverse), 2 x the input for copy (x.clone()).",
    "vs copy: the op's GB/s over the copy's at the same size, measured in the same run.",
]


def cases(device: torch.device, quick: bool = False) -> list[harness.Case]:
    kernel, gpu = device.type, device.type == "cuda"
    if gpu:
        dtype = torch.bfloat16
        sizes = [(64, 96, 56), (12, 96, 128), (3, 96, 256), (64, 384, 14)][: 1 if quick else 4]
    else:
        dtype, sizes = torch.float32, [(2, 32, 32), (2, 64, 64)][: 1 if quick else 2]
    out = []
    for batch, chans, side in sizes:
        map_bytes = batch * chans * side * side * dtype.itemsize
        for op, shape, fn, ref in (
                ("cross_scan", (batch, chans, side, side), ops.cross_scan,
                 ops.cross_scan_reference),
                ("cross_merge", (batch, 4, chans, side, side), ops.cross_merge,
                 ops.cross_merge_reference)):
            in_bytes = map_bytes * (4 if op == "cross_merge" else 1)
            providers = [
                harness.pyssm_provider(op, kernel, lambda t, f=fn: f(t, backend=kernel)),
                harness.Provider("reference", ref),
                harness.Provider("copy", torch.clone, bytes={"forward": 2 * in_bytes})]
            out.append(harness.Case(
                op=op, size={"batch": batch, "C": chans, "HxW": f"{side}x{side}"},
                make_inputs=lambda s=shape: (torch.randn(s, device=device, dtype=dtype),),
                providers=providers, modes=("forward",), dtype=str(dtype).removeprefix("torch."),
                bytes={"forward": 5 * map_bytes}))
    return out


def add_vs_copy(rows: list[dict]) -> None:
    """Adds "vs copy" (GB/s over the copy's GB/s at the same op and size) to the op rows."""
    rows = [r for r in rows if r["op"] in ("cross_scan", "cross_merge")]
    copies = {(r["op"], r["batch"], r["C"], r["HxW"]): r.get("gbps")
              for r in rows if r["provider"] == "copy"}
    for row in rows:
        copy = copies.get((row["op"], row["batch"], row["C"], row["HxW"]))
        if row["provider"] != "copy" and copy and row.get("gbps"):
            row["vs_copy"] = row["gbps"] / copy
