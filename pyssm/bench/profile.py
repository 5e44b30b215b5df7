"""``pyssm profile encoder NAME --img-size R --batch B``: where an encoder's time goes.

Runs a few inference steps (bf16 autocast on a GPU) under torch.profiler and writes:
  profile-<name>-<R>px.md    the top kernels / ops by self device time (CPU time on the CPU),
                             with their share of the total, like ANCHORS.md's breakdown
  trace-<name>-<R>px.json    a Chrome / Perfetto trace of the same steps
and prints the table and an ``ncu`` command line (clocks left alone: --clock-control none) that
inspects the top kernel in one of the same steps.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
from pathlib import Path

import torch

from pyssm.bench.results import atomic_write, markdown_table


def _kernel_rows(prof, device: torch.device, top: int) -> list[dict]:
    gpu = device.type == "cuda"
    events = [e for e in prof.key_averages()
              if (e.self_device_time_total if gpu else e.self_cpu_time_total) > 0]
    key = (lambda e: e.self_device_time_total) if gpu else (lambda e: e.self_cpu_time_total)
    total = sum(key(e) for e in events) or 1.0
    rows = []
    for e in sorted(events, key=key, reverse=True)[:top]:
        rows.append({"kernel / op": e.key[:90], "calls": e.count,
                     "self ms": key(e) / 1e3, "share": f"{100 * key(e) / total:.1f}%"})
    return rows


def profile_encoder(name: str, img_size: int, batch: int, device: torch.device,
                    out_dir: str | Path, steps: int = 3, top: int = 15,
                    trace: bool = True) -> dict:
    """Profiles ``steps`` inference steps; returns {"rows", "table", "ncu", "files"}."""
    from torch.profiler import ProfilerActivity, profile

    from pyssm.models import create_encoder

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = create_encoder(name, img_size=img_size).to(device).eval()
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with torch.no_grad(), autocast:
        model(x)  # warm-up outside the profile: lazy init, cuDNN autotuning
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        with profile(activities=activities) as prof:
            for _ in range(steps):
                model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    rows = _kernel_rows(prof, device, top)
    stem = f"{name}-{img_size}px"
    files = []
    if trace:
        trace_path = out_dir / f"trace-{stem}.json"
        tmp = out_dir / f".trace-{stem}.json.tmp"
        prof.export_chrome_trace(str(tmp))
        tmp.replace(trace_path)  # atomic: a partial trace never takes the name
        files.append(str(trace_path))
    what = "self GPU time" if device.type == "cuda" else "self CPU time"
    table = markdown_table(rows, ["kernel / op", "calls", "self ms", "share"])
    top_kernel = rows[0]["kernel / op"] if rows else "KERNEL"
    ncu = ("ncu --clock-control none --kernel-name regex:" + shlex.quote(top_kernel[:40])
           + " --launch-skip 3 --launch-count 1 --set full -o " + shlex.quote(f"ncu-{stem}")
           + " " + shlex.join([sys.executable, "-m", "pyssm", "profile", "encoder", name,
                                "--img-size", str(img_size), "--batch", str(batch),
                                "--device", device.type, "--no-trace", "--out",
                                str(out_dir)]))
    text = (f"# {name} at {img_size} px, batch {batch}, {device.type}: top {len(rows)} by "
            f"{what} over {steps} steps\n\n{table}\n\nInspect the top kernel:\n\n    {ncu}\n")
    md = out_dir / f"profile-{stem}.md"
    atomic_write(md, text)
    files.append(str(md))
    return {"rows": rows, "table": text, "ncu": ncu, "files": files}
