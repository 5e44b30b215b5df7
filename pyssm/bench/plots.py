"""matplotlib plots of benchmark results (Agg backend, PNG, written atomically).

    throughput_vs_resolution.png   img/s against resolution per encoder and provider, with the
                                   VMamba x ViT crossovers marked
    memory_vs_resolution.png       peak MB per image against resolution
    cost_vs_tokens.png             ms per image against visual tokens, log-log, with each fitted
                                   power law and its exponent in the legend
    accuracy_vs_throughput.png     the latest study's test accuracy against encoder img/s
    vlm_latency.png                time to first token split into encode / prefill, per encoder
"""

from __future__ import annotations

import io
from pathlib import Path

from pyssm.bench.fit import PowerLaw
from pyssm.bench.results import atomic_write


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out_dir: Path, name: str) -> Path:
    plt = _plt()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buf.getvalue())
    return path


def _by_series(rows: list[dict], mode: str, key: str) -> dict[str, list[tuple]]:
    series: dict[str, list[tuple]] = {}
    for r in rows:
        if r.get("mode") == mode and r.get(key) is not None and r.get("res"):
            series.setdefault(f"{r['op']} ({r['provider']})", []).append((r["res"], r[key]))
    return {k: sorted(v) for k, v in series.items()}


def _empty(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} measured", ha="center", va="center", transform=ax.transAxes)


def encoder_plots(rows: list[dict], laws: list[PowerLaw], crossings: list[dict],
                  out_dir: str | Path, device: str) -> list[Path]:
    plt = _plt()
    written = []

    def against_resolution(key: str, what: str, ylabel: str, title: str, marks=()):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        series = _by_series(rows, "forward", key)
        for label, pts in series.items():
            ax.plot(*zip(*pts), marker="o", label=label)
        for c in marks:
            ax.axvline(c["resolution"], ls="--", lw=0.8, color="grey")
            ax.annotate(f"{c['vmamba']} overtakes {c['vit']}\n({c['how']}, "
                        f"{c['resolution']:.0f} px)", (c["resolution"], 0.95),
                        xycoords=("data", "axes fraction"), fontsize=6, va="top")
        if series:
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        else:
            _empty(ax, what)
        ax.set(xlabel="resolution (px)", ylabel=ylabel, title=f"{title} ({device})")
        return fig

    marks = [c for c in crossings if c["resolution"] is not None and c["mode"] == "forward"]
    written.append(_save(against_resolution("img_s", "throughput", "img/s (inference)",
                                            "Encoder throughput against resolution", marks),
                         out_dir, "throughput_vs_resolution.png"))
    written.append(_save(against_resolution("mb_per_img", "memory",
                                            "peak MB per image above the inputs",
                                            "Encoder memory against resolution"),
                         out_dir, "memory_vs_resolution.png"))

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for law in laws:
        if law.mode != "forward":
            continue
        pts = sorted((r["tokens"], r["ms"] / r["batch"]) for r in rows
                     if r["op"] == law.encoder and r["provider"] == law.provider
                     and r["mode"] == law.mode and r.get("ms") and r.get("tokens"))
        line = ax.plot(*zip(*pts), marker="o", ls="none")[0]
        xs = [pts[0][0], pts[-1][0]]
        ax.plot(xs, [law.ms_per_image(x) for x in xs], color=line.get_color(),
                label=f"{law.encoder} ({law.provider}): T^{law.exponent:.2f}")
    if laws:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    else:
        _empty(ax, "cost series")
    ax.set(xlabel="visual tokens T", ylabel="ms per image",
           title=f"Cost against tokens, fitted exponents ({device})")
    written.append(_save(fig, out_dir, "cost_vs_tokens.png"))
    return written


def accuracy_plot(points: list[dict], out_dir: str | Path, source: str) -> Path:
    """``points``: {"label", "img_s", "accuracy", "half_width"} per encoder / objective."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for p in points:
        ax.errorbar(p["img_s"], p["accuracy"], yerr=p.get("half_width"), fmt="o",
                    label=p["label"])
    if points:
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    else:
        _empty(ax, "study result")
    ax.set(xlabel="encoder img/s", ylabel="test overall accuracy",
           title=f"Accuracy against throughput\n({source})")
    return _save(fig, out_dir, "accuracy_vs_throughput.png")


def vlm_plot(rows: list[dict], out_dir: str | Path, device: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ok = [r for r in rows if r.get("ttft_ms")]
    labels = [f"{r['encoder']}\n{r['res']} px" for r in ok]
    encode = [r["encode_ms"] for r in ok]
    prefill = [r["prefill_ms"] for r in ok]
    ax.bar(labels, encode, label="encode + connector")
    ax.bar(labels, prefill, bottom=encode, label="prefill")
    if not ok:
        _empty(ax, "VLM latency")
    else:
        ax.legend(fontsize=7)
    ax.set(ylabel="ms to first token", title=f"VLM time to first token ({device})")
    ax.tick_params(axis="x", labelsize=7)
    return _save(fig, out_dir, "vlm_latency.png")
