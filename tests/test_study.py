"""The controlled study: pretraining targets, and a tiny end-to-end run that writes its table."""

import json
import math
from dataclasses import replace

import pytest
import torch

from pyssm.cli import main
from pyssm.data import COLOURS, SceneDataset, SceneObject, scene_batch
from pyssm.study import BUDGETS
from pyssm.study.pretrain import (DENSE_LABELS, LABELS, PretrainScenes, class_targets,
                                  dense_targets, pretrain_encoder)
from pyssm.study.run import SceneTokens, TrainScenes, markdown, summarize_runs
from pyssm.vlm.preprocess import prepare_images
from pyssm.vlm.recipes import QUESTIONS_PER_SCENE, Preprocessed


class FakeScene:
    def __init__(self, objects):
        self.objects = objects


def test_targets_follow_the_scene_graph():
    obj = SceneObject("shape", "circle", "red", "large", (0.0, 0.0, 0.5, 0.5))
    digit = SceneObject("digit", "7", "blue", "small", (0.75, 0.75, 1.0, 1.0))
    scene = FakeScene([obj, digit])
    cls = class_targets([scene])[0]
    assert {LABELS[i] for i in cls.nonzero().flatten().tolist()} == {"circle", "red", "7", "blue"}
    dense = dense_targets([scene], grid=4)[0]           # cells [0, 0.25), [0.25, 0.5), ...
    red, circle, seven = (DENSE_LABELS.index(x) for x in ("red", "circle", "7"))
    assert dense[:, 0].view(4, 4).tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0],
                                               [0, 0, 0, 1]]
    for label in (red, circle):
        assert dense[:, label].view(4, 4)[:2, :2].eq(1).all() and dense[:, label].sum() == 4
    assert dense[:, seven].view(4, 4)[3, 3] == 1 and dense[:, seven].sum() == 1
    assert dense.sum() == 3 * 4 + 3 * 1                 # nothing else is marked


def test_dense_pretraining_runs():
    budget = replace(BUDGETS["tiny"], pretrain_steps=2)
    encoder, losses = pretrain_encoder("vit_tiny_patch16", "dense", budget, seed=0,
                                       device=torch.device("cpu"))
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert not encoder.training


def test_tiny_study_runs_and_writes_its_table(tmp_path, capsys, monkeypatch):
    # the tiny budget shrunk further: this checks the plumbing, not what the budget learns
    small = replace(BUDGETS["tiny"], pretrain_steps=3, vlm_steps=12, train_scenes=48,
                    eval_examples=16)
    monkeypatch.setitem(BUDGETS, "tiny", small)
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
        for split in ("val", "test", "test_comp", "test_shuffled"):
            assert 0.0 <= run["scores"][split]["overall"] <= 1.0
    assert "shuffled images" in table and "uniform chance" in table
    assert (out / "accuracy_by_type.png").stat().st_size > 0
    assert (out / "accuracy_vs_throughput.png").stat().st_size > 0


def test_dense_targets_mark_every_cell_an_object_overlaps():
    # a small object off the cell centres: at 2 x 2 the centres (0.25, 0.75) miss it, and a
    # centre-based target would show an empty scene
    obj = SceneObject("shape", "square", "green", "small", (0.30, 0.05, 0.45, 0.20))
    wide = SceneObject("shape", "circle", "red", "large", (0.40, 0.55, 0.60, 0.70))
    dense = dense_targets([FakeScene([obj, wide])], grid=2)[0]
    green, red = 1 + list(COLOURS).index("green"), 1 + list(COLOURS).index("red")
    assert dense[:, 0].tolist() == [1, 0, 1, 1]           # the wide one straddles two cells
    assert dense[:, green].tolist() == [1, 0, 0, 0]
    assert dense[:, red].tolist() == [0, 0, 1, 1]
    # boxes that only touch a cell's edge do not overlap it
    edge = SceneObject("shape", "square", "green", "small", (0.0, 0.0, 0.5, 0.5))
    assert dense_targets([FakeScene([edge])], grid=2)[0][:, 0].tolist() == [1, 0, 0, 0]


def test_targets_equal_a_loop_over_objects():
    """Dense and classification targets of generated scenes (1-6 objects; one scene empty) at several grids against marking one
    object, one cell at a time."""
    _, scenes = scene_batch("train", 0, 23, 16, base_seed=9, n_objects=(1, 6))
    scenes = list(scenes[:5]) + [FakeScene([])] + list(scenes[5:])
    for grid in (1, 2, 5, 8):
        want = torch.zeros(len(scenes), grid, grid, len(DENSE_LABELS))
        for b, scene in enumerate(scenes):
            for obj in scene.objects:
                x1, y1, x2, y2 = obj.box
                for r in range(grid):
                    for c in range(grid):
                        if (min(x2, (c + 1) / grid) > max(x1, c / grid)
                                and min(y2, (r + 1) / grid) > max(y1, r / grid)):
                            for label in ("object", obj.colour, obj.name):
                                want[b, r, c, DENSE_LABELS.index(label)] = 1.0
        assert torch.equal(dense_targets(scenes, grid), want.flatten(1, 2)), grid
    want = torch.zeros(len(scenes), len(LABELS))
    for b, scene in enumerate(scenes):
        for obj in scene.objects:
            want[b, LABELS.index(obj.name)] = want[b, LABELS.index(obj.colour)] = 1.0
    assert torch.equal(class_targets(scenes), want)


def test_pretraining_warms_up_the_learning_rate(monkeypatch):
    import pyssm.study.pretrain as pretrain

    seen = []
    step = torch.optim.AdamW.step

    def record(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    budget = replace(BUDGETS["tiny"], pretrain_steps=10, pretrain_batch=2, train_scenes=8,
                     pretrain_lr=1e-3, pretrain_warmup=0.3)
    pretrain.pretrain_encoder("vit_tiny_patch16", "classification", budget, seed=0,
                              device=torch.device("cpu"))
    assert seen[:3] == [pytest.approx(1e-3 / 3), pytest.approx(2e-3 / 3), pytest.approx(1e-3)]
    assert seen[-1] < seen[3]                           # then a cosine decay


def test_pretrain_scenes_are_the_rendered_batches():
    budget = replace(BUDGETS["tiny"], train_scenes=12)
    kept, rendered = PretrainScenes(budget, seed=2), PretrainScenes(budget, seed=2, max_bytes=0)
    assert kept.images is not None and rendered.images is None
    want_images, want_scenes = scene_batch("train", 3, 5, budget.img_size, base_seed=2)
    for scenes in (kept, rendered):
        images, batch = scenes.batch(3, 5)
        assert torch.equal(images, want_images) and batch == want_scenes


@pytest.mark.parametrize("max_bytes", [None, 0])
def test_seed_scenes_are_the_datasets_made_once_in_workers(max_bytes):
    """Made by two worker processes (in chunks, the last one short) or by this one: the
    scene graphs, images and questions SceneDataset gives, in order; without room for the
    images, the same images rendered when read."""
    from pyssm.data import render
    from pyssm.study import scenes as scenes_module

    data = SceneDataset("train", num_scenes=2 * scenes_module.CHUNK + 7, size=16,
                        base_seed=5, questions_per_scene=3, n_objects=(1, 3))
    made = [scenes_module.SeedScenes(data, texts=True, workers=w, max_bytes=max_bytes)
            for w in (2, 0)]
    for store in made:
        assert (store.images is None) == (max_bytes == 0) and len(store) == data.num_scenes
        for j in (0, scenes_module.CHUNK, data.num_scenes - 1):
            assert store.scenes[j] == data.scene(j)
            image, scenes = store.batch(j, 1)
            assert torch.equal(image[0], render(data.scene(j), 16)) and scenes[0] == data.scene(j)
        for i in (0, 4, len(data) - 1):
            assert store.texts[i] == (data.example(i).prompt, data.example(i).answer)
    assert made[0].texts == made[1].texts and made[0].scenes == made[1].scenes
    with pytest.raises(IndexError, match="out of range"):
        made[0].batch(data.num_scenes - 1, 2)


@pytest.mark.parametrize("budget_name, shared", [("tiny", False), ("small", True)])
def test_a_seeds_runs_share_one_making_of_its_scenes(budget_name, shared):
    """Pretraining reads the VLM's scenes when they are the same scenes (the small and medium
    budgets), its own otherwise (tiny: the VLM's scenes have 1-2 objects)."""
    from pyssm.study.run import seed_scenes

    budget = replace(BUDGETS[budget_name], train_scenes=9, img_size=16)
    pre, train = seed_scenes(budget, 4, letterbox=True, pretraining=True)
    assert (pre.store is train.store) == shared
    want_images, want_scenes = scene_batch("train", 2, 3, 16, base_seed=4)
    images, scenes = pre.batch(2, 3)
    assert torch.equal(images, want_images) and scenes == want_scenes
    assert seed_scenes(budget, 4, letterbox=True, pretraining=False)[0] is None


def test_train_scenes_give_what_preprocessed_gives():
    budget = replace(BUDGETS["tiny"], train_scenes=6)
    cached = TrainScenes(budget, seed=1, letterbox=True)
    plain = Preprocessed(SceneDataset("train", num_scenes=6, size=budget.img_size, base_seed=1,
                                      questions_per_scene=QUESTIONS_PER_SCENE,
                                      n_objects=budget.n_objects), budget.img_size, True)
    assert len(cached) == len(plain)
    for i in (0, 5, 0, 23):                             # again from the cache
        (a, pa, aa), (b, pb, ab) = cached[i], plain[i]
        assert torch.equal(a, b) and (pa, aa) == (pb, ab)


def test_scene_tokens_are_the_encoders_tokens_of_each_scene():
    from pyssm.vlm import VisionLanguageModel, VLMConfig
    from pyssm.vlm.model import _tokens
    from pyssm.vlm.tiny_lm import build_tiny_lm, build_word_tokenizer

    budget = replace(BUDGETS["tiny"], train_scenes=70)      # two batches of 64
    scenes = TrainScenes(budget, seed=3, letterbox=True)
    torch.manual_seed(0)
    tokenizer = build_word_tokenizer(["yes"])
    vlm = VisionLanguageModel.from_config(
        VLMConfig(encoder="vit_tiny_patch16", image_size=32, encoder_kwargs={"depth": 1}),
        build_tiny_lm(tokenizer, hidden_size=16, num_layers=1), tokenizer)
    cached = SceneTokens(scenes, vlm)
    assert len(cached) == len(scenes)
    for i in (0, 7, 255, 279, 7):
        tokens, prompt, answer = cached[i]
        image, want_prompt, want_answer = scenes[i]
        with torch.no_grad():
            want = _tokens(vlm.encoder, image[None], None)[0]
        torch.testing.assert_close(tokens, want, atol=1e-5, rtol=1e-5)
        assert (prompt, answer) == (want_prompt, want_answer)


def test_answer_nll_rise_is_paired_per_run():
    """The rise of the answer NLL with shuffled images is each run's own difference, then
    averaged over seeds: seeds with different levels but the same rise give that rise with
    no spread (unpaired means would give a wide interval)."""
    def run(seed, own, shuffled):
        def scores(nll):
            return {"overall": 0.5, "vqa": 0.5, "answer_nll": nll, "by_type": {}, "counts": {}}
        return {"encoder": "e", "objective": "dense", "seed": seed, "params_m": 1.0,
                "visual_tokens": 4, "encoder_img_s": 10.0,
                "scores": {"val": scores(own), "test": scores(own), "test_comp": scores(own),
                           "test_shuffled": scores(shuffled)}}

    rows = summarize_runs([run(0, 0.5, 0.75), run(1, 1.0, 1.25), run(2, 2.0, 2.25)])
    mean, half = rows[0]["answer_nll_rise"]
    assert mean == pytest.approx(0.25) and half == pytest.approx(0.0, abs=1e-12)
    assert rows[0]["test/answer_nll"][0] == pytest.approx(3.5 / 3)
    assert "0.250 ± 0.000" in markdown(rows, "tiny", 3)


def test_summary_skips_seeds_without_a_type():
    def run(seed, by_type):
        scores = {"overall": 0.5, "vqa": 0.5, "by_type": by_type,
                  "counts": {t: 2 for t in by_type}}
        return {"encoder": "e", "objective": "dense", "seed": seed, "params_m": 1.0,
                "visual_tokens": 4, "encoder_img_s": 10.0,
                "scores": {s: scores for s in ("val", "test", "test_comp", "test_shuffled")}}

    rows = summarize_runs([run(0, {"exist": 1.0, "colour": 0.5}), run(1, {"exist": 0.5}),
                           run(2, {"exist": 0.0, "colour": 0.25})])
    mean, half = rows[0]["test/type/colour"]
    assert mean == pytest.approx(0.375) and math.isfinite(half)   # seeds 0 and 2, not nan
    assert rows[0]["test/n/colour"] == 4
    assert rows[0]["test/type/exist"][0] == pytest.approx(0.5)


def test_shuffled_image_control_asks_about_the_next_scene():
    from pyssm.vlm import VLMConfig
    from pyssm.vlm.recipes import evaluate

    class Recorder(torch.nn.Module):
        """A stand-in VLM that answers "yes" and keeps the images it was shown."""

        def __init__(self):
            super().__init__()
            self.connector = torch.nn.Linear(1, 1)
            self.config = VLMConfig(image_size=32)
            self.images = []

        def generate(self, images, prompts, max_new_tokens):
            self.images.append(images)
            return ["yes"] * len(prompts)

    data = SceneDataset("test", num_scenes=3, size=32, base_seed=4,
                        questions_per_scene=QUESTIONS_PER_SCENE, n_objects=(1, 2))
    shown = {}
    for shuffle in (False, True):
        vlm = Recorder()
        result = evaluate(vlm, "test", 12, seed=4, batch_size=5, answer_nll=False,
                          scene_kwargs={"n_objects": (1, 2)}, shuffle_images=shuffle)
        assert result["examples"] == 12
        shown[shuffle] = torch.cat(vlm.images)
    image = [prepare_images([data[4 * j][0]], 32)[0] for j in range(3)]
    for i in range(12):
        assert torch.equal(shown[False][i], image[i // 4])
        assert torch.equal(shown[True][i], image[(i // 4 + 1) % 3])      # the next scene's



@pytest.mark.parametrize("shuffle", [False, True])
def test_answer_nll_is_each_answers_mean_token_nll(shuffle):
    """evaluate's answer_nll against one example at a time: the reference answer's tokens and
    EOS after the prompt, the log-softmax of the logits one position earlier, averaged per
    example and then over examples (batches of 4 over 7 examples: padding in play)."""
    from pyssm.data import vocabulary
    from pyssm.vlm import VisionLanguageModel, VLMConfig
    from pyssm.vlm.recipes import evaluate
    from pyssm.vlm.tiny_lm import build_tiny_lm, build_word_tokenizer

    torch.manual_seed(3)
    tokenizer = build_word_tokenizer(vocabulary())
    vlm = VisionLanguageModel.from_config(
        VLMConfig(encoder="vit_tiny_patch16", image_size=32, encoder_kwargs={"depth": 1},
                  image_style="llava", prompt_template="{prompt} {image}"),
        build_tiny_lm(tokenizer, hidden_size=16, num_layers=1), tokenizer)
    got = evaluate(vlm, "test", 7, seed=2, batch_size=4, max_new_tokens=2,
                   shuffle_images=shuffle)["answer_nll"]
    data = SceneDataset("test", num_scenes=2, size=32, base_seed=2,
                        questions_per_scene=QUESTIONS_PER_SCENE)
    total = 0.0
    for i in range(7):
        ex = data.example(i)
        image = prepare_images([data[(i + 4 * shuffle) % 8][0]], 32)
        prompt = tokenizer(vlm.format_prompt(ex.prompt))["input_ids"]
        answer = tokenizer(f" {ex.answer}", add_special_tokens=False)["input_ids"]
        answer = answer + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            embeds, mask, _ = vlm.build_inputs(image, ids, torch.ones_like(ids))
            logits = vlm.lm(inputs_embeds=embeds, attention_mask=mask).logits[0].double()
        start = embeds.shape[1] - len(answer)        # the answer's first position
        logp = logits[start - 1:-1].log_softmax(-1)
        total += -logp[torch.arange(len(answer)), torch.tensor(answer)].mean().item()
    assert got == pytest.approx(total / 7, rel=1e-4)


@pytest.mark.slow
def test_the_pipeline_reads_the_image():
    """A positive control for the study's plumbing: colour questions only, a tiny LM over the
    tiny budget's dense-pretrained encoder. It must read the colour from the
    image, well above the same model shown another scene's image; a break anywhere between
    the image and the answer (the token cache, splicing, the prompt template, evaluation)
    leaves it at the shuffled score."""
    from pyssm.data import vocabulary
    from pyssm.vlm import VisionLanguageModel, VLMConfig
    from pyssm.vlm.recipes import evaluate
    from pyssm.vlm.tiny_lm import build_tiny_lm, build_word_tokenizer
    from pyssm.vlm.train import Trainer, TrainConfig

    only = {"n_objects": (1, 2), "question_types": ("colour",), "grounding_fraction": 0.0}
    budget = replace(BUDGETS["tiny"], grounding_fraction=0.0, train_scenes=1000)
    encoder, _ = pretrain_encoder("vmamba_tiny_s1l8", "dense", budget, seed=0,
                                  device=torch.device("cpu"))
    scenes = TrainScenes(budget, seed=0, letterbox=True, data=SceneDataset(
        "train", num_scenes=1000, size=32, questions_per_scene=4, **only))
    torch.manual_seed(0)
    tokenizer = build_word_tokenizer(vocabulary())
    cfg = VLMConfig(encoder="vmamba_tiny_s1l8", image_size=32, connector=budget.connector,
                    image_style=budget.image_style, prompt_template=budget.prompt_template)
    vlm = VisionLanguageModel.from_config(
        cfg, build_tiny_lm(tokenizer, hidden_size=64, num_layers=2), tokenizer, encoder=encoder)
    Trainer(vlm, SceneTokens(scenes, vlm), TrainConfig(
        stage="one-stage", steps=800, batch_size=16, lr=budget.vlm_lr,
        loss_weighting=budget.loss_weighting)).fit()
    own = evaluate(vlm, "test", 120, scene_kwargs=only)["by_type"]["colour"]
    shuffled = evaluate(vlm, "test", 120, scene_kwargs=only, shuffle_images=True)
    assert own > shuffled["by_type"]["colour"] + 0.15 and own > 0.3, (own, shuffled)
