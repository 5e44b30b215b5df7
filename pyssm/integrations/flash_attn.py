"""Drop-ins for flash-attn's ``flash_attn_func`` and ``flash_attn_varlen_func``, and their
qkvpacked forms, on pyssm's attention, so code written against flash-attn switches by changing
one import:

    from pyssm.integrations.flash_attn import flash_attn_func, flash_attn_varlen_func

Same arguments, same layout ((batch, seqlen, heads, head_dim); packed (total, heads, head_dim)
with int32 ``cu_seqlens``; qkvpacked (batch, seqlen, 3, heads, head_dim) or (total, 3, heads,
head_dim), whose gradient comes back as one tensor), same return values: the output, or with ``return_attn_probs=True``
(out, softmax_lse, None), lse as (batch, heads, seqlen_q) or, packed, (heads, total_q); the
third value, flash-attn's dropout mask, is never formed. Grouped-query heads, bottom-right
causal masking and packed queries and keys with different sequence boundaries (cu_seqlens_q
and cu_seqlens_k) as in flash-attn. What pyssm does not compute raises NotImplementedError:
dropout, sliding windows, soft-capping, ALiBi and a paged KV cache.
"""

from __future__ import annotations

from pyssm.ops import attention, attention_qkvpacked


def _unsupported(what: str) -> NotImplementedError:
    return NotImplementedError(f"pyssm's flash_attn drop-in does not support {what}")


def _check_extras(dropout_p, window_size, softcap, alibi_slopes) -> None:
    if dropout_p:
        raise _unsupported(f"dropout (dropout_p={dropout_p}); pass 0.0")
    if tuple(window_size) != (-1, -1):
        raise _unsupported(f"sliding windows (window_size={tuple(window_size)})")
    if softcap:
        raise _unsupported(f"soft-capping (softcap={softcap})")
    if alibi_slopes is not None:
        raise _unsupported("ALiBi (alibi_slopes)")


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                    return_attn_probs=False, *, backend: str | None = None):
    """q (batch, seqlen_q, heads, d); k, v (batch, seqlen_k, heads_k, d) -> out like q."""
    _check_extras(dropout_p, window_size, softcap, alibi_slopes)
    result = attention(q, k, v, causal=causal, softmax_scale=softmax_scale,
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
    _check_extras(dropout_p, window_size, softcap, alibi_slopes)
    if block_table is not None:
        raise _unsupported("a paged KV cache (block_table)")
    keys = {} if cu_seqlens_k is cu_seqlens_q else dict(cu_seqlens_k=cu_seqlens_k,
                                                        max_seqlen_k=int(max_seqlen_k))
    max_seqlen = int(max_seqlen_q) if keys else max(int(max_seqlen_q), int(max_seqlen_k))
    result = attention(q, k, v, causal=causal, softmax_scale=softmax_scale,
                       cu_seqlens=cu_seqlens_q, max_seqlen=max_seqlen,
                       return_lse=return_attn_probs, backend=backend, **keys)
    return (*result, None) if return_attn_probs else result


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False, *,
                              backend: str | None = None):
    """qkv (batch, seqlen, 3, heads, d) -> out (batch, seqlen, heads, d)."""
    _check_extras(dropout_p, window_size, softcap, alibi_slopes)
    result = attention_qkvpacked(qkv, causal=causal, softmax_scale=softmax_scale,
                                 return_lse=return_attn_probs, backend=backend)
    return (*result, None) if return_attn_probs else result


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0,
                                     softmax_scale=None, causal=False, window_size=(-1, -1),
                                     softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, *, backend: str | None = None):
    """Packed qkv (total, 3, heads, d), sequence i being tokens cu_seqlens[i] ...
    cu_seqlens[i + 1] - 1 -> out (total, heads, d)."""
    _check_extras(dropout_p, window_size, softcap, alibi_slopes)
    result = attention_qkvpacked(qkv, causal=causal, softmax_scale=softmax_scale,
                                 cu_seqlens=cu_seqlens, max_seqlen=int(max_seqlen),
                                 return_lse=return_attn_probs, backend=backend)
    return (*result, None) if return_attn_probs else result
