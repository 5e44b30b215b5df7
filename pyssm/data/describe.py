"""Descriptions of objects ("small red circle", "7", "blue digit", "red objects") and the
scene-graph predicates that questions and referring expressions are built on: which objects
a description matches, spatial relations and distances between centres.

Relations compare centres: A is left of B when A's centre x is smaller (above: smaller y).
Generators only use a relation or a nearest/farthest choice when it holds by a clear margin
(``MARGIN``), so the answer never hinges on a near tie."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from pyssm.data.scenes import COLOURS, DIGITS, SHAPES, SIZES, SceneObject

MARGIN = 0.05
RELATIONS = ("left of", "right of", "above", "below")
EDGES = ("left", "right", "top", "bottom")


@dataclass(frozen=True)
class Description:
    """Attributes an object must have; ``noun`` is a shape name, a digit, "shape", "digit" or
    "object" (anything)."""
    noun: str = "object"
    colour: str | None = None
    size: str | None = None

    def matches(self, obj: SceneObject) -> bool:
        return ((self.noun == "object" or self.noun in (obj.name, obj.kind))
                and self.colour in (None, obj.colour) and self.size in (None, obj.size))

    def phrase(self, plural: bool = False) -> str:
        noun = self.noun
        if plural:
            noun += "es" if noun.endswith("s") else "s"
        return " ".join(w for w in (self.size, self.colour, noun) if w)

    def pair(self) -> tuple[str, str] | None:
        """(colour, name) when the description names both, else None."""
        return (self.colour, self.noun) if self.colour and self.noun not in (
            "object", "shape", "digit") else None

    def allowed(self, forbidden: Collection) -> bool:
        return self.pair() not in forbidden


def article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou8" else "a"


def select(objects: Sequence[SceneObject], d: Description) -> list[int]:
    return [i for i, o in enumerate(objects) if d.matches(o)]


def descriptions_of(obj: SceneObject, nouns: Sequence[str] = ("name", "kind", "object"),
                    colour: bool = True) -> list[Description]:
    """Every description ``obj`` satisfies, built from the given nouns (with or without
    size, and with or without colour when ``colour``), except a bare "object"."""
    out = []
    for which in nouns:
        noun = {"name": obj.name, "kind": obj.kind, "object": "object"}[which]
        for c in ((None, obj.colour) if colour else (None,)):
            for s in (None, obj.size):
                if noun == "object" and c is None and s is None:
                    continue
                out.append(Description(noun, c, s))
    return out


def unique_descriptions(objects: Sequence[SceneObject], i: int, forbidden: Collection = (),
                        **kwargs) -> list[Description]:
    """Descriptions (see descriptions_of) that match object ``i`` and no other."""
    return [d for d in descriptions_of(objects[i], **kwargs)
            if d.allowed(forbidden) and select(objects, d) == [i]]


def relation_holds(a: SceneObject, b: SceneObject, relation: str) -> bool:
    (ax, ay), (bx, by) = a.centre, b.centre
    return {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[relation]


def relation_clear(a: SceneObject, b: SceneObject, relation: str) -> bool:
    """Whether the centres differ by at least MARGIN along the relation's axis."""
    (ax, ay), (bx, by) = a.centre, b.centre
    gap = abs(ax - bx) if relation in ("left of", "right of") else abs(ay - by)
    return gap >= MARGIN


def distance(a: SceneObject, b: SceneObject) -> float:
    (ax, ay), (bx, by) = a.centre, b.centre
    return math.hypot(ax - bx, ay - by)


def edge_distance(a: SceneObject, edge: str) -> float:
    x, y = a.centre
    return {"left": x, "right": 1 - x, "top": y, "bottom": 1 - y}[edge]


def clear_extreme(candidates: Sequence[int], key, largest: bool = False) -> int | None:
    """The candidate with the smallest (largest) key if it beats the runner-up by MARGIN."""
    if len(candidates) < 2:
        return None
    ranked = sorted(candidates, key=key, reverse=largest)
    if abs(key(ranked[0]) - key(ranked[1])) < MARGIN:
        return None
    return ranked[0]


def random_description(rng, forbidden: Collection = ()) -> Description:
    """Any description over the vocabulary, e.g. for questions about absent objects."""
    nouns = SHAPES + DIGITS + ("shape", "digit", "object")
    while True:
        noun = nouns[rng.integers(len(nouns))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))] if rng.random() < 0.7 else None
        size = list(SIZES)[rng.integers(len(SIZES))] if rng.random() < 0.3 else None
        d = Description(noun, colour, size)
        if (noun != "object" or colour or size) and d.allowed(forbidden):
            return d
