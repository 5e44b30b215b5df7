"""Records every Triton kernel launch the CPU tests make in Triton's interpreter, as a GPU would
be asked for it, so that ``bench/triton_compile.py --launches PATH`` compiles each one for a GPU
(``pytest --triton-launches=PATH``; .ci/run does both).

The interpreter checks a kernel's arithmetic but not whether Triton's GPU compiler accepts it at
the tile sizes and flags a launch picks (a dot narrower than 16, a constexpr combination no
model shape reaches): the odd sizes the tests run are those the device check's ``-m cuda``
tests run, so compiling each launch here finds such a failure before a GPU does.

A launch is recorded as its kernel (module and name), each argument's Triton type as the JIT
would specialise it on a GPU (a tensor's element type as a pointer; an integer as i32 / i64,
or the constant 1, which the JIT folds; None as a constant), the constexpr values, num_warps
and num_stages. Values that are not types (sizes, strides) are not kept, so one record stands
for every launch that compiles to the same kernel. Not reproduced: the JIT's other
specialisation, pointers and integers divisible by 16 (an alignment hint for vector loads),
so each record compiles without it.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from pyssm.bench.results import atomic_write

ELEMENT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
           torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32", torch.int16: "i16",
           torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}

_records: set[str] = set()
_unrecordable: list[str] = []


def _constexpr_names(fn) -> set[str]:
    return {name for name, p in inspect.signature(fn).parameters.items()
            if "constexpr" in str(p.annotation)}


def _argument(value) -> tuple[str, object]:
    """(Triton type, constant): the constant is kept only for a "constexpr" type."""
    if value is None:
        return "constexpr", None
    if isinstance(value, torch.Tensor):
        return "*" + ELEMENT[value.dtype], None
    if isinstance(value, bool):
        return "i1", None
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1
        return ("i32", None) if -2**31 <= value < 2**31 else ("i64", None)
    if isinstance(value, float):
        return "fp32", None
    raise TypeError(f"an argument of type {type(value).__name__}")


def record(fn, args: tuple, kwargs: dict) -> None:
    """One launch of the kernel ``fn`` (the Python function under Triton's decorator)."""
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k, None) for k in ("num_warps", "num_stages")}
    kernel = f"{fn.__module__}.{fn.__qualname__}"
    signature, constants = {}, {}
    try:
        binding = inspect.signature(fn).bind(*args, **kwargs)
        binding.apply_defaults()
        bound, names = binding.arguments, list(binding.arguments)
        constexprs = _constexpr_names(fn)
        for name in names:
            if name in constexprs:
                signature[name] = "constexpr"
                constants[name] = bound[name]
                continue
            kind, constant = _argument(bound[name])
            signature[name] = kind
            if kind == "constexpr":
                constants[name] = constant
        line = json.dumps({"kernel": kernel, "signature": signature, "constants": constants,
                           **options})
    except (TypeError, KeyError) as exc:  # noqa: PERF203 (kept, and reported by the script)
        _unrecordable.append(f"{kernel}: {exc}")
        return
    _records.add(line)


def start() -> None:
    """Records each launch from now on (the interpreter's launch, wrapped once)."""
    from triton.runtime.interpreter import InterpretedFunction

    if getattr(InterpretedFunction.run, "_pyssm_records", False):
        return
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            record(self.fn, args, kwargs)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    recording_run._pyssm_records = True
    InterpretedFunction.run = recording_run


def write(path: str | Path) -> int:
    """Writes the launches recorded so far to ``path`` (JSON, atomically); returns their count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"launches": [json.loads(line) for line in sorted(_records)],
            "unrecordable": sorted(set(_unrecordable))}
    atomic_write(path, json.dumps(data, indent=1) + "\n")
    return len(_records)
