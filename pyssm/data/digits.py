"""Handwritten digit glyphs from the UCI digits set that scikit-learn ships (no download):
each 8x8 glyph is upsampled smoothly (bicubic, x4 on a zero-padded grid) into an intensity
field, with the tight box of its ink, so a renderer can draw it at any size and tint."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

PAD = 2          # zero border around the 8x8 glyph, in glyph pixels
UP = 4           # field samples per glyph pixel
INK = 0.4        # intensity (0..1) at which the field counts as ink: the glyph's edge


@dataclass(frozen=True)
class Glyphs:
    """``field[i]``: (G, G) float32 intensity in [0, 1], G = (8 + 2 * PAD) * UP, sample j at
    glyph coordinate (j + 0.5) / UP; ``labels[i]``: the digit; ``ink[i]``: the ink's box
    (u0, v0, u1, v1) in glyph coordinates (x right, y down, the padded glyph spans [0, 12])."""
    field: np.ndarray
    labels: np.ndarray
    ink: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@functools.lru_cache(maxsize=1)
def load_glyphs() -> Glyphs:
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.pad(digits.images.astype(np.float32) / 16.0, ((0, 0), (PAD, PAD), (PAD, PAD)))
    n = 8 + 2 * PAD
    with torch.no_grad():
        field = F.interpolate(torch.from_numpy(images)[:, None], size=(n * UP, n * UP),
                              mode="bicubic", align_corners=False)[:, 0].clamp_(0, 1).numpy()
    inked = field >= INK
    cols, rows = inked.any(axis=1), inked.any(axis=2)          # (N, G) each
    idx = np.arange(n * UP)

    def extent(mask):
        lo = np.where(mask, idx, n * UP).min(axis=1)
        hi = np.where(mask, idx, -1).max(axis=1) + 1
        return lo / UP, hi / UP

    u0, u1 = extent(cols)
    v0, v1 = extent(rows)
    ink = np.stack([u0, v0, u1, v1], axis=1).astype(np.float64)
    return Glyphs(np.ascontiguousarray(field), digits.target.astype(np.int64), ink)
