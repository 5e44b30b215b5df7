"""attention: softmax attention in the flash-attn layout (DESIGN.md).

q (batch, seqlen_q, heads, head_dim); k, v (batch, seqlen_k, heads_k, head_dim), with heads_k
dividing heads (grouped-query attention). With ``cu_seqlens`` (int32, num_sequences + 1
offsets) q, k and v are packed as (total_tokens, heads, head_dim) and sequence i is tokens
cu_seqlens[i] ... cu_seqlens[i+1] - 1 (images of different resolutions in one batch). With
``cu_seqlens_k`` as well, k and v (total_k, heads_k, head_dim) have offsets of their own, as
many sequences: sequence i's queries attend to keys cu_seqlens_k[i] ... cu_seqlens_k[i+1] - 1
(flash-attn's cu_seqlens_q / cu_seqlens_k: a padded batch decoding against its cache, or
queries against a different set of tokens). A dense batch with ``seqused_k`` (int32, batch)
uses the first seqused_k[b] keys of row b: a KV cache filled to different lengths, read in
place (flash-attn's cache_seqlens); with ``leftpad_k`` (int32, batch) too, none before key
leftpad_k[b]: row b's keys are leftpad_k[b] ... seqused_k[b] - 1 (or the cache's last), a
left-padded cache read in place (flash-attn's cache_leftpad). Causal and window masks align at
those keys' end.

    S = softmax_scale * q k^T   (default scale 1 / sqrt(head_dim))
    softcap > 0: S = softcap * tanh(S / softcap)   (logit soft-capping, Gemma 2's)
    causal: query i sees key j when j <= i + seqlen_k - seqlen_q (bottom-right, as flash-attn)
    window_size (left, right): query i sees key j when
        i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right
        (flash-attn's sliding window; -1: that side unbounded; causal is right = 0)
    lse = logsumexp_j S;  out = softmax(S) v

Returns out (the shape and dtype of q) and, with ``return_lse=True``, also lse: (batch, heads,
seqlen_q), or (heads, total_tokens) packed; float32 (float64 for float64 inputs). A query
that sees no key gets out = 0 and lse = -inf.
"""

from __future__ import annotations

import math
import os
import weakref

import torch
import torch.utils.weak

from pyssm import _extension
from pyssm.ops import _backend, _checks


# A window bound this far or farther reaches past any sequence: check_window takes it as this,
# so that positions plus bounds stay within int64 (the composed path clamps likewise)
FAR = 2 ** 40


def check_window(causal, window_size) -> tuple[int, int]:
    """window_size as (left, right) ints, each >= 0 or -1 (no bound), one past FAR taken as
    FAR (the same keys); causal=True is right = 0, so a positive right with it is an error
    rather than silently dropped."""
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise ValueError(f"window_size must be a pair (left, right), got {window_size!r}") from None
    if not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in (left, right)):
        raise ValueError(f"window_size must be two ints, each >= 0 or -1 for no bound, got "
                         f"{tuple(window_size)!r}")
    if causal and right > 0:
        raise ValueError(f"causal=True bounds each query's keys at its own position (window "
                         f"right 0), got window_size={tuple(window_size)!r}")
    return min(left, FAR), min(right, FAR)


def check_softcap(softcap) -> float:
    """softcap as a float: 0 (none), or the cap c > 0 of S = c tanh(S / c)."""
    if (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
            or not math.isfinite(softcap) or softcap < 0):
        raise ValueError(f"softcap must be a finite number >= 0 (0: no soft-capping), got "
                         f"{softcap!r}")
    return float(softcap)


def _attend(q, k, v, causal, scale, window=(-1, -1), softcap=0.0):
    """q (..., Sq, H, d), k, v (..., Sk, Hk, d) in the accumulation dtype -> out, lse."""
    qh, kh, vh = q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2)
    group = qh.shape[-3] // kh.shape[-3]
    if group > 1:
        kh = kh.repeat_interleave(group, dim=-3)
        vh = vh.repeat_interleave(group, dim=-3)
    S = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    if softcap:
        S = torch.tanh(S / softcap) * softcap
    left, right = window[0], 0 if causal else window[1]
    if left >= 0 or right >= 0:
        Sq, Sk = S.shape[-2], S.shape[-1]
        diag = torch.arange(Sq, device=S.device)[:, None] + (Sk - Sq)
        j = torch.arange(Sk, device=S.device)[None, :]
        hidden = torch.zeros(Sq, Sk, dtype=torch.bool, device=S.device)
        if right >= 0:
            hidden |= j > diag + right
        if left >= 0:
            hidden |= j < diag - left
        S = S.masked_fill(hidden, float("-inf"))
    # Stable softmax; the shift m cancels exactly, so it carries no gradient.
    m = S.amax(dim=-1, keepdim=True).detach() if S.shape[-1] else S.new_zeros(*S.shape[:-1], 1)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(S - m)
    total = e.sum(dim=-1, keepdim=True)
    P = e / torch.where(total == 0, torch.ones_like(total), total)
    lse = (torch.log(total) + m).squeeze(-1)
    return torch.matmul(P, vh).transpose(-3, -2), lse


def attention_reference(q, k, v, *, causal=False, softmax_scale=None, cu_seqlens=None,
                        max_seqlen=None, cu_seqlens_k=None, max_seqlen_k=None, seqused_k=None,
                        leftpad_k=None, window_size=(-1, -1), softcap=0.0, return_lse=False):
    """Pure-PyTorch attention (materialises the scores). Same arguments as attention."""
    window = check_window(causal, window_size)
    softcap = check_softcap(softcap)
    acc = _checks.acc_dtype(q.dtype)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    if seqused_k is not None or leftpad_k is not None:   # dense, row by row over its keys
        ends = seqused_k.tolist() if seqused_k is not None else [k.shape[1]] * k.shape[0]
        starts = leftpad_k.tolist() if leftpad_k is not None else [0] * k.shape[0]
        rows = [_attend(qa[b:b + 1], ka[b:b + 1, s:u], va[b:b + 1, s:u], causal, scale, window,
                        softcap)
                for b, (s, u) in enumerate(zip(starts, ends))]
        out = torch.cat([o for o, _ in rows]) if rows else qa.new_zeros(qa.shape)
        lse = (torch.cat([l_ for _, l_ in rows]) if rows
               else qa.new_zeros(q.shape[0], q.shape[2], q.shape[1]))
    elif cu_seqlens is None:
        out, lse = _attend(qa, ka, va, causal, scale, window, softcap)
    else:
        bounds = [int(b) for b in cu_seqlens.tolist()]
        bounds_k = bounds if cu_seqlens_k is None else [int(b) for b in cu_seqlens_k.tolist()]
        outs, lses = [], []
        for start, end, start_k, end_k in zip(bounds[:-1], bounds[1:], bounds_k[:-1],
                                              bounds_k[1:]):
            o, l_ = _attend(qa[start:end], ka[start_k:end_k], va[start_k:end_k], causal, scale,
                            window, softcap)
            outs.append(o)
            lses.append(l_)
        out = torch.cat(outs, 0) if outs else qa.new_zeros(qa.shape)
        lse = torch.cat(lses, -1) if lses else qa.new_zeros(q.shape[1], 0)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def check_attention(q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k=None,
                    max_seqlen_k=None, seqused_k=None, leftpad_k=None) -> None:
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        _checks.floating(t, name)
    if not (k.dtype == q.dtype == v.dtype):
        raise TypeError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype} and "
                        f"{v.dtype}")
    _checks.same_device(k, q, "k", "q")
    _checks.same_device(v, q, "v", "q")
    if cu_seqlens_k is not None and cu_seqlens is None:
        raise ValueError("cu_seqlens_k is only used with cu_seqlens (the queries' offsets)")
    if max_seqlen_k is not None and cu_seqlens_k is None:
        raise ValueError("max_seqlen_k is only used with cu_seqlens_k")
    if cu_seqlens is not None:
        layout = "(total_tokens, heads, head_dim) when cu_seqlens is given"
        for t, name in ((q, "q"), (k, "k"), (v, "v")):
            _checks.rank(t, 3, name, layout)
        _check_offsets_tensor(cu_seqlens, q, "cu_seqlens")
        if cu_seqlens_k is not None:
            _check_offsets_tensor(cu_seqlens_k, q, "cu_seqlens_k")
            if cu_seqlens_k.shape[0] != cu_seqlens.shape[0]:
                raise ValueError(f"cu_seqlens_k must hold {cu_seqlens.shape[0]} offsets, as "
                                 f"cu_seqlens does, got {cu_seqlens_k.shape[0]}")
        elif k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
            raise ValueError(f"with cu_seqlens (and no cu_seqlens_k), k and v must have the same "
                             f"number of tokens as q ({q.shape[0]}), got {k.shape[0]} and "
                             f"{v.shape[0]}")
    else:
        layout = "(batch, seqlen, heads, head_dim)"
        for t, name in ((q, "q"), (k, "k"), (v, "v")):
            _checks.rank(t, 4, name, layout)
        if max_seqlen is not None:
            raise ValueError("max_seqlen is only used with cu_seqlens")
        if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
            raise ValueError(f"q, k and v must have the same batch size, got {q.shape[0]}, "
                             f"{k.shape[0]} and {v.shape[0]}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k must have head_dim {q.shape[-1]} (the last dim of q), got "
                         f"{tuple(k.shape)}")
    heads, heads_k = q.shape[-2], k.shape[-2]
    if heads_k < 1 or heads % heads_k != 0:
        raise ValueError(f"the {heads_k} heads of k and v must divide the {heads} heads of q")
    _check_cache_rows(seqused_k, "seqused_k", "a KV cache", "lengths", "key lengths", q,
                      cu_seqlens)
    _check_cache_rows(leftpad_k, "leftpad_k", "a left-padded KV cache", "starts", "first keys",
                      q, cu_seqlens)


def _check_cache_rows(t, name, cache, packed_gives, holds, q, cu_seqlens) -> None:
    """seqused_k / leftpad_k: None, or int32 (batch,) on q's device, for dense batches."""
    if t is None:
        return
    if cu_seqlens is not None:
        raise ValueError(f"{name} is for dense batches ({cache}); packed keys give their "
                         f"{packed_gives} in cu_seqlens_k")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    _checks.rank(t, 1, name, "(batch,)")
    if t.shape[0] != q.shape[0]:
        raise ValueError(f"{name} must hold the {q.shape[0]} {holds} of the batch, got "
                         f"{t.shape[0]}")
    _checks.same_device(t, q, name, "q")


def _check_offsets_tensor(cu, q, name) -> None:
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}")
    _checks.rank(cu, 1, name, "(num_sequences + 1,)")
    if cu.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one offset (0)")
    _checks.same_device(cu, q, name, "q")


def _offsets_summary(cu_seqlens, total, name, tensors) -> int:
    """Checks the offsets themselves and returns the longest sequence. Reads them: a device
    sync for a CUDA tensor."""
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"{name} must start at 0, got {bounds[0]}")
    if any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"{name} must be non-decreasing, got {bounds}")
    if bounds[-1] != total:
        raise ValueError(f"{name} must end at the {total} tokens of {tensors}, got {bounds[-1]}")
    return max((b - a for a, b in zip(bounds[:-1], bounds[1:])), default=0)


# Offsets checked already: tensor -> (its version counter, tokens, longest sequence).
# A vision tower calls attention in every layer with the same cu_seqlens: read once, a forward
# pays one device sync instead of one a layer (and none in its backward). Keyed weakly by the
# tensor itself, so a freed tensor leaves; any in-place write bumps the version and is read
# again. (A write that bypasses the version counter, through .data or DLPack, is not seen:
# the kernels clamp every offset into [0, tokens], so it can give wrong values, never reads
# or writes out of bounds.)
_CHECKED = torch.utils.weak.WeakIdKeyDictionary()


def check_cu_seqlens_values(cu_seqlens, total, max_seqlen, name="cu_seqlens", tensors="q",
                            max_name="max_seqlen") -> int:
    """Checks the offsets against the packed length and max_seqlen, reading them once per
    tensor and version (_CHECKED); returns the longest sequence."""
    cached = _CHECKED.get(cu_seqlens)
    if cached is not None and cached[:2] == (cu_seqlens._version, total):
        longest = cached[2]
    else:
        longest = _offsets_summary(cu_seqlens, total, name, tensors)
        _CHECKED[cu_seqlens] = (cu_seqlens._version, total, longest)
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(f"{max_name} ({max_seqlen}) is smaller than the longest sequence in "
                         f"{name} ({longest})")
    return longest


# seqused_k tensors checked already: tensor -> (its version counter, the keys they were
# checked against), as _CHECKED (every layer of a decoding step shares one)
_CHECKED_USED = torch.utils.weak.WeakIdKeyDictionary()


def check_seqused_values(seqused_k, seqlen_k, name="seqused_k", limit="the keys of k and v"):
    """Checks each used length against the `seqlen_k` keys there are (`limit` says what they
    are), reading the tensor once per tensor and version."""
    if _CHECKED_USED.get(seqused_k) == (seqused_k._version, seqlen_k):
        return
    bad = [(b, u) for b, u in enumerate(seqused_k.tolist()) if not 0 <= u <= seqlen_k]
    if bad:
        raise ValueError(f"{name}[{bad[0][0]}] must be in [0, {seqlen_k}] ({limit}), got "
                         f"{bad[0][1]}")
    _CHECKED_USED[seqused_k] = (seqused_k._version, seqlen_k)


def trust_seqused(seqused_k, seqlen_k) -> None:
    """Records seqused_k as checked against seqlen_k keys without reading it: for a tensor
    derived from one that was checked (a KV cache's lengths plus the tokens just written)."""
    _CHECKED_USED[seqused_k] = (seqused_k._version, seqlen_k)


# leftpad_k tensors checked already: tensor -> (its version counter, the keys, a weak
# reference to the seqused_k tensor it was checked with (or None) and that one's version), as
# _CHECKED_USED
_CHECKED_LEAD = torch.utils.weak.WeakIdKeyDictionary()


def _lead_record(leftpad_k, seqused_k, seqlen_k):
    used = None if seqused_k is None else (weakref.ref(seqused_k), seqused_k._version)
    return (leftpad_k._version, seqlen_k, used)


def _lead_checked(leftpad_k, seqused_k, seqlen_k) -> bool:
    record = _CHECKED_LEAD.get(leftpad_k)
    if record is None or record[:2] != (leftpad_k._version, seqlen_k):
        return False
    if record[2] is None or seqused_k is None:
        return record[2] is None and seqused_k is None
    ref, version = record[2]
    return ref() is seqused_k and version == seqused_k._version


def check_leftpad_values(leftpad_k, seqused_k, seqlen_k, name="leftpad_k",
                         used_name="seqused_k"):
    """Checks each first key against its row's end (seqused_k[b], or the `seqlen_k` keys),
    reading the tensors once per pair of tensors and versions."""
    if _lead_checked(leftpad_k, seqused_k, seqlen_k):
        return
    ends = seqused_k.tolist() if seqused_k is not None else [seqlen_k] * leftpad_k.shape[0]
    bad = [(b, s, e) for b, (s, e) in enumerate(zip(leftpad_k.tolist(), ends))
           if not 0 <= s <= e]
    if bad:
        b, s, e = bad[0]
        end = f"{used_name}[{b}]" if seqused_k is not None else "the keys of k and v"
        raise ValueError(f"{name}[{b}] must be in [0, {e}] ({end}), got {s}")
    _CHECKED_LEAD[leftpad_k] = _lead_record(leftpad_k, seqused_k, seqlen_k)


def trust_leftpad(leftpad_k, seqused_k, seqlen_k) -> None:
    """Records leftpad_k as checked (with seqused_k, against seqlen_k keys) without reading
    it: for tensors derived on the device from a mask that was checked."""
    _CHECKED_LEAD[leftpad_k] = _lead_record(leftpad_k, seqused_k, seqlen_k)


def _checked_max_seqlen(t, cu, max_seqlen, name="cu_seqlens", tensors="q",
                        max_name="max_seqlen"):
    """max_seqlen, given or (packed batches, outside torch.compile) the longest sequence, with
    the offsets `cu` of t's tokens checked once per tensor (check_cu_seqlens_values)."""
    if cu is not None and not torch.compiler.is_compiling():
        longest = check_cu_seqlens_values(cu, t.shape[0], max_seqlen, name, tensors, max_name)
        if max_seqlen is None:   # the CUDA kernels then size their grid without a device read
            max_seqlen = longest
    return max_seqlen


def attention(q, k, v, *, causal=False, softmax_scale=None, cu_seqlens=None, max_seqlen=None,
              cu_seqlens_k=None, max_seqlen_k=None, seqused_k=None, leftpad_k=None,
              window_size=(-1, -1), softcap=0.0, return_lse=False, backend=None):
    """Softmax attention of the module docstring; out, or (out, lse) with return_lse.
    Differentiable in q, k and v (through out and lse; keys outside [leftpad_k, seqused_k) get
    zero gradient, as do keys no query's window reaches).
    window_size (left, right): a sliding window, -1 a side without bound (flash-attn's).
    softcap: 0, or the cap c > 0 of the scores, c tanh(S / c) (flash-attn's softcap), in every
    kernel (the CUDA forwards, backwards and decoding too).
    max_seqlen (max_seqlen_k): at least the longest query (key) sequence, read from the offsets
    when not given. The CUDA kernels read q, k and v in place at any strides that keep head_dim
    contiguous and 16-byte aligned (views into a fused qkv projection, torch SDPA's (B, H, N, d)
    layout transposed); other layouts are copied first."""
    check_attention(q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, seqused_k,
                    leftpad_k)
    left, right = check_window(causal, window_size)
    softcap = check_softcap(softcap)
    max_seqlen_k = _checked_max_seqlen(k, cu_seqlens_k, max_seqlen_k, "cu_seqlens_k", "k and v",
                                       "max_seqlen_k")
    if not torch.compiler.is_compiling():
        if seqused_k is not None:
            check_seqused_values(seqused_k, k.shape[1])
        if leftpad_k is not None:
            check_leftpad_values(leftpad_k, seqused_k, k.shape[1])
    return _run(q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen, return_lse, backend,
                lambda scale, longest: torch.ops.pyssm.attention(
                    q, k, v, causal, scale, cu_seqlens, longest, cu_seqlens_k, max_seqlen_k,
                    seqused_k, leftpad_k, left, right, softcap),
                dict(cu_seqlens_k=cu_seqlens_k, max_seqlen_k=max_seqlen_k, seqused_k=seqused_k,
                     leftpad_k=leftpad_k, window_size=(left, right), softcap=softcap))


def _run(q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen, return_lse, backend, op,
         keys=None):
    """attention of checked q, k, v by the backend chosen: the reference (with ``keys``, the
    key-side arguments), or ``op(scale, max_seqlen)`` -> (out, lse), the compiled op."""
    max_seqlen = _checked_max_seqlen(q, cu_seqlens, max_seqlen)
    if _backend.resolve("attention", q.device, backend) == "reference":
        with _backend.without_autocast(q.device):
            return attention_reference(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                       cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                       return_lse=return_lse, **(keys or {}))
    out, lse = op(None if softmax_scale is None else float(softmax_scale), max_seqlen)
    return (out, lse) if return_lse else out


def unbind_qkvpacked(qkv, cu_seqlens, max_seqlen):
    """q, k, v: qkv's views, checked as a packed qkv and as attention's inputs."""
    _checks.floating(qkv, "qkv")
    if cu_seqlens is not None:
        layout, rank = "(total_tokens, 3, heads, head_dim) when cu_seqlens is given", 4
    else:
        layout, rank = "(batch, seqlen, 3, heads, head_dim)", 5
    _checks.rank(qkv, rank, "qkv", layout)
    if qkv.shape[-3] != 3:
        raise ValueError(f"qkv must be {layout} (q, k and v along its dim -3), got "
                         f"{tuple(qkv.shape)}")
    q, k, v = qkv.unbind(-3)
    check_attention(q, k, v, cu_seqlens, max_seqlen)
    return q, k, v


def attention_qkvpacked(qkv, *, causal=False, softmax_scale=None, cu_seqlens=None,
                        max_seqlen=None, window_size=(-1, -1), softcap=0.0, return_lse=False,
                        backend=None):
    """attention of q, k and v packed in one tensor as a fused qkv projection gives them (the
    layout of flash-attn's qkvpacked functions): qkv (batch, seqlen, 3, heads, head_dim), or
    (total_tokens, 3, heads, head_dim) with cu_seqlens. The values of
    ``attention(*qkv.unbind(-3), ...)``; differentiable in qkv, whose gradient comes back as one
    tensor of its shape, which the CUDA backward writes dq, dk and dv into (rather than three
    gradients that unbind's backward stacks: one more read and write of all three).
    ``PYSSM_QKVPACKED=0`` (read at each call) runs it as ``attention`` on contiguous copies of q,
    k and v instead, the path a fused projection took before: the benchmarks' comparison.
    A sliding window (window_size other than (-1, -1)) or soft-capping runs as ``attention`` on
    qkv's views."""
    q, k, v = unbind_qkvpacked(qkv, cu_seqlens, max_seqlen)
    if tuple(check_window(causal, window_size)) != (-1, -1) or check_softcap(softcap):
        return attention(q, k, v, causal=causal, softmax_scale=softmax_scale,
                         cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, window_size=window_size,
                         softcap=softcap, return_lse=return_lse, backend=backend)
    if os.environ.get("PYSSM_QKVPACKED") == "0":  # the comparison: copies and a stack
        return attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=causal,
                         softmax_scale=softmax_scale, cu_seqlens=cu_seqlens,
                         max_seqlen=max_seqlen, return_lse=return_lse, backend=backend)
    return _run(q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen, return_lse, backend,
                lambda scale, longest: torch.ops.pyssm.attention_qkvpacked(
                    qkv, causal, scale, cu_seqlens, longest))


def _lse_shape(q, cu_seqlens):
    return (q.shape[1], q.shape[0]) if cu_seqlens is not None else (q.shape[0], q.shape[2],
                                                                    q.shape[1])


if _extension.available():

    # (every output contiguous, as the kernels allocate them, whatever q's, k's and v's strides:
    # torch.empty_like would keep a dense input's permutation, heads-first q say)
    @torch.library.register_fake("pyssm::attention")
    def _attention_fake(q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen,
                        cu_seqlens_k=None, max_seqlen_k=None, seqused_k=None, leftpad_k=None,
                        window_left=-1, window_right=-1, softcap=0.0):
        check_attention(q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, seqused_k,
                        leftpad_k)
        check_window(causal, (window_left, window_right))
        check_softcap(softcap)
        lse = q.new_empty(_lse_shape(q, cu_seqlens), dtype=_checks.acc_dtype(q.dtype))
        return q.new_empty(q.shape), lse

    @torch.library.register_fake("pyssm::attention_backward")
    def _attention_backward_fake(dout, dlse, q, k, v, out, lse, causal, softmax_scale,
                                 cu_seqlens, max_seqlen, cu_seqlens_k=None, max_seqlen_k=None,
                                 seqused_k=None, leftpad_k=None, window_left=-1,
                                 window_right=-1, softcap=0.0):
        check_attention(q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, seqused_k,
                        leftpad_k)
        check_window(causal, (window_left, window_right))
        check_softcap(softcap)
        _checks.shape(dout, q.shape, "dout", "the shape of q")
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def _attention_setup(ctx, inputs, output):
        (q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k,
         seqused_k, leftpad_k, window_left, window_right, softcap) = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, cu_seqlens_k, seqused_k, leftpad_k)
        ctx.args = (causal, softmax_scale, max_seqlen, max_seqlen_k, window_left, window_right,
                    softcap)

    def _attention_backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_seqlens, cu_seqlens_k, seqused_k, leftpad_k = ctx.saved_tensors
        (causal, softmax_scale, max_seqlen, max_seqlen_k, window_left, window_right,
         softcap) = ctx.args
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = torch.ops.pyssm.attention_backward(
            dout, dlse, q, k, v, out, lse, causal, softmax_scale, cu_seqlens, max_seqlen,
            cu_seqlens_k, max_seqlen_k, seqused_k, leftpad_k, window_left, window_right, softcap)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None

    torch.library.register_autograd(
        "pyssm::attention", _attention_backward, setup_context=_attention_setup)

    @torch.library.register_fake("pyssm::attention_qkvpacked")
    def _attention_qkvpacked_fake(qkv, causal, softmax_scale, cu_seqlens, max_seqlen):
        q, k, v = unbind_qkvpacked(qkv, cu_seqlens, max_seqlen)
        return _attention_fake(q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen)

    @torch.library.register_fake("pyssm::attention_qkvpacked_backward")
    def _attention_qkvpacked_backward_fake(dout, dlse, qkv, out, lse, causal, softmax_scale,
                                           cu_seqlens, max_seqlen):
        q, _, _ = unbind_qkvpacked(qkv, cu_seqlens, max_seqlen)
        _checks.shape(dout, q.shape, "dout", "the shape of q")
        return qkv.new_empty(qkv.shape)

    def _attention_qkvpacked_setup(ctx, inputs, output):
        qkv, causal, softmax_scale, cu_seqlens, max_seqlen = inputs
        out, lse = output
        ctx.save_for_backward(qkv, out, lse, cu_seqlens)
        ctx.args = (causal, softmax_scale, max_seqlen)

    def _attention_qkvpacked_backward(ctx, dout, dlse):
        qkv, out, lse, cu_seqlens = ctx.saved_tensors
        causal, softmax_scale, max_seqlen = ctx.args
        if dout is None:
            dout = torch.zeros_like(out)
        dqkv = torch.ops.pyssm.attention_qkvpacked_backward(
            dout, dlse, qkv, out, lse, causal, softmax_scale, cu_seqlens, max_seqlen)
        return dqkv, None, None, None, None

    torch.library.register_autograd("pyssm::attention_qkvpacked", _attention_qkvpacked_backward,
                                    setup_context=_attention_qkvpacked_setup)
