"""Answers are balanced and the wording of a question does not give its answer away: a
bag-of-words classifier of the prompt alone, trained on the train split, must stay near chance
on the test split for the yes / no types (before the generator drew answers first it got 0.77
on existence with 1-2 objects)."""

from collections import Counter, defaultdict

import numpy as np
import pytest

from pyssm.data import SceneDataset, make_scene
from pyssm.data.describe import select
from pyssm.data.questions import _minimal_pair, _perturbed

YES_NO = ("exist", "compare", "relation")


def _by_type(split, scenes, n_objects):
    ds = SceneDataset(split, scenes, size=32, n_objects=n_objects, grounding_fraction=0.0)
    out = defaultdict(list)
    for i in range(len(ds)):
        e = ds.example(i)
        out[e.type].append(e)
    return out


@pytest.fixture(scope="module", params=[(1, 2), (2, 6)], ids=["1-2 objects", "2-6 objects"])
def splits(request):
    return _by_type("train", 1500, request.param), _by_type("test", 500, request.param)


def test_yes_no_and_counts_balanced(splits):
    train, _ = splits
    for qtype in ("exist", "compare"):
        answers = Counter(e.answer for e in train[qtype])
        assert set(answers) == {"yes", "no"}
        assert 0.44 < answers["yes"] / sum(answers.values()) < 0.56, (qtype, answers)
    counts = Counter(e.answer for e in train["count"])
    assert max(counts.values()) / sum(counts.values()) < 0.47, counts


def test_text_alone_does_not_answer(splits):
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    train, test = splits
    for qtype in YES_NO:
        vec = CountVectorizer(ngram_range=(1, 3), token_pattern=r"\w+|[^\w\s]")
        x = vec.fit_transform([e.prompt for e in train[qtype]])
        clf = LogisticRegression(max_iter=2000).fit(x, [e.answer for e in train[qtype]])
        pred = clf.predict(vec.transform([e.prompt for e in test[qtype]]))
        acc = float(np.mean(pred == np.array([e.answer for e in test[qtype]])))
        # n is 150-400 a type: 0.5 + 0.1 is over 2.5 standard errors above chance
        assert acc < 0.6, (qtype, acc, len(test[qtype]))


def test_minimal_pairs_differ_in_one_attribute():
    rng = np.random.default_rng(0)
    for j in range(200):
        scene = make_scene("train", j)
        pair = _minimal_pair(scene, rng, (), absent=True)
        if pair is None:
            continue
        d, twin = pair
        assert select(scene.objects, d) and not select(scene.objects, twin)
        differ = [a for a in ("noun", "colour", "size") if getattr(d, a) != getattr(twin, a)]
        assert len(differ) == 1, (d, twin)
        assert _perturbed(d, rng) != d
