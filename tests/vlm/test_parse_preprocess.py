"""Answer / box parsing and image preprocessing."""

import pytest
import torch

from pyssm.vlm import normalize_answer, parse_box, prepare_images


@pytest.mark.parametrize("text,box", [
    ("[0.1, 0.2, 0.5, 0.9]", [0.1, 0.2, 0.5, 0.9]),
    ("the box is [0, .25,1.0, 0.75].", [0.0, 0.25, 1.0, 0.75]),
    ("[0.5, 0.2, 0.4, 0.9]", None),      # x1 >= x2
    ("[0.1, 0.2, 1.5, 0.9]", None),      # outside [0, 1]
    ("[0.1, 0.2, 0.5]", None), ("no box", None), ("", None), (None, None)])
def test_parse_box(text, box):
    assert parse_box(text) == box


def test_normalize_answer():
    assert normalize_answer("The Red.") == "red"
    assert normalize_answer("  a  big  circle!") == "big circle"


def test_letterbox_keeps_aspect_and_pads_with_mean():
    wide = torch.ones(3, 20, 40)                       # white, 1:2
    out = prepare_images([wide, torch.zeros(3, 8, 8, dtype=torch.uint8)], size=16)
    assert out.shape == (2, 3, 16, 16)
    assert torch.allclose(out[0, :, :4], torch.zeros(3, 4, 16), atol=1e-6)    # padding = mean
    assert (out[0, :, 4:12] > 1).all()                                        # the image
    squashed = prepare_images([wide], size=16, letterbox=False)
    assert (squashed > 1).all()
    with pytest.raises(ValueError, match=r"image 0 must be \(3, H, W\)"):
        prepare_images([torch.ones(20, 40)], size=16)


@pytest.mark.parametrize("letterbox", [True, False])
def test_an_image_already_at_size_is_only_normalised(letterbox):
    """The shortcut for images already size x size gives what resizing them would: the
    antialiased bilinear resize to the same size (and a letterbox with no border)."""
    import torch.nn.functional as F

    from pyssm.vlm.preprocess import normalize

    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 37, 37, generator=g),
              torch.randint(0, 256, (3, 37, 37), generator=g, dtype=torch.uint8)]
    out = prepare_images(images, size=37, letterbox=letterbox)
    for x, got in zip(images, out):
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x
        resized = F.interpolate(x[None], size=(37, 37), mode="bilinear", antialias=True,
                                align_corners=False)[0]
        assert torch.equal(got, normalize(resized))
