"""The pyssm command line: encoders, and a tiny vlm train -> eval -> generate round trip."""

import json

import numpy as np
import pytest
from PIL import Image

from pyssm.cli import main


def test_encoders_lists_names(capsys):
    assert main(["encoders", "vit"]) == 0
    names = capsys.readouterr().out.split()
    assert "vit_small_patch16" in names and not any(n.startswith("vmamba") for n in names)


def test_vlm_train_eval_generate(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["vlm", "train", "--encoder", "vit_tiny_patch16", "--lm", "tiny", "--steps", "3",
                 "--batch-size", "4", "--img-size", "32", "--train-size", "16",
                 "--out", str(out)]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["steps"] == 3 and trained["last_loss"] > 0
    assert main(["vlm", "eval", "--model", str(out / "model"), "--split", "val", "--size", "8",
                 "--batch-size", "4"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["examples"] == 8 and 0.0 <= scores["overall"] <= 1.0
    assert sum(scores["counts"].get(t, 0) for t in ("vqa", "grounding")) == 8
    image = tmp_path / "scene.png"
    Image.fromarray(np.full((40, 24, 3), 200, dtype=np.uint8)).save(image)
    assert main(["vlm", "generate", "--model", str(out / "model"), "--image", str(image),
                 "--prompt", "what color is the circle ?", "--max-new-tokens", "3"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1


def test_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["vlm", "train"])                       # --out is required
    assert "--out" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        main(["vlm", "train", "--lm", "meta-llama/Llama-3-8B", "--out", "/tmp/never"])
