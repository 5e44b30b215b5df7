"""attn_implementation="pyssm" with blocks of tokens attending both ways on top of a causal
mask (transformers' block_sequence_ids: PaliGemma's image-and-prompt prefix, Gemma 3's
images), against the dense mask transformers builds for sdpa, in float64 (CPU)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pyssm.integrations.transformers as pyssm_hf  # noqa: E402
from conftest import backend_params  # noqa: E402
from pyssm import ops  # noqa: E402

F64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def registered():
    pyssm_hf.register()


def _block_ids(S):
    """(ids, padding mask) of 3 rows: two image blocks among text (the second a single token
    at the end); a prefix block after 2 left-padding tokens (PaliGemma: the padding in the
    prefix's group), then text; no block, 3 right-padding tokens."""
    ids = torch.full((3, S), -1)
    ids[0, 2:6] = 0
    ids[0, 8:11] = 1
    ids[0, S - 1] = 2
    ids[1, :8] = 0
    mask = torch.ones(3, S, dtype=torch.bool)
    mask[1, :2] = False
    mask[2, S - 3:] = False
    return ids, mask


def _mask_function(kind, ids, w):
    from transformers import masking_utils as mu
    blocks = mu.blockwise_overlay(ids)
    if kind == "causal":        # (no blocks: the padding-mask path)
        return mu.causal_mask_function
    if kind == "window":
        return mu.sliding_window_causal_mask_function(w)
    if kind == "full":
        return mu.or_masks(mu.causal_mask_function, blocks)
    if kind == "window-or":     # create_sliding_window_causal_mask with block ids
        return mu.or_masks(mu.sliding_window_causal_mask_function(w), blocks)
    # Gemma 3's sliding layers: the window over both
    return mu.and_masks(mu.or_masks(mu.causal_mask_function, blocks), mu.sliding_window_overlay(w))


def _spy(monkeypatch):
    """Records (causal, window_size, cu_seqlens_k given) of each attention call."""
    seen, real = [], ops.attention

    def spy(*args, **kwargs):
        seen.append((kwargs["causal"], kwargs["window_size"],
                     kwargs.get("cu_seqlens_k") is not None))
        return real(*args, **kwargs)

    monkeypatch.setattr(pyssm_hf, "attention", spy)
    return seen


@pytest.mark.parametrize("kind,w", [("full", None), ("window-or", 6), ("window-and", 3),
                                    ("causal", None), ("window", 4)])
@pytest.mark.parametrize("step", ["prefill", "chunk", "static"])
def test_block_masks_against_the_dense_mask(kind, w, step, monkeypatch):
    """Every valid query's output, and the gradients of a loss over them, equal attention
    under the dense boolean mask transformers builds from the same mask function (sdpa_mask)
    for: a whole prefill, a chunk of 5 queries after 8 cached keys (blocks across the chunk's
    start), and a prefill into a static cache with 3 slots to spare. Two packed calls a layer:
    the runs of queries outside the blocks causally (or windowed), then every block's queries
    both ways, each run over its row's keys up to its end; the mask read on the host once, its
    making and the plan sharing the read where the or'ed window's check needs one.
    Without blocks (a causal mask, a causal window) the same holds for the padding-mask path,
    one call a layer: in the chunk, the right-padded row's padding queries come after its
    valid ones."""
    from transformers import masking_utils as mu

    torch.manual_seed(3)
    S, H, Hk, d = 13, 4, 2, 8
    ids, pad = _block_ids(S)
    slots = S + 3 if step == "static" else S
    ids = torch.nn.functional.pad(ids, (0, slots - S), value=-1)
    fn = _mask_function(kind, ids, w)
    Sq, q_offset = (5, 8) if step == "chunk" else (S, 0)
    sizes = dict(batch_size=3, q_length=Sq, kv_length=slots, q_offset=q_offset, kv_offset=0,
                 mask_function=fn, attention_mask=pad)
    reads = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **kw: reads.append(1) or
                        real_cpu(t, *a, **kw))
    ours = pyssm_hf.padding_mask(**sizes)
    monkeypatch.undo()
    blocks = kind not in ("causal", "window")
    assert ours.shape == ((3, 1, 1, slots) if blocks else (3, slots))
    dense = mu.sdpa_mask(**sizes, allow_is_causal_skip=False)[:, 0]     # (B, Sq, slots)
    q = torch.randn(3, H, Sq, d, dtype=F64, requires_grad=True)
    k, v = (torch.randn(3, Hk, slots, d, dtype=F64, requires_grad=True) for _ in "kv")
    module = torch.nn.Module()
    module.is_causal = True
    seen = _spy(monkeypatch)
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **kw: reads.append(1) or
                        real_cpu(t, *a, **kw))
    for _ in range(2):   # two layers: one plan
        out, _ = pyssm_hf.attention_forward(module, q, k, v, ours, scaling=0.4,
                                            sliding_window=w if kind != "full" else None)
    monkeypatch.undo()
    window = (-1, -1) if w is None else (w - 1, 0)
    if blocks:
        assert len(reads) == 1
        assert seen[:2] == [(True, window, True), (False, (window[0], -1), True)]
    else:
        assert seen == [(True, window, False)] * 2
    assert out.shape == (3, Sq, H, d) and out.isfinite().all()

    kr, vr = (t.repeat_interleave(H // Hk, 1) for t in (k, v))
    scores = 0.4 * q @ kr.transpose(-1, -2)                  # (B, H, Sq, slots)
    valid_q = pad[:, q_offset:q_offset + Sq]
    probs = scores.masked_fill(~dense[:, None], float("-inf")).softmax(-1)
    want = (probs.nan_to_num() @ vr).transpose(1, 2)
    torch.testing.assert_close(out[valid_q], want[valid_q], atol=1e-12, rtol=1e-12)
    weights = torch.randn(3, Sq, H, d, dtype=F64)
    got = torch.autograd.grad((out * weights)[valid_q].sum(), (q, k, v))
    wanted = torch.autograd.grad((want * weights)[valid_q].sum(), (q, k, v))
    for name, g, r in zip("qkv", got, wanted):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-10, msg=f"d{name}")


def _forward(mask, S=13, Sq=None, w=None):
    q = torch.randn(mask.shape[0], 2, Sq or S, 8, dtype=F64)
    k, v = (torch.randn(mask.shape[0], 2, mask.shape[-1], 8, dtype=F64) for _ in "kv")
    module = torch.nn.Module()
    module.is_causal = True
    return pyssm_hf.attention_forward(module, q, k, v, mask, sliding_window=w)


def test_what_block_masks_cannot_do_raises():
    """NotImplementedError, not a wrong answer: a block split by other tokens; a block longer
    than a window or'ed on outside the blocks (PaliGemma 2's sliding layers over a long
    prefix); a window with a hole in the padding before a block; padding between a chunk's
    valid queries."""
    from transformers import masking_utils as mu

    S = 13
    ids, pad = _block_ids(S)
    sizes = dict(batch_size=3, q_length=S, kv_length=S, attention_mask=pad)
    split = ids.clone()
    split[0, 7] = 0
    with pytest.raises(NotImplementedError, match="split by other tokens"):
        _forward(pyssm_hf.padding_mask(**sizes, mask_function=_mask_function("full", split, 0)))
    with pytest.raises(NotImplementedError, match="longer than the sliding window"):
        pyssm_hf.padding_mask(**sizes, mask_function=_mask_function("window-or", ids, 5))
    holed = pad.clone()
    holed[0, 1] = False
    mask = pyssm_hf.padding_mask(**dict(sizes, attention_mask=holed),
                                 mask_function=_mask_function("window-and", ids, 3))
    with pytest.raises(NotImplementedError, match="holes in the padding mask before"):
        _forward(mask, w=3)
    _forward(mask)          # (without a window the hole packs)
    chunk = pad.clone()
    chunk[2, 9] = False     # the right-padded row's chunk [8, 13): valid, padding, valid
    chunk[2, 10] = True
    for fn in (mu.causal_mask_function, _mask_function("full", ids, None)):
        with pytest.raises(NotImplementedError, match="between the valid queries"):
            _forward(pyssm_hf.padding_mask(**dict(sizes, q_length=5, q_offset=8,
                                                  attention_mask=chunk), mask_function=fn),
                     Sq=5)


def _paligemma_pair(window=None):
    """(sdpa PaliGemma, pyssm PaliGemma) in float64 with the same weights: a 1-layer SigLIP
    tower of 4 image tokens and a 2-layer Gemma (its attention built bidirectional, as
    PaliGemma's config sets it: the mask brings the causality); with a ``window``, PaliGemma
    2's: a Gemma 2, its first layer sliding (and eager attention the reference: Gemma 2 caps
    its scores)."""
    from transformers import (Gemma2Config, GemmaConfig, PaliGemmaConfig,
                              PaliGemmaForConditionalGeneration, SiglipVisionConfig)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, image_size=16, patch_size=8)
    sizes = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2, initializer_range=0.3)
    text = GemmaConfig(**sizes) if window is None else Gemma2Config(**sizes,
                                                                     sliding_window=window)
    config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_id=98,
                             projection_dim=32)
    torch.manual_seed(0)
    ref = PaliGemmaForConditionalGeneration(copy.deepcopy(config)).to(F64).eval()
    ref.set_attn_implementation("sdpa" if window is None else "eager")
    ours = PaliGemmaForConditionalGeneration(copy.deepcopy(config)).to(F64).eval()
    ours.load_state_dict(ref.state_dict())
    ours.set_attn_implementation({"text_config": "pyssm", "vision_config": "sdpa"})
    return ref, ours


def _paligemma_inputs():
    """Two rows of 12: 4 image tokens, a prompt, a 3-token suffix (token type 1); the first
    row left-padded by 2 (its image tokens after the padding)."""
    torch.manual_seed(4)
    ids = torch.randint(3, 97, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :2] = 0
    ids[0, :2] = 0
    ids[0, 2:6] = 98
    ids[1, :4] = 98
    types = torch.zeros(2, 12, dtype=torch.long)
    types[:, 9:] = 1
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types,
                pixel_values=torch.randn(2, 3, 16, 16, dtype=F64))


def _logits_match(ref, ours, inputs, monkeypatch, tol):
    """Runs both models on ``inputs`` and checks the valid tokens' logits agree within
    ``tol``; returns (the valid tokens, the reference's logits, ours' attention calls)."""
    valid = inputs["attention_mask"].bool()
    seen = _spy(monkeypatch)
    with torch.no_grad():
        want = ref(**inputs).logits
        got = ours(**inputs).logits
    torch.testing.assert_close(got[valid], want[valid], atol=tol, rtol=tol)
    return valid, want, seen


@pytest.mark.parametrize("types", [True, False], ids=["prefix", "no-token-types"])
def test_paligemma_prefix_lm_matches_sdpa(types, monkeypatch):
    """PaliGemma's language model on pyssm: with token types the image and prompt prefix
    attends both ways (the suffix causally, the prefix both ways: a packed call each), without
    them plain causal attention, though its attention modules say is_causal=False. Logits of
    the valid tokens and, in training, every gradient equal sdpa's; the prefix control (plain
    causal) does not."""
    ref, ours = _paligemma_pair()
    inputs = _paligemma_inputs()
    if not types:
        del inputs["token_type_ids"]
    valid, want, seen = _logits_match(ref, ours, inputs, monkeypatch, 1e-10)
    assert [c for c, _, packed in seen] == ([True, False] * 2 if types else [True] * 2)
    if types:   # (the prefix changes the answer)
        with torch.no_grad():
            plain = ref(**{k: v for k, v in inputs.items() if k != "token_type_ids"}).logits
        assert (plain[valid] - want[valid]).abs().max() > 1e-3
    # (PaliGemma's labels: the suffix only, each predicted from a valid token)
    labels = inputs["input_ids"].clone()
    labels[:, :9] = -100
    for model in (ref, ours):
        model.train()
        model(**inputs, labels=labels).loss.backward()
    for (name, a), b in zip(ref.named_parameters(), ours.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, atol=1e-9, rtol=1e-8, msg=name)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_paligemma_generate_matches_sdpa(cache):
    """Cached greedy generation from a left-padded prefix batch gives sdpa's tokens (the
    prefill with its prefix block, each step causal over the cache), with a dynamic or a
    static cache (its slots not written yet marked in the block mask)."""
    ref, ours = _paligemma_pair()
    inputs = _paligemma_inputs()
    inputs["token_type_ids"][:, 9:] = 0         # a prompt only: the model writes the suffix
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation=cache)
    torch.testing.assert_close(ours.generate(**inputs, **kw), ref.generate(**inputs, **kw),
                               atol=0, rtol=0)


def test_paligemma2_sliding_layers(monkeypatch):
    """PaliGemma 2 (Gemma 2, sliding and global layers): the sliding layers' window is or'ed
    with the prefix outside it. With a window of 16 over a prefix of 7 or 9 tokens (the
    window over both computes the same) the logits and cached generation equal eager
    attention's (which takes the softmax in float32); with a window of 4 it raises."""
    ref, ours = _paligemma_pair(window=16)
    inputs = _paligemma_inputs()
    _, _, seen = _logits_match(ref, ours, inputs, monkeypatch, 1e-5)
    assert [w for _, w, _ in seen] == [(15, 0), (15, -1), (-1, -1), (-1, -1)]
    monkeypatch.undo()
    inputs["token_type_ids"][:, 9:] = 0
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(ours.generate(**inputs, **kw), ref.generate(**inputs, **kw),
                               atol=0, rtol=0)
    _, ours = _paligemma_pair(window=4)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="longer than the sliding"):
        ours(**inputs)


def test_gemma3_image_blocks_match_sdpa(monkeypatch):
    """Gemma 3 with two images in one row and one after left padding in the other: each
    image's 4 tokens attend both ways, in the global layer and in the sliding one, whose
    window (3) is shorter than an image (the window over both: the block call with window
    (2, -1)). Logits of the valid tokens, training gradients and cached greedy generation
    equal sdpa's; without the token types (plain causal) the logits differ."""
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig,
                              SiglipVisionConfig)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, image_size=16, patch_size=4)
    text = Gemma3TextConfig(vocab_size=99, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                            initializer_range=0.3, sliding_window=3,
                            layer_types=["sliding_attention", "full_attention"])
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          image_token_index=98, boi_token_index=96, eoi_token_index=97)
    torch.manual_seed(0)
    ref = Gemma3ForConditionalGeneration(copy.deepcopy(config)).to(F64).eval()
    ref.set_attn_implementation("sdpa")
    ours = Gemma3ForConditionalGeneration(copy.deepcopy(config)).to(F64).eval()
    ours.load_state_dict(ref.state_dict())
    ours.set_attn_implementation({"text_config": "pyssm", "vision_config": "sdpa"})

    torch.manual_seed(4)
    ids = torch.randint(3, 90, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    ids[0, 1:5] = ids[0, 8:12] = 98
    mask[1, :3] = 0
    ids[1, :3] = 0
    ids[1, 5:9] = 98
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=(ids == 98).long(),
                  pixel_values=torch.randn(3, 3, 16, 16, dtype=F64))
    valid = mask.bool()
    seen = _spy(monkeypatch)
    with torch.no_grad():
        want = ref(**inputs).logits
        got = ours(**inputs).logits
        plain = ref(**{k: v for k, v in inputs.items() if k != "token_type_ids"}).logits
    torch.testing.assert_close(got[valid], want[valid], atol=1e-10, rtol=1e-10)
    assert (plain[valid] - want[valid]).abs().max() > 1e-3
    assert seen == [(True, (2, 0), True), (False, (2, -1), True),
                    (True, (-1, -1), True), (False, (-1, -1), True)]
    monkeypatch.undo()

    labels = ids.masked_fill((ids == 98) | ~valid, -100)
    labels[1, 3] = -100                  # (predicted from a padding position)
    for model in (ref, ours):
        model.train()
        model(**inputs, labels=labels).loss.backward()
        model.eval()
    for (name, a), b in zip(ref.named_parameters(), ours.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, atol=1e-9, rtol=1e-8, msg=name)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(ours.generate(**inputs, **kw), ref.generate(**inputs, **kw),
                               atol=0, rtol=0)


@pytest.mark.parametrize("device,backend", backend_params("attention"))
def test_block_masks_on_each_backend(device, backend, monkeypatch):
    """The block path on each of pyssm's backends at a kernel head size (64; on a GPU the
    flash kernels in bf16, both calls: causal over 3 x 77 tokens, then the packed blocks),
    prefill and a 9-query chunk: valid outputs and gradients against the dense mask's
    attention in float64 from the same inputs."""
    from transformers import masking_utils as mu

    monkeypatch.setattr(pyssm_hf, "_backend", backend)
    dtype, tol = (torch.bfloat16, 3e-2) if device == "cuda" else (F64, 1e-10)
    torch.manual_seed(5)
    S, H, Hk, d = 77, 4, 2, 64
    ids = torch.full((3, S), -1)
    ids[0, 5:40] = 0
    ids[0, 50:70] = 1
    ids[1, :60] = 0                  # (PaliGemma: a prefix, left padding in its group)
    pad = torch.ones(3, S, dtype=torch.bool)
    pad[1, :7] = False
    pad[2, S - 10:] = False
    for Sq in (S, 9):
        fn = _mask_function("full", ids.to(device), None)
        sizes = dict(batch_size=3, q_length=Sq, kv_length=S, q_offset=S - Sq, kv_offset=0,
                     mask_function=fn, attention_mask=pad.to(device), device=device)
        mask = pyssm_hf.padding_mask(**sizes)
        dense = mu.sdpa_mask(**sizes, allow_is_causal_skip=False)[:, 0].cpu()
        q = torch.randn(3, H, Sq, d, device=device, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(3, Hk, S, d, device=device, dtype=dtype, requires_grad=True)
                for _ in "kv")
        module = torch.nn.Module()
        module.is_causal = True
        out, _ = pyssm_hf.attention_forward(module, q, k, v, mask, scaling=d ** -0.5)
        valid_q = pad[:, S - Sq:]
        weights = torch.randn(3, Sq, H, d, dtype=F64)
        got = torch.autograd.grad((out.cpu().double() * weights)[valid_q].sum(), (q, k, v))
        q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
        kr, vr = (t.repeat_interleave(H // Hk, 1) for t in (k64, v64))
        probs = (d ** -0.5 * q64 @ kr.transpose(-1, -2)).masked_fill(
            ~dense[:, None], float("-inf")).softmax(-1)
        want = (probs.nan_to_num() @ vr).transpose(1, 2)
        torch.testing.assert_close(out.cpu().double()[valid_q], want[valid_q], atol=tol,
                                   rtol=tol)
        wanted = torch.autograd.grad((want * weights)[valid_q].sum(), (q64, k64, v64))
        for name, g, r in zip("qkv", got, wanted):
            torch.testing.assert_close(g.cpu().double(), r, atol=10 * tol, rtol=10 * tol,
                                       msg=f"d{name} ({Sq} queries)")
