"""SceneDataset: the trainer's (image, prompt, answer) contract, metadata, vocabulary."""

import pickle
import re

import pytest
import torch

from pyssm.data import Example, SceneDataset, vocabulary


def test_getitem_is_the_trainers_triple():
    ds = SceneDataset("val", num_scenes=10, size=64, questions_per_scene=3)
    assert len(ds) == 30
    item = ds[4]
    assert isinstance(item, tuple) and len(item) == 3
    image, prompt, answer = item
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert isinstance(prompt, str) and isinstance(answer, str) and prompt and answer
    ex = ds.example(4)
    assert isinstance(ex, Example) and (ex.prompt, ex.answer) == (prompt, answer)
    assert (ex.scene_index, ex.slot, ex.split) == (1, 1, "val")
    assert ex.task in ("vqa", "grounding")
    assert (ex.target_box is not None) == (ex.task == "grounding")
    assert ds[-1][1] == ds.example(29).prompt
    with pytest.raises(IndexError):
        ds[30]


def test_deterministic_across_instances_and_pickle():
    a, b = SceneDataset("test", 15), SceneDataset("test", 15)
    c = pickle.loads(pickle.dumps(a))
    for i in range(len(a)):
        assert a.example(i) == b.example(i) == c.example(i)
    assert torch.equal(a[7][0], c[7][0])
    assert SceneDataset("test", 15, base_seed=1).example(0) != a.example(0)


def test_no_repeated_prompt_within_a_scene():
    ds = SceneDataset("train", 50, questions_per_scene=4)
    for j in range(50):
        prompts = [ds.example(4 * j + k).prompt for k in range(4)]
        assert len(set(prompts)) == len(prompts), prompts


def test_task_mix_and_type_filters():
    assert {SceneDataset("train", 20, grounding_fraction=0.0).example(i).task
            for i in range(80)} == {"vqa"}
    assert {SceneDataset("train", 20, grounding_fraction=1.0).example(i).task
            for i in range(80)} == {"grounding"}
    ds = SceneDataset("train", 20, grounding_fraction=0.0, question_types=("count",))
    assert {ds.example(i).type for i in range(80)} == {"count"}


def test_batch_matches_items():
    ds = SceneDataset("train", 8, size=32)
    images, examples = ds.batch([0, 5, 9])
    assert images.shape == (3, 3, 32, 32)
    for k, i in enumerate([0, 5, 9]):
        assert torch.equal(images[k], ds[i][0]) and examples[k] == ds.example(i)


def test_vocabulary_covers_all_text():
    vocab = set(vocabulary())
    for split in ("train", "test_comp"):
        ds = SceneDataset(split, 100)
        for i in range(len(ds)):
            ex = ds.example(i)
            for text in (ex.prompt, ex.answer):
                words = re.findall(r"\w+|[^\w\s]+", text)
                assert set(words) <= vocab, (text, set(words) - vocab)


def test_word_tokenizer_has_no_unknowns():
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    from pyssm.vlm.tiny_lm import build_word_tokenizer

    tok = build_word_tokenizer(vocabulary())
    ds = SceneDataset("train", 30, grounding_fraction=0.5)
    for i in range(len(ds)):
        ex = ds.example(i)
        ids = tok(f"{ex.prompt} {ex.answer}", add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, ex
