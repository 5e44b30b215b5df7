"""``pyssm bench`` (also ``python -m pyssm.bench``) and ``pyssm profile``.

    pyssm bench kernels    ss2d, selective_scan, cross_scan, attention, layer_norm,
                           depthwise_conv2d, linear_gelu, linear_residual, mlp_gelu,
                           mlp_residual, norm_mlp_residual, layer_norm_linear against the
                           reference, torch SDPA, torch.compile, mamba_ssm / official VMamba
                           when installed, and the copy and matmul ceilings measured in the
                           same run
    pyssm bench encoders   img/s and memory against resolution; fitted cost exponents;
                           crossover resolutions; plots
    pyssm bench vlm        time to first token and decode tokens/s with each encoder
    pyssm bench all        all three, a report.md and every plot (the main job)
    pyssm bench compare A.json B.json      the ratio of two runs
    pyssm profile encoder NAME --img-size R --batch B

Results go to --out (default build/bench-results/<device>): <what>.json (rows + environment),
<what>.md, PNG plots and, for ``all``, report.md. Each JSON is rewritten after every case, so
a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

KERNEL_OPS = ("ss2d", "ss2d_module", "selective_scan", "cross_scan", "attention", "layer_norm",
              "depthwise_conv2d", "linear_gelu", "linear_residual", "mlp_gelu", "mlp_residual",
              "norm_mlp_residual", "layer_norm_linear")


# ---- shared options ---------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats (smoke run)")
    p.add_argument("--out", default=None,
                   help="results folder (default build/bench-results/<device>)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--repeats", type=int, help="timed steps per row (default 30 GPU, 10 CPU)")
    p.add_argument("--warmup", type=int, help="warm-up steps (default 5 GPU, 2 CPU)")
    p.add_argument("--budget-s", type=float, help="about this long per row (default 1.0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def resolve_device(name: str, threads: int | None = None) -> torch.device:
    if threads:
        torch.set_num_threads(threads)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: torch sees no CUDA device")
    return torch.device(name)


def _timing(args, device: torch.device) -> dict:
    gpu = device.type == "cuda"
    return {"warmup": args.warmup if args.warmup is not None else (5 if gpu else 2),
            "repeats": args.repeats or ((10 if args.quick else 30) if gpu else
                                        (3 if args.quick else 10)),
            "budget_s": args.budget_s or (0.5 if args.quick else 1.0),
            "progress": False if args.no_progress else None}


class Run:
    """One invocation: device, environment, output folder, timing options."""

    def __init__(self, args):
        from pyssm.bench.env import device_slug, environment

        self.args = args
        self.device = resolve_device(args.device, args.threads)
        self.env = environment(self.device)
        self.out = Path(args.out or Path("build", "bench-results", device_slug(self.device)))
        self.out.mkdir(parents=True, exist_ok=True)
        self.timing = _timing(args, self.device)
        self.ceiling: dict = {}

    def cases(self, name: str, cases, notes, post=None) -> list[dict]:
        """Times ``cases``, writing <name>.json / .md after each case; returns the rows."""
        from pyssm.bench import ceilings
        from pyssm.bench.harness import run_cases
        from pyssm.bench.results import write_results

        print(f"{name}: {len(cases)} cases on {self.device}", flush=True)

        def save(rows):
            if post is not None:
                post(rows)
            ceilings.add_fractions(rows, self.ceiling)
            write_results(name, rows, self.env, self.out, notes)

        rows = run_cases(cases, self.device, after_case=save, **self.timing)
        save(rows)
        return rows


def _plot(fn, *args) -> list:
    """The files ``fn`` writes, as a list; none, with a note, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("note: matplotlib is not installed: no plots (pip install matplotlib)",
              file=sys.stderr)
        return []
    written = fn(*args)
    return written if isinstance(written, list) else [written]


# ---- subcommands ------------------------------------------------------------------------------

def run_kernels(run: Run, ops: list[str]) -> list[dict]:
    from pyssm.bench import (attention, ceilings, cross_scan, depthwise_conv2d, layer_norm,
                             layer_norm_linear, linear_gelu, linear_residual, mlp_gelu,
                             mlp_residual, norm_mlp_residual, selective_scan, ss2d,
                             ss2d_module)

    modules = {"ss2d": ss2d, "ss2d_module": ss2d_module, "selective_scan": selective_scan,
               "cross_scan": cross_scan, "attention": attention, "layer_norm": layer_norm,
               "depthwise_conv2d": depthwise_conv2d, "linear_gelu": linear_gelu,
               "linear_residual": linear_residual, "mlp_gelu": mlp_gelu,
               "mlp_residual": mlp_residual, "norm_mlp_residual": norm_mlp_residual,
               "layer_norm_linear": layer_norm_linear}
    unknown = [op for op in ops if op not in modules]
    if unknown:
        raise SystemExit(f"error: --ops: unknown {unknown}; expected some of {KERNEL_OPS}")
    quick = run.args.quick
    cases = ceilings.cases(run.device, quick)
    for op in ops:
        cases += modules[op].cases(run.device, quick)
    notes = ceilings.NOTES + [n for op in ops for n in modules[op].NOTES]

    def post(rows):
        run.ceiling = ceilings.values(rows)
        cross_scan.add_vs_copy(rows)

    return run.cases("kernels", cases, notes, post)


def check_encoders(names: list[str] | None, timm_rope: bool = False) -> None:
    """SystemExit naming what --encoders names that is not an encoder; ``timm_rope``: timm's
    rotary ViTs (encoders.TIMM_ROPE) count, which only the encoders benchmark times (the VLM
    benchmark builds pyssm's encoders)."""
    from pyssm.bench import encoders
    from pyssm.models import list_encoders

    known = list_encoders() + (list(encoders.TIMM_ROPE) if timm_rope else [])
    unknown = [n for n in names or () if n not in known]
    if unknown:
        also = f" or one of timm's rotary ViTs {list(encoders.TIMM_ROPE)}" if timm_rope else ""
        raise SystemExit(f"error: --encoders: unknown {unknown}; see `pyssm encoders`{also}")


def run_encoders(run: Run, names: list[str] | None, timm_rope: bool = False) -> dict:
    """``timm_rope``: as check_encoders takes it."""
    from pyssm.bench import encoders, fit, plots
    from pyssm.bench.results import write_results

    check_encoders(names, timm_rope)
    rows = run.cases("encoders", encoders.cases(run.device, run.args.quick, names),
                     encoders.NOTES, encoders.add_rates)
    laws = fit.fits(rows)
    crossings = fit.crossovers(rows)
    write_results("encoders", rows, run.env, run.out, encoders.NOTES,
                  extra={"fits": fit.as_dicts(laws), "crossovers": crossings})
    written = _plot(plots.encoder_plots, rows, laws, crossings, run.out, run.device.type)
    return {"rows": rows, "fits": fit.as_dicts(laws), "crossovers": crossings,
            "plots": [str(p) for p in written]}


def run_vlm(run: Run, names: list[str] | None, lm: str | None, batch: int,
            new_tokens: int | None) -> dict:
    from pyssm.bench import plots, vlm
    from pyssm.bench.results import write_results

    print(f"vlm: on {run.device}", flush=True)
    rows = vlm.run(run.device, run.args.quick, names, lm, batch, new_tokens,
                   repeats=run.args.repeats)
    write_results("vlm", rows, run.env, run.out, vlm.NOTES)
    return {"rows": rows, "plots": [str(p) for p in _plot(plots.vlm_plot, rows, run.out,
                                                          run.device.type)]}


def _accuracy(run: Run, study: str | None, encoder_rows: list[dict]):
    from pyssm.bench import plots, report

    path = Path(study) / "results.json" if study and Path(study).is_dir() else (
        Path(study) if study else report.latest_study())
    if path is None or not path.exists():
        if study:
            print(f"warning: --study {study}: no results.json there", file=sys.stderr)
        return [], None, []
    points = report.accuracy_points(path, encoder_rows)
    return points, str(path), [str(p) for p in _plot(plots.accuracy_plot, points, run.out,
                                                      str(path))]


def cmd_kernels(args) -> int:
    from pyssm.bench.results import short_table

    run = Run(args)
    rows = run_kernels(run, _csv(args.ops))
    print(short_table(rows))
    print(f"results in {run.out}")
    return 0


def cmd_encoders(args) -> int:
    from pyssm.bench.results import markdown_table, short_table

    run = Run(args)
    result = run_encoders(run, _csv(args.encoders) if args.encoders else None, timm_rope=True)
    print(short_table(result["rows"]))
    if result["fits"]:
        print(markdown_table(result["fits"], ["encoder", "provider", "mode", "exponent", "r2"]))
    if result["crossovers"]:
        print(markdown_table(result["crossovers"], ["vmamba", "vit", "mode", "how",
                                                    "resolution"]))
    print(f"results and plots in {run.out}")
    return 0


def cmd_vlm(args) -> int:
    from pyssm.bench.results import short_table

    run = Run(args)
    result = run_vlm(run, _csv(args.encoders) if args.encoders else None, args.lm, args.batch,
                     args.new_tokens)
    print(short_table(result["rows"]))
    print(f"results in {run.out}")
    return 0


def cmd_all(args) -> int:
    from pyssm.bench import ceilings, encoders, report, vlm
    from pyssm.bench.results import atomic_write, markdown_table, short_table

    start = time.perf_counter()
    run = Run(args)
    names = _csv(args.encoders) if args.encoders else None
    check_encoders(names)   # (before the kernels' minutes)
    kernel_rows = run_kernels(run, list(KERNEL_OPS))
    enc = run_encoders(run, names)
    vl = run_vlm(run, names, args.lm, args.batch, args.new_tokens)
    points, study, acc_plots = _accuracy(run, args.study, enc["rows"])
    plots = enc["plots"] + vl["plots"] + acc_plots
    text = report.build_report(
        run.env, {"Kernels": kernel_rows, "Encoders": enc["rows"], "VLM": vl["rows"]},
        enc["fits"], enc["crossovers"], run.ceiling, points, study, plots,
        ceilings.NOTES + encoders.NOTES + vlm.NOTES)
    atomic_write(run.out / "report.md", text)
    # last: a short table of the key numbers
    # (not the rows of a mode a provider does not run, such as a backward-only comparison's
    # forward: "full / backward only")
    key = [r for r in kernel_rows if (r["provider"].startswith("pyssm") or r["op"] == "ceiling")
           and not str(r.get("status", "")).endswith(" only")]
    key += [r for r in enc["rows"] if r["provider"] == "pyssm" and r["mode"] == "forward"]
    print(short_table(key))
    print(short_table(vl["rows"]))
    if enc["fits"]:
        print(markdown_table(enc["fits"], ["encoder", "provider", "mode", "exponent", "r2"]))
    if enc["crossovers"]:
        print(markdown_table(enc["crossovers"], ["vmamba", "vit", "mode", "how",
                                                 "resolution"]))
    print(f"{len(kernel_rows) + len(enc['rows']) + len(vl['rows'])} rows in "
          f"{time.perf_counter() - start:.0f} s; report, JSON and plots in {run.out}")
    return 0


def cmd_compare(args) -> int:
    from pyssm.bench.compare import compare_files

    try:
        print(compare_files(args.a, args.b))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_profile(args) -> int:
    from pyssm.bench.profile import profile_encoder
    from pyssm.models import list_encoders

    if args.name not in list_encoders():
        print(f"error: unknown encoder {args.name!r}; see `pyssm encoders`", file=sys.stderr)
        return 2
    device = resolve_device(args.device, args.threads)
    from pyssm.bench.env import device_slug
    out = args.out or Path("build", "profiles", device_slug(device))
    result = profile_encoder(args.name, args.img_size, args.batch, device, out,
                             steps=args.steps, top=args.top, trace=not args.no_trace)
    print(result["table"])
    print("wrote " + ", ".join(result["files"]))
    return 0


# ---- parsers ----------------------------------------------------------------------------------

def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="throughput and memory against resolution",
                           description=__doc__.split("\n\n")[1],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    k = bsub.add_parser("kernels", help="ss2d, selective_scan, cross_scan, attention, "
                                         "layer_norm, depthwise_conv2d, linear_gelu, "
                                         "linear_residual, mlp_gelu, mlp_residual, "
                                         "norm_mlp_residual, layer_norm_linear")
    _common(k)
    k.add_argument("--ops", default=",".join(KERNEL_OPS), help="comma-separated subset")
    k.set_defaults(fn=cmd_kernels)
    e = bsub.add_parser("encoders", help="encoder img/s and memory against resolution")
    _common(e)
    e.add_argument("--encoders", default=None,
                   help="comma-separated names: pyssm's encoders, or timm's rotary ViTs "
                        "vit_pe_core_base_patch16_224 and eva02_base_patch14_224 (default: "
                        "VMamba-T, ViT-S and those two; more on a GPU)")
    e.set_defaults(fn=cmd_encoders)

    def vlm_opts(p):
        p.add_argument("--lm", default=None,
                       help="'tiny', 'llama-1b' (random 1.1B Llama) or a local HF folder "
                       "(default: tiny on the CPU, llama-1b on a GPU)")
        p.add_argument("--batch", type=int, default=1, help="images (prompts) per call")
        p.add_argument("--new-tokens", type=int, default=None,
                       help="decoded tokens (default 32, --quick 8)")

    v = bsub.add_parser("vlm", help="time to first token and decode tokens/s per encoder")
    _common(v)
    v.add_argument("--encoders", default=None, help="comma-separated names")
    vlm_opts(v)
    v.set_defaults(fn=cmd_vlm)
    a = bsub.add_parser("all", help="kernels, encoders, vlm, report and plots (the main job)")
    _common(a)
    a.add_argument("--encoders", default=None, help="comma-separated names")
    vlm_opts(a)
    a.add_argument("--study", default=None,
                   help="a study folder or results.json (default: newest profiles/study/*)")
    a.set_defaults(fn=cmd_all)
    c = bsub.add_parser("compare", help="B / A time ratios of two result JSON files")
    c.add_argument("a", help="result JSON A (the baseline)")
    c.add_argument("b", help="result JSON B")
    c.set_defaults(fn=cmd_compare)


def add_profile_parser(sub) -> None:
    prof = sub.add_parser("profile", help="torch.profiler breakdown of an encoder")
    psub = prof.add_subparsers(dest="profile_command", required=True)
    p = psub.add_parser("encoder", help="top kernels by time, a trace file, an ncu command",
                        description="Profiles a few inference steps of an encoder.")
    p.add_argument("name", help="a name from `pyssm encoders`")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--top", type=int, default=15, help="rows in the table")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int)
    p.add_argument("--no-trace", action="store_true", help="skip the trace file")
    p.add_argument("--out", default=None, help="default build/profiles/<device>")
    p.set_defaults(fn=cmd_profile)


def main(argv=None) -> int:
    """``python -m pyssm.bench ARGS`` = ``pyssm bench ARGS``."""
    parser = argparse.ArgumentParser(prog="python -m pyssm.bench")
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench_parser(sub)
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return args.fn(args)
