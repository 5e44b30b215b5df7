"""swap_vision_attention on every class of VISION_ATTENTION_CLASSES (CPU, float64): each
attention built alone from its model's default vision (or audio) config, run on three packed
images of 5, 1 and 9 tokens, swapped (one pyssm call, packed) against transformers' own forward
under "sdpa" (one call an image): outputs and gradients equal. (HunYuan-VL's and HY-V4-VL's
own per-image branch raises in transformers 5.24, for sdpa and eager alike: their reference is
their packed branch on torch SDPA an image, PER_SEQUENCE.) The whole-model check (Qwen2.5-VL,
generation included) is in test_transformers_attention.py."""

import copy
import importlib
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

import pyssm.integrations.transformers as pyssm_hf  # noqa: E402
from pyssm import ops  # noqa: E402

LENGTHS = (5, 1, 9)
# classes whose per-image branch transformers 5.24 cannot run (no attention_mask passed)
BROKEN_PER_IMAGE = {"HunYuanVLVisionAttention", "HYV4VLVisionAttention"}
# a reference attention under a name with "flash" in it (the packed branch): torch SDPA an image
PER_SEQUENCE = "test_flash_sdpa_per_sequence"


def _sdpa_per_sequence(module, query, key, value, attention_mask=None, scaling=None,
                       cu_seq_lens_q=None, **kwargs):
    cu = cu_seq_lens_q.tolist()
    out = torch.cat([F.scaled_dot_product_attention(
        *(t[:, :, a:b] for t in (query, key, value)), scale=scaling, enable_gqa=True)
        for a, b in zip(cu, cu[1:])], dim=2)
    return out.transpose(1, 2), None


def _config_class(module: str, cls: type) -> type:
    """The config class ``cls`` is built from: its __init__'s annotation, else the one vision
    (audio) config class of the model's configuration module."""
    hint = inspect.signature(cls.__init__).parameters["config"].annotation
    if hint is not inspect.Parameter.empty:
        return getattr(inspect.getmodule(cls), hint) if isinstance(hint, str) else hint
    configs = importlib.import_module(f"transformers.models.{module}.configuration_{module}")
    audio = "Audio" in cls.__name__
    names = [n for n in dir(configs) if n.endswith("Config") and
             (("Audio" in n or ("Encoder" in n and "Vision" not in n)) if audio else "Vision" in n)]
    assert len(names) == 1, f"{cls.__name__}: which config of {names}?"
    return getattr(configs, names[0])


def _build(module: str, name: str) -> nn.Module:
    cls = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"),
                  name)
    config = _config_class(module, cls)()
    config._attn_implementation = PER_SEQUENCE if name in BROKEN_PER_IMAGE else "sdpa"
    extra = {"layer_idx": 0} if "layer_idx" in inspect.signature(cls.__init__).parameters else {}
    torch.manual_seed(0)
    return cls(config, **extra).double().eval()


def _inputs(attn: nn.Module) -> dict:
    """Keyword arguments its forward takes: hidden states of three images (5, 1 and 9 tokens)
    packed by cu_seqlens ((tokens, channels), or (1, tokens, channels) where the forward wants
    a batch), and whichever form of rotary position embeddings its forward accepts (random:
    the test compares two forwards on the same inputs)."""
    n = sum(LENGTHS)
    width = next(m for m in attn.modules() if isinstance(m, nn.Linear)).in_features
    params = inspect.signature(type(attn).forward).parameters
    torch.manual_seed(1)
    x = torch.randn(n, width, dtype=torch.float64)
    base = dict(cu_seqlens=torch.tensor([0, 5, 6, 15], dtype=torch.int32))
    if "max_seqlen" in params and params["max_seqlen"].default is inspect.Parameter.empty:
        # (MiniCPM-V's: required)
        base["max_seqlen"] = None
    d = attn.head_dim
    rotary = [None]
    if "position_embeddings" in params:
        rotary = [(torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)),
                  (torch.randn(n, d // 2, dtype=torch.float64),
                   torch.randn(n, d // 2, dtype=torch.float64)),
                  torch.randn(n, d // 2, dtype=torch.float64)]
    errors = []
    for hidden in (x, x[None]):
        for form in rotary:
            inputs = dict(base, hidden_states=hidden)
            if form is not None:
                inputs["position_embeddings"] = form
            try:
                with torch.no_grad():
                    attn(**inputs)
                return inputs
            except (RuntimeError, TypeError, ValueError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
    raise AssertionError(f"{type(attn).__name__} took none of the inputs tried: {errors}")


def _spy(monkeypatch) -> list:
    calls = []
    real = ops.attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("cu_seqlens") is not None, kwargs.get("max_seqlen")))
        return real(*args, **kwargs)

    monkeypatch.setattr(pyssm_hf, "attention", spy)
    return calls


@pytest.mark.parametrize("module, name", pyssm_hf.VISION_ATTENTION_CLASSES,
                         ids=[n for _, n in pyssm_hf.VISION_ATTENTION_CLASSES])
def test_swapped_attention_matches_transformers(module, name, monkeypatch):
    pytest.importorskip(f"transformers.models.{module}.modeling_{module}")
    transformers.AttentionInterface.register(PER_SEQUENCE, _sdpa_per_sequence)
    ref = _build(module, name)
    inputs = _inputs(ref)
    holder = nn.ModuleDict({"attn": copy.deepcopy(ref)})
    assert pyssm_hf.swap_vision_attention(holder, backend="cpu") == 1
    ours = holder["attn"]
    assert isinstance(ours, (pyssm_hf.VisionAttention, type(ref)))
    assert ours.state_dict().keys() == ref.state_dict().keys()
    assert ours.config._attn_implementation == pyssm_hf.PACKED_NAME
    assert ref.config._attn_implementation in ("sdpa", PER_SEQUENCE)   # (left as it was)

    x = inputs["hidden_states"]
    calls = _spy(monkeypatch)
    got_x, want_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = ours(**dict(inputs, hidden_states=got_x))
    assert calls == [(True, max(LENGTHS))]   # one packed call, given its longest
    want = ref(**dict(inputs, hidden_states=want_x))
    assert len(calls) == 1                   # (sdpa's own: not pyssm's)
    got = got[0] if isinstance(got, tuple) else got
    want = want[0] if isinstance(want, tuple) else want
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)

    torch.manual_seed(2)
    w = torch.randn_like(want)
    params = [p for p in ours.parameters()]
    g_ours = torch.autograd.grad((got * w).sum(), [got_x, *params])
    g_ref = torch.autograd.grad((want * w).sum(), [want_x, *ref.parameters()])
    for (pname, _), g, r in zip([("hidden_states", None), *ours.named_parameters()], g_ours,
                                g_ref):
        torch.testing.assert_close(g, r, atol=1e-9, rtol=1e-8, msg=pname)


def test_swap_keeps_the_config_live_and_copies():
    """The swapped module's config reads and writes the model's (a later change shows), but for
    the attention implementation; a deep copy of the swapped model runs alike; max_seqlen given
    by the caller is passed on; a second swap finds nothing to replace."""
    ref = _build("qwen2_vl", "VisionAttention")
    inputs = _inputs(ref)
    holder = nn.ModuleDict({"attn": copy.deepcopy(ref)})
    assert pyssm_hf.swap_vision_attention(holder) == 1
    assert pyssm_hf.swap_vision_attention(holder) == 0
    ours = holder["attn"]
    config = ours.config
    assert config.num_heads == ref.config.num_heads
    config.some_new_setting = 3
    assert config._config.some_new_setting == 3 and config.some_new_setting == 3
    config._config._attn_implementation = "eager"
    assert config._attn_implementation == pyssm_hf.PACKED_NAME
    with torch.no_grad():
        want = ref(**inputs)
        torch.testing.assert_close(ours(**inputs), want, atol=1e-10, rtol=1e-10)
        twin = copy.deepcopy(holder)["attn"]
        assert type(twin) is type(ours) and twin.config._config is not config._config
        torch.testing.assert_close(twin(**inputs), want, atol=1e-10, rtol=1e-10)
        # max_seqlen as the caller gives it (here, larger than needed: still valid)
        torch.testing.assert_close(ours(**inputs, max_seqlen=40), want, atol=1e-10, rtol=1e-10)


def test_a_swapped_attention_pickles(monkeypatch, tmp_path):
    """torch.save and torch.load (no hybrid class made yet, as in a fresh process) of a swapped
    attention: the same class, its config still the packed view, the same outputs."""
    from pyssm.integrations import transformers_swaps

    ref = _build("qwen2_vl", "VisionAttention")
    inputs = _inputs(ref)
    holder = nn.ModuleDict({"attn": copy.deepcopy(ref)})
    pyssm_hf.swap_vision_attention(holder)
    torch.save(holder, tmp_path / "attn.pt")
    monkeypatch.setattr(transformers_swaps, "_HYBRIDS", {})
    back = torch.load(tmp_path / "attn.pt", weights_only=False)["attn"]
    assert type(back).__name__ == "PyssmVisionAttention"
    assert back.config._attn_implementation == pyssm_hf.PACKED_NAME
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs), ref(**inputs), atol=1e-10, rtol=1e-10)
