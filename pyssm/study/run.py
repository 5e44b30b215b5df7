"""The controlled encoder study (``pyssm study run``).

For each encoder and pretraining objective, and each seed: pretrain the encoder from scratch on
the scene generator (pyssm.study.pretrain, the same images / steps / optimizer / schedule for
every encoder) or load ``--checkpoint``; freeze it; train the VLM with the same connector, LM,
data, steps and hyperparameters (pyssm.vlm.Trainer); evaluate on val, test and the
compositional test split. Writes results.json, table.md and plots under the output folder.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import tempfile
import time

import torch

from pyssm.data import SceneDataset
from pyssm.data.metrics import mean_interval
from pyssm.study.budgets import BUDGETS, Budget
from pyssm.study.pretrain import OBJECTIVES, build_encoder, pretrain_encoder
from pyssm.vlm import VisionLanguageModel, VLMConfig
from pyssm.vlm.recipes import QUESTIONS_PER_SCENE, Preprocessed, evaluate
from pyssm.vlm.tiny_lm import build_tiny_lm, build_word_tokenizer
from pyssm.vlm.train import Trainer, TrainConfig

EVAL_SPLITS = ("val", "test", "test_comp")


def encoder_throughput(encoder, img_size: int, device: torch.device, batch: int = 16) -> float:
    """Images per second of ``encoder.tokens`` at ``img_size`` (median of a few timed calls)."""
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    times = []
    with torch.no_grad():
        for i in range(5):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            encoder.tokens(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:  # the first call warms up
                times.append(time.perf_counter() - start)
    return batch / sorted(times)[len(times) // 2]


def run_one(encoder_name: str, objective: str, seed: int, budget: Budget, device,
            letterbox: bool, checkpoint=None) -> dict:
    from pyssm.data import vocabulary

    start = time.perf_counter()
    if checkpoint is not None:
        encoder = build_encoder(encoder_name, budget, checkpoint).to(device).eval()
        pre_losses = []
    else:
        encoder, pre_losses = pretrain_encoder(encoder_name, objective, budget, seed, device)
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(vocabulary())
    lm = build_tiny_lm(tokenizer, hidden_size=budget.lm_hidden, num_layers=budget.lm_layers)
    cfg = VLMConfig(encoder=encoder_name, image_size=budget.img_size, letterbox=letterbox,
                    connector=budget.connector)
    vlm = VisionLanguageModel.from_config(cfg, lm, tokenizer, encoder=encoder).to(device)
    data = Preprocessed(SceneDataset("train", num_scenes=budget.train_scenes,
                                     size=budget.img_size, base_seed=seed,
                                     questions_per_scene=QUESTIONS_PER_SCENE),
                        budget.img_size, letterbox)
    trainer = Trainer(vlm, data, TrainConfig(stage="one-stage", steps=budget.vlm_steps,
                                             batch_size=budget.vlm_batch, lr=budget.vlm_lr,
                                             seed=seed))
    vlm_losses = trainer.fit()
    scores = {split: evaluate(vlm, split, budget.eval_examples, seed=seed,
                              batch_size=budget.vlm_batch) for split in EVAL_SPLITS}
    tokens = encoder.tokens(torch.zeros(1, 3, budget.img_size, budget.img_size, device=device))
    return {
        "encoder": encoder_name, "objective": objective if checkpoint is None else "checkpoint",
        "seed": seed, "params_m": sum(p.numel() for p in encoder.parameters()) / 1e6,
        "visual_tokens": tokens.shape[1], "encoder_img_s": encoder_throughput(
            encoder, budget.img_size, device), "pretrain_losses": pre_losses,
        "vlm_losses": vlm_losses, "scores": scores, "seconds": time.perf_counter() - start}


def summarize_runs(runs: list[dict]) -> list[dict]:
    """One row per (encoder, objective): means and 95% half-widths over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["encoder"], run["objective"]), []).append(run)
    rows = []
    for (encoder, objective), rs in groups.items():
        row = {"encoder": encoder, "objective": objective, "seeds": len(rs),
               "params_m": rs[0]["params_m"], "visual_tokens": rs[0]["visual_tokens"],
               "encoder_img_s": sum(r["encoder_img_s"] for r in rs) / len(rs)}
        for split in EVAL_SPLITS:
            for key in ("overall", "vqa", "grounding"):
                vals = [r["scores"][split].get(key) for r in rs]
                if all(v is not None for v in vals):
                    row[f"{split}/{key}"] = mean_interval(vals)
            types = sorted({t for r in rs for t in r["scores"][split]["by_type"]})
            for t in types:
                vals = [r["scores"][split]["by_type"].get(t, math.nan) for r in rs]
                row[f"{split}/type/{t}"] = mean_interval(vals)
        rows.append(row)
    return rows


def _fmt(cell) -> str:
    if isinstance(cell, tuple):
        mean, half = cell
        return f"{mean:.3f}" if math.isnan(half) else f"{mean:.3f} ± {half:.3f}"
    return f"{cell:.2f}" if isinstance(cell, float) else str(cell)


def markdown(rows: list[dict], budget_name: str, seeds: int) -> str:
    cols = ["encoder", "objective", "params_m", "visual_tokens", "encoder_img_s",
            "val/overall", "test/vqa", "test/grounding", "test/overall", "test_comp/overall"]
    types = sorted({k.split("/")[-1] for r in rows for k in r if k.startswith("test/type/")})
    cols += [f"test/type/{t}" for t in types]
    head = ["encoder", "objective", "params (M)", "visual tokens", "encoder img/s"]
    head += [c.replace("/type/", " ") for c in cols[5:]]
    lines = [f"# pyssm encoder study: budget {budget_name}, {seeds} seed(s)", "",
             "Accuracies: mean ± 95% half-width over seeds (t interval); grounding is "
             "Acc@0.5 IoU; overall weights every example equally.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out_dir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    labels = [f"{r['encoder']}\n{r['objective']}" for r in rows]
    types = sorted({k.split("/")[-1] for r in rows for k in r if k.startswith("test/type/")})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(types) * len(rows) / 2), 4))
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        vals = [r.get(f"test/type/{t}", (math.nan, 0))[0] for t in types]
        ax.bar([j + i * width for j in range(len(types))], vals, width, label=labels[i])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(types))], types, rotation=30)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, out_dir, "accuracy_by_type.png"))
    fig, ax = plt.subplots(figsize=(5, 4))
    for r, label in zip(rows, labels):
        mean, half = r.get("test/overall", (math.nan, math.nan))
        ax.errorbar(r["encoder_img_s"], mean, yerr=None if math.isnan(half) else half, fmt="o",
                    label=label.replace("\n", " "))
    ax.set_xscale("log")
    ax.set_xlabel("encoder img/s (this device)")
    ax.set_ylabel("test overall accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, out_dir, "accuracy_vs_throughput.png"))
    return written


def _save(fig, out_dir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(out_dir, name)
    tmp = tempfile.NamedTemporaryFile(dir=out_dir, prefix=f".{name}.", suffix=".png",
                                      delete=False)
    tmp.close()
    fig.savefig(tmp.name, dpi=110)
    plt.close(fig)
    os.replace(tmp.name, path)
    return path


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def run_study(encoders: list[str], seeds: int = 3, budget: str = "tiny",
              objectives: tuple[str, ...] = OBJECTIVES, out_dir: str | None = None,
              img_size: int | None = None, letterbox: bool = True, checkpoint=None,
              device: str | None = None, log=print) -> dict:
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {tuple(BUDGETS)}, got {budget!r}")
    b = BUDGETS[budget]
    if img_size is not None:
        from dataclasses import replace
        b = replace(b, img_size=img_size)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = out_dir or os.path.join(
        "profiles", "study", f"{datetime.date.today().isoformat()}-{budget}")
    os.makedirs(out_dir, exist_ok=True)
    runs = []
    for name in encoders:
        for objective in (objectives if checkpoint is None else ("checkpoint",)):
            for seed in range(seeds):
                log(f"[study] {name} / {objective} / seed {seed} ...")
                run = run_one(name, objective, seed, b, dev, letterbox, checkpoint)
                log(f"[study]   test overall {run['scores']['test']['overall']:.3f} "
                    f"in {run['seconds']:.0f} s")
                runs.append(run)
    rows = summarize_runs(runs)
    result = {"budget": budget, "budget_config": {k: v for k, v in vars(b).items()},
              "seeds": seeds, "device": str(dev), "letterbox": letterbox, "runs": runs,
              "summary": rows}
    _write(os.path.join(out_dir, "results.json"), json.dumps(result, indent=1, default=str))
    _write(os.path.join(out_dir, "table.md"), markdown(rows, budget, seeds))
    result["plots"] = plot(rows, out_dir)
    result["out_dir"] = out_dir
    return result
