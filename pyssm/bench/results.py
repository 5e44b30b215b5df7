"""Benchmark results on disk: JSON (rows + environment + notes) and a markdown table beside it,
both written atomically (a temp file in the same folder, then os.replace)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

ANCHOR_LABEL = "(ANCHORS.md, measured another day)"
LABELS = {"ms": "ms", "ms_p20": "p20", "ms_p80": "p80", "gbps": "GB/s", "tflops": "TFLOP/s",
          "peak_mb": "peak MB", "nvml_peak_mb": "NVML peak MB", "power_w": "W",
          "sm_clock_mhz": "SM MHz", "anchor_ms": f"anchor ms {ANCHOR_LABEL}",
          "anchor_tflops": f"anchor TFLOP/s {ANCHOR_LABEL}",
          "vs_anchor": "vs anchor (>1: faster)", "vs_copy": "vs copy",
          "of_copy": "of copy ceiling", "of_matmul": "of matmul ceiling", "img_s": "img/s",
          "mb_per_img": "MB/img", "ttft_ms": "TTFT ms", "decode_tok_s": "decode tok/s",
          "a_ms": "A ms", "b_ms": "B ms", "ratio": "B / A (<1: B faster)"}
_NOT_COLUMNS = {"device", "repeats", "copies", "benchmark"}
# the columns that are results; every other column names the measurement (compare matches them)
RESULT_KEYS = {"status", "copies", "repeats", "ms", "ms_p20", "ms_p80", "gbps", "tflops",
               "peak_mb", "nvml_peak_mb", "power_w", "sm_clock_mhz", "anchor_ms",
               "anchor_tflops", "vs_anchor", "vs_copy", "of_copy", "of_matmul", "size", "img_s",
               "mb_per_img", "tokens", "ttft_ms", "decode_tok_s", "encode_ms", "prefill_ms",
               "decode_ms_per_token", "prompt_tokens"}
SHORT_COLUMNS = ["op", "provider", "mode", "size", "dtype", "ms", "img_s", "mb_per_img", "gbps",
                 "of_copy", "tflops", "of_matmul", "ttft_ms", "decode_tok_s", "peak_mb",
                 "anchor_ms", "anchor_tflops", "vs_anchor", "vs_copy", "status"]


def fmt(v) -> str:
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
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def short_table(rows: list[dict]) -> str:
    """A narrow markdown table: one "size" column of every key that names the size, and the
    key results."""
    rows = [dict(r) for r in rows]
    for row in rows:
        row["size"] = " ".join(f"{k}={v}" for k, v in row.items()
                               if k not in RESULT_KEYS and k not in _NOT_COLUMNS
                               and k not in ("op", "provider", "mode", "dtype"))
    columns = [c for c in SHORT_COLUMNS if any(row.get(c) not in (None, "") for row in rows)]
    return markdown_table(rows, columns)


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Writes ``data`` to ``path`` through a temp file in the same folder and os.replace, so a
    reader never sees half a file and a killed run leaves the previous one."""
    path = Path(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    with tempfile.NamedTemporaryFile(mode, dir=path.parent, prefix=f".{path.name}.",
                                     delete=False) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(f.name, 0o644)
    os.replace(f.name, path)


def write_results(name: str, rows: list[dict], env: dict, out_dir: str | Path,
                  notes: list[str] = (), extra: dict | None = None) -> Path:
    """Writes <out_dir>/<name>.json (rows, env, notes and ``extra`` sections) and <name>.md;
    returns the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "env": env, "notes": list(notes), "rows": rows, **(extra or {})}
    atomic_write(out / f"{name}.json", json.dumps(result, indent=1, default=str) + "\n")
    header = "\n".join(f"- {k}: {json.dumps(v) if isinstance(v, dict) else v}"
                       for k, v in env.items())
    foot = "\n".join(f"{i + 1}. {n}" for i, n in enumerate(notes))
    atomic_write(out / f"{name}.md", f"# {name}\n\n{header}\n\n{markdown_table(rows)}\n\n"
                                     f"{foot}\n")
    return out / f"{name}.json"


def load_results(path: str | Path) -> dict:
    """A result JSON written by write_results; a clear error for anything else."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except OSError as exc:
        raise FileNotFoundError(f"cannot read benchmark result {path}: {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(result, dict) or not isinstance(result.get("rows"), list):
        raise ValueError(f"{path} is not a pyssm benchmark result (no 'rows' list)")
    return result


def row_key(row: dict) -> tuple:
    """What a row measures (op, provider, mode, size, dtype, ...), without its results."""
    return tuple(sorted((k, str(v)) for k, v in row.items()
                        if k not in RESULT_KEYS and k not in _NOT_COLUMNS and k != "device"))
