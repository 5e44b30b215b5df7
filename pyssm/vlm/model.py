"""VisionLanguageModel: a frozen pyssm encoder, a connector and any Hugging Face causal LM
(LLaVA / Prismatic style).

    vlm = VisionLanguageModel.from_config(VLMConfig(encoder="vmamba_tiny_s1l8"), lm, tokenizer)
    out = vlm(images, input_ids, attention_mask, labels)       # an HF CausalLMOutput
    answers = vlm.generate(images, ["what color is the circle ?"], max_new_tokens=8)
    vlm.save_pretrained("run/vlm");  vlm = VisionLanguageModel.from_pretrained("run/vlm")

The encoder is frozen: no gradients, always in eval mode, run under no_grad so it keeps no
activations. Its visual tokens (``encoder.tokens(images, tap)``) go through the connector and
are spliced into the LM's ``inputs_embeds`` (``pyssm.vlm.splice``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pyssm.models import create_encoder
from pyssm.vlm.connector import Standardize, build_connector, connector_dims
from pyssm.vlm.splice import IGNORE, STYLES, splice_image_embeds

CONFIG_NAME = "vlm_config.json"
LOSS_REDUCTIONS = ("mean", "sum", "sequence_sum")


@dataclass
class VLMConfig:
    encoder: str = "vmamba_tiny_s1l8"
    encoder_kwargs: dict = field(default_factory=dict)   # e.g. {"depths": [2, 2, 4, 2]}
    tap: int | str | None = None       # encoder.tokens(tap=...); None: the encoder's default
    image_size: int = 224
    letterbox: bool = True
    connector: str = "mlp2x_gelu"
    image_style: str = "prismatic"     # "prismatic" (after BOS) or "llava" (<image> token)
    image_token: str = "<image>"
    # how a question becomes the LM's prompt; "{image}" marks where the llava style's image
    # goes ("{prompt} {image}": after the question). None: "{image} {prompt}" (llava), or
    # the question as it is (prismatic, whose image always follows BOS)
    prompt_template: str | None = None
    # the connector standardises the tokens per channel (pyssm.vlm.connector.Standardize),
    # with statistics fit by fit_token_statistics before training
    standardize_tokens: bool = False


class VisionLanguageModel(nn.Module):
    def __init__(self, config: VLMConfig, encoder: nn.Module, connector: nn.Module,
                 lm: nn.Module, tokenizer):
        super().__init__()
        if config.image_style not in STYLES:
            raise ValueError(f"image_style must be one of {STYLES}, got {config.image_style!r}")
        self.config, self.encoder, self.connector, self.lm = config, encoder, connector, lm
        self.tokenizer = tokenizer
        lm_dim = lm.get_input_embeddings().embedding_dim
        vision_dim, out_dim = connector_dims(connector)
        if out_dim != lm_dim:
            raise ValueError(f"the connector outputs {out_dim} features but the LM's hidden "
                             f"size is {lm_dim}")
        self.image_token_id = None
        template = config.prompt_template
        if template is not None and (template.count("{prompt}") != 1 or template.count(
                "{image}") != (config.image_style == "llava")):
            raise ValueError(f"prompt_template must hold {{prompt}} once, and {{image}} once "
                             f"with the llava style (never with prismatic), got {template!r}")
        if config.image_style == "llava":
            ids = tokenizer.convert_tokens_to_ids(config.image_token)
            if ids is None or ids == tokenizer.unk_token_id:
                raise ValueError(f"the llava style needs {config.image_token!r} in the tokenizer")
            self.image_token_id = ids
        self.encoder.requires_grad_(False)
        self.encoder.eval()

    @classmethod
    def from_config(cls, config: VLMConfig, lm: nn.Module, tokenizer,
                    encoder: nn.Module | None = None, checkpoint=None) -> VisionLanguageModel:
        """Builds the encoder (``create_encoder(config.encoder, checkpoint=...)``) unless one is
        given, and a fresh connector from its token width to the LM's hidden size."""
        if encoder is None:
            encoder = create_encoder(config.encoder, img_size=config.image_size,
                                     checkpoint=checkpoint, **config.encoder_kwargs)
        vision_dim = _token_dim(encoder, config)
        lm_dim = lm.get_input_embeddings().embedding_dim
        connector = build_connector(config.connector, vision_dim, lm_dim,
                                    standardize=config.standardize_tokens)
        return cls(config, encoder, connector, lm, tokenizer)

    @torch.no_grad()
    def fit_token_statistics(self, tokens_or_images) -> None:
        """Fits the connector's per-channel standardisation (``standardize_tokens``) to the
        training data: precomputed tokens (N, T, C), or images whose tokens the encoder
        computes: one (B, 3, H, W) batch or an iterable of them."""
        first = self.connector[0] if len(self.connector) else None
        if not isinstance(first, Standardize):
            raise ValueError("this VLM's connector does not standardise its tokens "
                             "(VLMConfig.standardize_tokens is False)")
        if isinstance(tokens_or_images, torch.Tensor) and tokens_or_images.dim() == 3:
            tokens = tokens_or_images
        elif isinstance(tokens_or_images, torch.Tensor) and tokens_or_images.dim() != 4:
            raise ValueError(f"tokens_or_images must be tokens (N, T, C), images (B, 3, H, W) "
                             f"or an iterable of image batches, got a tensor of shape "
                             f"{tuple(tokens_or_images.shape)}")
        else:
            if isinstance(tokens_or_images, torch.Tensor):
                tokens_or_images = [tokens_or_images]
            device = next(self.encoder.parameters()).device
            tokens = torch.cat([_tokens(self.encoder, images.to(device), self.config.tap)
                                for images in tokens_or_images])
        first.fit(tokens)

    def train(self, mode: bool = True) -> VisionLanguageModel:
        super().train(mode)
        self.encoder.eval()  # frozen: dropout / stochastic depth stay off
        return self

    # ---- the forward path -------------------------------------------------------------------

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> connector output (B, T, lm_dim); the encoder runs under
        no_grad. (B, T, C) input is taken as the encoder's tokens, precomputed
        (pyssm.vlm.cache), and goes straight to the connector."""
        if images.dim() == 3:
            feats = images
        elif images.dim() != 4:
            raise ValueError(f"images must be (B, 3, H, W) images or (B, T, C) precomputed "
                             f"encoder tokens, got shape {tuple(images.shape)}")
        else:
            with torch.no_grad():
                feats = _tokens(self.encoder, images, self.config.tap)
        dtype = next(self.connector.parameters()).dtype
        return self.connector(feats.to(dtype))

    def build_inputs(self, images, input_ids, attention_mask, labels=None, padding_side=None):
        """inputs_embeds, attention_mask, labels with the images spliced in."""
        token_embeds = self.lm.get_input_embeddings()(input_ids)
        return splice_image_embeds(
            token_embeds, input_ids, attention_mask, self.encode_images(images),
            style=self.config.image_style, bos_token_id=self.tokenizer.bos_token_id,
            image_token_id=self.image_token_id, labels=labels,
            padding_side=padding_side or self.tokenizer.padding_side,
            max_length=getattr(self.lm.config, "max_position_embeddings", None))

    def forward(self, images, input_ids, attention_mask, labels=None, loss_reduction="mean"):
        """The LM's output on the spliced inputs. With labels, ``loss`` is the mean next-token
        cross-entropy over label tokens; with ``loss_reduction="sum"`` their sum, and with
        ``"sequence_sum"`` the sum over sequences of each sequence's mean (every sequence with
        label tokens counts once, however long its answer). The sums are for normalising by a
        count over several micro-batches or ranks."""
        embeds, mask, labels = self.build_inputs(images, input_ids, attention_mask, labels)
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got "
                             f"{loss_reduction!r}")
        out = self.lm(inputs_embeds=embeds, attention_mask=mask,
                      labels=labels if loss_reduction == "mean" else None)
        if labels is not None and loss_reduction != "mean":
            logits, target = out.logits[:, :-1].float(), labels[:, 1:]
            flat = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
            if loss_reduction == "sum":      # one fused sum: the token path's numerics as before
                out.loss = F.cross_entropy(*flat, ignore_index=IGNORE, reduction="sum")
            else:
                per_token = F.cross_entropy(*flat, ignore_index=IGNORE,
                                            reduction="none").view(target.shape)
                counts = (target != IGNORE).sum(1)
                out.loss = (per_token.sum(1)[counts > 0] / counts[counts > 0]).sum()
        return out

    def format_prompt(self, prompt: str) -> str:
        cfg = self.config
        if cfg.image_token in prompt:              # already placed by the caller
            return prompt
        template = cfg.prompt_template
        if template is None:
            template = "{image} {prompt}" if cfg.image_style == "llava" else "{prompt}"
        return template.format(prompt=prompt, image=cfg.image_token)

    @torch.no_grad()
    def generate(self, images: torch.Tensor, prompts: list[str], max_new_tokens: int = 32,
                 **generate_kwargs) -> list[str]:
        """Answers to ``prompts`` (one per image), with Hugging Face ``generate`` on the spliced
        ``inputs_embeds`` (greedy by default; pass do_sample=True etc. to sample)."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images for {len(prompts)} prompts")
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"  # generation continues at the right end
        try:
            batch = self.tokenizer([self.format_prompt(p) for p in prompts], padding=True,
                                   return_tensors="pt").to(images.device)
        finally:
            self.tokenizer.padding_side = side
        embeds, mask, _ = self.build_inputs(images, batch["input_ids"], batch["attention_mask"],
                                            padding_side="left")
        generate_kwargs.setdefault("do_sample", False)
        out = self.lm.generate(inputs_embeds=embeds, attention_mask=mask,
                               max_new_tokens=max_new_tokens,
                               pad_token_id=self.tokenizer.pad_token_id, **generate_kwargs)
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

    # ---- save / load ------------------------------------------------------------------------

    def save_pretrained(self, path: str | os.PathLike, state_dict: dict | None = None) -> None:
        """config JSON, encoder and connector as safetensors, the LM and tokenizer in their own
        Hugging Face format under lm/. Written to a temporary folder, then moved into place.
        ``state_dict`` (the whole VLM's) replaces the modules' own tensors: an FSDP-sharded
        model holds only its shards, gathered elsewhere (``Trainer.save_model``)."""
        from safetensors.torch import save_file

        state = self.state_dict() if state_dict is None else state_dict

        def part(prefix):
            return {k[len(prefix):]: v.contiguous() for k, v in state.items()
                    if k.startswith(prefix)}

        path = os.fspath(path)
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".vlm-", dir=parent)
        try:
            with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
                json.dump(dataclasses.asdict(self.config), f, indent=1)
            save_file(part("connector."), os.path.join(tmp, "connector.safetensors"))
            save_file(part("encoder."), os.path.join(tmp, "encoder.safetensors"))
            self.lm.save_pretrained(os.path.join(tmp, "lm"),
                                    state_dict=None if state_dict is None else part("lm."))
            self.tokenizer.save_pretrained(os.path.join(tmp, "lm"))
            old = None
            if os.path.exists(path):
                old = tempfile.mkdtemp(prefix=".vlm-old-", dir=parent)
                os.replace(path, os.path.join(old, "x"))
            os.replace(tmp, path)
            if old:
                shutil.rmtree(old)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **lm_kwargs) -> VisionLanguageModel:
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = os.fspath(path)
        with open(os.path.join(path, CONFIG_NAME)) as f:
            config = VLMConfig(**json.load(f))
        lm = AutoModelForCausalLM.from_pretrained(os.path.join(path, "lm"), **lm_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(path, "lm"))
        vlm = cls.from_config(config, lm, tokenizer,
                              checkpoint=load_file(os.path.join(path, "encoder.safetensors")))
        vlm.connector.load_state_dict(load_file(os.path.join(path, "connector.safetensors")))
        return vlm


def encoder_fingerprint(vlm: VisionLanguageModel) -> float:
    """A cheap checksum of the frozen encoder's weights, for files that depend on them but do
    not hold them (training checkpoints, token caches)."""
    with torch.no_grad():
        return float(sum((p.double().abs().sum() + p.double().sum()) * (i + 1)
                         for i, p in enumerate(vlm.encoder.parameters())))


def _tokens(encoder: nn.Module, images: torch.Tensor, tap) -> torch.Tensor:
    return encoder.tokens(images) if tap is None else encoder.tokens(images, tap=tap)


def _token_dim(encoder: nn.Module, config: VLMConfig) -> int:
    """The width of the encoder's visual tokens at ``config.tap`` (one tiny forward)."""
    size = 32 if "vmamba" in config.encoder else getattr(encoder, "patch_size", 16) * 2
    param = next(encoder.parameters())
    probe = torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype)
    with torch.no_grad():
        return _tokens(encoder.eval(), probe, config.tap).shape[-1]
