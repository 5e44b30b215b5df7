"""``pyssm bench compare A.json B.json``: the ratio of two runs, row by row.

Rows match on what they measure (op, provider, mode, sizes, dtype: every column that is not a
result). For each match it prints A's and B's time (ms; for VLM rows the time to first token)
and B / A: below 1, B is faster. Rows only one side has are counted, not hidden; what the
two runs' environments record differently (GPU, driver, torch, Triton, ...) is printed first.
"""

from __future__ import annotations

import math

from pyssm.bench.results import fmt, load_results, markdown_table, row_key


def _time(row: dict) -> float | None:
    ms = row.get("ms")
    return ms if isinstance(ms, (int, float)) and ms > 0 else None


def compare(a: dict, b: dict) -> dict:
    """{"rows": matched rows with a_ms, b_ms, ratio (B / A); "only_a", "only_b": counts;
    "geomean": geometric mean of the ratios}."""
    index_b = {row_key(r): r for r in b["rows"]}
    matched, seen = [], set()
    for row in a["rows"]:
        key = row_key(row)
        other = index_b.get(key)
        if other is None:
            continue
        seen.add(key)
        ta, tb = _time(row), _time(other)
        named = dict(key)
        size = " ".join(f"{k}={v}" for k, v in row.items() if k in named
                        and k not in ("op", "provider", "mode", "dtype"))
        matched.append({"op": row.get("op"), "provider": row.get("provider"),
                        "mode": row.get("mode"), "size": size, "dtype": row.get("dtype"),
                        "a_ms": ta, "b_ms": tb,
                        "ratio": tb / ta if ta and tb else None})
    ratios = [m["ratio"] for m in matched if m["ratio"]]
    return {"rows": matched, "only_a": len(a["rows"]) - len(seen),
            "only_b": len(b["rows"]) - len(seen),
            "geomean": math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None}


# what a timing depends on besides pyssm's code: a ratio across a change here is not a
# comparison of the code alone
TIMING_ENV = ("device", "gpu", "capability", "driver", "torch", "cuda", "cudnn", "triton",
              "python", "cpu", "cpu_threads")


def environment_changes(env_a: dict, env_b: dict) -> list[str]:
    """'key: A -> B' for each of TIMING_ENV that the two runs recorded differently (a key one
    run lacks counts as a difference; one both lack does not)."""
    return [f"{k}: {env_a.get(k)} -> {env_b.get(k)}" for k in TIMING_ENV
            if (k in env_a or k in env_b) and env_a.get(k) != env_b.get(k)]


def compare_files(path_a: str, path_b: str) -> str:
    a, b = load_results(path_a), load_results(path_b)
    result = compare(a, b)
    env_a, env_b = a.get("env", {}), b.get("env", {})
    lines = [f"A: {path_a} ({env_a.get('gpu') or env_a.get('device')}, "
             f"{env_a.get('pyssm_git')}, {env_a.get('date')})",
             f"B: {path_b} ({env_b.get('gpu') or env_b.get('device')}, "
             f"{env_b.get('pyssm_git')}, {env_b.get('date')})"]
    changes = environment_changes(env_a, env_b)
    if changes:
        lines.append("The environments differ, so the ratios are not of the code alone: "
                     + "; ".join(changes))
    lines.append("")
    rows = [dict(r, ratio=r["ratio"]) for r in result["rows"]]
    lines.append(markdown_table(rows, ["op", "provider", "mode", "size", "dtype", "a_ms", "b_ms",
                                       "ratio"]))
    lines.append("")
    lines.append(f"{len(result['rows'])} rows matched; geometric mean B / A: "
                 f"{fmt(result['geomean']) or 'n/a'}; only in A: {result['only_a']}, "
                 f"only in B: {result['only_b']}")
    return "\n".join(lines)
