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

Memory: on a GPU, torch.cuda.max_memory_allocated above the allocation at the start of the
step, and the NVML reading of the same (every context, see env.NvmlSampler) with the power draw
and SM clock; on the CPU, one extra untimed step under torch.profiler's memory recording gives
the peak of the bytes allocated above the start.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from pyssm.bench.env import NvmlSampler

MODES = ("forward", "backward", "full", "step")


@dataclass
class Provider:
    name: str
    fn: Callable[..., torch.Tensor] | None  # fn(*inputs) -> output
    status: str = "ok"                      # otherwise why it does not run
    bytes: dict[str, float] | None = None   # its own traffic per mode, if not the case's
    modes: tuple[str, ...] | None = None    # the modes it runs, if not all of the case's
    # environment variables set while it is measured (every step, forward and backward: a
    # switch the kernels read at each call, such as PYSSM_FLASH_SM90=0), restored after
    env: dict[str, str] | None = None


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


def triton_providers(ours: Callable, torchs: Callable, device: torch.device,
                     quick: bool, two_pass: Callable | None = None) -> list[Provider]:
    """A Triton op's providers: "pyssm-triton" (``ours``; GPU only, as Triton runs CPU tensors
    only in its interpreter), "pyssm-two-pass" (``two_pass``, where given: pyssm's own unfused
    passes; GPU only, and no row elsewhere), "torch" (``torchs``, the unfused ops) and, on full
    GPU sweeps, "torch-compile" of ``torchs`` (compiling costs ~10-30 s per size and mode)."""
    from pyssm.ops import _triton

    gpu = device.type == "cuda"
    if gpu and _triton.available():
        mine = [Provider("pyssm-triton", ours)]
        if two_pass is not None:
            mine.append(Provider("pyssm-two-pass", two_pass))
    else:
        mine = [Provider("pyssm-triton", None, "GPU only" if _triton.available() else "no triton")]
    providers = [*mine, Provider("torch", torchs)]
    if gpu and not quick:
        providers.append(Provider("torch-compile", torch.compile(torchs)))
    return providers


def mlp_sizes(device: torch.device, quick: bool) -> list[tuple[str, int, int, int]]:
    """(layer label, rows, width, hidden) of the MLPs the linear_gelu (fc1: width -> hidden)
    and linear_residual (fc2: hidden -> width) tables time: on a GPU, the encoders' at 224 px x
    128 (the first two under --quick), with "{fc}" in the label for the layer's name; on the
    CPU, two small shapes (one under --quick)."""
    if device.type == "cuda":
        return [("VMamba-T s1 {fc}, 224 px x 128", 128 * 56 * 56, 96, 384),
                ("ViT-B/16 {fc}, 224 px x 128", 128 * 197, 768, 3072),
                ("VMamba-T s3 {fc}, 224 px x 128", 128 * 14 * 14, 384, 1536),
                ("ViT-S/16 {fc}, 224 px x 128", 128 * 197, 384, 1536)][: 2 if quick else 4]
    return [("small", 4096, 96, 384), ("wide", 512, 384, 1536)][: 1 if quick else 2]


def bf16_linear(n: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A Linear(k, n)'s weight (scaled by k^-1/2) and bias, random, in bf16."""
    return ((torch.randn(n, k, device=device) / k ** 0.5).to(torch.bfloat16),
            (0.1 * torch.randn(n, device=device)).to(torch.bfloat16))


def pyssm_provider(op: str, backend: str, fn: Callable) -> Provider:
    """``fn`` as provider "pyssm-<backend>", or a "not built" row when pyssm._C lacks the kernel."""
    from pyssm import _extension

    name = f"pyssm-{backend}"
    if backend != "reference" and not _extension.has_kernel(op, backend):
        return Provider(name, None, "not built")
    return Provider(name, fn)


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


def cpu_peak_mb(step: Callable[[], object]) -> float:
    """Peak MB that ``step()`` allocates on the CPU above what is live when it starts, from the
    allocation records of torch.profiler (profile_memory=True): every alloc and free in order,
    summed as they come."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


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
            warmup: int, repeats: int, budget_s: float, cpu_memory: bool = True) -> dict:
    """Times ``fn`` on the rotating ``copies`` in ``mode``: ms median / p20 / p80, peak MB
    (on the CPU only with ``cpu_memory``: it costs one profiled step), NVML readings."""
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

    extra = {}
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(n)]
        with NvmlSampler(device) as nvml:
            for i, (begin, end) in enumerate(events):
                prepared = prepare(copies[i % len(copies)])
                begin.record()
                step(prepared)
                end.record()
                del prepared
            sync()
        times = [begin.elapsed_time(end) for begin, end in events]
        peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        extra = nvml.result()
    else:
        times = []
        for i in range(n):
            prepared = prepare(copies[i % len(copies)])
            begin = time.perf_counter()
            step(prepared)
            times.append((time.perf_counter() - begin) * 1e3)
            del prepared
        # one more step, profiled for its allocations: skipped for steps over 2 s (the slow
        # Python-loop references), whose rows then have no peak
        peak_mb = (cpu_peak_mb(lambda: step(prepare(copies[0])))
                   if cpu_memory and estimate_ms < 2000 else None)
    return {"ms": _percentile(times, 0.5), "ms_p20": _percentile(times, 0.2),
            "ms_p80": _percentile(times, 0.8), "peak_mb": peak_mb, "repeats": n, **extra}


@contextlib.contextmanager
def env_overrides(overrides: dict[str, str] | None):
    """os.environ with ``overrides`` set inside the block, as it was after."""
    before = {name: os.environ.get(name) for name in overrides or {}}
    os.environ.update(overrides or {})
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_cases(cases: list[Case], device: torch.device, *, modes: tuple[str, ...] | None = None,
              warmup: int, repeats: int, budget_s: float, cpu_memory: bool = True,
              verbose: bool = True, progress: bool | None = None,
              after_case: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Times every provider of every case in each of its modes (or ``modes``); a row each.
    ``after_case(rows so far)`` runs after each case (to save partial results). ``progress``:
    a tqdm bar on stderr (None: only on a terminal)."""
    try:
        from tqdm import tqdm
    except ImportError:  # no progress bar without tqdm
        tqdm = _NoBar

    total = sum(len(modes or c.modes) * len(c.providers) for c in cases)
    bar = tqdm(total=total, desc="bench", unit="row", leave=False,
               disable=None if progress is None else not progress)  # None: on a terminal only
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
                bar.set_postfix_str(f"{case.op} {provider.name} {mode}")
                row = {"op": case.op, "provider": provider.name, "mode": mode, **case.size,
                       "dtype": case.dtype, "device": device.type, "copies": len(copies)}
                row["status"] = provider.status
                if provider.modes is not None and mode not in provider.modes:
                    row["status"] = f"{' / '.join(provider.modes)} only"
                elif provider.fn is not None:
                    try:
                        with env_overrides(provider.env):
                            row.update(measure(provider.fn, copies, mode, device,
                                               warmup=warmup, repeats=repeats,
                                               budget_s=budget_s, cpu_memory=cpu_memory))
                    except Exception as exc:  # an OOM or a missing kernel is a row, not a crash
                        row["status"] = f"error: {type(exc).__name__}: {str(exc)[:160]}"
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                _derive(row, case, provider, mode)
                rows.append(row)
                bar.update()
                if verbose:
                    size = " ".join(f"{k}={v}" for k, v in case.size.items())
                    ms = row.get("ms")
                    tqdm.write(f"  {case.op} {provider.name:15s} {mode:8s} {size}: "
                               f"{f'{ms:.4g} ms' if ms else row['status']}")
        del copies, one
        if after_case is not None:
            after_case(rows)
    bar.close()
    return rows


class _NoBar:
    def __init__(self, *args, **kwargs):
        pass

    def set_postfix_str(self, *args):
        pass

    update = close = set_postfix_str

    @staticmethod
    def write(text):
        print(text, flush=True)


def _derive(row: dict, case: Case, provider: Provider, mode: str) -> None:
    """GB/s and TFLOP/s from the case's bytes and flops; the anchor columns and the ratio."""
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
