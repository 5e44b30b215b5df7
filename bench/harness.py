"""The shared benchmark harness: providers x modes x sizes -> result rows (Liger-Kernel style).

A benchmark script lists Cases: one op at one size, with a maker of fresh inputs, the bytes it
moves and the flops it does per mode, and the Providers (implementations) to time on it. A
Provider is a function of the inputs, or the reason it cannot run ("not built", ...), which
becomes a row with that status instead of a crash.

Modes: forward (under no_grad), backward (gradients of every float input; the forward runs
untimed before each step), full (forward + backward), step (the provider runs a whole step
itself, such as a training step with its own backward).

Timing: CUDA events around each step on a GPU, time.perf_counter on the CPU. The inputs rotate
among a few copies (together more than twice the L2 cache) so caches don't flatter. One cold
call first; then warm-up and repeats, fewer for slow providers so a row takes about budget_s.
A row reports the median and the 20th / 80th percentiles in ms, GB/s and TFLOP/s where the
case gives bytes / flops, and on a GPU the peak memory a step allocates above its inputs.

Results: write_results() writes <name>.json (atomically: a temp file in the same folder, then
os.replace) and <name>.md, each with an environment header (GPU, driver, versions, git sha).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
try:
    import pyssm  # noqa: F401
except ImportError:  # not installed (e.g. its build failed): the source tree, reference ops only
    sys.path.insert(0, str(ROOT))
DEFAULT_OUT = ROOT / "build" / "bench-results"
MODES = ("forward", "backward", "full", "step")
ANCHOR_LABEL = "(ANCHORS.md, measured another day)"
LABELS = {"ms": "ms", "ms_p20": "p20", "ms_p80": "p80", "gbps": "GB/s", "tflops": "TFLOP/s",
          "peak_mb": "peak MB", "anchor_ms": f"anchor ms {ANCHOR_LABEL}",
          "anchor_tflops": f"anchor TFLOP/s {ANCHOR_LABEL}",
          "vs_anchor": "vs anchor (>1: faster)", "vs_copy": "vs copy", "img_s": "img/s",
          "mb_per_img": "MB/img"}
_NOT_COLUMNS = {"device", "repeats", "copies"}


@dataclass
class Provider:
    name: str
    fn: Callable[..., torch.Tensor] | None  # fn(*inputs) -> output
    status: str = "ok"                      # otherwise why it does not run
    bytes: dict[str, float] | None = None   # its own traffic per mode, if not the case's


@dataclass
class Case:
    op: str
    size: dict                               # the columns that name the size
    make_inputs: Callable[[], tuple]         # one fresh copy of the inputs
    providers: list[Provider]
    modes: tuple[str, ...] = ("forward", "full")
    dtype: str = ""
    bytes: dict[str, float] = field(default_factory=dict)   # mode -> bytes moved
    flops: dict[str, float] = field(default_factory=dict)   # mode -> flops
    extra: Callable[[str, str], dict] | None = None         # (provider, mode) -> anchor columns


def pyssm_provider(op: str, backend: str, fn: Callable) -> Provider:
    """``fn`` as provider "pyssm-<backend>", or a "not built" row when pyssm._C lacks the kernel."""
    from pyssm import _extension

    name = f"pyssm-{backend}"
    if backend != "reference" and not _extension.has_kernel(op, backend):
        return Provider(name, None, "not built")
    return Provider(name, fn)


# ---- environment --------------------------------------------------------------------------

def _run(cmd: list[str]) -> str | None:
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_sha() -> str | None:
    sha = _run(["git", "rev-parse", "--short=12", "HEAD"])
    if sha and _run(["git", "status", "--porcelain", "--untracked-files=no"]):
        sha += "+dirty"
    return sha


def device_slug(device: torch.device | None = None) -> str:
    """'nvidia-h200' for the GPU, 'cpu' otherwise: the profiles/ folder name."""
    cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def environment(device: torch.device) -> dict:
    import pyssm

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "pyssm": pyssm.__version__,
           "pyssm_git": git_sha(), "pyssm_extension": pyssm.extension_status(),
           "cpu": platform.machine(), "cpu_threads": torch.get_num_threads()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   gpu_memory_gb=round(props.total_memory / 2**30, 1),
                   sms=props.multi_processor_count, cudnn=torch.backends.cudnn.version())
        try:
            import pynvml  # nvidia-ml-py
            pynvml.nvmlInit()
            driver = pynvml.nvmlSystemGetDriverVersion()
            env["driver"] = driver.decode() if isinstance(driver, bytes) else driver
        except Exception:  # not installed, or no NVML: the header just lacks the driver
            env["driver"] = None
    return env


# ---- timing -------------------------------------------------------------------------------

def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _copy_bytes(inputs: tuple) -> int:
    return sum(t.numel() * t.element_size() for t in inputs if isinstance(t, torch.Tensor))


def n_copies(one_copy_bytes: int, device: torch.device) -> int:
    """Enough copies that rotating through them spans twice the L2 (CPU: 32 MiB), 2 to 8."""
    cache = 32 * 2**20
    if device.type == "cuda":
        cache = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
        free = torch.cuda.mem_get_info(device)[0]
        most = max(1, int(0.2 * free // max(one_copy_bytes, 1)))
    else:
        most = 8
    return max(1, min(8, most, max(2, 1 + math.ceil(2 * cache / max(one_copy_bytes, 1)))))


def _grad_leaves(inputs: tuple) -> list[torch.Tensor]:
    return [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


def _steps(fn: Callable, mode: str):
    """(prepare, step) for a mode: prepare runs untimed before each timed step."""
    grad_out: list[torch.Tensor] = []

    def backward(out, inputs):
        if not grad_out:  # made on the first (cold) call, outside the timed steps
            grad_out.append(torch.randn_like(out))
        torch.autograd.grad(out, _grad_leaves(inputs), grad_out[0], allow_unused=True)

    if mode == "forward":
        def step(inputs):
            with torch.no_grad():
                fn(*inputs)
        return (lambda inputs: inputs), step
    if mode == "full":
        return (lambda inputs: inputs), (lambda inputs: backward(fn(*inputs), inputs))
    if mode == "backward":
        return (lambda inputs: (fn(*inputs), inputs)), (lambda prepared: backward(*prepared))
    if mode == "step":  # fn runs a whole step itself (a training step: forward, backward)
        return (lambda inputs: inputs), (lambda inputs: fn(*inputs))
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def measure(fn: Callable, copies: list[tuple], mode: str, device: torch.device, *,
            warmup: int, repeats: int, budget_s: float) -> dict:
    """Times ``fn`` on the rotating ``copies`` in ``mode``: ms median / p20 / p80, peak MB."""
    prepare, step = _steps(fn, mode)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    start = time.perf_counter()
    step(prepare(copies[0]))  # cold call: lazy init, allocator, autotuning
    sync()
    estimate_ms = (time.perf_counter() - start) * 1e3
    if estimate_ms < budget_s * 1e3:  # not so slow that one more call matters: a warm estimate
        start = time.perf_counter()
        step(prepare(copies[1 % len(copies)]))
        sync()
        estimate_ms = max((time.perf_counter() - start) * 1e3, 1e-3)
    n = max(1, min(repeats, int(budget_s * 1e3 / estimate_ms)))
    for i in range(min(warmup - 1, int(0.25 * budget_s * 1e3 / estimate_ms))):
        step(prepare(copies[i % len(copies)]))
    sync()

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(n)]
        for i, (begin, end) in enumerate(events):
            prepared = prepare(copies[i % len(copies)])
            begin.record()
            step(prepared)
            end.record()
            del prepared
        sync()
        times = [begin.elapsed_time(end) for begin, end in events]
        peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        times = []
        for i in range(n):
            prepared = prepare(copies[i % len(copies)])
            begin = time.perf_counter()
            step(prepared)
            times.append((time.perf_counter() - begin) * 1e3)
            del prepared
        peak_mb = None
    return {"ms": _percentile(times, 0.5), "ms_p20": _percentile(times, 0.2),
            "ms_p80": _percentile(times, 0.8), "peak_mb": peak_mb, "repeats": n}


def run_cases(cases: list[Case], device: torch.device, *, modes: tuple[str, ...] | None = None,
              warmup: int, repeats: int, budget_s: float, verbose: bool = True,
              after_case: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Times every provider of every case in each of its modes (or ``modes``); a row each.
    ``after_case(rows so far)`` runs after each case (to save partial results)."""
    rows = []
    for case in cases:
        torch.manual_seed(0)
        one = case.make_inputs()
        copies = [one] + [case.make_inputs() for _ in range(n_copies(_copy_bytes(one), device) - 1)]
        for mode in modes or case.modes:
            if mode in ("backward", "full"):
                copies = [tuple(t.requires_grad_() if isinstance(t, torch.Tensor)
                                and t.is_floating_point() else t for t in c) for c in copies]
            for provider in case.providers:
                row = {"op": case.op, "provider": provider.name, "mode": mode, **case.size,
                       "dtype": case.dtype, "device": device.type, "copies": len(copies)}
                row["status"] = provider.status
                if provider.fn is not None:
                    try:
                        row.update(measure(provider.fn, copies, mode, device, warmup=warmup,
                                           repeats=repeats, budget_s=budget_s))
                    except Exception as exc:  # an OOM or a missing kernel is a row, not a crash
                        row["status"] = f"error: {type(exc).__name__}: {str(exc)[:160]}"
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                ms = row.get("ms")
                moved = (provider.bytes or case.bytes).get(mode)
                if ms and moved:
                    row["gbps"] = moved / ms / 1e6
                if ms and case.flops.get(mode):
                    row["tflops"] = case.flops[mode] / ms / 1e9
                if case.extra is not None:
                    row.update(case.extra(provider.name, mode))
                if ms and row.get("anchor_ms"):
                    row["vs_anchor"] = row["anchor_ms"] / ms
                elif row.get("tflops") and row.get("anchor_tflops"):
                    row["vs_anchor"] = row["tflops"] / row["anchor_tflops"]
                rows.append(row)
                if verbose:
                    size = " ".join(f"{k}={v}" for k, v in case.size.items())
                    print(f"  {case.op} {provider.name:15s} {mode:8s} {size}: "
                          f"{_fmt(ms) + ' ms' if ms else row['status']}", flush=True)
        del copies, one
        if after_case is not None:
            after_case(rows)
    return rows


# ---- output -------------------------------------------------------------------------------

def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A markdown table of the rows; by default every column that some row fills."""
    if columns is None:
        columns = []
        for row in rows:
            columns += [k for k in row if k not in columns and k not in _NOT_COLUMNS]
        columns = [c for c in columns if c != "status"] + ["status"]
        columns = [c for c in columns if any(row.get(c) not in (None, "") for row in rows)]
    lines = ["| " + " | ".join(LABELS.get(c, c) for c in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


RESULT_KEYS = {"op", "provider", "mode", "dtype", "device", "status", "copies", "repeats", "ms",
               "ms_p20", "ms_p80", "gbps", "tflops", "peak_mb", "anchor_ms", "anchor_tflops",
               "vs_anchor", "vs_copy", "size", "img_s", "mb_per_img"}
SHORT_COLUMNS = ["op", "provider", "mode", "size", "dtype", "ms", "img_s", "mb_per_img", "gbps",
                 "tflops", "peak_mb",
                 "anchor_ms", "anchor_tflops", "vs_anchor", "vs_copy", "status"]


def short_table(rows: list[dict]) -> str:
    """A narrow markdown table: one "size" column of the size keys that vary, key results."""
    varying = [k for row in rows for k in row if k not in RESULT_KEYS
               and len({str(r.get(k)) for r in rows if r["op"] == row["op"]}) > 1]
    for row in rows:
        row["size"] = " ".join(f"{k}={row[k]}" for k in dict.fromkeys(varying) if k in row)
    columns = [c for c in SHORT_COLUMNS if any(row.get(c) not in (None, "") for row in rows)]
    return markdown_table(rows, columns)


def _atomic_write(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.",
                                     delete=False) as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(f.name, 0o644)
    os.replace(f.name, path)


def write_results(name: str, rows: list[dict], env: dict, out_dir: str | Path,
                  notes: list[str] = ()) -> Path:
    """Writes <out_dir>/<name>.json and <name>.md; returns the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / f"{name}.json",
                  json.dumps({"benchmark": name, "env": env, "notes": list(notes), "rows": rows},
                             indent=1, default=str) + "\n")
    header = "\n".join(f"- {k}: {json.dumps(v) if isinstance(v, dict) else v}"
                       for k, v in env.items())
    foot = "\n".join(f"{i + 1}. {n}" for i, n in enumerate(notes))
    _atomic_write(out / f"{name}.md", f"# {name}\n\n{header}\n\n{markdown_table(rows)}\n\n"
                                      f"{foot}\n")
    return out / f"{name}.json"


# ---- command line -------------------------------------------------------------------------

def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for JSON + markdown")
    parser.add_argument("--modes", nargs="+", choices=MODES,
                        help="run these modes on every case (default: each case's own)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int,
                        help="timed steps per row (default 30 GPU, 10 CPU)")
    parser.add_argument("--warmup", type=int, help="warm-up steps (default 5 GPU, 2 CPU)")
    parser.add_argument("--budget-s", type=float, help="about this long per row (default 1.0)")
    return parser


def resolve_device(name: str, threads: int | None = None) -> torch.device:
    if threads:
        torch.set_num_threads(threads)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    return torch.device(name)


def timing_kwargs(args, device: torch.device) -> dict:
    gpu = device.type == "cuda"
    return {"warmup": args.warmup if args.warmup is not None else (5 if gpu else 2),
            "repeats": args.repeats or ((10 if args.quick else 30) if gpu else
                                        (3 if args.quick else 10)),
            "budget_s": args.budget_s or (0.5 if args.quick else 1.0),
            "modes": tuple(args.modes) if args.modes else None}


def run_benchmark(name: str, cases: list[Case], notes: list[str], args, device: torch.device,
                  post: Callable[[list[dict]], None] | None = None,
                  show: bool = True) -> list[dict]:
    """What each bench script's main does: time the cases, write the results (after each case)
    and print them (``show``). ``post(rows)`` adds derived columns before each write."""
    print(f"{name}: {len(cases)} cases on {device}", flush=True)
    env = environment(device)

    def save(rows):  # after every case, so a run cut short still leaves its rows
        if post is not None:
            post(rows)
        return write_results(name, rows, env, args.out, notes)

    rows = run_cases(cases, device, **timing_kwargs(args, device), after_case=save)
    path = save(rows)
    if show:
        print(markdown_table(rows))
        for i, note in enumerate(notes):
            print(f"{i + 1}. {note}")
    print(f"wrote {path} and {path.with_suffix('.md')}", flush=True)
    return rows
