"""Answers and boxes re-derived from the scene graph by an independent parser (scene_oracle)."""

import re
from collections import Counter

import numpy as np
import pytest
from scene_oracle import answer_vqa, resolve_expression

from pyssm.data import (GROUNDING_TYPES, QUESTION_TYPES, SPLITS, SceneDataset, format_box,
                        make_question, make_scene, refer, resolve)
from pyssm.data.describe import Description
from pyssm.data.grounding import Referral

BOX_TEXT = re.compile(r"\[(\d\.\d\d), (\d\.\d\d), (\d\.\d\d), (\d\.\d\d)\]")


@pytest.fixture(scope="module", params=["train", "test_comp"])
def examples(request):
    ds = SceneDataset(request.param, 200, questions_per_scene=4)
    return [ds.example(i) for i in range(len(ds))]


def test_every_type_is_generated(examples):
    types = Counter(e.type for e in examples)
    assert set(types) == set(QUESTION_TYPES) | set(GROUNDING_TYPES), types
    tasks = Counter(e.task for e in examples)
    assert 0.35 < tasks["grounding"] / len(examples) < 0.65


def test_vqa_answers_from_the_graph(examples):
    n = 0
    for e in examples:
        if e.task == "vqa":
            assert answer_vqa(e.scene.to_dict(), e.prompt) == e.answer, (e.prompt, e.answer)
            n += 1
    assert n > 300


def test_yes_no_roughly_balanced(examples):
    yn = Counter(e.answer for e in examples if e.type in ("exist", "relation"))
    assert min(yn["yes"], yn["no"]) > 0.3 * (yn["yes"] + yn["no"]), yn


def test_referring_expressions_have_one_target(examples):
    n = 0
    for e in examples:
        if e.task != "grounding":
            continue
        graph = e.scene.to_dict()
        hits = resolve_expression(graph, e.prompt)
        assert len(hits) == 1, (e.prompt, hits)
        box = graph["objects"][hits[0]]["box"]
        m = BOX_TEXT.fullmatch(e.answer)
        assert m, e.answer
        coords = [float(v) for v in m.groups()]
        assert coords == [round(v, 2) for v in box] == list(e.target_box)
        assert 0 <= coords[0] < coords[2] <= 1 and 0 <= coords[1] < coords[3] <= 1
        assert hits[0] == e.objects[0]
        n += 1
    assert n > 300


def test_resolve_refuses_ambiguity():
    scene = make_scene("train", 5)
    objs = scene.objects
    # a description several objects share is not a referring expression on its own
    assert len(resolve(scene, Referral(Description("object")))) == len(objs)
    # an anchor that is not unique resolves to nothing
    assert resolve(scene, Referral(Description("object"), "left of", Description("object"))) == []


def test_generators_deterministic():
    for split in SPLITS:
        for j in range(10):
            scene = make_scene(split, j)
            for t in QUESTION_TYPES:
                a = make_question(scene, np.random.default_rng(j), t)
                b = make_question(scene, np.random.default_rng(j), t)
                assert a == b
            a = refer(scene, np.random.default_rng(j))
            assert a == refer(scene, np.random.default_rng(j))


def test_format_box():
    assert format_box((0.123, 0.4, 0.3349, 0.6071)) == "[0.12, 0.40, 0.33, 0.61]"
    assert format_box((0, 0.5, 1, 1)) == "[0.00, 0.50, 1.00, 1.00]"
