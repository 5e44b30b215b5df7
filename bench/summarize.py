"""Prints the key rows of benchmark result JSON files: pyssm's rows, and the reference points
beside them (SDPA default, copy) that show the timing agrees with ANCHORS.md.

    python bench/summarize.py DIR [DIR ...]      (every *.json written by the harness)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import harness

KEY_PROVIDERS = ("sdpa-default", "copy")


def key_rows(rows: list[dict]) -> list[dict]:
    ours = [r for r in rows if r["provider"].startswith("pyssm")]
    statuses = {r["status"] for r in ours}
    if ours and statuses != {"ok"} and len(statuses) == 1:  # one line for "not built"
        ours = [{"op": ours[0]["op"], "provider": ours[0]["provider"], "mode": "all",
                 "status": statuses.pop()}]
    return ours + [r for r in rows if r["provider"] in KEY_PROVIDERS]


def main(dirs: list[str]) -> int:
    for path in sorted(p for d in dirs for p in Path(d).glob("*.json")):
        try:
            result = json.loads(path.read_text())
            rows = result["rows"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a harness result
        print(f"\n{result.get('benchmark', path.stem)} ({path})")
        print(harness.short_table(key_rows(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or [str(harness.DEFAULT_OUT)]))
