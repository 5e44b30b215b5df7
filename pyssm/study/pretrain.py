"""Pretraining an encoder from scratch on the scene generator, with a matched budget.

Two objectives, as in the study (ImageNet classification checkpoints, and dense-task tuning):
  classification  multi-label: which shapes, digits and colours a scene contains (BCE on the
                  encoder's own head);
  dense           per visual token (the grid the VLM reads): is the cell's centre inside an
                  object, and inside one of each colour (BCE on a linear head over the tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pyssm.data import COLOURS, DIGITS, SHAPES, scene_batch
from pyssm.models import create_encoder
from pyssm.study.budgets import Budget
from pyssm.vlm.preprocess import normalize

OBJECTIVES = ("classification", "dense")
LABELS = (*SHAPES, *DIGITS, *COLOURS)


def class_targets(scenes) -> torch.Tensor:
    index = {name: i for i, name in enumerate(LABELS)}
    out = torch.zeros(len(scenes), len(LABELS))
    for b, scene in enumerate(scenes):
        for obj in scene.objects:
            out[b, index[obj.name]] = 1.0
            out[b, index[obj.colour]] = 1.0
    return out


def dense_targets(scenes, grid: int) -> torch.Tensor:
    """(B, grid * grid, 1 + colours): objectness and per-colour coverage of cell centres."""
    colours = {c: i + 1 for i, c in enumerate(COLOURS)}
    centres = (torch.arange(grid) + 0.5) / grid
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    out = torch.zeros(len(scenes), grid * grid, 1 + len(COLOURS))
    for b, scene in enumerate(scenes):
        for obj in scene.objects:
            x1, y1, x2, y2 = obj.box
            inside = ((cx >= x1) & (cx <= x2) & (cy >= y1) & (cy <= y2)).flatten()
            out[b, inside, 0] = 1.0
            out[b, inside, colours[obj.colour]] = 1.0
    return out


def build_encoder(name: str, budget: Budget, checkpoint=None) -> nn.Module:
    family = name.split("_")[0]
    kwargs = dict(budget.encoder_overrides.get(family, {}))
    return create_encoder(name, img_size=budget.img_size, checkpoint=checkpoint, **kwargs)


def pretrain_encoder(name: str, objective: str, budget: Budget, seed: int,
                     device: torch.device) -> tuple[nn.Module, list[float]]:
    """A freshly initialised encoder trained on ``objective``; returns it and its losses."""
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
        head = nn.Linear(width, 1 + len(COLOURS)).to(device)
    encoder.to(device).train()
    params = list(encoder.parameters()) + (list(head.parameters()) if head else [])
    opt = torch.optim.AdamW(params, lr=budget.pretrain_lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, budget.pretrain_steps)
    losses = []
    for step in range(budget.pretrain_steps):
        start = (step * budget.pretrain_batch) % max(1, budget.train_scenes - budget.pretrain_batch)
        images, scenes = scene_batch("train", start, budget.pretrain_batch, budget.img_size,
                                     base_seed=seed)
        images = normalize(images.to(device))
        if head is None:
            loss = F.binary_cross_entropy_with_logits(encoder(images),
                                                      class_targets(scenes).to(device))
        else:
            tokens = encoder.tokens(images)
            grid = int(round(tokens.shape[1] ** 0.5))
            loss = F.binary_cross_entropy_with_logits(head(tokens),
                                                      dense_targets(scenes, grid).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    encoder.eval()
    return encoder, losses
