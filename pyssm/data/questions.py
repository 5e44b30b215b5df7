"""VQA questions generated from a scene graph, with exact short answers.

Types: exist ("Is there a red circle?"), count ("How many digits are there?"), compare
("Are there more circles than 7s?"), colour ("What colour is the small square?"), shape
("What shape is the red object?"), digit ("What digit is the blue digit?"), relation ("Is the
red circle left of the 7?"), nearest / farthest ("What colour is the object nearest to the
green triangle?", "What is the object farthest from the 3?"). Every object a question names
is named by a description that matches it alone."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from pyssm.data.describe import (RELATIONS, Description, article, clear_extreme, descriptions_of,
                                 distance, random_description, relation_clear, relation_holds,
                                 select, unique_descriptions)
from pyssm.data.scenes import Scene

QUESTION_TYPES = ("exist", "count", "compare", "colour", "shape", "digit", "relation",
                  "nearest", "farthest")


@dataclass(frozen=True)
class Question:
    type: str
    prompt: str
    answer: str
    objects: tuple[int, ...] = ()       # indices of the objects the question is about


def _pick(rng, seq):
    return seq[rng.integers(len(seq))] if len(seq) else None


def _about(scene: Scene, rng, forbidden) -> Description:
    """A description to ask about: mostly one that some object satisfies, sometimes any."""
    if rng.random() < 0.8:
        obj = scene.objects[rng.integers(len(scene.objects))]
        options = [d for d in descriptions_of(obj) if d.allowed(forbidden)]
        if options:
            return _pick(rng, options)
    return random_description(rng, forbidden)


def _exist(scene, rng, forbidden):
    if rng.random() < 0.5:                      # yes: a description of a present object
        d = _about(scene, rng, forbidden)
    else:                                        # no: one matching nothing
        for _ in range(20):
            d = random_description(rng, forbidden)
            if not select(scene.objects, d):
                break
    hits = select(scene.objects, d)
    return Question("exist", f"Is there {article(d.phrase())} {d.phrase()}?",
                    "yes" if hits else "no", tuple(hits))


def _count(scene, rng, forbidden):
    d = _about(scene, rng, forbidden)
    hits = select(scene.objects, d)
    return Question("count", f"How many {d.phrase(plural=True)} are there?", str(len(hits)),
                    tuple(hits))


def _compare(scene, rng, forbidden):
    a, b = _about(scene, rng, forbidden), _about(scene, rng, forbidden)
    if a == b:
        return None
    na, nb = len(select(scene.objects, a)), len(select(scene.objects, b))
    more = rng.random() < 0.5
    word, yes = ("more", na > nb) if more else ("fewer", na < nb)
    return Question("compare", f"Are there {word} {a.phrase(True)} than {b.phrase(True)}?",
                    "yes" if yes else "no",
                    tuple(select(scene.objects, a) + select(scene.objects, b)))


def _attribute(scene, rng, forbidden, qtype):
    objs = scene.objects
    kinds = {"colour": ("shape", "digit"), "shape": ("shape",), "digit": ("digit",)}[qtype]
    targets = [i for i, o in enumerate(objs) if o.kind in kinds]
    rng.shuffle(targets)
    for i in targets:
        if qtype == "colour":
            options = unique_descriptions(objs, i, forbidden, colour=False)
        else:      # must not give the answer away: describe by colour / size only
            options = unique_descriptions(objs, i, forbidden, nouns=("kind", "object"))
        if options:
            d = _pick(rng, options)
            answer = objs[i].colour if qtype == "colour" else objs[i].name
            return Question(qtype, f"What {qtype} is the {d.phrase()}?", answer, (i,))
    return None


def _relation(scene, rng, forbidden):
    objs = scene.objects
    n = len(objs)
    pairs = [(a, b) for a in range(n) for b in range(n) if a != b]
    rng.shuffle(pairs)
    for a, b in pairs:
        da = unique_descriptions(objs, a, forbidden)
        db = unique_descriptions(objs, b, forbidden)
        clear = [r for r in RELATIONS if relation_clear(objs[a], objs[b], r)]
        if da and db and clear:
            rel = _pick(rng, clear)
            yes = relation_holds(objs[a], objs[b], rel)
            prompt = f"Is the {_pick(rng, da).phrase()} {rel} the {_pick(rng, db).phrase()}?"
            return Question("relation", prompt, "yes" if yes else "no", (a, b))
    return None


def _distance(scene, rng, forbidden, farthest):
    objs = scene.objects
    anchors = list(range(len(objs)))
    rng.shuffle(anchors)
    for a in anchors:
        options = unique_descriptions(objs, a, forbidden)
        others = [i for i in range(len(objs)) if i != a]
        best = clear_extreme(others, lambda i: distance(objs[i], objs[a]), largest=farthest)
        if options and best is not None:
            where = "farthest from" if farthest else "nearest to"
            d = _pick(rng, options).phrase()
            if rng.random() < 0.5:
                prompt, answer = f"What colour is the object {where} the {d}?", objs[best].colour
            else:
                prompt, answer = f"What is the object {where} the {d}?", objs[best].name
            return Question("farthest" if farthest else "nearest", prompt, answer, (a, best))
    return None


_GENERATORS = {
    "exist": _exist, "count": _count, "compare": _compare,
    "colour": lambda s, r, f: _attribute(s, r, f, "colour"),
    "shape": lambda s, r, f: _attribute(s, r, f, "shape"),
    "digit": lambda s, r, f: _attribute(s, r, f, "digit"),
    "relation": _relation,
    "nearest": lambda s, r, f: _distance(s, r, f, False),
    "farthest": lambda s, r, f: _distance(s, r, f, True),
}


def make_question(scene: Scene, rng: np.random.Generator, qtype: str,
                  forbidden: Collection = ()) -> Question | None:
    """A question of type ``qtype`` about ``scene``, or None when the scene allows none.
    Descriptions never name a ``forbidden`` (colour, name) pair."""
    if qtype not in _GENERATORS:
        raise ValueError(f"question type must be one of {QUESTION_TYPES}, got {qtype!r}")
    return _GENERATORS[qtype](scene, rng, forbidden)


def ask(scene: Scene, rng: np.random.Generator, types: Sequence[str] = QUESTION_TYPES,
        forbidden: Collection = ()) -> Question:
    """A question of a uniformly drawn type; types the scene allows no question of are
    skipped (exist and count are always possible)."""
    order = list(types)
    rng.shuffle(order)
    for qtype in order + ["exist"]:
        q = make_question(scene, rng, qtype, forbidden)
        if q is not None:
            return q
    raise AssertionError("unreachable: exist questions always exist")
