"""Splicing image embeddings into an LM's ``inputs_embeds``.

Two styles, per sample (one image each):
  prismatic  the T image embeddings go right after the BOS token;
  llava      they replace the single ``<image>`` placeholder token.
Labels are -100 at image positions (prompt positions are the caller's to mask). Rows are
re-padded on the tokenizer's padding side (left or right), with zero embeddings, mask 0 and
label -100.
"""

from __future__ import annotations

import torch

STYLES = ("prismatic", "llava")
IGNORE = -100


def splice_image_embeds(token_embeds: torch.Tensor, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor, image_embeds: torch.Tensor, *,
                        style: str, bos_token_id: int | None = None,
                        image_token_id: int | None = None, labels: torch.Tensor | None = None,
                        padding_side: str = "right", max_length: int | None = None):
    """token_embeds (B, S, D), input_ids / attention_mask / labels (B, S), image_embeds
    (B, T, D) -> inputs_embeds (B, S', D), attention_mask (B, S'), labels (B, S') or None."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    B, T = image_embeds.shape[:2]
    if input_ids.shape[0] != B:
        raise ValueError(f"{B} images for {input_ids.shape[0]} sequences: one image per "
                         f"sequence is expected")
    rows = []
    for i in range(B):
        keep = attention_mask[i].bool()
        ids, emb = input_ids[i][keep], token_embeds[i][keep]
        lab = labels[i][keep] if labels is not None else None
        if style == "prismatic":
            if bos_token_id is None or ids.numel() == 0 or int(ids[0]) != bos_token_id:
                raise ValueError(f"sequence {i} does not start with the BOS token "
                                 f"({bos_token_id}); the prismatic style inserts the image "
                                 f"after it")
            at, drop = 1, 0
        else:
            where = (ids == image_token_id).nonzero().flatten()
            if where.numel() != 1:
                raise ValueError(f"sequence {i} has {where.numel()} <image> placeholders for "
                                 f"its 1 image (the llava style needs exactly one)")
            at, drop = int(where[0]), 1
        new_emb = torch.cat([emb[:at], image_embeds[i].to(emb.dtype), emb[at + drop:]])
        new_lab = None
        if lab is not None:
            new_lab = torch.cat([lab[:at], lab.new_full((T,), IGNORE), lab[at + drop:]])
        rows.append((new_emb, new_lab))
    length = max(r[0].shape[0] for r in rows)
    if max_length is not None and length > max_length:
        raise ValueError(f"a sequence of {length} positions ({T} of them image tokens) exceeds "
                         f"the LM's context of {max_length}; shorten the prompt")
    D = token_embeds.shape[-1]
    out_emb = token_embeds.new_zeros(B, length, D)
    out_mask = attention_mask.new_zeros(B, length)
    out_lab = labels.new_full((B, length), IGNORE) if labels is not None else None
    for i, (emb, lab) in enumerate(rows):
        n = emb.shape[0]
        sl = slice(length - n, length) if padding_side == "left" else slice(0, n)
        out_emb[i, sl] = emb
        out_mask[i, sl] = 1
        if lab is not None:
            out_lab[i, sl] = lab
    return out_emb, out_mask, out_lab
