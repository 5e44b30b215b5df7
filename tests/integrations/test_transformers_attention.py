"""attn_implementation="pyssm" in transformers against "sdpa" on tiny random models (CPU):
CLIP and SigLIP vision towers, a Llama causal LM (padding on either side, cached generation),
and LLaVA. Weights are drawn with a large init so that attention dominates the outputs."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pyssm.integrations.transformers as pyssm_hf  # noqa: E402
from pyssm.integrations import transformers_swaps  # noqa: E402
from pyssm import ops  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def registered():
    pyssm_hf.register()


def _pair(cls, config, ref_impl="sdpa", double=False, **kw):
    """(sdpa model (or ``ref_impl``'s), pyssm model) with the same weights (float64 where
    ``double``); separate configs so that setting one's attention backend cannot change the
    other's."""
    torch.manual_seed(0)
    ref = cls(copy.deepcopy(config), **kw).eval()
    ref.set_attn_implementation(ref_impl)
    ours = cls(copy.deepcopy(config), **kw).eval()
    ours.load_state_dict(ref.state_dict())
    ours.set_attn_implementation("pyssm")
    assert ours.config._attn_implementation == "pyssm"
    assert ref.config._attn_implementation == ref_impl
    if double:
        ref, ours = ref.double(), ours.double()
    return ref, ours


def _llama_config(**kw):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.3,
                       **kw)


def _padded_batch(side):
    """(ids, mask) of 3 rows of 13 tokens, padded on `side` ("left", "right" or "none") by 5, 1
    and 0 tokens (the padding's ids 0)."""
    torch.manual_seed(1)
    ids = torch.randint(3, 97, (3, 13))
    mask = torch.ones_like(ids)
    if side != "none":
        for row, pad in enumerate((5, 1, 0)):
            if pad:
                mask[row, :pad] = 0 if side == "left" else 1
                if side == "right":
                    mask[row, -pad:] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("side", ["left", "right", "none"])
def test_llama_logits_match_sdpa_with_padding(side, monkeypatch):
    from transformers import LlamaForCausalLM

    ref, ours = _pair(LlamaForCausalLM, _llama_config())
    ids, mask = _padded_batch(side)
    seen = _path_spy(monkeypatch, "cu_seqlens", "seqused_k", "leftpad_k")
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    # padding on either side read in place from each row's first valid key (leftpad_k) to the
    # last key (causal: no valid query sees the right padding)
    path = (False, False, False) if side == "none" else (False, False, True)
    assert seen == [path] * 2
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=2e-4, rtol=2e-4)
    assert got.isfinite().all()   # the padding's queries too
    if side == "left":  # the padding mattered: ignoring it changes the outputs
        with torch.no_grad():
            unmasked = ours(input_ids=ids).logits
        assert (unmasked[valid] - want[valid]).abs().max() > 1e-2


def _path_spy(monkeypatch, *names):
    """Records which of the attention calls' arguments ``names`` (default: cu_seqlens_k,
    seqused_k, leftpad_k) each call is given, as a tuple of bools."""
    seen = []
    real = ops.attention
    names = names or ("cu_seqlens_k", "seqused_k", "leftpad_k")

    def spy(*args, **kwargs):
        seen.append(tuple(kwargs.get(n) is not None for n in names))
        return real(*args, **kwargs)

    monkeypatch.setattr(pyssm_hf, "attention", spy)
    return seen


def _call_counter(monkeypatch, owner, name):
    """Records a None for each call of ``owner.name`` (which still runs)."""
    calls = []
    real = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(None)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.parametrize("holes", [False, True], ids=["left-padded", "holes"])
def test_llama_generate_with_cache_and_left_padding_matches_sdpa(holes, monkeypatch):
    """Cached greedy decoding of a left-padded batch gives sdpa's tokens; the prompt and each
    decoding step are one call a layer, not one a row: the rows' valid keys read in place from
    their first (leftpad_k, seqused_k) when each row's are one run, else (a mask with holes)
    the prompt's valid tokens packed and each step's new queries packed against their rows'
    own valid keys (cu_seqlens_k)."""
    from transformers import LlamaForCausalLM

    ref, ours = _pair(LlamaForCausalLM, _llama_config())
    torch.manual_seed(2)
    ids = torch.randint(3, 97, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :6] = 0
    if holes:
        mask[1, 4] = 0
    ids = ids.masked_fill(mask == 0, 0)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = ref.generate(input_ids=ids, **kw)
    seen = _path_spy(monkeypatch)
    reads = _call_counter(monkeypatch, pyssm_hf._padding, "rows")
    torch.testing.assert_close(ours.generate(input_ids=ids, **kw), want, atol=0, rtol=0)
    assert len(seen) == 2 * 8   # 2 layers x (prefill + 7 steps)
    assert reads == ([None] * 8 if holes else [])   # a mask with holes read once a step
    prompt = (False, False, False) if holes else (False, False, True)
    assert seen[:2] == [prompt] * 2
    step = (True, False, False) if holes else (False, True, True)
    assert seen[2:] == [step] * 14


def test_mask_summary_is_read_once_per_mask():
    """The padding mask's key runs: [lead, end) per row when each row's valid keys are one run
    (left or right padding, a static cache's unwritten slots after), None with holes; read once
    per mask tensor and version."""
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    all_valid, lead, end = pyssm_hf._mask_summary(mask)
    assert not all_valid and lead.tolist() == [2, 0, 1] and end.tolist() == [5, 5, 3]
    assert lead.dtype == end.dtype == torch.int32
    assert pyssm_hf._mask_summary(mask)[1] is lead            # cached
    mask[2, 4] = True                                          # in place: read again
    assert pyssm_hf._mask_summary(mask)[1:] == (None, None)    # a hole at 3
    assert pyssm_hf._mask_summary(torch.ones(2, 4, dtype=torch.long))[0]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("pads", [((3, 0), (0, 0), (6, 0)), ((0, 2), (1, 3), (0, 0)),
                                  ((0, 0), (2, 0), (0, 4)), ((1, 0), (0, 1), (0, 0)),
                                  ((2, 0), (0, 3), (5, 0), "hole")],
                         ids=["left", "both-sides", "mixed", "left-and-right", "holes"])
def test_padded_prefill_against_float64(causal, pads, monkeypatch):
    """The attention function on a padded prefill (Sq == Sk, each row's valid tokens one run
    [lead, S - trail), or with a hole) in float64 against a reference over each row's valid
    tokens alone: one runs read in place (leftpad_k; seqused_k without a causal mask), holes
    packed (cu_seqlens). The valid rows' outputs, and the gradients of a loss over them (what a
    training batch's padding leaves), are the reference's; every output is finite."""
    holes = pads[-1] == "hole"
    pads = pads[:-1] if holes else pads
    torch.manual_seed(len(pads) + sum(map(sum, pads)))
    B, S, H, Hk, d = len(pads), 11, 4, 2, 24
    mask = torch.ones(B, S, dtype=torch.bool)
    for row, (lead, trail) in enumerate(pads):
        mask[row, :lead] = False
        mask[row, S - trail:] = False
    if holes:
        mask[1, 4] = False
    q = torch.randn(B, H, S, d, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, Hk, S, d, dtype=torch.float64, requires_grad=True) for _ in "kv")
    module = torch.nn.Module()
    module.is_causal = causal
    seen = _path_spy(monkeypatch, "cu_seqlens", "seqused_k", "leftpad_k")
    out, _ = pyssm_hf.attention_forward(module, q, k, v, mask, scaling=0.3)
    assert seen == [(True, False, False) if holes else (False, not causal, True)]
    assert out.shape == (B, S, H, d) and out.isfinite().all()
    weights = torch.randn(B, S, H, d, dtype=torch.float64)
    got_grads = torch.autograd.grad((out * weights)[mask].sum(), (q, k, v))
    want_loss = 0
    for row in range(B):
        rows = mask[row].nonzero()[:, 0]
        lead = int(rows[0])
        qr, kr, vr = (t[row, :, rows] for t in (q, k, v))
        kr, vr = (t.repeat_interleave(H // Hk, 0) for t in (kr, vr))
        scores = 0.3 * qr @ kr.transpose(-1, -2)
        if causal:
            n = scores.shape[-1]
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        want = (scores.softmax(-1) @ vr).transpose(0, 1)
        want_loss = want_loss + (want * weights[row, rows]).sum()
        torch.testing.assert_close(out[row, rows], want, atol=1e-12, rtol=1e-12)
        if holes:   # (packed: the padding's outputs zeros)
            assert (out[row][~mask[row]] == 0).all()
        if causal:   # the left padding's queries see no key
            assert (out[row, :lead] == 0).all()
    want_grads = torch.autograd.grad(want_loss, (q, k, v))
    for name, g, w in zip("qkv", got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10, msg=f"d{name}")


@pytest.mark.parametrize("side", ["none", "left"])
def test_llama_generate_with_a_static_cache_matches_sdpa(side, monkeypatch):
    """A static cache (cache_implementation="static": more slots than keys written) gives
    sdpa's tokens. Every call reads the cache in place: without padding up to the keys written
    (seqused_k, one count a row, never read on the host), with left padding also from each
    row's first valid key (leftpad_k: the mask read once a step)."""
    from transformers import LlamaForCausalLM

    ref, ours = _pair(LlamaForCausalLM, _llama_config())
    torch.manual_seed(3)
    ids = torch.randint(3, 97, (2, 9))
    mask = torch.ones_like(ids)
    if side == "left":
        mask[0, :3] = 0
    ids = ids.masked_fill(mask == 0, 0)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
              cache_implementation="static")
    want = ref.generate(input_ids=ids, **kw)
    seen = _path_spy(monkeypatch)
    torch.testing.assert_close(ours.generate(input_ids=ids, **kw), want, atol=0, rtol=0)
    assert len(seen) == 2 * 6
    assert seen == [(False, True, side == "left")] * 12


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_llama_sequences_packed_by_position_ids_match_sdpa(training, monkeypatch):
    """Sequences packed along each row by position_ids (no padding mask, no cache: padding-free
    training) run as one packed batch, q, k and v in place (cu_seqlens from the rows' sequence
    ids, one call a layer): sdpa's logits and gradients, and each sequence's logits as when it
    runs alone."""
    from transformers import LlamaForCausalLM

    ref, ours = _pair(LlamaForCausalLM, _llama_config())
    torch.manual_seed(4)
    ids = torch.randint(3, 97, (3, 12))
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 3], list(range(12)),
                              [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]])
    offsets = []
    real = ops.attention
    monkeypatch.setattr(pyssm_hf, "attention", lambda *a, **k: offsets.append(
        k["cu_seqlens"].tolist() if "cu_seqlens" in k else None) or real(*a, **k))
    results = []
    for model in (ref, ours):
        model.train(training)
        with torch.set_grad_enabled(training):
            logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        grads = torch.autograd.grad(logits.square().mean(), list(model.parameters())) \
            if training else ()
        results.append((logits.detach(), grads))
    # (B, S) as one packed batch, a call a layer; every row starts a sequence (row 1, one
    # sequence of id 0, ends where row 2's first sequence, also of id 0, starts)
    assert offsets[:2] == [[0, 3, 8, 12, 24, 30, 36]] * 2
    (want, want_g), (got, got_g) = results
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    for (name, _), g, w in zip(ours.named_parameters(), got_g, want_g):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-3, msg=name)
    with torch.no_grad():
        alone = ours.eval()(input_ids=ids[:1, 3:8], position_ids=positions[:1, 3:8],
                            use_cache=False).logits
    torch.testing.assert_close(got[0, 3:8], alone[0], atol=2e-4, rtol=2e-4)
    assert offsets[2:] == [None] * 2   # (one sequence: plain causal)


def test_llama_flash_attn_kwargs_match_sdpa(monkeypatch):
    """DataCollatorWithFlattening(return_flash_attn_kwargs=True): the sequences' offsets come
    as cu_seq_lens_q / _k with max_length_q / _k (FlashAttentionKwargs) and are taken as
    given, one call a layer, the position_ids' mask not read; logits and gradients equal
    sdpa's on the same batch (its mask from position_ids). A batch of two rows raises."""
    from transformers import DataCollatorWithFlattening, LlamaForCausalLM

    ref, ours = _pair(LlamaForCausalLM, _llama_config())
    torch.manual_seed(5)
    features = [{"input_ids": torch.randint(3, 97, (n,)).tolist()} for n in (3, 5, 4)]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(features)
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 8, 12]
    seen = []
    real = ops.attention
    monkeypatch.setattr(pyssm_hf, "attention", lambda *a, **k: seen.append(
        (k["cu_seqlens"].tolist(), k["max_seqlen"], "cu_seqlens_k" in k)) or real(*a, **k))
    reads = _call_counter(monkeypatch, pyssm_hf, "_sequence_offsets")
    results = []
    for model in (ref, ours):
        model.train()
        out = model(**batch, use_cache=False)
        results.append((out.logits.detach(), torch.autograd.grad(out.loss, list(
            model.parameters()))))
    assert seen == [([0, 3, 8, 12], 5, True)] * 2 and reads == []   # (the keys: cu_seq_lens_k)
    (want, want_g), (got, got_g) = results
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    for (name, _), g, w in zip(ours.named_parameters(), got_g, want_g):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-3, msg=name)
    two = {k: (v.expand(2, -1) if k in ("input_ids", "position_ids") else v)
           for k, v in batch.items() if k != "labels"}
    with torch.no_grad(), pytest.raises(ValueError, match="along one row"):
        ours(**two, use_cache=False)


def _window_spy(monkeypatch):
    """Records the window_size of each attention call."""
    windows = []
    real = ops.attention

    def spy(*args, **kwargs):
        windows.append(kwargs.get("window_size"))
        return real(*args, **kwargs)

    monkeypatch.setattr(pyssm_hf, "attention", spy)
    return windows


def _prompt(padded):
    """(ids, mask) of 2 prompts of 9 tokens, the first left-padded by 3 when ``padded``."""
    torch.manual_seed(2)
    ids = torch.randint(3, 97, (2, 9))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _mistral_config(**kw):
    from transformers import MistralConfig
    return MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, initializer_range=0.3, sliding_window=4, **kw)


@pytest.mark.parametrize("side", ["left", "right", "none"])
def test_mistral_sliding_window_matches_sdpa(side, monkeypatch):
    """Mistral's sliding window (4: each query sees itself and the 3 keys before it) runs as
    pyssm's window (3, 0), padded rows read in place, against sdpa's sliding mask."""
    from transformers import MistralForCausalLM

    ref, ours = _pair(MistralForCausalLM, _mistral_config())
    ids, mask = _padded_batch(side)
    windows = _window_spy(monkeypatch)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    assert windows == [(3, 0)] * 2
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=2e-4, rtol=2e-4)
    with torch.no_grad():  # the window mattered: plain causal attention differs
        monkeypatch.setattr(pyssm_hf, "attention",
                            lambda *a, **kw: ops.attention(*a, **{**kw, "window_size": (-1, -1)}))
        unwindowed = ours(input_ids=ids, attention_mask=mask).logits
    assert (unwindowed[valid] - want[valid]).abs().max() > 1e-2


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_mistral_generate_with_a_sliding_cache_matches_sdpa(padded, cache, monkeypatch):
    """Cached greedy decoding past the window: the sliding cache keeps the last keys only (a
    key offset; a static one its window's slots), read in place with the window aligned at the
    last key; sdpa's tokens."""
    from transformers import MistralForCausalLM

    ref, ours = _pair(MistralForCausalLM, _mistral_config())
    ids, mask = _prompt(padded)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
              cache_implementation=cache)
    want = ref.generate(input_ids=ids, **kw)
    windows = _window_spy(monkeypatch)
    torch.testing.assert_close(ours.generate(input_ids=ids, **kw), want, atol=0, rtol=0)
    assert windows == [(3, 0)] * (2 * 8)   # 2 layers x (prefill + 7 steps)


def _gemma2_config(**kw):
    from transformers import Gemma2Config
    return Gemma2Config(vocab_size=97, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=64,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.3,
                        sliding_window=4, attn_logit_softcapping=3.0, **kw)


def _call_spy(monkeypatch):
    """Records (window_size, softcap) of each attention call."""
    calls = []
    real = ops.attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("window_size"), kwargs.get("softcap")))
        return real(*args, **kwargs)

    monkeypatch.setattr(pyssm_hf, "attention", spy)
    return calls


@pytest.mark.parametrize("side", ["left", "right", "none"])
def test_gemma2_soft_capping_matches_eager(side, monkeypatch):
    """Gemma 2's attention soft-capping (3 here) runs as pyssm's softcap, in its sliding layer
    (window 4: (3, 0)) and its global one, padded rows read in place, against eager attention
    (Gemma 2 has no sdpa: sdpa cannot cap)."""
    from transformers import Gemma2ForCausalLM

    ref, ours = _pair(Gemma2ForCausalLM, _gemma2_config(), ref_impl="eager")
    ids, mask = _padded_batch(side)
    calls = _call_spy(monkeypatch)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    assert calls == [((3, 0), 3.0), ((-1, -1), 3.0)]
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=2e-4, rtol=2e-4)
    with torch.no_grad():  # the cap mattered: attention without it differs
        monkeypatch.setattr(pyssm_hf, "attention",
                            lambda *a, **kw: ops.attention(*a, **{**kw, "softcap": 0.0}))
        uncapped = ours(input_ids=ids, attention_mask=mask).logits
    assert (uncapped[valid] - want[valid]).abs().max() > 1e-2


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_gemma2_generate_matches_eager(padded, monkeypatch):
    """Cached greedy decoding past the window with soft-capping: eager's tokens."""
    from transformers import Gemma2ForCausalLM

    ref, ours = _pair(Gemma2ForCausalLM, _gemma2_config(), ref_impl="eager")
    ids, mask = _prompt(padded)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = ref.generate(input_ids=ids, **kw)
    calls = _call_spy(monkeypatch)
    torch.testing.assert_close(ours.generate(input_ids=ids, **kw), want, atol=0, rtol=0)
    assert calls == [((3, 0), 3.0), ((-1, -1), 3.0)] * 8   # (prefill + 7 steps)


def test_mistral_sliding_window_with_holes_raises():
    from transformers import MistralForCausalLM

    _, ours = _pair(MistralForCausalLM, _mistral_config())
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 3] = 0
    with torch.no_grad(), pytest.raises(NotImplementedError, match="holes in the padding mask"):
        ours(input_ids=torch.randint(3, 97, (2, 7)), attention_mask=mask)


def _bidirectional_encoder(kind):
    """(model class, tiny config) of an encoder with bidirectional sliding windows: ModernBERT
    (local_attention 4: each token sees the 2 on either side; every third layer global) or
    EmbeddingGemma (Gemma 3 with use_bidirectional_attention, sliding_window 5, which its
    config makes 5 // 2 + 1 = 3: the tokens less than 3 apart; a sliding and a full layer)."""
    if kind == "modernbert":
        from transformers import ModernBertConfig, ModernBertModel
        return ModernBertModel, ModernBertConfig(
            vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, local_attention=4, global_attn_every_n_layers=3,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
            initializer_range=0.3)
    from transformers import Gemma3TextConfig, Gemma3TextModel
    return Gemma3TextModel, Gemma3TextConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        max_position_embeddings=64, sliding_window=5, use_bidirectional_attention=True,
        layer_types=["sliding_attention", "full_attention"], pad_token_id=0, bos_token_id=1,
        eos_token_id=2, initializer_range=0.3)


@pytest.mark.parametrize("side", ["left", "right", "none", "holes"])
@pytest.mark.parametrize("kind", ["modernbert", "embeddinggemma"])
def test_bidirectional_sliding_windows_match_sdpa(kind, side, monkeypatch):
    """Encoders attending both ways within a window run it as pyssm's centred window
    (transformers' sliding_window w: the w - 1 keys on either side, as its flash-attn path
    sets it), full layers both ways unwindowed; a padded row's valid run packed (in place the
    window would shift with the padding). Against sdpa's masks, on the valid tokens; holes in
    the padding mask of a windowed layer raise."""
    cls, config = _bidirectional_encoder(kind)
    ref, ours = _pair(cls, config)
    ids, mask = _padded_batch("left" if side == "holes" else side)
    if side == "holes":
        mask[2, 6] = 0
    calls = _call_spy(monkeypatch)
    with torch.no_grad():
        if side == "holes":
            with pytest.raises(NotImplementedError, match="holes in the padding mask"):
                ours(input_ids=ids, attention_mask=mask)
            return
        got = ours(input_ids=ids, attention_mask=mask).last_hidden_state
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    windows = [((2, 2), 0.0), ((-1, -1), 0.0)]
    assert calls == ([windows[1], windows[0], windows[0]] if kind == "modernbert" else windows)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=2e-5, rtol=2e-5)


def test_bidirectional_masks_recognised():
    """padding_mask takes masking_utils' bidirectional sliding window and a causal mask (sliding
    or not) or'ed open both ways (checked over the grid: all pairs, or those less than w
    apart), giving the padding; an overlay opening anything else, or a cache, raises."""
    from transformers import masking_utils as mu

    def near(w):   # (as Gemma 3's _bidirectional_window_overlay)
        return lambda b, h, q, k: (q - k).abs() < w

    anything = lambda b, h, q, k: torch.tensor(True)   # noqa: E731
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    for both in (mu.sliding_window_bidirectional_mask_function(3),
                 mu.or_masks(mu.causal_mask_function, anything),
                 mu.or_masks(mu.sliding_window_causal_mask_function(3), near(3))):
        assert pyssm_hf.padding_mask(2, 8, 8, mask_function=both) is None
        got = pyssm_hf.padding_mask(2, 8, 8, mask_function=both, attention_mask=mask)
        assert got.tolist() == mask.bool()[:, None, None, :].tolist()   # (sdpa's layout)
        with pytest.raises(NotImplementedError, match="bidirectional attention over a cache"):
            pyssm_hf.padding_mask(2, 1, 8, q_offset=7, mask_function=both)
    for other in (mu.or_masks(mu.sliding_window_causal_mask_function(3), near(4)),
                  mu.or_masks(mu.sliding_window_causal_mask_function(3), anything),
                  mu.or_masks(mu.causal_mask_function, near(3)),
                  mu.or_masks(mu.causal_mask_function, lambda b, h, q, k: b == 0)):
        with pytest.raises(NotImplementedError, match="the attention mask this model builds"):
            pyssm_hf.padding_mask(2, 8, 8, mask_function=other)


def test_masks_pyssm_cannot_compute_raise():
    """A mask function other than plain causal / bidirectional or a sliding window (here:
    chunked attention), or packed sequences with a padding mask,
    raises rather than running plain causal attention."""
    from transformers import masking_utils

    sliding = masking_utils.and_masks(masking_utils.causal_mask_function,
                                      masking_utils.sliding_window_overlay(4))
    assert pyssm_hf.padding_mask(1, 8, 8, mask_function=sliding) is None
    assert pyssm_hf.padding_mask(1, 1, 4, q_offset=9, kv_offset=6,
                                 mask_function=sliding) is None   # a sliding cache's keys
    for other in (masking_utils.chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long)),):
        with pytest.raises(NotImplementedError, match="the attention mask this model builds"):
            pyssm_hf.padding_mask(1, 8, 8, mask_function=other)
    packed = masking_utils.and_masks(
        masking_utils.remap_positions_for_packed_sequence(masking_utils.causal_mask_function,
                                                          torch.tensor([[0, 1, 0, 1]])),
        masking_utils.packed_sequence_mask_function(torch.tensor([[0, 0, 1, 1]])))
    assert pyssm_hf.padding_mask(1, 4, 4, mask_function=packed).tolist() == [[0, 0, 1, 1]]
    with pytest.raises(NotImplementedError, match="packed by position_ids with a padding mask"):
        pyssm_hf.padding_mask(1, 4, 4, mask_function=packed,
                              attention_mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="a key offset"):
        pyssm_hf.padding_mask(1, 1, 4, q_offset=9, kv_offset=6)


def test_clip_vision_matches_sdpa(monkeypatch):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(image_size=40, patch_size=8, hidden_size=48, intermediate_size=96,
                              num_hidden_layers=2, num_attention_heads=4, initializer_factor=3.0)
    ref, ours = _pair(CLIPVisionModel, config)
    pixels = torch.randn(2, 3, 40, 40)
    calls = _path_spy(monkeypatch, "cu_seqlens")
    with torch.no_grad():
        want = ref(pixel_values=pixels).last_hidden_state
        got = ours(pixel_values=pixels).last_hidden_state
    assert len(calls) == 2  # one per layer, 26 tokens (CLS + 25 patches)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_siglip_vision_matches_sdpa():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(image_size=36, patch_size=6, hidden_size=40, intermediate_size=80,
                                num_hidden_layers=2, num_attention_heads=5)
    ref, ours = _pair(SiglipVisionModel, config)
    pixels = torch.randn(2, 3, 36, 36)
    with torch.no_grad():
        torch.testing.assert_close(ours(pixel_values=pixels).last_hidden_state,
                                   ref(pixel_values=pixels).last_hidden_state,
                                   atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("full", [False, True], ids=["mixed_sizes", "all_full"])
def test_siglip2_naflex_with_pooling_head_matches_sdpa(full):
    """SigLIP 2 NaFlex with its pooling head (vision_use_head: the image embedding), images of
    16, 12 and 6 patches padded to 16: the head's cross-attention (one probe query, the
    patches as keys) builds its mask through the model's mask interface and reshapes it for
    nn.MultiheadAttention as sdpa's 4D layout, which padding_mask gives for masks both ways;
    with every image full, no mask. In float64 against sdpa: the patches and the pooled
    embedding."""
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    config = Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, patch_size=4, num_patches=16,
                                 vision_use_head=True)
    ref, ours = _pair(Siglip2VisionModel, config, double=True)
    torch.manual_seed(5)
    pixels = torch.randn(3, 16, 3 * 4 * 4, dtype=torch.float64)
    shapes = torch.tensor([[4, 4]] * 3 if full else [[4, 4], [3, 4], [2, 3]])
    mask = torch.zeros(3, 16, dtype=torch.long)
    for row, (h, w) in enumerate(shapes.tolist()):
        mask[row, :h * w] = 1
    inputs = dict(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes)
    with torch.no_grad():
        got, want = ours(**inputs), ref(**inputs)
    valid = mask.bool()
    torch.testing.assert_close(got.last_hidden_state[valid], want.last_hidden_state[valid],
                               atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("encoder_mask", ["none", "all_ones", "padded"])
def test_blip2_qformer_cross_attention_matches_sdpa(encoder_mask):
    """BLIP-2's Q-Former (InstructBLIP's too): 4 learned queries attend to 16 image tokens
    (cross-attention, fewer queries than keys, no cache): every image token is seen, or the
    padding mask's (BLIP-2 passes an all-ones one). pyssm once read a mask both ways with
    fewer queries than keys as a static cache's first slots: only 4 keys seen."""
    from transformers.models.blip_2.configuration_blip_2 import Blip2QFormerConfig
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel

    config = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, encoder_hidden_size=24,
                                cross_attention_frequency=1)
    ref, ours = _pair(Blip2QFormerModel, config, double=True)
    torch.manual_seed(6)
    queries = torch.randn(2, 4, 32, dtype=torch.float64)
    image = torch.randn(2, 16, 24, dtype=torch.float64)
    mask = None if encoder_mask == "none" else torch.ones(2, 16, dtype=torch.long)
    if encoder_mask == "padded":
        mask[1, 9:] = 0
    inputs = dict(query_embeds=queries, encoder_hidden_states=image, encoder_attention_mask=mask)
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).last_hidden_state,
                                   ref(**inputs).last_hidden_state, atol=1e-10, rtol=1e-10)
    assert pyssm_hf.padding_mask(2, 4, 16, mask_function=transformers.masking_utils
                                 .bidirectional_mask_function,
                                 attention_mask=torch.ones(2, 16, dtype=torch.bool)) is None


@pytest.mark.parametrize("padded", [False, True], ids=["all_valid", "padded"])
def test_idefics2_perceiver_resampler_matches_sdpa(padded):
    """Idefics2's connector: 4 latents attend to 16 image tokens and themselves (20 keys for 4
    queries, no cache), with an all-ones or a padded image mask, in float64 against sdpa."""
    from transformers.models.idefics2.configuration_idefics2 import Idefics2PerceiverConfig
    from transformers.models.idefics2.modeling_idefics2 import Idefics2PerceiverResampler

    config = Idefics2PerceiverConfig(hidden_size=32, resampler_n_latents=4, resampler_depth=2,
                                     resampler_n_heads=4, resampler_head_dim=8,
                                     num_key_value_heads=2)
    ref, ours = _pair(Idefics2PerceiverResampler, config, double=True)
    torch.manual_seed(7)
    context = torch.randn(2, 16, 32, dtype=torch.float64)
    mask = torch.ones(2, 16, dtype=torch.long)
    if padded:
        mask[1, 10:] = 0
    with torch.no_grad():
        torch.testing.assert_close(ours(context, mask), ref(context, mask),
                                   atol=1e-10, rtol=1e-10)


def test_llava_matches_sdpa(monkeypatch):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4)
    config = LlavaConfig(vision_config=vision, text_config=_llama_config(), image_token_id=96,
                         vision_feature_layer=-1, vision_feature_select_strategy="full")
    ref, ours = _pair(LlavaForConditionalGeneration, config)
    assert pyssm_hf.swap_layers(ours) == 2   # (the vision tower's layers, on pyssm's ops too)
    assert ours.config.vision_config._attn_implementation == "pyssm"
    assert ours.config.text_config._attn_implementation == "pyssm"
    torch.manual_seed(3)
    ids = torch.randint(3, 90, (2, 8))
    ids = torch.cat([ids[:, :1], torch.full((2, 17), 96), ids[:, 1:]], 1)  # 1 + 16 patches + CLS
    mask = torch.ones_like(ids)
    mask[1, 0] = 0
    pixels = torch.randn(2, 3, 32, 32)
    calls = _path_spy(monkeypatch, "cu_seqlens")
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        got = ours(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert len(calls) == 4  # 2 vision layers + 2 text layers
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("swapped", [False, True], ids=["backend", "swap_vision_attention"])
def test_qwen2_5_vl_matches_sdpa(swapped, monkeypatch):
    """Qwen2.5-VL on pyssm throughout, in float64: its vision tower (windowed and global
    layers: each window or image one bidirectional call, as transformers splits them for
    backends other than flash-attn; swapped by swap_vision_attention, one packed call a
    layer) and its language model (multimodal rotary positions, a left-padded row): the valid
    tokens' logits, the vision tower's gradients and cached greedy generation equal sdpa's."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(vocab_size=160, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, pad_token_id=0,
                bos_token_id=1, eos_token_id=2, initializer_range=0.3)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=1, window_size=16,
                  fullatt_block_indexes=[1], out_hidden_size=32, in_channels=3)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=150,
                              video_token_id=151, vision_start_token_id=152,
                              vision_end_token_id=153)
    torch.manual_seed(0)
    ref = Qwen2_5_VLForConditionalGeneration(copy.deepcopy(config)).double().eval()
    ref.set_attn_implementation("sdpa")
    ours = Qwen2_5_VLForConditionalGeneration(copy.deepcopy(config)).double().eval()
    ours.load_state_dict(ref.state_dict())
    ours.set_attn_implementation("pyssm")
    if swapped:   # (every class of the list there in the pinned transformers)
        assert len(transformers_swaps._classes(pyssm_hf.VISION_ATTENTION_CLASSES)) == \
            len(pyssm_hf.VISION_ATTENTION_CLASSES) == 36
        assert pyssm_hf.swap_vision_attention(ours) == 2
        assert isinstance(ours.model.visual.blocks[0].attn, pyssm_hf.VisionAttention)
        assert ours.state_dict().keys() == ref.state_dict().keys()
    # two images, 8 x 8 patches (16 tokens after merging) and 4 x 4 (4 tokens)
    grid = torch.tensor([[1, 8, 8], [1, 4, 4]])
    torch.manual_seed(3)
    pixels = torch.randn(64 + 16, 3 * 4 * 4, dtype=torch.float64)
    ids = torch.randint(3, 140, (2, 24))
    ids[0, 2], ids[0, 3:19], ids[0, 19] = 152, 150, 153
    ids[1, 9], ids[1, 10:14], ids[1, 14] = 152, 150, 153
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    ids[1, :5] = 0
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid)
    calls = _path_spy(monkeypatch, "cu_seqlens")
    with torch.no_grad():
        want = ref(**inputs).logits
        got = ours(**inputs).logits
    # the vision calls (swapped: one a layer, packed), then 2 text layers
    assert calls == [(True,)] * 2 + [(False,)] * 2 if swapped else \
        len(calls) > 6 and set(calls) == {(False,)}
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-10, rtol=1e-10)
    monkeypatch.undo()
    grads = []
    for model in (ref, ours):
        features = model.model.get_image_features(pixels, grid).pooler_output
        features = torch.cat(features) if isinstance(features, (list, tuple)) else features
        grads.append(torch.autograd.grad(features.square().sum(),
                                         list(model.model.visual.parameters())))
    for (name, _), g, w in zip(ref.model.visual.named_parameters(), grads[1], grads[0]):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-8, msg=name)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(ours.generate(**inputs, **kw), ref.generate(**inputs, **kw),
                               atol=0, rtol=0)


def test_pixtral_vision_matches_sdpa(monkeypatch):
    """Pixtral's vision tower (Mistral Small 3.1's, Pixtral 12B's) packs its images along one
    row under a dense block-diagonal mask it builds itself: one packed pyssm call a layer (the
    mask's blocks read once a forward), outputs and gradients equal to sdpa's in float64, two
    images of different sizes."""
    from transformers import PixtralVisionConfig, PixtralVisionModel

    config = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, head_dim=8, image_size=32, patch_size=4)
    ref, ours = _pair(PixtralVisionModel, config, double=True)
    torch.manual_seed(3)
    pixels = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    sizes = torch.tensor([[16, 12], [8, 8]])   # 4 x 3 and 2 x 2 patches: runs of 12 and 4
    calls = _path_spy(monkeypatch, "cu_seqlens")
    got = ours(pixel_values=pixels, image_sizes=sizes).last_hidden_state
    want = ref(pixel_values=pixels, image_sizes=sizes).last_hidden_state
    assert calls == [(True,)] * 2
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    for g, w, (name, _) in zip(torch.autograd.grad(got.square().sum(), list(ours.parameters())),
                               torch.autograd.grad(want.square().sum(), list(ref.parameters())),
                               ours.named_parameters()):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-8, msg=name)


def test_dense_block_diagonal_masks():
    """A dense 4D mask a model builds itself runs as one packed call when block-diagonal
    (boolean or additive, one row's blocks broadcast over the batch, float64 against SDPA with
    the mask); any other dense mask (causal, padding, a bias) raises."""
    torch.manual_seed(4)
    B, H, S, d = 3, 2, 9, 8
    q, k, v = (torch.randn(B, H, S, d, dtype=torch.float64) for _ in range(3))
    run = torch.tensor([0, 0, 0, 0, 1, 2, 2, 2, 2])
    visible = (run[:, None] == run[None, :])[None, None]
    module = torch.nn.Module()
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible)
    additive = torch.zeros(1, 1, S, S, dtype=torch.float64).masked_fill(
        ~visible, torch.finfo(torch.float64).min)
    for mask in (visible, visible.expand(B, 1, S, S), additive):
        got, _ = pyssm_hf.attention_forward(module, q, k, v, mask)
        torch.testing.assert_close(got, want.transpose(1, 2), atol=1e-12, rtol=1e-12)
    causal = torch.ones(S, S, dtype=torch.bool).tril()[None, None]
    padded = visible.clone()
    padded[..., 3] = False
    biased = additive.masked_fill(visible, 0.5)
    for mask in (causal, padded, biased, visible[..., :8, :]):
        with pytest.raises(NotImplementedError, match="not block-diagonal"):
            pyssm_hf.attention_forward(module, q, k, v, mask)


def test_what_pyssm_does_not_compute_raises():
    from transformers import LlamaForCausalLM

    _, ours = _pair(LlamaForCausalLM, _llama_config(attention_dropout=0.1))
    ids = torch.randint(3, 97, (1, 5))
    ours.eval()
    with torch.no_grad():
        ours(input_ids=ids)  # no dropout in eval: fine
        with pytest.raises(NotImplementedError, match="output_attentions"):
            ours(input_ids=ids, output_attentions=True)
    ours.train()
    with pytest.raises(NotImplementedError, match="attention dropout while training"):
        ours(input_ids=ids)
