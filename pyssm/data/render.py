"""Rasterising scenes with vectorised numpy: textured background, then each object inside its
own pixel window. Shapes are signed-distance fields turned into anti-aliased coverage; digits
sample their upsampled glyph field. The result is a float tensor (3, S, S) in [0, 1] for any S;
an object's edge (coverage 0.5) lies on its normalised box at every resolution."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from pyssm.data.digits import UP, load_glyphs
from pyssm.data.scenes import COLOURS, Background, Scene, SceneObject

_RGB = {k: np.asarray(v, np.float32).reshape(3, 1, 1) for k, v in COLOURS.items()}
NOISE_GRID = 6          # low-frequency noise: a NOISE_GRID x NOISE_GRID lattice, upsampled


@functools.lru_cache(maxsize=16)
def _lerp_matrix(size: int, grid: int) -> np.ndarray:
    """(size, grid) bilinear interpolation from grid samples (at the cell centres) to pixels."""
    pos = np.clip((np.arange(size) + 0.5) / size * grid - 0.5, 0, grid - 1)
    lo = np.minimum(np.floor(pos).astype(int), grid - 2)
    t = pos - lo
    m = np.zeros((size, grid), np.float32)
    m[np.arange(size), lo] = 1 - t
    m[np.arange(size), lo + 1] += t
    return m


def _background(bg: Background, size: int, img: np.ndarray) -> np.ndarray:
    img[:] = np.asarray(bg.colour, np.float32).reshape(3, 1, 1)
    if bg.kind == "noise":
        rng = np.random.default_rng([0x6E6F, bg.noise_seed, size])
        m = _lerp_matrix(size, NOISE_GRID)
        low = m @ rng.standard_normal((NOISE_GRID, NOISE_GRID), np.float32) @ m.T
        grain = rng.random((size, size), np.float32) - 0.5
        img += (bg.amplitude * (0.7 * low + 0.6 * grain))[None]
    elif bg.kind == "stripes":
        c = (np.arange(size, dtype=np.float32) + 0.5) / size
        proj = c[None, :] * np.cos(bg.angle) + c[:, None] * np.sin(bg.angle)
        img += (bg.amplitude * np.sin(2 * np.pi * proj / bg.period + bg.phase))[None]
    elif bg.kind != "plain":
        raise ValueError(f"unknown background {bg.kind!r}")
    return np.clip(img, 0, 1, out=img)


def _box_sdf(dx, dy, hw, hh):
    return np.maximum(np.abs(dx) - hw, np.abs(dy) - hh)


def _shape_sdf(name: str, dx: np.ndarray, dy: np.ndarray, hw: float, hh: float) -> np.ndarray:
    """Signed distance (normalised units, < 0 inside) of a shape filling the box of half-sizes
    (hw, hh) centred at 0; dx is (1, w), dy is (h, 1)."""
    if name == "circle":
        return np.sqrt(dx * dx + dy * dy) - min(hw, hh)
    if name == "square":
        return _box_sdf(dx, dy, hw, hh)
    if name == "diamond":
        return (np.abs(dx) * hh + np.abs(dy) * hw - hw * hh) / np.hypot(hw, hh)
    if name == "triangle":            # apex at the top centre, base along the bottom edge
        edge = (2 * hh * np.abs(dx) - hw * (dy + hh)) / np.hypot(2 * hh, hw)
        return np.maximum(edge, dy - hh)
    if name == "cross":               # arms one third of the box wide
        return np.minimum(_box_sdf(dx, dy, hw, hh / 3), _box_sdf(dx, dy, hw / 3, hh))
    raise ValueError(f"unknown shape {name!r}")


def _digit_alpha(obj: SceneObject, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Ink coverage of a digit: its glyph's ink box stretched onto the object's box."""
    glyphs = load_glyphs()
    field = glyphs.field[obj.glyph]
    u0, v0, u1, v1 = glyphs.ink[obj.glyph]
    x1, y1, x2, y2 = obj.box
    g = field.shape[0]
    fu = np.clip((u0 + (xs - x1) * ((u1 - u0) / (x2 - x1))) * UP - 0.5, 0, g - 1.001)
    fv = np.clip((v0 + (ys - y1) * ((v1 - v0) / (y2 - y1))) * UP - 0.5, 0, g - 1.001)
    iu, iv = fu.astype(np.int64), fv.astype(np.int64)
    tu, tv = (fu - iu).astype(np.float32)[None, :], (fv - iv).astype(np.float32)[:, None]
    rows0, rows1 = field[iv], field[iv + 1]
    top = rows0[:, iu] * (1 - tu) + rows0[:, iu + 1] * tu
    bot = rows1[:, iu] * (1 - tu) + rows1[:, iu + 1] * tu
    v = top * (1 - tv) + bot * tv
    t = np.clip((v - 0.25) / 0.3, 0, 1)       # a soft edge centred on the ink threshold 0.4
    return t * t * (3 - 2 * t)


def _draw(img: np.ndarray, obj: SceneObject) -> None:
    size = img.shape[-1]
    x1, y1, x2, y2 = obj.box
    ix0, ix1 = max(0, int(np.floor(x1 * size)) - 1), min(size, int(np.ceil(x2 * size)) + 1)
    iy0, iy1 = max(0, int(np.floor(y1 * size)) - 1), min(size, int(np.ceil(y2 * size)) + 1)
    xs = (np.arange(ix0, ix1, dtype=np.float32) + 0.5) / size
    ys = (np.arange(iy0, iy1, dtype=np.float32) + 0.5) / size
    if obj.kind == "digit":
        alpha = _digit_alpha(obj, xs, ys)
    else:
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        sdf = _shape_sdf(obj.name, (xs - cx)[None, :], (ys - cy)[:, None],
                         (x2 - x1) / 2, (y2 - y1) / 2)
        alpha = np.clip(0.5 - sdf * size, 0, 1)
    win = img[:, iy0:iy1, ix0:ix1]
    win += alpha[None] * (_RGB[obj.colour] - win)


def render_numpy(scene: Scene, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """The scene as a float32 array (3, size, size) in [0, 1], written into ``out`` if given."""
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    img = np.empty((3, size, size), np.float32) if out is None else out
    _background(scene.background, size, img)
    for obj in scene.objects:
        _draw(img, obj)
    return img


def render(scene: Scene, size: int) -> torch.Tensor:
    """The scene as a float tensor (3, size, size) in [0, 1]."""
    return torch.from_numpy(render_numpy(scene, size))


def render_batch(scenes: Sequence[Scene], size: int) -> torch.Tensor:
    """Scenes as one float tensor (B, 3, size, size), rendered straight into the batch."""
    out = np.empty((len(scenes), 3, size, size), np.float32)
    for i, scene in enumerate(scenes):
        render_numpy(scene, size, out=out[i])
    return torch.from_numpy(out)
