"""Padding masks as pyssm's attention takes them: each row's valid keys read once per mask
(device reads once a forward, not once a layer) as one run [lead, end) where they are one
(``leftpad_k`` / ``seqused_k``, read in place), else the valid tokens packed (``cu_seqlens``).
Shared by the transformers backend and the timm modules (pyssm.integrations)."""

from __future__ import annotations

import functools

import torch
import torch.utils.weak


def once_per_version(summarise):
    """``summarise(t)``, worked out once per tensor ``t`` and version (its device reads with
    it): the model passes one mask to every layer of a forward, so a step reads it once."""
    done = torch.utils.weak.WeakIdKeyDictionary()   # t -> (its version counter, the result)

    @functools.wraps(summarise)
    def once(t: torch.Tensor):
        hit = done.get(t)
        if hit is None or hit[0] != t._version:
            hit = done[t] = (t._version, summarise(t))
        return hit[1]

    return once


@once_per_version
def mask_summary(mask: torch.Tensor):
    """(all_valid, lead, end) of a 2D padding mask (B, S), read once per mask tensor and
    version (one device sync): all_valid when every key is valid; lead and end (int32 (B,))
    when each row's valid keys are one run [lead, end) (left or right padding, a static cache's
    unwritten slots after), else None for both."""
    valid = mask.bool()
    count = valid.sum(1, dtype=torch.int32)
    lead = (valid.cumsum(1) == 0).sum(1, dtype=torch.int32)
    end = lead + count
    slots = torch.arange(valid.shape[1], device=valid.device)
    one_run = (valid == ((slots >= lead[:, None]) & (slots < end[:, None]))).all()
    all_valid, one_run = torch.stack([(count == valid.shape[1]).all(), one_run]).tolist()
    return (bool(all_valid), lead, end) if one_run else (bool(all_valid), None, None)


# an additive mask's entries at or below this hide their key (timm: finfo(dtype).min; others
# -inf or -10000)
MASKED_BIAS = -1e4


@once_per_version
def diagonal_blocks(mask: torch.Tensor):
    """(cu_seqlens (int32), longest) when a dense (B or 1, 1, S, S) mask, boolean (True: attend)
    or additive (0: attend, at most MASKED_BIAS: hidden), is block-diagonal: runs of tokens
    along each row that attend exactly to their own run (images packed along a row, as
    transformers' Pixtral tower masks them), the runs of all B rows as one packed batch over
    B x S tokens; None for any other mask. Read once per mask tensor and version (three device
    reads)."""
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != mask.shape[3]:
        return None
    m = mask[:, 0]
    ok = m if m.dtype == torch.bool else m == 0
    B, S, _ = ok.shape
    tokens = torch.arange(S, device=ok.device)
    starts = ok.int().argmax(-1) == tokens            # (B, S): a run's first token
    run = starts.cumsum(-1)
    exact = (ok == (run[:, :, None] == run[:, None, :])).all()
    if m.dtype != torch.bool:                         # (and every hidden entry hides)
        exact &= (ok | (m <= MASKED_BIAS)).all()
    if S == 0 or not bool(exact):
        return None
    return run_offsets(starts)


def run_offsets(starts: torch.Tensor):
    """(int32 cu_seqlens, the longest run) of runs of tokens packed over B x S, from ``starts``
    (B, S) bool, True at each run's first token (every row's first token among them). One
    device sync."""
    B, S = starts.shape
    first = starts.reshape(-1).nonzero()[:, 0].to(torch.int32)
    cu = torch.cat([first, first.new_full((1,), B * S)])
    return cu, (int((cu[1:] - cu[:-1]).max()) if B * S else 0)


@once_per_version
def key_padding(attn_mask: torch.Tensor) -> dict:
    """timm's attention mask read as padding, once per mask tensor and version (the model
    passes one mask to every block): boolean (True: attend) or additive (0: attend, at most
    MASKED_BIAS: hidden), (B or 1, 1, Nq, N) with Nq = N or 1 (or fewer leading dims), that
    hides a set of keys from every query (timm's key-only NaFlex mask) and, optionally, every
    key from a set of queries (its symmetric mask: padding queries see nothing). Returns
    rows(keys), keys (B or 1, N) the valid keys. Anything else (a causal or per-head mask,
    another bias) raises NotImplementedError."""
    if not 2 <= attn_mask.dim() <= 4:
        raise NotImplementedError(f"pyssm's timm attention takes a padding mask (batch, 1, "
                                  f"queries, keys), got shape {tuple(attn_mask.shape)}")
    m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if m.shape[1] != 1:
        raise NotImplementedError(f"pyssm's timm attention takes one mask for every head, got "
                                  f"shape {tuple(attn_mask.shape)}")
    m = m[:, 0]
    ok = m if m.dtype == torch.bool else m == 0
    keys = ok.any(-2)                      # (B, N): seen by some query
    queries = ok.any(-1)                   # (B, Nq): seeing some key
    padding = (ok == (queries[:, :, None] & keys[:, None, :])).all()
    if m.dtype != torch.bool:              # (and every hidden entry hides: no other bias)
        padding &= (ok | (m <= MASKED_BIAS)).all()
    if not padding.item():                 # (one device read)
        raise NotImplementedError(
            "pyssm's timm attention takes padding masks only (each query sees every valid key "
            "or none; additive entries 0 or masked), not a causal or arbitrary mask or bias")
    return rows(keys)


def rows(keys: torch.Tensor, packed: bool = False) -> dict:
    """The key arguments for a batch whose valid keys are ``keys`` (B, N) bool (device reads:
    one, or three with holes): ``all_valid``; ``lead`` / ``end`` (int32 (B,)) where each row's
    valid keys are one run [lead, end); with holes (or ``packed``, some key padding) also
    ``keys`` (the flat indices of the valid keys over B x N), their ``cu_seqlens_k``,
    ``longest_k`` and ``cu_seqlens`` (every row's N queries); and ``batch`` B, ``valid`` the
    keys. A one-row mask for a batch of B rows: ``rows_for(pad, B)``."""
    all_valid, lead, end = mask_summary(keys)
    B, N = keys.shape
    out = dict(all_valid=all_valid, lead=lead, end=end, batch=B, valid=keys)
    if (lead is None or packed) and not all_valid:
        lengths = keys.sum(1, dtype=torch.int32)
        cu_k = torch.zeros(B + 1, dtype=torch.int32, device=keys.device)
        cu_k[1:] = torch.cumsum(lengths, 0)
        out.update(keys=keys.reshape(-1).nonzero()[:, 0], cu_seqlens_k=cu_k,
                   longest_k=int(lengths.max()),
                   cu_seqlens=torch.arange(0, (B + 1) * N, N, dtype=torch.int32,
                                           device=keys.device))
    return out


def rows_for(pad: dict, batch: int) -> dict:
    """``pad`` (rows' result) for a batch of ``batch`` rows: itself, or, for a one-row mask
    broadcast over the batch, its rows repeated (worked out once and kept in ``pad``)."""
    if pad["batch"] == batch:
        return pad
    if pad["batch"] != 1:
        raise ValueError(f"a padding mask of {pad['batch']} rows for a batch of {batch}")
    if batch not in pad:
        pad[batch] = rows(pad["valid"].expand(batch, -1))
    return pad[batch]
