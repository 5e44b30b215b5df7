"""Referring expressions with exactly one target, answered by its normalised box.

Types: ref_attribute ("the green triangle"), ref_relation ("the circle left of the blue
square"), ref_edge ("the 7 nearest the top edge"), ref_distance ("the circle nearest to the
red 3", "the digit farthest from the small square"). Each expression is resolved against the
scene graph by ``resolve`` before it is used, and kept only if it picks out a single object
(relations and extremes must also hold by describe.MARGIN for every candidate)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from pyssm.data.describe import (EDGES, RELATIONS, Description, clear_extreme, descriptions_of,
                                 distance, edge_distance, relation_clear, relation_holds, select,
                                 unique_descriptions)
from pyssm.data.scenes import Scene

GROUNDING_TYPES = ("ref_attribute", "ref_relation", "ref_edge", "ref_distance")


@dataclass(frozen=True)
class Referral:
    """A parsed referring expression: ``target`` describes the object; ``relation`` (one of
    describe.RELATIONS, "nearest to", "farthest from", "nearest the") and ``anchor`` (a
    Description, or an edge name for "nearest the") narrow it down when set."""
    target: Description
    relation: str | None = None
    anchor: Description | str | None = None

    def text(self) -> str:
        head = f"the {self.target.phrase()}"
        if self.relation is None:
            return head
        if self.relation == "nearest the":
            return f"{head} nearest the {self.anchor} edge"
        return f"{head} {self.relation} the {self.anchor.phrase()}"


@dataclass(frozen=True)
class Grounding:
    type: str
    expression: str
    target: int                                  # index of the object
    box: tuple[float, float, float, float]       # the target's box, rounded to two decimals
    objects: tuple[int, ...] = ()                # the target and the anchor object, if any

    @property
    def prompt(self) -> str:
        return f"Locate {self.expression}."

    @property
    def answer(self) -> str:
        return format_box(self.box)


def format_box(box) -> str:
    """"[0.12, 0.40, 0.33, 0.61]": a normalised box rounded to two decimals."""
    return "[" + ", ".join(f"{v:.2f}" for v in box) + "]"


def round_box(box) -> tuple[float, float, float, float]:
    return tuple(round(float(v), 2) for v in box)


def resolve(scene: Scene, ref: Referral) -> list[int]:
    """The objects ``ref`` picks out. Ambiguous parts (an anchor that is not unique, a
    relation or extreme within describe.MARGIN) resolve to [] so such expressions are never
    kept."""
    objs = scene.objects
    cands = select(objs, ref.target)
    if ref.relation is None:
        return cands
    if ref.relation == "nearest the":
        best = clear_extreme(cands, lambda i: edge_distance(objs[i], ref.anchor))
        return [] if best is None else [best]
    anchors = select(objs, ref.anchor)
    if len(anchors) != 1:
        return []
    a = anchors[0]
    cands = [i for i in cands if i != a]
    if ref.relation in RELATIONS:
        if not all(relation_clear(objs[i], objs[a], ref.relation) for i in cands):
            return []
        return [i for i in cands if relation_holds(objs[i], objs[a], ref.relation)]
    best = clear_extreme(cands, lambda i: distance(objs[i], objs[a]),
                         largest=ref.relation == "farthest from")
    return [] if best is None else [best]


def _ambiguous_descriptions(scene, i, forbidden):
    """Descriptions of object i that other objects share too (relations then disambiguate)."""
    return [d for d in descriptions_of(scene.objects[i])
            if d.allowed(forbidden) and len(select(scene.objects, d)) > 1]


def _candidates(scene: Scene, i: int, rtype: str, rng, forbidden) -> list[Referral]:
    objs = scene.objects
    if rtype == "ref_attribute":
        return [Referral(d) for d in unique_descriptions(objs, i, forbidden)]
    shared = _ambiguous_descriptions(scene, i, forbidden)
    if rtype == "ref_edge":
        return [Referral(d, "nearest the", e) for d in shared for e in EDGES]
    out = []
    for a in range(len(objs)):
        if a == i:
            continue
        anchors = unique_descriptions(objs, a, forbidden)
        if not anchors:
            continue
        anchor = anchors[rng.integers(len(anchors))]
        rels = RELATIONS if rtype == "ref_relation" else ("nearest to", "farthest from")
        out += [Referral(d, r, anchor) for d in shared for r in rels]
    return out


def make_grounding(scene: Scene, rng: np.random.Generator, rtype: str,
                   forbidden: Collection = (), targets=None) -> Grounding | None:
    """A referring expression of type ``rtype`` for one of ``targets`` (default: any
    object), verified unique with ``resolve``; None when the scene allows none."""
    if rtype not in GROUNDING_TYPES:
        raise ValueError(f"grounding type must be one of {GROUNDING_TYPES}, got {rtype!r}")
    order = list(range(len(scene.objects)) if targets is None else targets)
    rng.shuffle(order)
    for i in order:
        cands = _candidates(scene, i, rtype, rng, forbidden)
        rng.shuffle(cands)
        for ref in cands:
            if resolve(scene, ref) == [i]:
                anchor = select(scene.objects, ref.anchor) if isinstance(
                    ref.anchor, Description) else []
                return Grounding(rtype, ref.text(), i, round_box(scene.objects[i].box),
                                 (i, *anchor))
    return None


def refer(scene: Scene, rng: np.random.Generator, types=GROUNDING_TYPES,
          forbidden: Collection = (), targets=None) -> Grounding | None:
    """A referring expression of a uniformly drawn type, falling back to the other types
    when the scene allows none of it."""
    order = list(types)
    rng.shuffle(order)
    for rtype in order:
        g = make_grounding(scene, rng, rtype, forbidden, targets)
        if g is not None:
            return g
    return None
