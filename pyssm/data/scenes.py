"""Scene graphs: the vocabulary of objects (shapes, digits, colours, sizes), the dataclasses
kept with every image, and sampling a scene from a numpy Generator.

Coordinates are normalised to the image: x right, y down, both in [0, 1], independent of the
resolution the scene is rendered at. An object's box is the tight box of what is drawn.
Objects never overlap (boxes are kept ``GAP`` apart), so every object is fully visible.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np

from pyssm.data.digits import load_glyphs

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
DIGITS = tuple(str(d) for d in range(10))
COLOURS = {                         # name -> RGB in [0, 1]
    "red": (0.86, 0.10, 0.10),
    "green": (0.10, 0.60, 0.15),
    "blue": (0.12, 0.30, 0.92),
    "yellow": (0.95, 0.80, 0.00),
    "purple": (0.55, 0.18, 0.78),
    "orange": (1.00, 0.50, 0.00),
    "cyan": (0.00, 0.75, 0.80),
}
SIZES = {"small": 0.13, "large": 0.24}   # size class -> extent (the box's longer side)
SIZE_JITTER = 0.08                       # relative; keeps the classes well apart
BACKGROUNDS = ("plain", "noise", "stripes")
MARGIN = 0.03                            # from the image border
GAP = 0.02                               # between object boxes
MIN_DIGIT_ASPECT = 0.4                   # width / height; thinner glyphs (some 1s) are widened


@dataclass(frozen=True)
class SceneObject:
    kind: str                            # "shape" | "digit"
    name: str                            # shape name, or the digit "0".."9"
    colour: str
    size: str                            # size class
    box: tuple[float, float, float, float]   # normalised [x1, y1, x2, y2]
    glyph: int = -1                      # index into load_glyphs() for digits

    @property
    def centre(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return ((x1 + x2) / 2, (y1 + y2) / 2)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "colour": self.colour, "size": self.size,
                "box": list(self.box), "centre": list(self.centre), "glyph": self.glyph}


@dataclass(frozen=True)
class Background:
    kind: str = "plain"                  # one of BACKGROUNDS
    colour: tuple[float, float, float] = (0.9, 0.9, 0.9)
    amplitude: float = 0.0               # of the noise / stripes, in intensity
    period: float = 0.1                  # stripes: normalised period
    angle: float = 0.0                   # stripes: radians
    phase: float = 0.0                   # stripes: radians
    noise_seed: int = 0

    def to_dict(self) -> dict:
        return {"kind": self.kind, "colour": list(self.colour), "amplitude": self.amplitude,
                "period": self.period, "angle": self.angle, "phase": self.phase,
                "noise_seed": self.noise_seed}


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: Background = field(default_factory=Background)
    key: tuple = ()                      # (base_seed, split, index) when made by splits.make_scene

    def to_dict(self) -> dict:
        return {"objects": [o.to_dict() for o in self.objects],
                "background": self.background.to_dict(), "key": list(self.key)}


def kind_of(name: str) -> str:
    return "digit" if name in DIGITS else "shape"


def _background(rng: np.random.Generator) -> Background:
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    level = rng.uniform(0.78, 0.95)
    colour = tuple(float(np.clip(level + t, 0, 1)) for t in rng.uniform(-0.04, 0.04, 3))
    return Background(kind=kind, colour=colour,
                      amplitude=float(rng.uniform(0.03, 0.07)) if kind != "plain" else 0.0,
                      period=float(rng.uniform(0.05, 0.12)), angle=float(rng.uniform(0, np.pi)),
                      phase=float(rng.uniform(0, 2 * np.pi)),
                      noise_seed=int(rng.integers(2**31)))


def _place(rng: np.random.Generator, w: float, h: float, boxes: list, tries: int = 48):
    """A box of size w x h inside the margins, GAP away from every box in ``boxes``."""
    x1 = rng.uniform(MARGIN, 1 - MARGIN - w, tries)
    y1 = rng.uniform(MARGIN, 1 - MARGIN - h, tries)
    if boxes:
        b = np.asarray(boxes)
        free = ((x1[:, None] >= b[None, :, 2] + GAP) | (x1[:, None] + w + GAP <= b[None, :, 0])
                | (y1[:, None] >= b[None, :, 3] + GAP) | (y1[:, None] + h + GAP <= b[None, :, 1]))
        ok = np.flatnonzero(free.all(axis=1))
        if len(ok) == 0:
            return None
        x1, y1 = x1[ok[0]], y1[ok[0]]
    else:
        x1, y1 = x1[0], y1[0]
    return (round(float(x1), 4), round(float(y1), 4),
            round(float(x1 + w), 4), round(float(y1 + h), 4))


@functools.lru_cache(maxsize=8)
def _glyphs_by_digit(pool: tuple[int, ...] | None) -> tuple[np.ndarray, ...]:
    glyphs = load_glyphs()
    pool = np.arange(len(glyphs)) if pool is None else np.asarray(pool)
    return tuple(pool[glyphs.labels[pool] == d] for d in range(10))


def sample_scene(rng: np.random.Generator, n_objects: tuple[int, int] = (2, 6),
                 digit_fraction: float = 0.4, forbidden: Collection = (),
                 required: Collection = (), glyph_pool: Sequence[int] | None = None,
                 key: tuple = ()) -> Scene:
    """A random scene of n_objects[0]..n_objects[1] objects (fewer only if they don't fit).
    ``forbidden`` (colour, name) pairs never appear; one of the ``required`` pairs, if any,
    is the first object. Digits draw their handwriting from ``glyph_pool`` (glyph indices)."""
    glyphs = load_glyphs()
    if glyph_pool is not None and not isinstance(glyph_pool, tuple):
        glyph_pool = tuple(int(g) for g in glyph_pool)
    by_digit = _glyphs_by_digit(glyph_pool)
    colours = list(COLOURS)
    forbidden = set(forbidden)
    required = sorted(required)
    n = int(rng.integers(n_objects[0], n_objects[1] + 1))
    objects, boxes = [], []
    for i in range(n):
        if i == 0 and required:
            colour, name = required[rng.integers(len(required))]
        else:
            name = (DIGITS[rng.integers(10)] if rng.random() < digit_fraction
                    else SHAPES[rng.integers(len(SHAPES))])
            allowed = [c for c in colours if (c, name) not in forbidden]
            colour = allowed[rng.integers(len(allowed))]
        size = "small" if rng.random() < 0.5 else "large"
        extent = SIZES[size] * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)
        kind, glyph = kind_of(name), -1
        if kind == "digit":
            candidates = by_digit[int(name)]
            glyph = int(candidates[rng.integers(len(candidates))])
            u0, v0, u1, v1 = glyphs.ink[glyph]
            w, h = extent * max(MIN_DIGIT_ASPECT, (u1 - u0) / (v1 - v0)), extent
        elif name == "triangle":
            w, h = extent, extent * 0.9
        else:
            w, h = extent, extent
        box = _place(rng, w, h, boxes)
        if box is None:
            if i == 0:
                raise RuntimeError("the first object always fits")
            continue
        boxes.append(box)
        objects.append(SceneObject(kind, name, colour, size, box, glyph))
    return Scene(tuple(objects), _background(rng), tuple(key))
