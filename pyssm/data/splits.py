"""Splits: train / val / test / test_comp. A scene's random stream is keyed by
(base_seed, split, index), so no scene is shared between splits; the handwriting is split
too (each split draws its digits from its own glyphs, test_comp shares test's). The
``HELD_OUT`` colour-name pairs never appear in train, val or test (neither as objects nor in
any question); every test_comp scene contains at least one of them."""

from __future__ import annotations

import functools

import numpy as np

from pyssm.data.digits import load_glyphs
from pyssm.data.scenes import Scene, sample_scene

SPLITS = ("train", "val", "test", "test_comp")
_SPLIT_CODE = {"train": 1, "val": 2, "test": 3, "test_comp": 4}
_TAG = 0x5353_4D44          # keys are fixed-length lists starting with this (SeedSequence pads
                            # short keys with zeros, so [a, b] and [a, b, 0] would collide)
STREAM_SCENE, STREAM_ITEMS = 1, 2

# every colour and every name is held out with exactly one partner at most, so each still
# appears in training with the others
HELD_OUT = frozenset({("red", "circle"), ("blue", "triangle"), ("green", "square"),
                      ("yellow", "diamond"), ("purple", "cross"), ("orange", "3"),
                      ("cyan", "7")})


def _check(split: str) -> int:
    if split not in _SPLIT_CODE:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return _SPLIT_CODE[split]


def rng_for(split: str, index: int, base_seed: int = 0, stream: int = STREAM_SCENE,
            slot: int = 0) -> np.random.Generator:
    """The generator of (split, index): one stream for the scene, others for its questions."""
    for v in (index, base_seed, slot):
        if not 0 <= v < 2**32:
            raise ValueError(f"index, base_seed and slot must be in [0, 2**32), got {v}")
    return np.random.default_rng([_TAG, base_seed, _check(split), index, stream, slot])


def forbidden_pairs(split: str) -> frozenset:
    """The (colour, name) pairs that may not appear in ``split``."""
    return frozenset() if _check(split) == _SPLIT_CODE["test_comp"] else HELD_OUT


def glyph_pool(split: str) -> tuple[int, ...]:
    """The glyph indices a split draws its digits from: train 3/5 of the set, val and test
    1/5 each, test_comp the test glyphs."""
    return _pool(_check(split))


@functools.lru_cache(maxsize=None)
def _pool(code: int) -> tuple[int, ...]:
    i = np.arange(len(load_glyphs()))
    keep = {1: i % 5 < 3, 2: i % 5 == 3, 3: i % 5 == 4, 4: i % 5 == 4}[code]
    return tuple(int(k) for k in i[keep])


def make_scene(split: str, index: int, base_seed: int = 0,
               n_objects: tuple[int, int] = (2, 6), digit_fraction: float = 0.4) -> Scene:
    """Scene ``index`` of ``split``: a pure function of (base_seed, split, index)."""
    required = HELD_OUT if split == "test_comp" else ()
    return sample_scene(rng_for(split, index, base_seed), n_objects=n_objects,
                        digit_fraction=digit_fraction, forbidden=forbidden_pairs(split),
                        required=required, glyph_pool=glyph_pool(split),
                        key=(base_seed, split, index))
