"""Splice positions, masks and labels for both styles, with padding on either side."""

import pytest
import torch

from pyssm.vlm.splice import splice_image_embeds

BOS, IMG, PAD = 1, 4, 0
D, T = 3, 2


def batch(rows, side):
    """rows of token ids -> padded ids, mask, labels (= ids, -100 on pads), embeds (= id)."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), PAD)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(n - len(r), n) if side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    embeds = ids[..., None].float().expand(-1, -1, D).clone()
    return ids, mask, labels, embeds


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("style", ["prismatic", "llava"])
def test_positions_masks_labels(style, side):
    rows = [[BOS, 7, 8, 9], [BOS, 7]] if style == "prismatic" else [[BOS, 7, IMG, 8, 9], [BOS, IMG]]
    ids, mask, labels, embeds = batch(rows, side)
    images = -torch.arange(1, 2 * T * D + 1, dtype=torch.float).view(2, T, D)
    out, out_mask, out_labels = splice_image_embeds(
        embeds, ids, mask, images, style=style, bos_token_id=BOS, image_token_id=IMG,
        labels=labels, padding_side=side)
    for i, row in enumerate(rows):
        at = 1 if style == "prismatic" else row.index(IMG)
        rest = row[at + (style == "llava"):]
        expect_ids = row[:at] + [None] * T + rest
        n, length = len(expect_ids), out.shape[1]
        sl = slice(length - n, length) if side == "left" else slice(0, n)
        assert out_mask[i].tolist() == [1 if p in range(sl.start, sl.stop) else 0
                                        for p in range(length)]
        got_emb, got_lab = out[i, sl], out_labels[i, sl]
        for p, tok in enumerate(expect_ids):
            if tok is None:
                assert torch.equal(got_emb[p], images[i, p - at]) and got_lab[p] == -100
            else:
                assert got_emb[p].tolist() == [float(tok)] * D and got_lab[p] == tok
        outside = [p for p in range(length) if p not in range(sl.start, sl.stop)]
        assert all(out_labels[i, p] == -100 and not out[i, p].any() for p in outside)


def test_bad_inputs():
    ids, mask, labels, embeds = batch([[BOS, 7, IMG, IMG], [BOS, IMG]], "right")
    images = torch.zeros(2, T, D)
    with pytest.raises(ValueError, match="sequence 0 has 2 <image> placeholders"):
        splice_image_embeds(embeds, ids, mask, images, style="llava", image_token_id=IMG)
    with pytest.raises(ValueError, match="3 images for 2 sequences"):
        splice_image_embeds(embeds, ids, mask, torch.zeros(3, T, D), style="llava",
                            image_token_id=IMG)
    ids2, mask2, _, emb2 = batch([[7, 8], [BOS, 7]], "right")
    with pytest.raises(ValueError, match="sequence 0 does not start with the BOS token"):
        splice_image_embeds(emb2, ids2, mask2, images, style="prismatic", bos_token_id=BOS)
    with pytest.raises(ValueError, match="exceeds the LM's context of 5"):
        splice_image_embeds(embeds, ids, mask, torch.zeros(2, 4, D), style="prismatic",
                            bos_token_id=BOS, max_length=5)


def splice_rows(embeds, ids, mask, images, labels, style, side):
    """Per-row reference: lists of (embedding, label) per position, spliced and re-padded to
    the input's width + T - (1 for llava)."""
    B, S = ids.shape
    T = images.shape[1]
    drop = style == "llava"
    width = S + T - drop
    out = torch.zeros(B, width, embeds.shape[-1], dtype=embeds.dtype)
    out_mask = torch.zeros(B, width, dtype=mask.dtype)
    out_lab = torch.full((B, width), -100)
    for b in range(B):
        row = [(embeds[b, s], int(labels[b, s]), int(ids[b, s])) for s in range(S) if mask[b, s]]
        at = 1 if style == "prismatic" else [t for _, _, t in row].index(IMG)
        image = [(images[b, t], -100, None) for t in range(T)]
        row = row[:at] + image + row[at + drop:]
        start = width - len(row) if side == "left" else 0
        for p, (e, lab, _) in enumerate(row):
            out[b, start + p], out_lab[b, start + p], out_mask[b, start + p] = e, lab, 1
    return out, out_mask, out_lab


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("style", ["prismatic", "llava"])
def test_random_batches_match_rows_with_gradients(style, side):
    """Random lengths and placeholder positions (odd sizes, one row without padding), poisoned
    pads: values, masks, labels and both inputs' gradients equal the per-row reference."""
    g = torch.Generator().manual_seed(11)
    B, T, D = 7, 5, 3
    rows = []
    for b in range(B):
        n = 2 + int(torch.randint(0, 9, (), generator=g))
        body = torch.randint(5, 50, (n,), generator=g).tolist()
        if style == "llava":
            body.insert(int(torch.randint(0, n + 1, (), generator=g)), IMG)
        rows.append([BOS] + body)
    rows[3] = rows[3] + [9] * (max(len(r) for r in rows) - len(rows[3]) + 2)  # the longest
    ids, mask, labels, _ = batch(rows, side)
    embeds = torch.randn(*ids.shape, D, generator=g, dtype=torch.float64)
    embeds[~mask.bool()] = float("nan")                 # pads must never reach the output
    images = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    embeds.requires_grad_(True)
    images.requires_grad_(True)
    got = splice_image_embeds(embeds, ids, mask, images, style=style, bos_token_id=BOS,
                              image_token_id=IMG, labels=labels, padding_side=side)
    weights = torch.randn(got[0].shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((got[0] * weights).sum(), (embeds, images))
    want = splice_rows(embeds, ids, mask, images, labels, style, side)
    want_grads = torch.autograd.grad((want[0] * weights).sum(), (embeds, images))
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1]) and got[1].dtype == mask.dtype
    assert torch.equal(got[2], want[2])
    for a, b in zip(grads, want_grads):
        assert torch.equal(a, b)
