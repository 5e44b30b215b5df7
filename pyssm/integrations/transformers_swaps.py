"""Module swaps that put pyssm's ops into Hugging Face transformers models (re-exported by
pyssm.integrations.transformers, whose docstring covers the attention backend):

``swap_mlp(model)`` replaces every CLIPMLP, SiglipMLP, Siglip2MLP and the vision MLPs of
Idefics2, Idefics3 and SmolVLM (fc1, activation, fc2; MLP_CLASSES) by ``MLP``, the encoders' MLP
(``pyssm.models.mlp.Mlp``) over the same layers: the same state dict, and in 16-bit inference
fc1 and the activation as one ``linear_gelu`` pass, in 16-bit training the whole MLP as one
``mlp_gelu`` with its fused backward, where their Triton kernels run, for CLIP's quick GELU,
SigLIP's tanh GELU and the exact GELU (another activation: the layers).
``swap_layers(model)`` replaces every CLIPEncoderLayer, SiglipEncoderLayer,
Siglip2EncoderLayer and the Idefics2, Idefics3 and SmolVLM vision towers' encoder layers
(pre-norm: layer_norm1, self_attn, layer_norm2, mlp; LAYER_CLASSES) by ``EncoderLayer``,
which runs them as pyssm's ViT runs its blocks: its MLP swapped as by swap_mlp, its norms
pyssm's LayerNorm over the same parameters, the first residual add and the second norm as one
``layer_norm`` pass, and in 16-bit inference fc2 and the second add as one pass
(``linear_residual_``), or, for layers up to 256 channels wide, the first add, the norm, the
whole MLP and the second add as one ``norm_mlp_residual`` pass, where their Triton kernels run.
Its attention stays the model's (whichever ``attn_implementation``), and so do gradient
checkpointing and the state dict.

``swap_vision_attention(model)`` packs the vision towers' attention: transformers runs the
vision attention of Qwen2-VL and its lineage (Qwen2.5-VL, Qwen3-VL, Qwen3.5, the Omni models),
GLM-4V and its kin, ERNIE-4.5-VL, PaddleOCR-VL, VideoLLaMA3, Kimi-K2.5, MiniCPM-V, HunYuan-VL and
others (VISION_ATTENTION_CLASSES, 36 classes: RADIO's, and the Omni and ASR models' audio towers)
one image, window or clip at a time for every backend whose name lacks "flash". Each becomes a
``VisionAttention``: the model's own forward (projections, norms, rotation, the same state
dict), taking its packed branch into one pyssm call a layer (their cu_seqlens).
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from pyssm.integrations.padding import once_per_version as _once_per_version
from pyssm.integrations.swap import shared_layer_norm, swap_modules
from pyssm.models.mlp import Mlp as _PyssmMlp
from pyssm.models.mlp import add_mlp, norm_add_mlp
from pyssm.models.norms import triton_backend


# (transformers' module, class): the MLPs whose forward is fc2(activation_fn(fc1(x)))
MLP_CLASSES = (("clip", "CLIPMLP"), ("siglip", "SiglipMLP"), ("siglip2", "Siglip2MLP"),
               ("idefics2", "Idefics2VisionMLP"), ("idefics3", "Idefics3VisionMLP"),
               ("smolvlm", "SmolVLMVisionMLP"))


class MLP(_PyssmMlp):
    """transformers' MLP_CLASSES (CLIPMLP, SiglipMLP, ...) on pyssm's fused MLP ops (module
    docstring): their fc1, activation_fn and fc2 under the same names."""

    def __init__(self, hf_mlp: nn.Module, backend: str | None = None):
        nn.Module.__init__(self)
        self.config = getattr(hf_mlp, "config", None)
        self.activation_fn, self.fc1, self.fc2 = hf_mlp.activation_fn, hf_mlp.fc1, hf_mlp.fc2
        self.backend = backend

    @property
    def act(self) -> nn.Module:  # (the name pyssm's Mlp reads)
        return self.activation_fn


def swap_mlp(model: nn.Module, backend: str | None = None) -> int:
    """Replaces every MLP of MLP_CLASSES in ``model`` (in place) by ``MLP``;
    returns how many it replaced. ``backend``: the fused ops' ("triton", "reference"; None:
    their automatic choice, Triton on CUDA tensors once verified on a GPU)."""
    return swap_modules(model, _classes(MLP_CLASSES), lambda m: MLP(m, backend=backend))


# (transformers' module, class): the pre-norm encoder layers swap_layers takes
LAYER_CLASSES = (("clip", "CLIPEncoderLayer"), ("siglip", "SiglipEncoderLayer"),
                 ("siglip2", "Siglip2EncoderLayer"), ("idefics2", "Idefics2EncoderLayer"),
                 ("idefics3", "Idefics3EncoderLayer"), ("smolvlm", "SmolVLMEncoderLayer"))


def _classes(pairs) -> tuple[type, ...]:
    import importlib

    classes = []
    for module, name in pairs:
        try:
            classes.append(getattr(importlib.import_module(
                f"transformers.models.{module}.modeling_{module}"), name))
        except (ImportError, AttributeError):  # (an older transformers without the model)
            continue
    return tuple(classes)


class EncoderLayer(nn.Module):
    """transformers' LAYER_CLASSES (CLIPEncoderLayer, SiglipEncoderLayer, ...) on pyssm's
    fused ops (module docstring): ``s = x + self_attn(layer_norm1(x))``, then
    ``s + mlp(layer_norm2(s))``, under the same submodule names. swap_layers makes each layer
    an instance of a subclass of both this and the layer's own class (``encoder_layer``), so
    that transformers' isinstance checks hold (its hidden-state and attention recorders hook
    the layers by class) and its activation checkpointing wraps the forward."""

    def __init__(self, hf_layer: nn.Module, backend: str | None = None):
        nn.Module.__init__(self)   # (not the transformers class's: it would build new layers)
        self.embed_dim = hf_layer.embed_dim
        for name, child in hf_layer.named_children():   # (in its order: the state dict's)
            if name in ("layer_norm1", "layer_norm2"):
                child = shared_layer_norm(child)
            elif name == "mlp" and not isinstance(child, MLP):
                child = MLP(child, backend=backend)
            setattr(self, name, child)
        self.gradient_checkpointing = hf_layer.gradient_checkpointing
        if hasattr(hf_layer, "_gradient_checkpointing_func"):
            self._gradient_checkpointing_func = hf_layer._gradient_checkpointing_func
        self.backend = backend

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        x, nb = hidden_states, triton_backend(self.backend)
        h = self.layer_norm1(x, for_matmul=True, backend=nb)
        branch, _ = self.self_attn(hidden_states=h, attention_mask=attention_mask, **kwargs)
        del h
        out = norm_add_mlp(self.layer_norm2, self.mlp, branch, x, backend=nb)
        if out is not None:   # the add, the norm, the MLP and the add in one pass
            return out
        h, s = self.layer_norm2.add(branch, x, for_matmul=True, backend=nb)
        del branch
        return add_mlp(self.mlp, h, s, x, backend=nb)   # in place in inference


# (pyssm's class, transformers' class) -> their hybrid
_HYBRIDS: dict[tuple[type, type], type] = {}


def _hybrid_class(ours: type, cls: type) -> type:
    """The subclass of both ``ours`` and transformers' ``cls`` (``Pyssm<its name>``), made once
    per pair. Built at run time, it is not found by name in this module, so its instances
    pickle as (_unpickled, (ours, cls)) and their state: torch.save of a swapped model, and
    torch.load in a fresh process, work."""
    if (ours, cls) not in _HYBRIDS:
        _HYBRIDS[ours, cls] = type(f"Pyssm{cls.__name__}", (ours, cls),
                                   {"__module__": __name__, "__doc__": ours.__doc__,
                                    "__reduce_ex__": _reduce_hybrid})
    return _HYBRIDS[ours, cls]


def _reduce_hybrid(module: nn.Module, protocol: int):
    return _unpickled, type(module).__bases__, module.__dict__.copy()


def _unpickled(ours: type, cls: type) -> nn.Module:
    """An empty instance of the hybrid of ``ours`` and ``cls``, which pickle fills with its
    state (nn.Module.__setstate__)."""
    return object.__new__(_hybrid_class(ours, cls))


def _hybrid(ours: type, hf_module: nn.Module, backend: str | None) -> nn.Module:
    """``ours`` built over ``hf_module`` as an instance of a subclass of both
    (``_hybrid_class``), so that transformers' isinstance checks hold: its hidden-state and
    attention recorders hook modules by class, and its GradientCheckpointingLayer wraps the
    forward."""
    return _hybrid_class(ours, type(hf_module))(hf_module, backend=backend)


def encoder_layer(hf_layer: nn.Module, backend: str | None = None) -> EncoderLayer:
    """swap_layers' replacement for ``hf_layer``: an instance of ``EncoderLayer`` and of
    ``type(hf_layer)`` (``Pyssm<its class name>``) over its modules."""
    return _hybrid(EncoderLayer, hf_layer, backend)


def _swappable_layer(layer: nn.Module) -> bool:
    """LayerNorms over the channels, and an MLP swap_mlp takes (or has taken)."""
    norms = all(type(n) is nn.LayerNorm and len(n.normalized_shape) == 1
                for n in (layer.layer_norm1, layer.layer_norm2))
    return norms and (isinstance(layer.mlp, MLP) or type(layer.mlp) in _classes(MLP_CLASSES))


def swap_layers(model: nn.Module, backend: str | None = None) -> int:
    """Replaces every encoder layer of LAYER_CLASSES in ``model`` whose norms are LayerNorms
    (in place) by ``EncoderLayer``; returns how many it replaced. ``backend``: the fused ops'
    ("triton", "reference"; None: their automatic choice)."""
    return swap_modules(model, _classes(LAYER_CLASSES),
                        lambda m: encoder_layer(m, backend=backend), when=_swappable_layer)


# (transformers' module, class): the attentions of vision (and audio) towers that pack their
# images, windows or clips as cu_seqlens and, under any backend whose name lacks "flash", attend
# one at a time (transformers' is_flash_attention_requested picks the packed branch)
VISION_ATTENTION_CLASSES = (
    ("qwen2_vl", "VisionAttention"), ("qwen2_5_vl", "Qwen2_5_VLVisionAttention"),
    ("qwen3_vl", "Qwen3VLVisionAttention"), ("qwen3_vl_moe", "Qwen3VLMoeVisionAttention"),
    ("qwen3_5", "Qwen3_5VisionAttention"), ("qwen3_5_moe", "Qwen3_5MoeVisionAttention"),
    ("qwen4_exp", "Qwen4ExpVisionAttention"),
    ("qwen2_5_omni", "Qwen2_5OmniVisionAttention"), ("qwen2_5_omni", "Qwen2_5OmniAudioAttention"),
    ("qwen3_omni_moe", "Qwen3OmniMoeVisionAttention"),
    ("qwen3_omni_moe", "Qwen3OmniMoeAudioAttention"), ("qwen3_asr", "Qwen3ASRAudioAttention"),
    ("glm4v", "Glm4vVisionAttention"), ("glm4v_moe", "Glm4vMoeVisionAttention"),
    ("glm5_next", "Glm5NextVisionAttention"), ("glm_image", "GlmImageVisionAttention"),
    ("glm_ocr", "GlmOcrVisionAttention"), ("ernie4_5_vl_moe", "Ernie4_5_VLMoeVisionAttention"),
    ("paddleocr_vl", "PaddleOCRVisionAttention"), ("video_llama_3", "VideoLlama3VisionAttention"),
    ("kimi_k25", "Kimi_K25VisionAttention"), ("minicpm_ocr", "MiniCPMOcrVisionAttention"),
    ("minicpmv4_6", "MiniCPMV4_6VisionAttention"), ("minicpmv4_7", "MiniCPMV4_7VisionAttention"),
    ("minimax_m3_vl", "MiniMaxM3VLVisionAttention"), ("lfm3_vl", "Lfm3VlVisionAttention"),
    ("hunyuan_vl", "HunYuanVLVisionAttention"), ("hy_v4_vl", "HYV4VLVisionAttention"),
    ("exaone4_5", "Exaone4_5_VisionAttention"), ("cohere_compass", "CohereCompassVisionAttention"),
    ("dots3_note", "Dots3NoteVisionAttention"), ("inkling2", "Inkling2VisionAttention"),
    ("muse_glimmer", "MuseGlimmerVisionAttention"), ("muse_spark", "MuseSparkVisionAttention"),
    ("radio", "RadioAttention"), ("cosmos3_edge", "Cosmos3EdgeVisionAttention"))

# the name under which swapped vision attentions find pyssm's attention function: "flash" in it
# is what sends their forward down the packed branch (the name is swap_vision_attention's own,
# not one to pass as attn_implementation: transformers would look for a flash-attn kernel)
PACKED_NAME = "pyssm_flash_packed"


class _PackedConfig:
    """A swapped vision attention's config: the model's own (every attribute read and written
    there, so later changes show) but for the attention implementation, PACKED_NAME."""

    __slots__ = ("_config",)
    _attn_implementation = PACKED_NAME

    def __init__(self, config):
        object.__setattr__(self, "_config", config)

    def __getattr__(self, name):   # (only for names not found here: not _attn_implementation)
        return getattr(object.__getattribute__(self, "_config"), name)

    def __setattr__(self, name, value):
        setattr(self._config, name, value)

    def __getstate__(self):   # (copies and pickles: the model's config, copied with it)
        return self._config

    def __setstate__(self, config):
        object.__setattr__(self, "_config", config)

    def __repr__(self) -> str:
        return f"_PackedConfig({self._config!r})"


@_once_per_version
def _longest(cu_seqlens: torch.Tensor) -> int:
    """The longest sequence of packed offsets, read once per offsets tensor and version: the
    vision model hands one cu_seqlens to all its layers."""
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0


@functools.cache
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


class VisionAttention(nn.Module):
    """transformers' VISION_ATTENTION_CLASSES with every image, window or clip of a batch in one
    packed pyssm call a layer (``cu_seqlens`` as the model gives it), where transformers' own
    forward, for any backend whose name lacks "flash", splits them and attends one at a time.
    The forward is the model's own (its projections, norms and rotation; the same state dict):
    its config answers PACKED_NAME as the attention implementation (``_PackedConfig``), which
    takes the forward's packed branch to pyssm's attention function; the longest sequence is
    read once per cu_seqlens (``_longest``), not once a layer, where the forward takes max_seqlen
    (RADIO's does not: transformers reads it a layer)."""

    def __init__(self, hf_attention: nn.Module, backend: str | None = None):
        nn.Module.__init__(self)
        for key, value in vars(hf_attention).items():   # its modules, parameters, attributes
            object.__setattr__(self, key, dict(value) if type(value) is dict else value)
        config = hf_attention.config
        self.config = config if isinstance(config, _PackedConfig) else _PackedConfig(config)
        self.pyssm_backend = backend   # (pyssm's attention backend: None, register()'s)
        self.hf_class = type(hf_attention)   # (whose forward runs)

    def forward(self, *args, **kwargs):
        signature = _signature(self.hf_class)
        bound = signature.bind_partial(self, *args, **kwargs)   # (max_seqlen may be required)
        given = bound.arguments
        if "max_seqlen" in signature.parameters and given.get("max_seqlen") is None and \
                given.get("cu_seqlens") is not None:
            given["max_seqlen"] = _longest(given["cu_seqlens"])
        return self.hf_class.forward(*bound.args, **bound.kwargs)


def vision_attention(hf_attention: nn.Module, backend: str | None = None) -> VisionAttention:
    """swap_vision_attention's replacement for ``hf_attention``: an instance of
    ``VisionAttention`` and of ``type(hf_attention)`` (``Pyssm<its class name>``)."""
    return _hybrid(VisionAttention, hf_attention, backend)


def swap_vision_attention(model: nn.Module, backend: str | None = None) -> int:
    """Replaces every attention of VISION_ATTENTION_CLASSES in ``model`` (in place) by
    ``VisionAttention`` (one packed call a layer for all the images, windows or audio clips,
    whatever the model's attn_implementation); returns how many it replaced. ``backend``:
    pyssm's attention backend (None: register()'s, else chosen per call)."""
    from transformers import AttentionInterface

    from pyssm.integrations.transformers import attention_forward

    AttentionInterface.register(PACKED_NAME, attention_forward)
    return swap_modules(model, _classes(VISION_ATTENTION_CLASSES),
                        lambda m: vision_attention(m, backend=backend))
