"""The controlled study: pretraining targets, and a tiny end-to-end run that writes its table."""

import json
import math
from dataclasses import replace

import torch

from pyssm.cli import main
from pyssm.data import COLOURS, SceneObject
from pyssm.study import BUDGETS
from pyssm.study.pretrain import LABELS, class_targets, dense_targets, pretrain_encoder


class FakeScene:
    def __init__(self, objects):
        self.objects = objects


def test_targets_follow_the_scene_graph():
    obj = SceneObject("shape", "circle", "red", "large", (0.0, 0.0, 0.5, 0.5))
    digit = SceneObject("digit", "7", "blue", "small", (0.75, 0.75, 1.0, 1.0))
    scene = FakeScene([obj, digit])
    cls = class_targets([scene])[0]
    assert {LABELS[i] for i in cls.nonzero().flatten().tolist()} == {"circle", "red", "7", "blue"}
    dense = dense_targets([scene], grid=4)[0]           # cell centres 0.125, 0.375, ...
    red = 1 + list(COLOURS).index("red")
    assert dense[:, 0].view(4, 4).tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0],
                                               [0, 0, 0, 1]]
    assert dense[:, red].view(4, 4)[:2, :2].eq(1).all() and dense[:, red].sum() == 4


def test_dense_pretraining_runs():
    budget = replace(BUDGETS["tiny"], pretrain_steps=2)
    encoder, losses = pretrain_encoder("vit_tiny_patch16", "dense", budget, seed=0,
                                       device=torch.device("cpu"))
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert not encoder.training


def test_tiny_study_runs_and_writes_its_table(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["study", "run", "--encoders", "vmamba_tiny_s1l8,vit_tiny_patch16", "--seeds",
                 "1", "--budget", "tiny", "--objectives", "classification", "--device", "cpu",
                 "--out", str(out)]) == 0
    table = (out / "table.md").read_text()
    assert "vmamba_tiny_s1l8" in table and "vit_tiny_patch16" in table
    result = json.loads((out / "results.json").read_text())
    assert len(result["runs"]) == 2 and len(result["summary"]) == 2
    for run in result["runs"]:
        assert run["visual_tokens"] == 4                # 32 px: a 2 x 2 token grid
        assert run["vlm_losses"][-1] < run["vlm_losses"][0]
        for split in ("val", "test", "test_comp"):
            assert 0.0 <= run["scores"][split]["overall"] <= 1.0
    assert (out / "accuracy_by_type.png").stat().st_size > 0
    assert (out / "accuracy_vs_throughput.png").stat().st_size > 0
