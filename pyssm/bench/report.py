"""The markdown report of a benchmark run: environment, ceilings, kernel and encoder tables,
fitted cost exponents, crossover resolutions, VLM latency and, when a study has been run,
accuracy against throughput."""

from __future__ import annotations

import json
from pathlib import Path

from pyssm.bench.results import fmt, markdown_table, short_table


def latest_study(folder: str | Path = "profiles/study") -> Path | None:
    """The newest results.json under ``folder`` (one level down), or None."""
    found = sorted(Path(folder).glob("*/results.json"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def accuracy_points(study_path: Path, encoder_rows: list[dict]) -> list[dict]:
    """One point per (encoder, objective) of a study: its test overall accuracy (mean and 95%
    half-width over seeds) against img/s, taken from this run's pyssm inference rows at the
    resolution nearest the study's when the encoder was measured here, else the study's own."""
    study = json.loads(Path(study_path).read_text())
    size = study.get("budget_config", {}).get("img_size")
    points = []
    for row in study.get("summary", []):
        acc = row.get("test/overall")
        if not acc:
            continue
        mean, half = acc
        ours = [r for r in encoder_rows if r.get("op") == row["encoder"] and r.get("img_s")
                and r.get("provider") == "pyssm" and r.get("mode") == "forward"]
        if ours and size:
            best = min(ours, key=lambda r: abs(r["res"] - size))
            img_s, source = best["img_s"], f"this run, {best['res']} px"
        else:
            img_s, source = row.get("encoder_img_s"), "the study's own timing"
        if not img_s:
            continue
        points.append({"label": f"{row['encoder']} / {row['objective']} ({source})",
                       "img_s": img_s, "accuracy": mean,
                       "half_width": None if half != half else half})  # NaN: one seed
    return points


def build_report(env: dict, sections: dict[str, list[dict]], fits: list[dict],
                 crossings: list[dict], ceiling: dict, accuracy: list[dict],
                 study: str | None, plots: list[str], notes: list[str]) -> str:
    out = ["# pyssm benchmark report", ""]
    out += [f"- {k}: {json.dumps(v) if isinstance(v, dict) else v}" for k, v in env.items()]
    out += ["", "## Ceilings (this run, this device)", ""]
    out.append(f"- copy: {fmt(ceiling.get('copy_gbps'))} GB/s; matmul: "
               f"{fmt(ceiling.get('matmul_tflops'))} TFLOP/s")
    for name, rows in sections.items():
        if rows:
            out += ["", f"## {name}", "", short_table(rows)]
    if fits:
        out += ["", "## Cost against tokens: fitted exponents (ms per image = c T^a)", "",
                markdown_table(fits, ["encoder", "provider", "mode", "exponent", "r2",
                                      "points"])]
    if crossings:
        out += ["", "## Crossover: the resolution where each VMamba overtakes each ViT", "",
                markdown_table(crossings, ["vmamba", "vit", "provider", "mode", "how",
                                           "resolution"]),
                "", "how: measured (between two measured resolutions), always (faster at all), "
                "extrapolated (from power-law fits, beyond the range), never, too few points."]
    out += ["", "## Accuracy against throughput", ""]
    if accuracy:
        out.append(f"From {study}:")
        out += ["", markdown_table(accuracy, ["label", "img_s", "accuracy", "half_width"])]
    else:
        out.append("No study results found (run `pyssm study run`, or pass --study DIR).")
    if plots:
        out += ["", "## Plots", ""] + [f"- {Path(p).name}" for p in plots]
    if notes:
        out += ["", "## Notes", ""] + [f"{i + 1}. {n}" for i, n in enumerate(notes)]
    return "\n".join(out) + "\n"
