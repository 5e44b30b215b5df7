"""Pretraining an encoder from scratch on the scene generator, with a matched budget.

Two objectives, as in the study (ImageNet classification checkpoints, and dense-task tuning):
  classification  multi-label: which shapes, digits and colours a scene contains (BCE on the
                  encoder's own head);
  dense           per visual token (the grid the VLM reads): does an object overlap the
                  cell, and one of each colour, and of each shape / digit (BCE on a linear
                  head over the tokens).

Pretraining reads the generator's usual scenes (2-6 objects), whatever scenes the budget's VLM
is trained on: more objects per image is more signal per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pyssm.data import COLOURS, DIGITS, SHAPES, SceneDataset, scene_batch
from pyssm.models import create_encoder
from pyssm.study.budgets import Budget
from pyssm.study.scenes import SeedScenes
from pyssm.vlm.preprocess import normalize
from pyssm.vlm.train import lr_lambda

OBJECTIVES = ("classification", "dense")
LABELS = (*SHAPES, *DIGITS, *COLOURS)


def class_targets(scenes) -> torch.Tensor:
    """(B, len(LABELS)): which shapes, digits and colours each scene contains."""
    index = {name: i for i, name in enumerate(LABELS)}
    marks = [(b, index[label]) for b, scene in enumerate(scenes) for obj in scene.objects
             for label in (obj.name, obj.colour)]
    out = torch.zeros(len(scenes), len(LABELS))
    if marks:               # one indexing op, not two per object
        out[tuple(torch.tensor(marks).T)] = 1.0
    return out


DENSE_LABELS = ("object", *COLOURS, *SHAPES, *DIGITS)


def dense_targets(scenes, grid: int) -> torch.Tensor:
    """(B, grid * grid, len(DENSE_LABELS)): which cells object boxes overlap, any object
    (objectness), per colour and per shape / digit. (With objectness and colours alone the
    tokens carried too little of what an object is: a VLM on them answered shape questions
    no better than with another scene's image.)

    Overlap rather than "is the cell's centre inside an object": at the tiny budget's 2 x 2
    grid the four centres miss most objects (a third of the scenes have no positive cell),
    and the fraction of a cell covered is a weak target there (a small object covers 7% of a
    cell); with either, 200 steps of pretraining left the tokens no better than random ones
    at telling an object's colour, while with overlap they tell it from 86-97% of the
    scenes. On a fine grid overlap is the object's cells and those its box edges touch."""
    # All objects of the batch at once (a loop over objects took 61 ms a batch of 64 scenes
    # at an 8 x 8 grid: 90 s of the medium budget's 1500 steps, with the GPU waiting)
    index = {label: i for i, label in enumerate(DENSE_LABELS)}
    objects = [(b, obj) for b, scene in enumerate(scenes) for obj in scene.objects]
    out = torch.zeros(len(scenes), grid * grid * len(DENSE_LABELS))
    if not objects:
        return out.view(len(scenes), grid * grid, len(DENSE_LABELS))
    boxes = torch.tensor([obj.box for _, obj in objects], dtype=torch.float64)   # (M, 4)
    edges = torch.arange(grid + 1, dtype=torch.float64) / grid
    lo, hi = edges[:-1], edges[1:]
    cols = (torch.minimum(hi, boxes[:, 2:3]) - torch.maximum(lo, boxes[:, 0:1])) > 0  # (M, g)
    rows = (torch.minimum(hi, boxes[:, 3:4]) - torch.maximum(lo, boxes[:, 1:2])) > 0
    cells = rows[:, :, None] & cols[:, None, :]         # a positive area in common
    labels = torch.zeros(len(objects), len(DENSE_LABELS))   # each object's: one indexing op
    labels[tuple(torch.tensor([(m, index[label]) for m, (_, obj) in enumerate(objects)
                               for label in ("object", obj.colour, obj.name)]).T)] = 1.0
    marks = (cells.flatten(1).float()[:, :, None] * labels[:, None, :]).flatten(1)
    owner = torch.tensor([b for b, _ in objects])
    out.index_add_(0, owner, marks).clamp_(max=1.0)     # any object of the scene: 1
    return out.view(len(scenes), grid * grid, len(DENSE_LABELS))


class PretrainScenes:
    """Scenes 0 .. train_scenes - 1 of the train split for one seed (the generator's usual
    scenes), as pretraining reads them.

    Pretraining cycles over these scenes many times, and every encoder and objective of a
    seed reads the same ones: they are made once (pyssm.study.scenes.SeedScenes, which also
    keeps the images when they fit in ``max_bytes``), or given as ``scenes`` (a SeedScenes of
    these scenes, shared with the VLM's data when its scenes are the same). Either way a
    batch is the same tensor."""

    def __init__(self, budget: Budget, seed: int, max_bytes: int | None = None,
                 scenes: SeedScenes | None = None):
        self.budget, self.seed = budget, seed
        self.store = scenes if scenes is not None else SeedScenes(
            pretrain_data(budget, seed), max_bytes=max_bytes)
        self.images = self.store.images

    def batch(self, start: int, count: int):
        """(images (count, 3, S, S) in [0, 1], scenes) of scenes start .. start + count - 1
        (made now when they go past the kept ones: a batch larger than the scenes)."""
        if start + count > len(self.store):
            return scene_batch("train", start, count, self.budget.img_size,
                               base_seed=self.seed)
        return self.store.batch(start, count)


def pretrain_data(budget: Budget, seed: int) -> SceneDataset:
    """The scenes pretraining reads: the train split's usual scenes (SceneDataset's
    defaults), ``budget.train_scenes`` of them at ``budget.img_size``."""
    return SceneDataset("train", num_scenes=budget.train_scenes, size=budget.img_size,
                        base_seed=seed)


def build_encoder(name: str, budget: Budget, checkpoint=None) -> nn.Module:
    family = name.split("_")[0]
    kwargs = dict(budget.encoder_overrides.get(family, {}))
    return create_encoder(name, img_size=budget.img_size, checkpoint=checkpoint, **kwargs)


def pretrain_encoder(name: str, objective: str, budget: Budget, seed: int,
                     device: torch.device, scenes: PretrainScenes | None = None
                     ) -> tuple[nn.Module, list[float]]:
    """A freshly initialised encoder trained on ``objective``; returns it and its losses.
    ``scenes``: the seed's PretrainScenes, to share between runs (made here if not given)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    torch.manual_seed(seed)
    encoder = build_encoder(name, budget).to(device)
    if objective == "classification":
        encoder.reset_classifier(len(LABELS))
        head = None
    else:
        width = encoder.tokens(torch.zeros(1, 3, budget.img_size, budget.img_size,
                                           device=device)).shape[-1]
        head = nn.Linear(width, len(DENSE_LABELS)).to(device)
    encoder.to(device).train()
    params = list(encoder.parameters()) + (list(head.parameters()) if head else [])
    opt = torch.optim.AdamW(params, lr=budget.pretrain_lr, weight_decay=0.05)
    # linear warmup, then cosine decay (the VLM trainer's schedule): without warmup a ViT trained
    # from scratch at these learning rates stalls at the label prior while VMamba trains
    warmup = max(1, round(budget.pretrain_warmup * budget.pretrain_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, budget.pretrain_steps, warmup))
    if scenes is None:
        scenes = PretrainScenes(budget, seed)
    losses = []
    for step in range(budget.pretrain_steps):
        start = (step * budget.pretrain_batch) % max(1, budget.train_scenes - budget.pretrain_batch)
        images, batch = scenes.batch(start, budget.pretrain_batch)
        images = normalize(images.to(device))
        if head is None:
            loss = F.binary_cross_entropy_with_logits(encoder(images),
                                                      class_targets(batch).to(device))
        else:
            tokens = encoder.tokens(images)
            grid = int(round(tokens.shape[1] ** 0.5))
            loss = F.binary_cross_entropy_with_logits(head(tokens),
                                                      dense_targets(batch, grid).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    encoder.eval()
    return encoder, losses
