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
    # Every row at once: a text token's place in the output is its index among its row's
    # kept tokens, moved past the image when it comes after the insertion point. One scatter
    # writes text and image embeddings; pads and the <image> placeholder go to a spare last
    # column that is cut off. No loop over rows: one host synchronisation, for the check of
    # the placeholders (and one more only when the rows might not fit the LM's context),
    # where a loop over rows had several per row.
    keep = attention_mask.bool()
    kept = keep.sum(1)                                  # (B,)
    index = keep.long().cumsum(1) - 1                   # place among the row's kept tokens
    if style == "prismatic":
        first = keep.long().argmax(1, keepdim=True)     # first kept position of each row
        bad = (kept == 0) | (input_ids.gather(1, first).squeeze(1) != (
            -1 if bos_token_id is None else bos_token_id))
        drop = 0
        placeholder = torch.zeros_like(keep)
        at = torch.ones_like(kept)
    else:
        placeholder = keep & (input_ids == image_token_id)
        counts = placeholder.sum(1)
        bad = counts != 1
        drop = 1
        at = (index * placeholder).sum(1)               # the placeholder's place
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        if style == "prismatic":
            raise ValueError(f"sequence {i} does not start with the BOS token "
                             f"({bos_token_id}); the prismatic style inserts the image "
                             f"after it")
        raise ValueError(f"sequence {i} has {int(counts[i])} <image> placeholders for "
                         f"its 1 image (the llava style needs exactly one)")
    # the input's width bounds its rows' kept tokens: the output is as wide as that allows
    # (no sync for the longest row), trimmed to the longest row only when it would overflow
    length = input_ids.shape[1] + T - drop
    if max_length is not None and length > max_length:
        length = int(kept.max()) + T - drop
        if length > max_length:
            raise ValueError(f"a sequence of {length} positions ({T} of them image tokens) "
                             f"exceeds the LM's context of {max_length}; shorten the prompt")
    n_out = kept + T - drop                             # (B,) each row's spliced length
    shift = (length - n_out if padding_side == "left" else torch.zeros_like(n_out))[:, None]
    text_dest = torch.where(index < at[:, None], index, index + T - drop) + shift
    text_dest = torch.where(keep & ~placeholder, text_dest, length)   # to the spare column
    image_dest = at[:, None] + torch.arange(T, device=at.device) + shift
    dest = torch.cat([text_dest, image_dest], 1)        # (B, S + T)
    D = token_embeds.shape[-1]
    source = torch.cat([token_embeds, image_embeds.to(token_embeds.dtype)], 1)
    out_emb = token_embeds.new_zeros(B, length + 1, D).scatter(
        1, dest[..., None].expand(-1, -1, D), source)[:, :length]
    places = torch.arange(length, device=kept.device)
    out_mask = ((places >= shift) & (places < shift + n_out[:, None])).to(attention_mask.dtype)
    out_lab = None
    if labels is not None:
        image_labels = labels.new_full((B, T), IGNORE)
        out_lab = labels.new_full((B, length + 1), IGNORE).scatter(
            1, dest, torch.cat([labels, image_labels], 1))[:, :length]
    return out_emb, out_mask, out_lab
