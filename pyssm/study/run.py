"""The controlled encoder study (``pyssm study run``).

For each seed, encoder and pretraining objective: pretrain the encoder from scratch on the
scene generator (pyssm.study.pretrain, the same images / steps / optimizer / schedule for
every encoder) or load ``--checkpoint``; freeze it; train the VLM with the same connector, LM,
data, steps and hyperparameters (pyssm.vlm.Trainer); evaluate on val, test and the
compositional test split, and on test again with every question asked about another scene's
image (the shuffled-image control: what the model scores without reading the image). Writes
results.json, table.md and plots under the output folder.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time

import torch

from pyssm.bench.results import atomic_write
from pyssm.data import SceneDataset
from pyssm.data.metrics import mean_interval
from pyssm.study.budgets import BUDGETS, Budget
from pyssm.study.pretrain import (OBJECTIVES, PretrainScenes, build_encoder, pretrain_data,
                                  pretrain_encoder)
from pyssm.study.scenes import SeedScenes, default_max_bytes
from pyssm.vlm import VisionLanguageModel, VLMConfig
from pyssm.vlm.preprocess import prepare_images
from pyssm.vlm.recipes import QUESTIONS_PER_SCENE, evaluate
from pyssm.vlm.tiny_lm import build_tiny_lm, build_word_tokenizer
from pyssm.vlm.train import Trainer, TrainConfig

EVAL_SPLITS = ("val", "test", "test_comp")
STATISTICS_SCENES = 4096   # scenes the token statistics are fit on when tokens are not cached
CONTROL = "test_shuffled"       # test, every question asked about another scene's image
# uniform guessing over the answers a question type can have (types whose answer set depends
# on the scene, count / nearest / farthest, have none)
CHANCE = {"exist": 1 / 2, "compare": 1 / 2, "relation": 1 / 2, "colour": 1 / 7, "shape": 1 / 5,
          "digit": 1 / 10}


class TrainScenes:
    """The VLM's training examples for one seed, (image, prompt, answer) as
    pyssm.vlm.recipes.Preprocessed gives them. The VLM revisits every example many times and
    all encoders and objectives of a seed read the same examples, so the scenes, their
    questions and (when they fit in ``max_bytes``) their images are made once
    (pyssm.study.scenes.SeedScenes), or given as ``scenes`` (a SeedScenes with texts, shared
    with pretraining when its scenes are the same). ``data``: the SceneDataset to read
    (default: the budget's training scenes for ``seed``)."""

    def __init__(self, budget: Budget, seed: int, letterbox: bool,
                 max_bytes: int | None = None, scenes: SeedScenes | None = None,
                 data: SceneDataset | None = None):
        if scenes is None:
            scenes = SeedScenes(data or train_data(budget, seed), texts=True,
                                max_bytes=max_bytes)
        if scenes.texts is None:
            raise ValueError("scenes must be a SeedScenes made with texts=True")
        self.store, self.data = scenes, scenes.data
        self.size, self.letterbox = budget.img_size, letterbox

    def __len__(self) -> int:
        return len(self.store.texts)

    def text(self, i: int) -> tuple[str, str, int]:
        """(prompt, answer, scene index) of item i."""
        prompt, answer = self.store.texts[i]
        return prompt, answer, i // self.data.questions_per_scene

    def image(self, j: int) -> torch.Tensor:
        """Scene j's image, preprocessed for the encoder."""
        return prepare_images(self.store.batch(j, 1)[0], self.size, letterbox=self.letterbox)[0]

    def __getitem__(self, i: int):
        prompt, answer, j = self.text(i)
        return self.image(j), prompt, answer


def train_data(budget: Budget, seed: int) -> SceneDataset:
    """The VLM's training scenes and questions for ``seed`` under ``budget``."""
    return SceneDataset("train", num_scenes=budget.train_scenes, size=budget.img_size,
                        base_seed=seed, questions_per_scene=QUESTIONS_PER_SCENE,
                        n_objects=budget.n_objects,
                        grounding_fraction=budget.grounding_fraction)


def seed_scenes(budget: Budget, seed: int, letterbox: bool, pretraining: bool) -> tuple:
    """(PretrainScenes or None, TrainScenes) of ``seed``: one SeedScenes for both when the
    VLM's scenes are pretraining's (the same objects per scene), else one each."""
    vlm_data = train_data(budget, seed)
    vlm_scenes = SeedScenes(vlm_data, texts=True)
    pre = None
    if pretraining:
        pre_data = pretrain_data(budget, seed)
        same = (pre_data.n_objects, pre_data.digit_fraction) == (vlm_data.n_objects,
                                                                  vlm_data.digit_fraction)
        pre = PretrainScenes(budget, seed, scenes=vlm_scenes if same else None)
    return pre, TrainScenes(budget, seed, letterbox, scenes=vlm_scenes)


class SceneTokens:
    """TrainScenes with each scene's image replaced by the frozen encoder's visual tokens,
    computed once per scene (batched) when the run starts: the VLM reads every scene many
    times, and the encoder is frozen, so its output never changes. Items are (tokens (T, C),
    prompt, answer), which VisionLanguageModel takes in place of images."""

    def __init__(self, scenes: TrainScenes, vlm: VisionLanguageModel, batch: int = 64):
        from pyssm.vlm.model import _tokens

        self.scenes = scenes
        device = next(vlm.connector.parameters()).device
        n = scenes.data.num_scenes
        chunks = []
        with torch.no_grad():
            for start in range(0, n, batch):
                images = torch.stack([scenes.image(j)
                                      for j in range(start, min(n, start + batch))])
                chunks.append(_tokens(vlm.encoder, images.to(device), vlm.config.tap))
        self.tokens = torch.cat(chunks)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int):
        prompt, answer, j = self.scenes.text(i)
        return self.tokens[j], prompt, answer


def token_cache_fits(budget: Budget, width: int, tokens: int, device: torch.device,
                     max_bytes: int | None = None) -> bool:
    """Whether every training scene's float32 tokens fit where they are computed: in a
    quarter of the GPU's free memory, or of the machine's memory on the CPU (the medium
    budget's 50,000 scenes x 64 tokens x 384 channels are 4.9 GB)."""
    if max_bytes is None:
        if device.type == "cuda":
            max_bytes = torch.cuda.mem_get_info(device)[0] // 4
        else:
            max_bytes = default_max_bytes()
    return budget.train_scenes * tokens * width * 4 <= max_bytes


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
            letterbox: bool, checkpoint=None, pretrain_scenes: PretrainScenes | None = None,
            train_scenes: TrainScenes | None = None) -> dict:
    """One (encoder, objective, seed) of the study. ``pretrain_scenes`` / ``train_scenes``:
    the seed's data, shared by its runs (made here when not given)."""
    from pyssm.data import vocabulary

    start = time.perf_counter()
    if checkpoint is not None:
        encoder = build_encoder(encoder_name, budget, checkpoint).to(device).eval()
        pre_losses = []
    else:
        encoder, pre_losses = pretrain_encoder(encoder_name, objective, budget, seed, device,
                                               scenes=pretrain_scenes)
    pretrain_s = time.perf_counter() - start
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(vocabulary())
    lm = build_tiny_lm(tokenizer, hidden_size=budget.lm_hidden, num_layers=budget.lm_layers)
    cfg = VLMConfig(encoder=encoder_name, image_size=budget.img_size, letterbox=letterbox,
                    connector=budget.connector, image_style=budget.image_style,
                    prompt_template=budget.prompt_template,
                    standardize_tokens=budget.standardize_tokens)
    vlm = VisionLanguageModel.from_config(cfg, lm, tokenizer, encoder=encoder).to(device)
    data = train_scenes or TrainScenes(budget, seed, letterbox)
    with torch.no_grad():   # the token grid and width, for the cache and the results
        _, n_tokens, width = encoder.tokens(
            torch.zeros(1, 3, budget.img_size, budget.img_size, device=device)).shape
    if token_cache_fits(budget, width, n_tokens, torch.device(device)):
        data = SceneTokens(data, vlm)
    if budget.standardize_tokens:     # statistics of the training scenes' tokens
        if isinstance(data, SceneTokens):
            vlm.fit_token_statistics(data.tokens)
        else:                         # at most STATISTICS_SCENES of them, 64 at a time
            n = min(STATISTICS_SCENES, data.data.num_scenes)
            vlm.fit_token_statistics(
                torch.stack([data.image(j) for j in range(s, min(n, s + 64))])
                for s in range(0, n, 64))
    trainer = Trainer(vlm, data, TrainConfig(stage="one-stage", steps=budget.vlm_steps,
                                             batch_size=budget.vlm_batch, lr=budget.vlm_lr,
                                             seed=seed, loss_weighting=budget.loss_weighting))
    vlm_losses = trainer.fit()
    vlm_s = time.perf_counter() - start - pretrain_s
    scene_kwargs = {"n_objects": budget.n_objects}
    scores = {split: evaluate(vlm, split, budget.eval_examples, seed=seed,
                              batch_size=budget.vlm_batch, scene_kwargs=scene_kwargs)
              for split in EVAL_SPLITS}
    scores[CONTROL] = evaluate(vlm, "test", budget.eval_examples, seed=seed,
                               batch_size=budget.vlm_batch, scene_kwargs=scene_kwargs,
                               shuffle_images=True)
    return {
        "encoder": encoder_name, "objective": objective if checkpoint is None else "checkpoint",
        "seed": seed, "params_m": sum(p.numel() for p in encoder.parameters()) / 1e6,
        "visual_tokens": n_tokens, "encoder_img_s": encoder_throughput(
            encoder, budget.img_size, device), "pretrain_losses": pre_losses,
        "vlm_losses": vlm_losses, "scores": scores, "seconds": time.perf_counter() - start,
        "pretrain_seconds": pretrain_s, "vlm_seconds": vlm_s}


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
        # the control is paired: each run's own rise of the answer NLL with shuffled images
        rises = [r["scores"][CONTROL]["answer_nll"] - r["scores"]["test"]["answer_nll"]
                 for r in rs if "answer_nll" in r["scores"].get(CONTROL, {})
                 and "answer_nll" in r["scores"].get("test", {})]
        if rises:
            row["answer_nll_rise"] = mean_interval(rises)
        for split in (*EVAL_SPLITS, CONTROL):
            scored = [r["scores"][split] for r in rs if split in r["scores"]]
            if not scored:
                continue
            for key in ("overall", "vqa", "grounding", "answer_nll"):
                vals = [sc.get(key) for sc in scored]
                if all(v is not None for v in vals):
                    row[f"{split}/{key}"] = mean_interval(vals)
            types = sorted({t for sc in scored for t in sc["by_type"]})
            for t in types:
                # over the seeds whose sample has the type: with a small eval set a rare type
                # can be missing from a seed, and a nan there would blank the whole mean
                vals = [sc["by_type"][t] for sc in scored if t in sc["by_type"]]
                row[f"{split}/type/{t}"] = mean_interval(vals)
                row[f"{split}/n/{t}"] = sum(sc["counts"].get(t, 0) for sc in scored)
        rows.append(row)
    return rows


def _fmt(cell) -> str:
    if isinstance(cell, tuple):
        mean, half = cell
        return f"{mean:.3f}" if math.isnan(half) else f"{mean:.3f} ± {half:.3f}"
    return f"{cell:.2f}" if isinstance(cell, float) else str(cell)


def markdown(rows: list[dict], budget_name: str, seeds: int, budget: Budget | None = None) -> str:
    cols = ["encoder", "objective", "params_m", "visual_tokens", "encoder_img_s",
            "val/overall", "test/vqa", f"{CONTROL}/vqa", "test/grounding", "test/overall",
            "test_comp/overall", "test/answer_nll", "answer_nll_rise"]
    head = ["encoder", "objective", "params (M)", "visual tokens", "encoder img/s",
            "val overall", "test vqa", "test vqa, shuffled images", "test grounding",
            "test overall", "test_comp overall", "test answer NLL",
            "its rise with shuffled images"]
    lines = [f"# pyssm encoder study: budget {budget_name}, {seeds} seed(s)", ""]
    if budget is not None:
        lines += [f"{budget.img_size} px, scenes of {budget.n_objects[0]}-{budget.n_objects[1]} "
                  f"objects, {budget.train_scenes} training scenes; pretraining "
                  f"{budget.pretrain_steps} steps x {budget.pretrain_batch}, VLM "
                  f"{budget.vlm_steps} steps x {budget.vlm_batch}; {budget.eval_examples} "
                  f"examples per split and seed.", ""]
    lines += ["Accuracies: mean ± 95% half-width over seeds (t interval); grounding is "
              "Acc@0.5 IoU; overall weights every example equally. \"shuffled images\": the "
              "same model on the same test questions, each asked about another scene's image: "
              "what it scores without reading the image. Answer NLL: the reference answer's "
              "negative log-likelihood per token (teacher-forced), lower is better; its rise "
              "with shuffled images (each run's own, then over seeds) measures how much the "
              "model reads the image, before exact match shows it: 0 when it does not.", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    types = sorted({k.split("/")[-1] for r in rows for k in r if k.startswith("test/type/")})
    lines += ["", "## Test accuracy by type: the model / with shuffled images", "",
              "Each cell: accuracy with the scene's own image / with another scene's image; "
              "n is the number of test examples of the type over all seeds.", "",
              "| encoder | objective | " + " | ".join(types) + " |",
              "|" + "---|" * (len(types) + 2)]
    for r in rows:
        cells = []
        for t in types:
            own, shuffled = r.get(f"test/type/{t}"), r.get(f"{CONTROL}/type/{t}")
            cell = _fmt(own) if own else ""
            if own and shuffled:
                cell += f" / {shuffled[0]:.3f}"
            cells.append(cell + (f" (n {r[f'test/n/{t}']})" if f"test/n/{t}" in r else ""))
        lines.append(f"| {r['encoder']} | {r['objective']} | " + " | ".join(cells) + " |")
    lines.append("| uniform chance | | " + " | ".join(
        f"{CHANCE[t]:.3f}" if t in CHANCE else "" for t in types) + " |")
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
        xs = [j + i * width for j in range(len(types))]
        vals = [r.get(f"test/type/{t}", (math.nan, 0))[0] for t in types]
        ax.bar(xs, vals, width, label=labels[i])
        control = [r.get(f"{CONTROL}/type/{t}", (math.nan, 0))[0] for t in types]
        ax.scatter(xs, control, marker="_", s=120, color="black", zorder=3,
                   label="shuffled images" if i == 0 else None)
    chance = [j for j, t in enumerate(types) if t in CHANCE]
    for j in chance:
        ax.hlines(CHANCE[types[j]], j - width / 2, j + 0.8 - width / 2, colors="grey",
                  linestyles="dotted", label="uniform chance" if j == chance[0] else None)
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
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    path = os.path.join(out_dir, name)
    atomic_write(path, buf.getvalue())
    return path


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
    start = time.perf_counter()
    for seed in range(seeds):          # seeds outermost: a seed's runs share its data
        pretrain_scenes, train_scenes = seed_scenes(b, seed, letterbox, checkpoint is None)
        for name in encoders:
            for objective in (objectives if checkpoint is None else ("checkpoint",)):
                log(f"[study] {name} / {objective} / seed {seed} ...")
                run = run_one(name, objective, seed, b, dev, letterbox, checkpoint,
                              pretrain_scenes, train_scenes)
                test, control = run["scores"]["test"], run["scores"][CONTROL]
                log(f"[study]   test vqa {test.get('vqa', math.nan):.3f} (shuffled images "
                    f"{control.get('vqa', math.nan):.3f}), answer NLL "
                    f"{test['answer_nll']:.3f} (shuffled {control['answer_nll']:.3f}), "
                    f"overall {test['overall']:.3f} in {run['seconds']:.0f} s")
                runs.append(run)
    rows = summarize_runs(runs)
    result = {"budget": budget, "budget_config": {k: v for k, v in vars(b).items()},
              "seeds": seeds, "device": str(dev), "letterbox": letterbox,
              "torch_threads": torch.get_num_threads(),
              "wall_seconds": time.perf_counter() - start, "runs": runs, "summary": rows}
    atomic_write(os.path.join(out_dir, "results.json"),
                 json.dumps(result, indent=1, default=str))
    atomic_write(os.path.join(out_dir, "table.md"), markdown(rows, budget, seeds, b))
    result["plots"] = plot(rows, out_dir)
    result["out_dir"] = out_dir
    return result
