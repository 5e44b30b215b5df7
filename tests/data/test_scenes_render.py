"""Scene sampling and rendering: determinism, geometry, resolution independence."""

import numpy as np
import pytest
import torch

from pyssm.data import (COLOURS, SHAPES, Scene, SceneDataset, SceneObject, make_scene, render,
                        render_batch, sample_scene)
from pyssm.data.scenes import Background


def test_same_seed_same_scene_and_image():
    for j in range(20):
        a, b = make_scene("train", j), make_scene("train", j)
        assert a == b and a.to_dict() == b.to_dict()
        assert torch.equal(render(a, 64), render(b, 64))
    assert make_scene("train", 0) != make_scene("train", 1)
    assert make_scene("train", 0, base_seed=1) != make_scene("train", 0, base_seed=0)
    r1, r2 = np.random.default_rng(7), np.random.default_rng(7)
    assert sample_scene(r1) == sample_scene(r2)


def test_boxes_inside_unit_square_and_disjoint():
    for j in range(200):
        scene = make_scene("train", j)
        assert 2 <= len(scene.objects) <= 6
        boxes = np.array([o.box for o in scene.objects])
        assert (boxes >= 0).all() and (boxes <= 1).all()
        assert (boxes[:, 0] < boxes[:, 2]).all() and (boxes[:, 1] < boxes[:, 3]).all()
        for i in range(len(boxes)):
            for k in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[k]
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
        for o in scene.objects:
            assert o.kind == ("digit" if o.name.isdigit() else "shape")
            assert o.colour in COLOURS and o.size in ("small", "large")
            assert (o.glyph >= 0) == (o.kind == "digit")


def test_image_format():
    scene = make_scene("val", 3)
    for size in (32, 64, 97):
        img = render(scene, size)
        assert img.shape == (3, size, size) and img.dtype == torch.float32
        assert img.min() >= 0 and img.max() <= 1
    batch = render_batch([make_scene("val", j) for j in range(3)], 48)
    assert batch.shape == (3, 3, 48, 48)
    assert torch.equal(batch[1], render(make_scene("val", 1), 48))


def test_two_resolutions_same_graph_and_examples():
    lo, hi = SceneDataset("train", 20, size=64), SceneDataset("train", 20, size=128)
    for i in range(len(lo)):
        a, b = lo.example(i), hi.example(i)
        assert a.scene.to_dict() == b.scene.to_dict()
        assert (a.prompt, a.answer, a.type, a.target_box) == (b.prompt, b.answer, b.type,
                                                               b.target_box)
        assert lo[i][0].shape == (3, 64, 64) and hi[i][0].shape == (3, 128, 128)


def _alpha(img: torch.Tensor, bg, rgb) -> np.ndarray:
    """Per-pixel coverage of colour rgb over the plain background bg."""
    img = img.numpy()
    bg, rgb = np.asarray(bg).reshape(3, 1, 1), np.asarray(rgb).reshape(3, 1, 1)
    c = int(np.argmax(np.abs(rgb - bg)))
    return (img[c] - bg[c, 0, 0]) / (rgb[c, 0, 0] - bg[c, 0, 0])


@pytest.mark.parametrize("size", [64, 160])
def test_drawn_extent_matches_box(size):
    """On a plain background, each object's half-coverage region spans its box (to within
    a pixel or so) and nothing is drawn outside the boxes."""
    bg = (0.9, 0.9, 0.9)
    for j in range(12):
        scene = make_scene("train", j)
        plain = Scene(scene.objects, Background("plain", bg))
        img = render(plain, size)
        outside = np.ones((size, size), bool)
        for o in scene.objects:
            a = _alpha(img, bg, COLOURS[o.colour])
            x1, y1, x2, y2 = (v * size for v in o.box)
            win = np.zeros((size, size), bool)
            win[max(0, int(y1) - 1):int(np.ceil(y2)) + 1,
                max(0, int(x1) - 1):int(np.ceil(x2)) + 1] = True
            outside &= ~win
            ys, xs = np.nonzero((a >= 0.5) & win)
            # pointed tips (triangle apex, diamond corners) and the ends of thin strokes thin
            # out below a pixel
            tol = {"circle": 1.0, "square": 1.0, "cross": 1.0}.get(o.name, 2.0)
            assert len(xs), o
            assert abs(xs.min() - x1) <= tol and abs(xs.max() + 1 - x2) <= tol, (o, xs, size)
            assert abs(ys.min() - y1) <= tol and abs(ys.max() + 1 - y2) <= tol, (o, ys, size)
        assert np.abs(img.numpy() - np.reshape(bg, (3, 1, 1)))[:, outside].max() < 1e-6


def test_shape_centres_have_their_colour():
    for name in SHAPES:
        obj = SceneObject("shape", name, "blue", "large", (0.3, 0.3, 0.6, 0.6))
        img = render(Scene((obj,), Background("plain", (0.9, 0.9, 0.9))), 100)
        assert torch.allclose(img[:, 45, 45], torch.tensor(COLOURS["blue"]), atol=1e-5), name
        assert torch.allclose(img[:, 5, 5], torch.tensor([0.9, 0.9, 0.9]))
