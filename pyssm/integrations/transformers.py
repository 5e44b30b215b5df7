"""pyssm's attention as a Hugging Face transformers attention backend, and its fused MLP in
CLIP and SigLIP towers.

    import pyssm.integrations.transformers as pyssm_hf
    pyssm_hf.register()                                   # once per process
    model = AutoModel.from_pretrained(path, attn_implementation="pyssm")
    # or per sub-model: attn_implementation={"text_config": "pyssm", "vision_config": "sdpa"}
    pyssm_hf.swap_mlp(model)                              # CLIP / SigLIP MLPs -> pyssm's
    pyssm_hf.swap_layers(model)       # or their whole encoder layers: norms and adds fused too
    pyssm_hf.swap_vision_attention(model)   # Qwen-VL, GLM-4V, ... towers: one packed call

``register()`` adds "pyssm" to transformers' ``AttentionInterface`` (the attention function)
and to its ``AttentionMaskInterface`` (the mask the model builds for it). Like flash-attn, pyssm
takes no dense mask: the model hands it either no mask (every key visible, or plain causal) or
the 2D padding mask. Causal masking is bottom-right aligned, so decoding with a KV cache (one
query against the cache) is right. A padded batch reads each row's valid keys in place when
they are one run (``leftpad_k``, and ``seqused_k`` where the keys after the run must stay
unread; the mask read once a step rather than once a layer): left padding, as ``generate``
pads (the prompt and each cached decoding step), and right padding, as training batches are
padded. The padding's own outputs are then not zeros but finite values no valid token depends
on (leading padding sees no key under a causal mask: out = 0). A mask with holes packs, one
call for the batch: a prefill's valid tokens into pyssm's variable-length form
(``cu_seqlens``), a decoding step's new queries against each row's own valid keys
(``cu_seqlens_k``). A static cache (more slots than keys written:
``cache_implementation="static"``) is read in place up to the keys written (``seqused_k``,
counted on the device, so nothing is read on the host), with padding likewise. Sequences
packed along each row by position_ids (padding-free training, as transformers'
DataCollatorWithFlattening makes them) run as pyssm's packed batches (``cu_seqlens``, read once
a forward), q, k and v in place; offsets that come as flash-attn's keyword arguments
(cu_seq_lens_q / _k, max_length_q / _k: the collator's return_flash_attn_kwargs) are taken as
given, nothing read. Causal sliding-window layers (Mistral, Qwen2, Gemma 2 and 3's local layers:
``sliding_window`` w, each query seeing itself and the w - 1 keys before it) run pyssm's
windowed kernels (``window_size=(w - 1, 0)``), left padding and dynamic or static sliding caches
included (a dynamic one's trimmed keys come with a key offset); a sliding layer with holes in
its padding mask raises (packing would move the window), and so does padding between the valid
queries of a step with a cache (a prompt chunk, or a prompt into a static cache, with holes).
Blocks of tokens attending both ways on top of a causal mask (transformers' block_sequence_ids:
PaliGemma's image-and-prompt prefix, Gemma 3's images, with or without a sliding window) run as
two packed calls a layer: the runs of queries outside the blocks causally, each block's queries
both ways, every run over its row's valid keys up to its end (the mask read once a forward,
``block_mask``). The mask brings the causality: PaliGemma's attention modules say
is_causal=False. Encoders attending both ways within a window (ModernBERT, EmbeddingGemma:
``sliding_window`` w on a bidirectional layer) run pyssm's centred window
(``window_size=(w - 1, w - 1)``, as transformers' flash-attn path sets it), a padded row's valid
run packed.
Cross-attention (fewer queries than keys: BLIP-2's Q-Former, perceiver resamplers, SigLIP 2's
pooling head) sees every key, or the padding mask's; a padding mask both ways comes as (batch,
1, 1, keys), sdpa's layout, for models that reshape it for other modules (that pooling head's
nn.MultiheadAttention). A dense 4D mask a model builds itself, bypassing the mask interface,
runs where it is block-diagonal (images packed along a row, each attending to itself: Pixtral's
vision tower, Mistral Small 3.1's and Pixtral 12B's): one packed call a layer, its blocks read
once a forward. A model whose mask is none of these (chunked attention) raises. Gemma 2's
attention soft-capping (the config's attn_logit_softcapping) runs as pyssm's ``softcap``. What
pyssm does not compute raises instead of being dropped: attention dropout while training,
position biases (T5-style), attention sinks, and attention probabilities
(``output_attentions``).

``swap_mlp``, ``swap_layers`` and ``swap_vision_attention`` (re-exported here from
pyssm.integrations.transformers_swaps, whose docstring describes them) put pyssm's fused MLP and
norms into CLIP / SigLIP-family towers and pack the vision attention of Qwen-VL-family towers.

Tested with transformers 5.24 (CLIP vision and text towers, SigLIP and SmolVLM vision towers,
Llama, Mistral, Gemma 2, LLaVA, PaliGemma 1 and 2, Gemma 3, Qwen2.5-VL, Pixtral's vision
tower, ModernBERT, EmbeddingGemma, and each of VISION_ATTENTION_CLASSES alone; tests/integrations).
"""

from __future__ import annotations

import torch

from pyssm.integrations.padding import mask_summary as _mask_summary
from pyssm.integrations.padding import once_per_version as _once_per_version
from pyssm.integrations import padding as _padding
from pyssm.ops import attention
from pyssm.ops.attention import trust_leftpad, trust_seqused

NAME = "pyssm"
_backend: str | None = None


def _unsupported(what: str) -> NotImplementedError:
    return NotImplementedError(
        f"attn_implementation='{NAME}' does not support {what}; use 'sdpa' or 'eager' for this "
        f"model (or this sub-model, with a per-sub-config attn_implementation dict)")


@_once_per_version
def _sequence_offsets(ids: torch.Tensor):
    """(int32 cu_seqlens, the longest sequence) of the sequences packed in ``ids`` (B, S), the
    sequence index of each token (transformers' packed_sequence_mask: a run of equal values a
    sequence, every row starting its own): read once per tensor and version (one device sync)."""
    B, S = ids.shape
    starts = torch.ones(B, S, dtype=torch.bool, device=ids.device)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return _padding.run_offsets(starts)


@_once_per_version
def _key_padding(mask: torch.Tensor) -> torch.Tensor:
    """The (B, keys) padding of a both-ways mask padding_mask gives as (B, 1, 1, keys) (sdpa's
    broadcastable layout, which models that reuse the mask for other modules expect: SigLIP 2's
    pooling head), one tensor per mask and version, so the reads keyed on it happen once."""
    return mask[:, 0, 0].clone()


@_once_per_version
def _rows(mask: torch.Tensor) -> dict:
    """A padding mask's valid keys packed (one with holes, or a bidirectional window's): their
    flat indices, cu_seqlens_k and longest row (padding.rows), read once per mask tensor and
    version: the model passes one mask to every layer, so the layers gather with index_select
    and none reads the device."""
    return _padding.rows(mask, packed=True)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, sliding_window: int | None = None,
                      softcap: float | None = None, position_bias: torch.Tensor | None = None,
                      s_aux: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query (B, H, Sq, d), key and value
    (B, Hk, Sk, d) -> ((B, Sq, H, d), None)."""
    if dropout and module.training:
        raise _unsupported(f"attention dropout while training (dropout={dropout}); set the "
                           f"config's attention_dropout to 0")
    if position_bias is not None:
        raise _unsupported("an additive position bias")
    if s_aux is not None:
        raise _unsupported("attention sinks (s_aux)")
    if kwargs.get("output_attentions"):
        raise _unsupported("output_attentions=True (it never forms the attention matrix)")
    if value.shape[-1] != query.shape[-1]:
        raise _unsupported(f"a value head size ({value.shape[-1]}) different from the query's "
                           f"({query.shape[-1]})")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    if attention_mask is not None and attention_mask.dim() == 4 and \
            attention_mask.dtype == torch.bool and attention_mask.shape[1:3] == (1, 1):
        attention_mask = _key_padding(attention_mask)   # (a both-ways mask's padding: 2D)
    block_mask_given = attention_mask is not None and attention_mask.dim() == 4 and \
        attention_mask.dtype == torch.int32
    if block_mask_given:
        causal = True   # (a block mask is causal whatever the module says: PaliGemma's says not)
    window = _window(sliding_window, causal)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, S, heads, d)
    B, Sq, Sk = q.shape[0], q.shape[1], k.shape[1]
    # what the model computes in: the dtype of the projections' weights, as the other backends
    dtype = q.dtype
    k, v = k.to(dtype), v.to(dtype)
    call = dict(causal=causal, softmax_scale=scaling, window_size=window, softcap=softcap or 0.0,
                backend=getattr(module, "pyssm_backend", None) or _backend)

    if kwargs.get("cu_seq_lens_q") is not None:
        return _varlen(q, k, v, attention_mask, kwargs, call), None
    if attention_mask is not None and attention_mask.dtype == torch.int64:
        # sequences packed along each row (position_ids restarting): each attends to itself
        if attention_mask.shape != (B, Sq) or Sq != Sk:
            raise ValueError(f"attn_implementation='{NAME}': packed sequences' ids must be "
                             f"int64 ({B}, {Sq}) for {Sq} queries and keys, got "
                             f"{tuple(attention_mask.shape)} for {Sk} keys")
        cu, longest = _sequence_offsets(attention_mask)
        flat = [t.reshape(B * Sq, *t.shape[2:]) for t in (q, k, v)]   # (views: B, S adjacent)
        return attention(*flat, cu_seqlens=cu, max_seqlen=longest, **call).view(q.shape), None
    if attention_mask is not None and attention_mask.dim() == 4 and not block_mask_given:
        # a dense mask the model built itself: taken where block-diagonal (images packed along
        # a row, each attending to itself: Pixtral's tower), one packed call for the batch
        blocks = _padding.diagonal_blocks(attention_mask) if Sq == Sk else None
        if blocks is None or attention_mask.shape[0] not in (1, B):
            raise _unsupported(f"a dense {tuple(attention_mask.shape)} attention mask that is not "
                               f"block-diagonal over the {Sq} queries and keys")
        cu, longest = blocks
        if attention_mask.shape[0] != B:   # (one row's blocks for every row of the batch)
            rows = torch.arange(B, dtype=cu.dtype, device=cu.device)[:, None] * Sq
            cu = torch.cat([(cu[None, :-1] + rows).reshape(-1), cu.new_full((1,), B * Sq)])
        flat = [t.reshape(B * Sq, *t.shape[2:]) for t in (q, k, v)]
        return attention(*flat, cu_seqlens=cu, max_seqlen=longest, **call).view(q.shape), None
    if block_mask_given:
        # image or prefix tokens attending both ways within their block (block_mask): the
        # runs of queries outside the blocks causally and each block's queries both ways, each
        # run over its row's valid keys up to its end, one packed call a kind for the batch
        plan = _block_plan(attention_mask, Sq)
        if plan["holes"] and window != (-1, -1):
            raise _unsupported(f"sliding-window attention (sliding_window={sliding_window}) with "
                               f"holes in the padding mask before a run of queries (packing "
                               f"the valid tokens would move the window)")
        if plan["blocks"] is None:   # no block of two queries: plain causal, in place
            return attention_forward(module, query, key, value, plan["valid"], dropout,
                                     scaling, True, sliding_window, softcap, **kwargs)
        out = q.new_zeros(B * Sq, *q.shape[2:])
        for part, both_ways in ((plan["text"], False), (plan["blocks"], True)):
            if part is None:
                continue
            qp = q.reshape(B * Sq, *q.shape[2:]).index_select(0, part["queries"])
            kp, vp = (t.reshape(B * Sk, *t.shape[2:]).index_select(0, part["keys"])
                      for t in (k, v))
            res = attention(qp, kp, vp, cu_seqlens=part["cu_seqlens"],
                            max_seqlen=part["longest"], cu_seqlens_k=part["cu_seqlens_k"],
                            max_seqlen_k=part["longest_k"],
                            **dict(call, causal=not both_ways,
                                   window_size=(window[0], -1) if both_ways else window))
            out = out.index_copy(0, part["queries"], res.to(out.dtype))
        return out.view(q.shape), None
    if attention_mask is not None and attention_mask.dtype == torch.int32:
        if attention_mask.shape != (B,):
            raise ValueError(f"attn_implementation='{NAME}': a static cache's key counts must be "
                             f"int32 ({B},), got {tuple(attention_mask.shape)}")
        # a static cache without padding: each row's first keys, read in place
        return attention(q, k, v, seqused_k=attention_mask, **call).contiguous(), None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"attn_implementation='{NAME}' expects the 2D padding mask its mask "
                             f"function makes, got shape {tuple(attention_mask.shape)}; was "
                             f"register() called before the model was built?")
        if attention_mask.shape[1] != Sk:
            raise ValueError(f"attn_implementation='{NAME}': a padding mask over "
                             f"{attention_mask.shape[1]} keys for {Sk} keys")
        all_valid, lead, end = _mask_summary(attention_mask)
        if all_valid:
            attention_mask = None
    if attention_mask is None:
        return attention(q, k, v, **call).contiguous(), None

    # each row's valid keys, one run [lead, end) (lead <= end <= Sk, checked with the mask),
    # read in place. A causal mask aligns the queries with the last key read. In a prefill
    # (Sq == Sk) that must be key Sk - 1, so the keys after each run are read too: no valid
    # query sees them (they come after it), only the trailing padding's queries do. A decoding
    # step's queries are the last keys written (end: a static cache's slots after stay unread).
    if lead is not None and causal and Sq == Sk:
        trust_leftpad(lead, None, Sk)
        return attention(q, k, v, leftpad_k=lead, **call).contiguous(), None
    # A bidirectional window is centred on its query only where a row's queries and keys are
    # the same tokens: its valid run, packed (in place, the keys' alignment would shift it).
    centred = window != (-1, -1) and not causal
    if lead is not None and not centred:
        trust_seqused(end, Sk)
        trust_leftpad(lead, end, Sk)
        return attention(q, k, v, seqused_k=end, leftpad_k=lead, **call).contiguous(), None
    if window != (-1, -1) and lead is None:
        raise _unsupported(f"sliding-window attention (sliding_window={sliding_window}) with "
                           f"holes in the padding mask (packing the valid tokens would move "
                           f"the window)")
    if centred and Sq != Sk:
        raise _unsupported(f"bidirectional sliding-window attention (sliding_window="
                           f"{sliding_window}) with padding over a cache")
    pad = _rows(attention_mask)   # the valid keys' flat indices and offsets, once a mask
    flat = [t.reshape(B * Sk, *t.shape[2:]) for t in (k, v)]
    kp, vp = (t.index_select(0, pad["keys"]) for t in flat)
    if Sq == Sk:  # prefill / encoder with holes (or a centred window): the valid tokens, packed
        qp = q.reshape(B * Sq, *q.shape[2:]).index_select(0, pad["keys"])
        out_p = attention(qp, kp, vp, cu_seqlens=pad["cu_seqlens_k"],
                          max_seqlen=pad["longest_k"], **call)
        out = out_p.new_zeros(B * Sq, *out_p.shape[1:]).index_copy(0, pad["keys"], out_p)
        return out.view(q.shape), None
    # a decoding step with holes in the mask: every row's Sq queries against its own valid
    # keys, packed with offsets of their own (cu_seqlens_k)
    cu_q = torch.arange(0, (B + 1) * Sq, Sq, dtype=torch.int32, device=q.device)
    out = attention(q.reshape(B * Sq, *q.shape[2:]), kp, vp, cu_seqlens=cu_q, max_seqlen=Sq,
                    cu_seqlens_k=pad["cu_seqlens_k"], max_seqlen_k=pad["longest_k"], **call)
    return out.view(q.shape), None


def _varlen(q, k, v, attention_mask, kwargs: dict, call: dict) -> torch.Tensor:
    """flash-attn's variable-length form as transformers' FlashAttentionKwargs bring it
    (cu_seq_lens_q / _k and max_length_q / _k: DataCollatorWithFlattening's
    return_flash_attn_kwargs, or a model that packs its own sequences): one row of packed
    sequences, their offsets taken as given (the mask, the same sequences by position_ids,
    not read)."""
    cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs.get("cu_seq_lens_k")
    if q.shape[0] != 1:
        raise ValueError(f"attn_implementation='{NAME}': cu_seq_lens_q packs sequences along one "
                         f"row, got a batch of {q.shape[0]}")
    if attention_mask is not None and attention_mask.dtype != torch.int64:
        raise _unsupported("cu_seq_lens_q together with a padding mask")
    def longest(name):   # (an int, or a 0-d tensor read once: flash-attn's is an int)
        n = kwargs.get(name)
        return int(n) if isinstance(n, torch.Tensor) else n

    lengths = dict(max_seqlen=longest("max_length_q"))
    if cu_k is not None and cu_k is not cu_q:
        lengths.update(cu_seqlens_k=cu_k.to(torch.int32), max_seqlen_k=longest("max_length_k"))
    out = attention(q[0], k[0], v[0], cu_seqlens=cu_q.to(torch.int32), **lengths, **call)
    return out.unsqueeze(0)


def _align_queries(valid: torch.Tensor, first, q_length: int):
    """A cached step's padding mask (B, S) as a causal call needs it: its queries, the slots
    [first, first + q_length), are aligned with the last keys read, so the padding among them
    after each row's last valid query is made valid (only padding queries come after it, so
    only they see it). Returns that mask and whether some padding query sits between two
    valid ones (which no alignment reads right) as a device bool."""
    slots = torch.arange(valid.shape[1], device=valid.device)
    first = torch.as_tensor(first, device=valid.device)
    queries = (slots >= first) & (slots < first + q_length)
    valid_queries = valid & queries
    before = valid_queries.cumsum(1) > 0                   # a valid query at or before
    after = valid_queries.flip(1).cumsum(1).flip(1) > 0    # a valid query at or after
    return valid | (queries & ~after), (queries & ~valid & before & after).any()


def _hole_among_queries() -> NotImplementedError:
    return _unsupported("padding between the valid queries of a step with a cache (a chunk "
                        "of a prompt, or a prompt into a static cache, with holes in its "
                        "padding mask)")


# block_mask's entries (besides a block's index, >= 0): a key in no block, a padding key, a
# static cache's slot not written yet
TEXT, PADDING, UNWRITTEN = -1, -2, -3


@_once_per_version
def _block_plans(kinds: torch.Tensor) -> dict:
    """The plans (_plan_blocks) of one block mask, by query count: one mask a forward."""
    return {}


@_once_per_version
def _host_kinds(kinds: torch.Tensor) -> torch.Tensor:
    """A block mask's kinds (B, Sk) on the host: one device read a mask, shared by
    block_mask's window check and _plan_blocks."""
    return kinds[:, 0, 0].cpu()


def _block_plan(kinds: torch.Tensor, Sq: int) -> dict:
    plans = _block_plans(kinds)
    if Sq not in plans:
        plans[Sq] = _plan_blocks(kinds, Sq)
    return plans[Sq]


def _plan_blocks(kinds: torch.Tensor, Sq: int) -> dict:
    """How to attend with a block mask (block_mask: (B, 1, 1, Sk) int32, each key's block, or
    TEXT, PADDING, UNWRITTEN) for the last Sq keys written as queries (one device read).
    ``valid``: the padding mask (B, Sk) of a plain causal call (None: every key valid and
    written), for when no block holds two queries or more. Otherwise ``blocks`` and ``text``:
    each row's runs of queries in one block, and of queries outside any (each a sequence of
    its own, its keys the row's valid keys up to its end), packed: ``queries`` (flat over
    B x Sq), ``keys`` (flat over B x Sk), ``cu_seqlens``, ``cu_seqlens_k``, ``longest``,
    ``longest_k`` (None for a kind without queries). ``holes``: some sequence's keys have a
    hole."""
    if kinds.dtype != torch.int32 or kinds.shape[1:3] != (1, 1):
        raise ValueError(f"attn_implementation='{NAME}': a block mask must be int32 (batch, 1, "
                         f"1, keys), got {kinds.dtype} {tuple(kinds.shape)}; was register() "
                         f"called before the model was built?")
    device, host = kinds.device, _host_kinds(kinds)
    B, Sk = host.shape
    written = (host != UNWRITTEN).sum(1)
    W = int(written[0])
    if not (written == W).all() or (host[:, :W] == UNWRITTEN).any() or W < Sq:
        raise ValueError(f"attn_implementation='{NAME}': a block mask's unwritten slots must be "
                         f"each row's last, the same in every row, and leave the {Sq} queries")
    first_query = W - Sq
    valid = host >= TEXT
    if 1 < Sq < Sk:   # a cached step of several queries, or a prefill into a static cache
        valid, hole = _align_queries(valid, first_query, Sq)
        if hole:
            raise _hole_among_queries()
    runs = {"blocks": [], "text": []}   # (flat query indices, flat key indices)
    holes = wide = False
    for b in range(B):
        pos = valid[b].nonzero()[:, 0]            # the row's valid keys, by position
        groups = host[b, pos]
        starts = torch.ones_like(groups, dtype=torch.bool)
        starts[1:] = groups[1:] != groups[:-1]
        run = starts.cumsum(0) - 1                 # each valid key's run of one group
        run_groups = groups[starts]
        blocks = run_groups[run_groups >= 0]
        if blocks.unique().numel() != blocks.numel():
            raise _unsupported("a block of image tokens split by other tokens (a block's "
                               "tokens must be one run of the row's valid tokens)")
        for r, group in enumerate(run_groups.tolist()):
            members = pos[run == r]
            mine = members[members >= first_query]
            if not mine.numel():
                continue
            seen = pos[pos <= members[-1]]        # every valid key up to the run's end
            holes |= bool(seen[-1] - seen[0] + 1 != seen.numel())
            wide |= group >= 0 and mine.numel() > 1
            runs["blocks" if group >= 0 else "text"].append(
                (b * Sq + mine - first_query, b * Sk + seen))
    plan = dict(valid=None if valid[:, :W].all() and W == Sk else valid.to(device),
                blocks=None, text=None, holes=holes)
    if not wide:   # (a block's last token sees what a causal query sees)
        return plan
    for kind, parts in runs.items():
        if parts:
            cu = [torch.tensor([0] + [len(p[i]) for p in parts]).cumsum(0).to(torch.int32)
                  for i in (0, 1)]
            plan[kind] = dict(queries=torch.cat([p[0] for p in parts]).to(device),
                              keys=torch.cat([p[1] for p in parts]).to(device),
                              cu_seqlens=cu[0].to(device), cu_seqlens_k=cu[1].to(device),
                              longest=int(cu[0].diff().max()), longest_k=int(cu[1].diff().max()))
    return plan


def _window(sliding_window, causal) -> tuple[int, int]:
    """pyssm's window_size for transformers' sliding_window w: a causal layer's query sees
    itself and the w - 1 keys before it (masking_utils' sliding_window_overlay:
    kv_idx > q_idx - w); a bidirectional layer's the w - 1 keys on either side, as
    transformers' flash-attn path sets it (the models pass w to match: ModernBERT's half-width
    plus one, EmbeddingGemma's window)."""
    if sliding_window is None:
        return (-1, -1)
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or \
            sliding_window < 1:
        raise ValueError(f"attn_implementation='{NAME}': sliding_window must be a positive int, "
                         f"got {sliding_window!r}")
    return (sliding_window - 1, 0 if causal else sliding_window - 1)


def _closure(fn) -> dict:
    """The variables a nested function closes over, by name ({} for anything else)."""
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None) or ()
    return dict(zip(code.co_freevars, (c.cell_contents for c in cells))) if code else {}


def _and_mask_parts(mask_function) -> tuple | None:
    """The two mask functions an ``and_masks`` of two combines (masking_utils), or None for
    any other mask function."""
    parts = _closure(mask_function).get("mask_functions")
    if getattr(mask_function, "__qualname__", "") != "and_masks.<locals>.and_mask" or \
            not isinstance(parts, tuple) or len(parts) != 2:
        return None
    return parts


def _packed_sequence_ids(mask_function) -> torch.Tensor | None:
    """The sequence ids (B, S) when ``mask_function`` is the one transformers builds for
    sequences packed by position_ids (masking_utils: ``and_masks`` of a plain causal or
    bidirectional mask on the positions remapped per sequence, and ``packed_sequence_mask_
    function``: one sequence attends only to itself); None for any other mask function."""
    from transformers import masking_utils

    parts = _and_mask_parts(mask_function)
    if parts is None:
        return None
    remapped, same_sequence = parts
    plain = (masking_utils.causal_mask_function, masking_utils.bidirectional_mask_function)
    if (getattr(remapped, "__qualname__", "")
            != "remap_positions_for_packed_sequence.<locals>.inner_mask"
            or not any(_closure(remapped).get("mask_function") is f for f in plain)
            or getattr(same_sequence, "__qualname__", "")
            != "packed_sequence_mask_function.<locals>.inner_mask"):
        return None
    ids = _closure(same_sequence).get("packed_sequence_mask")
    return ids if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None


def _sliding_window_of(mask_function) -> int | None:
    """w when ``mask_function`` is transformers' causal sliding-window mask
    (masking_utils.sliding_window_causal_mask_function(w): ``and_masks`` of the window overlay
    and the causal mask); None for any other."""
    from transformers import masking_utils

    parts = _and_mask_parts(mask_function)
    if parts is None:
        return None
    causal = [f for f in parts if f is masking_utils.causal_mask_function]
    overlay = [f for f in parts if getattr(f, "__qualname__", "")
               == "sliding_window_overlay.<locals>.inner_mask"]
    if len(causal) != 1 or len(overlay) != 1:
        return None
    overlay = overlay[0]
    w = _closure(overlay).get("sliding_window")
    return w if isinstance(w, int) else None


def _or_mask_parts(mask_function) -> tuple | None:
    """The two mask functions an ``or_masks`` of two combines, or None for any other."""
    parts = _closure(mask_function).get("mask_functions")
    if getattr(mask_function, "__qualname__", "") != "or_masks.<locals>.or_mask" or \
            not isinstance(parts, tuple) or len(parts) != 2:
        return None
    return parts


def _blockwise_of(mask_function) -> tuple | None:
    """(block ids (B, keys), w, inside) when ``mask_function`` is a causal mask with blocks
    attending both ways (masking_utils' blockwise_overlay of block_sequence_ids, or'ed on:
    PaliGemma's prefix, Gemma 3's images): w None without a window; a causal sliding window
    or'ed with the blocks (inside False: create_sliding_window_causal_mask) or and'ed over
    both (inside True: Gemma 3's sliding layers). None for any other mask function."""
    def blocks_on(f):   # (ids, the other part) of an or_masks(part, blockwise)
        parts = _or_mask_parts(f)
        if parts is None or getattr(parts[1], "__qualname__", "") != \
                "blockwise_overlay.<locals>.inner_mask":
            return None
        ids = _closure(parts[1]).get("block_sequence_ids")
        return (ids, parts[0]) if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None

    from transformers import masking_utils

    found = blocks_on(mask_function)
    if found is not None:
        ids, base = found
        if base is masking_utils.causal_mask_function:
            return ids, None, False
        w = _sliding_window_of(base)
        return None if w is None else (ids, w, False)
    parts = _and_mask_parts(mask_function)
    if parts is None or getattr(parts[1], "__qualname__", "") != \
            "sliding_window_overlay.<locals>.inner_mask":
        return None
    found, w = blocks_on(parts[0]), _closure(parts[1]).get("sliding_window")
    if found is None or found[1] is not masking_utils.causal_mask_function or \
            not isinstance(w, int):
        return None
    return found[0], w, True


def block_mask(ids: torch.Tensor, window: int | None, inside: bool, batch_size: int,
               q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
               attention_mask: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """The mask "pyssm" makes for a causal mask with blocks attending both ways (_blockwise_of):
    int32 (batch, 1, 1, kv_length), each key's block (>= 0), or TEXT (no block), PADDING, or
    UNWRITTEN (a static cache's slot after the keys written). Four dimensions so that a
    language model handed it (PaliGemma's) takes it as made, as it takes sdpa's 4D mask."""
    if kv_offset and window is None:
        raise _unsupported(f"a key offset (kv_offset={kv_offset}) outside a dynamic "
                           f"sliding-window cache")
    if ids is None:   # (no blocks)
        if device is None and attention_mask is not None:
            device = attention_mask.device
        ids = torch.full((batch_size, kv_offset + kv_length), TEXT, device=device)
    if ids.shape[0] != batch_size or ids.shape[1] < kv_offset + kv_length:
        raise ValueError(f"attn_implementation='{NAME}': block ids of shape {tuple(ids.shape)} "
                         f"for {batch_size} rows of {kv_offset + kv_length} keys")
    ids = ids[:, kv_offset:kv_offset + kv_length]
    kinds = torch.where(ids >= 0, ids, TEXT).to(torch.int32)
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"attn_implementation='{NAME}' takes a 2D padding mask "
                             f"(batch, length), got shape {tuple(attention_mask.shape)}")
        valid = attention_mask[:, -kv_length:].bool().to(kinds.device)
        valid = torch.nn.functional.pad(valid, (0, kv_length - valid.shape[1]))
        kinds = kinds.masked_fill(~valid, PADDING)
    if isinstance(q_offset, torch.Tensor) or q_offset + q_length < kv_length:   # static
        slots = torch.arange(kv_length, device=kinds.device)
        kinds = kinds.masked_fill(slots >= torch.as_tensor(q_offset, device=kinds.device) +
                                  q_length, UNWRITTEN)
    kinds = kinds.reshape(batch_size, 1, 1, kv_length)
    if window is not None and not inside:
        # the window or'ed on outside the blocks: a block query i sees keys from min(block
        # start, i - w + 1), the same as the window over both while each block's valid keys
        # span at most w positions
        for row in _host_kinds(kinds):
            for g in row[row >= 0].unique().tolist():
                at = (row == g).nonzero()[:, 0]
                if int(at[-1] - at[0]) + 1 > window:
                    raise _unsupported(f"a block of {int(at[-1] - at[0]) + 1} image or prefix "
                                       f"tokens longer than the sliding window ({window}) it "
                                       f"is or'ed with")
    return kinds


def _both_ways(mask_function, batch_size: int, q_length: int, kv_length: int, q_offset,
               kv_offset: int, device) -> bool:
    """Whether ``mask_function`` lets each query see keys on both sides, within a window or
    not, in the forms transformers' models build: masking_utils'
    sliding_window_bidirectional_mask_function (ModernBERT, NeoMME, UltraBERT), or a causal
    mask (sliding or not) or'ed with a model's own overlay that opens it both ways (Gemma 3's
    use_bidirectional_attention: EmbeddingGemma), that one checked by evaluating it over the
    batch's (query, key) grid, once a forward, as sdpa's mask would be: every pair visible, or
    exactly those less than w apart. The window itself is the attention function's
    sliding_window, as for flash-attn."""
    from transformers import masking_utils

    parts = _and_mask_parts(mask_function)
    if parts is not None:
        names = sorted(getattr(f, "__qualname__", "") for f in parts)
        return masking_utils.bidirectional_mask_function in parts and \
            "sliding_window_bidirectional_overlay.<locals>.inner_mask" in names
    parts = _or_mask_parts(mask_function)
    if parts is None or not isinstance(q_offset, int):
        return False
    w = _sliding_window_of(parts[0])
    if parts[0] is not masking_utils.causal_mask_function and w is None:
        return False
    q = torch.arange(q_offset, q_offset + q_length, device=device).view(1, 1, -1, 1)
    k = torch.arange(kv_offset, kv_offset + kv_length, device=device).view(1, 1, 1, -1)
    b = torch.arange(batch_size, device=device).view(-1, 1, 1, 1)
    got = torch.as_tensor(mask_function(b, torch.zeros_like(b), q, k), device=device)
    want = torch.ones((), dtype=torch.bool, device=device) if w is None else (q - k).abs() < w
    return bool((got.bool() == want).all())


def _check_mask_function(mask_function) -> None:
    """Only plain causal or bidirectional masks and causal sliding windows (with padding) are
    pyssm's to compute: a model that bends them otherwise (chunked attention) gets an error,
    not plain causal attention. (Sequences packed by position_ids, blocks attending both ways,
    bidirectional windows: padding_mask, before this. The window itself: the attention
    function's sliding_window, which every sliding layer passes.)"""
    from transformers import masking_utils

    plain = (None, masking_utils.causal_mask_function, masking_utils.bidirectional_mask_function)
    if not any(mask_function is f for f in plain) and _sliding_window_of(mask_function) is None:
        name = getattr(mask_function, "__name__", type(mask_function).__name__)
        raise _unsupported(f"the attention mask this model builds ({name}: not plain causal or "
                           f"bidirectional attention with padding)")


def _both_ways_padding(attention_mask: torch.Tensor | None, kv_length: int):
    """padding_mask's answer for a mask both ways: None when every key is seen, else the
    padding of the last kv_length keys (a static cache's slots past the mask hidden) as
    (batch, 1, 1, kv_length), sdpa's layout."""
    if attention_mask is None:
        return None
    valid = attention_mask[:, -kv_length:].bool()
    if valid.shape[1] < kv_length:   # (a static cache's slots not written yet)
        valid = torch.nn.functional.pad(valid, (0, kv_length - valid.shape[1]))
    return None if bool(valid.all()) else valid[:, None, None, :]


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0,
                 kv_offset: int = 0, mask_function=None,
                 attention_mask: torch.Tensor | None = None, device=None, **kwargs):
    """The mask transformers builds for "pyssm": None when every key is there to be seen;
    the boolean (batch, kv_length) padding mask when some are padding (the attention
    function unpads with it), or (batch, 1, 1, kv_length) for a mask both ways
    (bidirectional, with a window or not: sdpa's broadcastable layout, which models reusing
    the mask for other modules expect, SigLIP 2's pooling head); or, for a static cache
    (kv_length slots, of which the first q_offset + q_length are written) with no padding,
    the int32 (batch,) number of keys written, which the attention function passes as
    seqused_k: the cache read in place, nothing read on the host (q_offset is a tensor
    there); or, for sequences packed along each row by position_ids (no padding mask, no
    cache: padding-free training), the int64 (batch, length) sequence index of each token,
    from which the attention function takes cu_seqlens once a forward; or, for a causal mask
    with blocks attending both ways, or any causal mask where the config builds its
    attention modules bidirectional (use_bidirectional_attention: PaliGemma), the int32
    (batch, 1, 1, kv_length) ``block_mask``. A cached step of several queries has the
    padding after each row's last valid query made valid (_align_queries)."""
    from transformers import masking_utils

    ids = _packed_sequence_ids(mask_function)
    if ids is not None:
        if attention_mask is not None or not isinstance(q_offset, int) or q_offset or kv_offset or \
                ids.shape != (batch_size, q_length) or q_length != kv_length:
            raise _unsupported("sequences packed by position_ids with a padding mask or a cache")
        return ids.to(torch.int64)
    blockwise = _blockwise_of(mask_function)
    config = kwargs.get("config")
    if blockwise is None and getattr(config, "use_bidirectional_attention", False):
        # a causal mask for attention modules built bidirectional (PaliGemma's language model
        # without token types, or a decoding step): its causality must come with the mask
        w = _sliding_window_of(mask_function)
        if mask_function is masking_utils.causal_mask_function:
            blockwise = None, None, True
        elif w is not None:
            blockwise = None, w, True
    if blockwise is not None:
        return block_mask(*blockwise, batch_size, q_length, kv_length, q_offset, kv_offset,
                          attention_mask, device)
    if _both_ways(mask_function, batch_size, q_length, kv_length, q_offset, kv_offset, device):
        if not isinstance(q_offset, int) or q_offset or kv_offset or q_length != kv_length:
            raise _unsupported("bidirectional attention over a cache")
        return _both_ways_padding(attention_mask, kv_length)
    _check_mask_function(mask_function)
    if attention_mask is not None and attention_mask.dtype == torch.int32 and \
            attention_mask.shape == (batch_size,):
        return attention_mask   # made here already (generate builds masks ahead of the model)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"attn_implementation='{NAME}' takes a 2D padding mask "
                         f"(batch, length), got shape {tuple(attention_mask.shape)}")
    if mask_function is masking_utils.bidirectional_mask_function and not kv_offset:
        # both ways, as sdpa reads it whatever the lengths: every key the padding mask shows
        # (every key without one), an encoder's, cross-attention's (BLIP-2's Q-Former, a
        # perceiver resampler, SigLIP 2's pooling head: fewer queries than keys) or over a cache
        return _both_ways_padding(attention_mask, kv_length)
    static = isinstance(q_offset, torch.Tensor) or q_offset + q_length < kv_length
    # a dynamic sliding cache keeps its last keys only: key j is token kv_offset + j, the last
    # key the last query, as the bottom-right aligned window wants (and the padding mask's last
    # kv_length columns are those tokens')
    if kv_offset and (static or _sliding_window_of(mask_function) is None):
        raise _unsupported(f"a key offset (kv_offset={kv_offset}) outside a dynamic "
                           f"sliding-window cache")
    if attention_mask is not None:
        attention_mask = attention_mask[:, -kv_length:].bool()
    if attention_mask is None or bool(attention_mask.all()):
        if not static:
            return None
        if device is None and attention_mask is not None:
            device = attention_mask.device
        return (torch.as_tensor(q_offset, device=device) + q_length).to(
            torch.int32).reshape(1).expand(batch_size).contiguous()
    if attention_mask.shape[1] < kv_length:   # a static cache's slots not written yet
        attention_mask = torch.nn.functional.pad(attention_mask,
                                                 (0, kv_length - attention_mask.shape[1]))
    if q_length > 1 and (static or q_offset):   # a cached step of several queries (a chunk)
        attention_mask, hole = _align_queries(attention_mask, q_offset - kv_offset, q_length)
        if bool(hole):
            raise _hole_among_queries()
    return attention_mask


def register(name: str = NAME, backend: str | None = None) -> str:
    """Registers pyssm's attention and mask functions under ``name`` in transformers'
    interfaces and returns the name. ``backend`` fixes pyssm's backend ("cuda", "cpu",
    "reference"); None picks it per call from the tensors' device."""
    global NAME, _backend
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as exc:
        raise ImportError("pyssm.integrations.transformers needs transformers>=5.24 "
                          "(pip install 'pyssm[integrations]')") from exc
    NAME, _backend = name, backend
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, padding_mask)
    return name


# the module swaps (their own module), here for ``pyssm_hf.swap_mlp(model)`` and the like
from pyssm.integrations.transformers_swaps import (  # noqa: E402  (after attention_forward)
    LAYER_CLASSES, MLP, MLP_CLASSES, PACKED_NAME, VISION_ATTENTION_CLASSES, EncoderLayer,
    VisionAttention, encoder_layer, swap_layers, swap_mlp, swap_vision_attention,
    vision_attention)

__all__ = ["NAME", "register", "attention_forward", "padding_mask", "block_mask",
           "swap_mlp", "swap_layers", "swap_vision_attention", "MLP", "EncoderLayer",
           "VisionAttention", "encoder_layer", "vision_attention", "MLP_CLASSES",
           "LAYER_CLASSES", "VISION_ATTENTION_CLASSES", "PACKED_NAME"]
