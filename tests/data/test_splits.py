"""Splits: disjoint scenes, held-out colour-name pairs, disjoint handwriting."""

import pytest

from pyssm.data import COLOURS, DIGITS, HELD_OUT, SHAPES, SPLITS, SceneDataset, make_scene
from pyssm.data.splits import glyph_pool, rng_for

N = 300


def _fingerprint(scene):
    return tuple((o.name, o.colour, o.size, o.box) for o in scene.objects)


@pytest.fixture(scope="module")
def scenes():
    return {s: [make_scene(s, j) for j in range(N)] for s in SPLITS}


def test_no_scene_shared_between_splits(scenes):
    seen = {}
    for split, items in scenes.items():
        prints = {_fingerprint(s) for s in items}
        assert len(prints) == N                     # no repeats inside a split either
        for other, theirs in seen.items():
            assert not prints & theirs, (split, other)
        seen[split] = prints


def test_streams_differ_by_split_index_and_stream():
    draws = {(s, j, k): rng_for(s, j, stream=k).integers(2**62)
             for s in SPLITS for j in (0, 1, 2**32 - 1) for k in (1, 2)}
    assert len(set(draws.values())) == len(draws)
    with pytest.raises(ValueError):
        rng_for("dev", 0)
    with pytest.raises(ValueError):
        rng_for("train", -1)


def test_held_out_pairs_only_in_test_comp(scenes):
    for split in ("train", "val", "test"):
        pairs = {(o.colour, o.name) for s in scenes[split] for o in s.objects}
        assert not pairs & HELD_OUT, split
    for s in scenes["test_comp"]:
        assert any((o.colour, o.name) in HELD_OUT for o in s.objects)


def test_every_colour_and_name_still_seen_in_train(scenes):
    objs = [o for s in scenes["train"] for o in s.objects]
    assert {o.colour for o in objs} == set(COLOURS)
    assert {o.name for o in objs} == set(SHAPES) | set(DIGITS)
    for colour, name in HELD_OUT:     # each half of a held-out pair appears with others
        assert any(o.colour == colour for o in objs if o.name != name)
        assert any(o.name == name for o in objs if o.colour != colour)


def test_held_out_pairs_absent_from_train_text():
    ds = SceneDataset("train", 150)
    for i in range(len(ds)):
        ex = ds.example(i)
        words = f" {ex.prompt.rstrip('?.')} ".replace("the ", " ")
        for colour, name in HELD_OUT:
            for noun in (name, name + "s", name + "es"):
                assert f" {colour} {noun} " not in words, ex.prompt


def test_test_comp_examples_are_about_held_out_objects():
    ds = SceneDataset("test_comp", 100)
    about = 0
    for i in range(len(ds)):
        ex = ds.example(i)
        held = {k for k, o in enumerate(ex.scene.objects) if (o.colour, o.name) in HELD_OUT}
        about += bool(held & set(ex.objects))
    assert about >= 0.9 * len(ds)


def test_handwriting_split():
    train, val, test = (set(glyph_pool(s)) for s in ("train", "val", "test"))
    assert not train & val and not train & test and not val & test
    assert set(glyph_pool("test_comp")) == test
    for split in SPLITS:
        pool = set(glyph_pool(split))
        for j in range(50):
            for o in make_scene(split, j).objects:
                assert o.kind == "shape" or o.glyph in pool
