"""Drop-ins for flash-attn's ``flash_attn_func``, ``flash_attn_varlen_func``, their qkvpacked
and kvpacked forms and ``flash_attn_with_kvcache``, on pyssm's attention, so code written
against flash-attn switches by changing one import:

    from pyssm.integrations.flash_attn import flash_attn_func, flash_attn_varlen_func

Same arguments, same layout ((batch, seqlen, heads, head_dim); packed (total, heads, head_dim)
with int32 ``cu_seqlens``; qkvpacked (batch, seqlen, 3, heads, head_dim) or (total, 3, heads,
head_dim), whose gradient comes back as one tensor; kvpacked kv (batch, seqlen_k, 2, heads_k,
head_dim) or (total_k, 2, heads_k, head_dim)), same return values: the output, or with
``return_attn_probs=True`` (out, softmax_lse, None), lse as (batch, heads, seqlen_q) or,
packed, (heads, total_q); the third value, flash-attn's dropout mask, is never formed.
Grouped-query heads, bottom-right causal masking, sliding windows (``window_size=(left,
right)``; with ``causal=True`` right is 0, as flash-attn makes it), soft-capping (``softcap``:
each score s becomes softcap tanh(s / softcap), Gemma 2's) and packed queries and keys
with different sequence boundaries (cu_seqlens_q and cu_seqlens_k) as in flash-attn; in
``flash_attn_with_kvcache`` rotary embedding of q and the new k (rotary_cos / rotary_sin,
interleaved or not) and left-padded caches (cache_leftpad) too. What pyssm does not compute
raises NotImplementedError: dropout, ALiBi and a paged KV cache;
in ``flash_attn_with_kvcache`` also cache_batch_idx, and rotary embedding of a left-padded
cache.
"""

from __future__ import annotations

import torch

from pyssm.ops import attention, attention_qkvpacked
from pyssm.ops.attention import (check_leftpad_values, check_seqused_values, check_window,
                                 trust_leftpad, trust_seqused)


def _unsupported(what: str) -> NotImplementedError:
    return NotImplementedError(f"pyssm's flash_attn drop-in does not support {what}")


def _check_extras(dropout_p, alibi_slopes) -> None:
    if dropout_p:
        raise _unsupported(f"dropout (dropout_p={dropout_p}); pass 0.0")
    if alibi_slopes is not None:
        raise _unsupported("ALiBi (alibi_slopes)")


def _window(window_size, causal) -> tuple:
    """flash-attn's window_size as pyssm's attention takes it: under causal=True its right
    side is 0 whatever was given (flash-attn replaces it so; transformers passes (w, w) with
    causal=True for Mistral-style sliding windows)."""
    left, right = check_window(False, window_size)   # (a pair of ints >= -1; causal below)
    return (left, 0) if causal else (left, right)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                    return_attn_probs=False, *, backend: str | None = None):
    """q (batch, seqlen_q, heads, d); k, v (batch, seqlen_k, heads_k, d) -> out like q."""
    _check_extras(dropout_p, alibi_slopes)
    result = attention(q, k, v, causal=causal, softmax_scale=softmax_scale,
                       window_size=_window(window_size, causal), softcap=softcap,
                       return_lse=return_attn_probs, backend=backend)
    return (*result, None) if return_attn_probs else result


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False,
                           window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *,
                           backend: str | None = None):
    """Packed q (total_q, heads, d), k, v (total_k, heads_k, d): sequence i's queries are
    tokens cu_seqlens_q[i] ... cu_seqlens_q[i + 1] - 1 of q, its keys tokens cu_seqlens_k[i]
    ... cu_seqlens_k[i + 1] - 1 of k and v -> out like q."""
    _check_extras(dropout_p, alibi_slopes)
    if block_table is not None:
        raise _unsupported("a paged KV cache (block_table)")
    keys = {} if cu_seqlens_k is cu_seqlens_q else dict(cu_seqlens_k=cu_seqlens_k,
                                                        max_seqlen_k=int(max_seqlen_k))
    max_seqlen = int(max_seqlen_q) if keys else max(int(max_seqlen_q), int(max_seqlen_k))
    result = attention(q, k, v, causal=causal, softmax_scale=softmax_scale,
                       cu_seqlens=cu_seqlens_q, max_seqlen=max_seqlen,
                       window_size=_window(window_size, causal), softcap=softcap,
                       return_lse=return_attn_probs, backend=backend, **keys)
    return (*result, None) if return_attn_probs else result


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False, *,
                             backend: str | None = None):
    """q (batch, seqlen_q, heads, d), kv (batch, seqlen_k, 2, heads_k, d) -> out like q. The
    kernels read k and v as views of kv, in place."""
    _check_extras(dropout_p, alibi_slopes)
    k, v = _unbind_kv(kv, 5, "(batch, seqlen_k, 2, heads_k, head_dim)")
    return flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=causal,
                           window_size=window_size, softcap=softcap,
                           return_attn_probs=return_attn_probs, backend=backend)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, dropout_p=0.0, softmax_scale=None,
                                    causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False,
                                    return_attn_probs=False, *, backend: str | None = None):
    """Packed q (total_q, heads, d), kv (total_k, 2, heads_k, d), offsets as
    flash_attn_varlen_func -> out like q."""
    _check_extras(dropout_p, alibi_slopes)
    k, v = _unbind_kv(kv, 4, "(total_k, 2, heads_k, head_dim)")
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, softmax_scale=softmax_scale, causal=causal,
                                  window_size=window_size, softcap=softcap,
                                  return_attn_probs=return_attn_probs, backend=backend)


def _unbind_kv(kv, dims, layout):
    if kv.dim() != dims or kv.shape[-3] != 2:
        raise ValueError(f"kv must be {layout} (k and v along its dim -3), got "
                         f"{tuple(kv.shape)}")
    return kv.unbind(-3)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False, *,
                              backend: str | None = None):
    """qkv (batch, seqlen, 3, heads, d) -> out (batch, seqlen, heads, d)."""
    _check_extras(dropout_p, alibi_slopes)
    result = attention_qkvpacked(qkv, causal=causal, softmax_scale=softmax_scale,
                                 window_size=_window(window_size, causal), softcap=softcap,
                                 return_lse=return_attn_probs, backend=backend)
    return (*result, None) if return_attn_probs else result


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0,
                                     softmax_scale=None, causal=False, window_size=(-1, -1),
                                     softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, *, backend: str | None = None):
    """Packed qkv (total, 3, heads, d), sequence i being tokens cu_seqlens[i] ...
    cu_seqlens[i + 1] - 1 -> out (total, heads, d)."""
    _check_extras(dropout_p, alibi_slopes)
    result = attention_qkvpacked(qkv, causal=causal, softmax_scale=softmax_scale,
                                 cu_seqlens=cu_seqlens, max_seqlen=int(max_seqlen),
                                 window_size=_window(window_size, causal), softcap=softcap,
                                 return_lse=return_attn_probs, backend=backend)
    return (*result, None) if return_attn_probs else result


def _rotate(x, cos, sin, positions, interleaved):
    """x (batch, seqlen, heads, d) with its first rotary_dim = 2 cos.shape[1] dimensions rotated
    by the rows `positions` (batch, seqlen) of cos / sin (seqlen_ro, rotary_dim / 2): pairs of
    dimensions (2i, 2i + 1) when interleaved (GPT-J), else (i, i + rotary_dim / 2) (GPT-NeoX);
    in float32 (float64 for float64), returned in x's dtype."""
    half, work = cos.shape[1], torch.promote_types(x.dtype, torch.float32)
    c, s = (t[positions].unsqueeze(2).to(work) for t in (cos, sin))  # (batch, seqlen, 1, half)
    head = x[..., :2 * half].to(work)
    if interleaved:
        x1, x2 = head[..., 0::2], head[..., 1::2]
        turned = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = head[..., :half], head[..., half:]
        turned = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((turned.to(x.dtype), x[..., 2 * half:]), dim=-1)


def _check_rotary(rotary_cos, rotary_sin, k, head_dim, positions):
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin are given together or not at all")
    if k is None:
        raise ValueError("rotary_cos / rotary_sin rotate the new k: give k and v too")
    if (rotary_cos.dim() != 2 or rotary_sin.shape != rotary_cos.shape
            or not 0 < 2 * rotary_cos.shape[1] <= head_dim):
        raise ValueError(f"rotary_cos and rotary_sin must be (seqlen_ro, rotary_dim / 2) of one "
                         f"shape with rotary_dim <= head_dim {head_dim}, got "
                         f"{tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}")
    if rotary_cos.shape[0] < positions:
        raise ValueError(f"rotary_cos and rotary_sin must have a row for each of the "
                         f"{positions} positions q and k may take (seqlen_ro >= seqlen_cache, "
                         f"and under causal >= the last free slot + seqlen_q), got "
                         f"{rotary_cos.shape[0]}")


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None,
                            rotary_sin=None, cache_seqlens=None, cache_batch_idx=None,
                            cache_leftpad=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                            return_softmax_lse=False, *, backend: str | None = None):
    """Decoding against a KV cache, as flash-attn's: q (batch, seqlen_q, heads, d), k_cache,
    v_cache (batch, seqlen_cache, heads_k, d); row b attends to its first cache_seqlens[b] keys
    (an int or int32 (batch,); None: the whole cache), after k and v (batch, seqlen_new,
    heads_k, d), when given, are written into the caches in place at positions
    cache_seqlens[b] ... cache_seqlens[b] + seqlen_new - 1. Causal masking is bottom-right
    aligned at each row's length. With cache_leftpad (int32 (batch,)) row b's keys start at
    cache_leftpad[b]: a left-padded cache, keys cache_leftpad[b] ... cache_seqlens[b] +
    seqlen_new - 1. The caches are read in place (``seqused_k``, ``leftpad_k``), never
    gathered.
    With rotary_cos and rotary_sin (seqlen_ro, rotary_dim / 2), the new k is rotated at
    positions cache_seqlens[b] + j before it is written, and q at cache_seqlens[b] + i under a
    causal mask, else at cache_seqlens[b] (every query at the first new position), as
    flash-attn does; rotary_interleaved pairs dimensions (2i, 2i + 1), else (i, i + rotary_dim
    / 2). Returns out like q, or (out, softmax_lse (batch, heads, seqlen_q)) with
    return_softmax_lse. A sliding window (window_size) aligns at each row's end as the causal
    mask does. ``num_splits`` is flash-attn's tuning knob and ignored."""
    _check_extras(0.0, alibi_slopes)
    if cache_batch_idx is not None:
        raise _unsupported("cache_batch_idx")
    if cache_leftpad is not None and (rotary_cos is not None or rotary_sin is not None):
        raise _unsupported("rotary embedding with cache_leftpad")
    if block_table is not None:
        raise _unsupported("a paged KV cache (block_table)")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must be (batch, seqlen_cache, heads_k, head_dim) "
                         f"of one shape, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    batch, capacity = k_cache.shape[:2]
    if (k is None) != (v is None):
        raise ValueError("k and v are given together (the new keys and values) or not at all")
    new = 0 if k is None else k.shape[1]
    if k is not None:
        if k.shape != v.shape or k.shape[0] != batch or k.shape[2:] != k_cache.shape[2:]:
            raise ValueError(f"k and v must be (batch, seqlen_new, heads_k, head_dim) = "
                             f"({batch}, seqlen_new, {k_cache.shape[2]}, {k_cache.shape[3]}), "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")
        if cache_seqlens is None:
            raise ValueError("cache_seqlens must say where k and v go in the caches")
    rotary = rotary_cos is not None or rotary_sin is not None
    if rotary:
        # (causal: query i at cache_seqlens + i, at most the cache's last free slot + i)
        positions = capacity - new + (q.shape[1] if causal else 1)
        _check_rotary(rotary_cos, rotary_sin, k, k_cache.shape[3], max(capacity, positions))
    if cache_seqlens is None:
        used = None
    else:
        if isinstance(cache_seqlens, int):
            cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32,
                                       device=k_cache.device)
        if cache_seqlens.dtype != torch.int32 or cache_seqlens.shape != (batch,):
            raise ValueError(f"cache_seqlens must be an int or int32 ({batch},), got "
                             f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
        # read once per tensor and version (every layer of a step shares it); the new tokens
        # must fit behind each row's cached ones
        check_seqused_values(
            cache_seqlens, capacity - new, "cache_seqlens",
            f"the cache's {capacity} slots less the {new} new tokens")
        used = cache_seqlens
        if rotary:   # (k is given: _check_rotary)
            at = cache_seqlens.long()[:, None] + torch.arange(
                q.shape[1], device=q.device) * int(causal)
            q = _rotate(q, rotary_cos, rotary_sin, at, rotary_interleaved)
        if new:
            rows = torch.arange(batch, device=k_cache.device)[:, None]
            slots = cache_seqlens.long()[:, None] + torch.arange(new, device=k_cache.device)
            if rotary:
                k = _rotate(k, rotary_cos, rotary_sin, slots, rotary_interleaved)
            k_cache[rows, slots] = k.to(k_cache.dtype)
            v_cache[rows, slots] = v.to(v_cache.dtype)
            used = cache_seqlens + new
            trust_seqused(used, capacity)   # (within it, as checked above)
    if cache_leftpad is not None:
        if cache_leftpad.dtype != torch.int32 or cache_leftpad.shape != (batch,):
            raise ValueError(f"cache_leftpad must be int32 ({batch},), got "
                             f"{cache_leftpad.dtype} {tuple(cache_leftpad.shape)}")
        # against the cached keys' end, once per tensor and version (every layer of a step
        # shares them); the keys just written only move the end further
        check_leftpad_values(cache_leftpad, cache_seqlens, capacity, "cache_leftpad",
                             "cache_seqlens")
        trust_leftpad(cache_leftpad, used, capacity)
    return attention(q, k_cache, v_cache, causal=causal, softmax_scale=softmax_scale,
                     seqused_k=used, leftpad_k=cache_leftpad,
                     window_size=_window(window_size, causal), softcap=softcap,
                     return_lse=return_softmax_lse, backend=backend)
