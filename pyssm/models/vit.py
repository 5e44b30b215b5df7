"""The plain Vision Transformer (Dosovitskiy et al., 2021) on ``pyssm.ops.attention``.

Numerically and in its state dict the model of timm's ``vit_*_patch16_224`` and
``vit_huge_patch14_224``: a conv patch embedding, a class token, learned absolute position
embeddings (class token included), pre-norm blocks (LayerNorm eps 1e-6, fused qkv with bias,
GELU MLP), a final LayerNorm and a linear head on the class token. timm state dicts load
unchanged through ``checkpoint_filter``, at any resolution:

    enc = create_encoder("vit_base_patch16", img_size=336, checkpoint="vit_b16_224.pth")
    visual = enc.tokens(images, tap=-2)      # (B, 441, 768): the patch tokens of block -2

Any input whose height and width are multiples of the patch size runs; when its grid differs
from the ``img_size`` grid, the stored position embeddings are resampled on the fly (bicubic
with antialiasing, the class token's kept apart). Attention runs on the backend chosen by
``backend=`` per call, else ``model.backend``, else pyssm's usual choice
(``pyssm.ops._backend``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pyssm.models.mlp import Mlp, add_mlp, norm_add_mlp
from pyssm.models.norms import LayerNorm, triton_backend
from pyssm.models.registry import register_encoder, strip_wrapper_prefixes
from pyssm.models.residual import carry_unsummed, run_unsummed, summed
from pyssm.models.vit_configs import GLOBAL_POOLS, VIT_CONFIGS, ViTConfig
from pyssm.ops import attention_qkvpacked
from pyssm.ops._backend import BACKENDS



def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: Sequence[int],
                       old_grid: Sequence[int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """(1, prefix + old_h * old_w, C) -> (1, prefix + new_h * new_w, C): the grid part
    resampled bicubically with antialiasing (as timm's resample_abs_pos_embed), the prefix
    (class token) part unchanged. Interpolates in float32 (float64 stays float64)."""
    new_grid, old_grid = tuple(new_grid), tuple(old_grid)
    if new_grid == old_grid:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    work = torch.float64 if grid.dtype == torch.float64 else torch.float32
    grid = grid.to(work).reshape(1, *old_grid, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)
    return torch.cat([prefix, grid.to(pos_embed.dtype)], dim=1)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> embed_dim by one strided convolution; (B, C, h, w) out."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Attention(nn.Module):
    """Multi-head self-attention on the fused projection as it comes, (B, N, 3, heads,
    head_dim): pyssm.ops.attention_qkvpacked reads q, k and v in place (nothing transposed or
    copied) and its backward writes one gradient of that shape."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        out = attention_qkvpacked(qkv, backend=backend)
        return self.proj(out.reshape(B, N, C))


class Block(nn.Module):
    """x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        dim = config.embed_dim
        self.norm1 = LayerNorm(dim, eps=config.norm_eps)
        self.attn = Attention(dim, config.num_heads, config.qkv_bias)
        self.norm2 = LayerNorm(dim, eps=config.norm_eps)
        self.mlp = Mlp(dim, config.mlp_hidden)

    def forward(self, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        nb = triton_backend(backend)
        branch = self.attn(self.norm1(x, for_matmul=True, backend=nb), backend=backend)
        out = norm_add_mlp(self.norm2, self.mlp, branch, x, backend=nb)  # all of it, one pass
        if out is not None:
            return out
        h, s = self.norm2.add(branch, x, for_matmul=True, backend=nb)  # the add and norm fused
        del branch  # (not held while the MLP's hidden layer is alive)
        return add_mlp(self.mlp, h, s, x, backend=nb)  # s + mlp(h); in place in inference

    def forward_unsummed(self, branch: torch.Tensor | None, s: torch.Tensor,
                         backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` on the stream ``s + branch`` given unsummed (``branch`` None: s alone),
        its output likewise: ``(mlp(norm2(x)), x)`` with x the sum after attention, whose sum
        is forward's output (``pyssm.models.residual``: norm1 makes the input's sum)."""
        nb = triton_backend(backend)
        if branch is None:
            x, h = s, self.norm1(s, for_matmul=True, backend=nb)
        else:
            h, x = self.norm1.add(branch, s, for_matmul=True, backend=nb)
        branch = self.attn(h, backend=backend)
        h, s = self.norm2.add(branch, x, for_matmul=True, backend=nb)
        del branch
        return self.mlp(h, backend=nb), s


class VisionTransformer(nn.Module):
    """A ViT of ``config`` whose position embeddings are stored for the ``img_size`` grid.

    ``backend`` (None, "auto", "cpu", "reference" or "cuda") is kept as ``model.backend`` and
    used by every attention call unless a forward method gets its own ``backend=``.
    """

    def __init__(self, config: ViTConfig, img_size: int | tuple[int, int] = 224,
                 backend: str | None = None):
        super().__init__()
        self.config = config
        self.patch_size = p = config.patch_size
        self.img_size = _pair(img_size)
        if any(s < p or s % p for s in self.img_size):
            raise ValueError(f"img_size {self.img_size} must be a multiple of the patch size {p}")
        self.grid_size = (self.img_size[0] // p, self.img_size[1] // p)
        self.num_prefix_tokens = 1
        self.embed_dim = self.num_features = self.head_hidden_size = config.embed_dim
        self.num_classes = config.num_classes
        self.global_pool = config.global_pool
        self.backend = backend

        dim = config.embed_dim
        self.patch_embed = PatchEmbed(p, config.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid_size[0] * self.grid_size[1],
                                                  dim))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = LayerNorm(dim, eps=config.norm_eps)
        self.head = nn.Linear(dim, self.num_classes) if self.num_classes > 0 else nn.Identity()
        self.init_weights()

    @property
    def backend(self) -> str | None:
        return self._backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        if value is not None and value != "auto" and value not in BACKENDS:
            raise ValueError(f"backend must be None, 'auto' or one of {BACKENDS}, got {value!r}")
        self._backend = value

    def init_weights(self) -> None:
        """Random initialisation for training from scratch (checkpoints overwrite it)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    # -- the trunk ---------------------------------------------------------------------------

    def _backend_for(self, backend: str | None) -> str | None:
        return backend if backend is not None else self._backend

    def _grid_of(self, x: torch.Tensor) -> tuple[int, int]:
        if x.dim() != 4 or x.shape[1] != self.config.in_chans:
            raise ValueError(f"expected images (batch, {self.config.in_chans}, height, width), "
                             f"got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        p = self.patch_size
        if H < p or W < p or H % p or W % p:
            raise ValueError(f"image size {H}x{W} must be a multiple of the patch size {p}")
        return H // p, W // p

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, in_chans, H, W) -> (B, 1 + h * w, C): class token and patches, plus
        the position embeddings (resampled from the img_size grid when h, w differ)."""
        grid = self._grid_of(x)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + resample_pos_embed(self.pos_embed, grid, self.grid_size,
                                      self.num_prefix_tokens)

    def forward_features(self, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        """Images -> (B, 1 + h * w, C) tokens after the final norm."""
        backend = self._backend_for(backend)
        x = self.embed(x)
        if carry_unsummed(self.blocks, x):  # (training: the last sum made by the final norm)
            branch, s = run_unsummed(self.blocks, x, backend=backend)
            return self.norm(s, residual=branch, backend=triton_backend(backend))
        for block in self.blocks:
            x = block(x, backend=backend)
        return self.norm(x, backend=triton_backend(backend))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """forward_features' tokens -> pooled features (pre_logits) or logits."""
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool:
            patches = x[:, self.num_prefix_tokens:]
            if self.global_pool == "avg":
                x = patches.mean(dim=1)
            elif self.global_pool == "max":
                x = patches.amax(dim=1)
            else:  # avgmax
                x = 0.5 * (patches.amax(dim=1) + patches.mean(dim=1))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, backend=backend))

    def _block_index(self, index: int) -> int:
        depth = len(self.blocks)
        if isinstance(index, bool) or not isinstance(index, int) or not -depth <= index < depth:
            raise ValueError(f"block index {index!r} is out of range for {depth} blocks "
                             f"(-{depth} to {depth - 1})")
        return index % depth

    def _take_indices(self, indices: int | Sequence[int] | None) -> list[int]:
        depth = len(self.blocks)
        if indices is None:
            return list(range(depth))
        if isinstance(indices, int) and not isinstance(indices, bool):
            if not 0 < indices <= depth:
                raise ValueError(f"last-n indices={indices} is out of range (1 to {depth})")
            return list(range(depth - indices, depth))
        return [self._block_index(i) for i in indices]

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False,
                              return_prefix_tokens: bool = False, stop_early: bool = False,
                              backend: str | None = None):
        """The outputs of the blocks in ``indices`` (None: all; an int n: the last n; a list:
        those blocks, negative from the end), with the final norm when ``norm``, class token
        dropped: (B, C, h, w) for "NCHW", (B, h * w, C) for "NLC"; with
        ``return_prefix_tokens`` each is (patches, class token (B, 1, C)).
        Returns (forward_features' output, intermediates), or the list alone when
        ``intermediates_only``. ``stop_early`` skips the blocks after the last one taken (the
        "final" output is then the norm of that block's output)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        backend = self._backend_for(backend)
        take = self._take_indices(indices)
        h, w = self._grid_of(x)
        x = self.embed(x)
        blocks = self.blocks[:max(take) + 1] if stop_early else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            x = block(x, backend=backend)
            if i in take:
                intermediates.append(self.norm(x, backend=triton_backend(backend)) if norm else x)
        prefixes = [y[:, :self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [y.reshape(y.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()
                             for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefixes))
        if intermediates_only:
            return intermediates
        return self.norm(x, backend=triton_backend(backend)), intermediates

    def tokens(self, images: torch.Tensor, tap: int | str = -1, include_cls: bool = False,
               backend: str | None = None) -> torch.Tensor:
        """Visual tokens for a VLM: (B, T, C) with T = h * w patches (+ 1 with include_cls,
        the class token first).

        ``tap`` is an index into ``blocks`` (negative from the end) and gives that block's
        output, the raw residual stream before the final norm: -1 is the last block, -2 the
        one before (LLaVA's ``vision_feature_layer=-2``). Blocks after the tap are not run.
        ``tap="final"`` gives forward_features' tokens: the last block after the final norm.
        """
        backend = self._backend_for(backend)
        if tap == "final":
            x = self.forward_features(images, backend=backend)
        else:
            stop = self._block_index(tap) if not isinstance(tap, str) else None
            if stop is None:
                raise ValueError(f"tap must be a block index or 'final', got {tap!r}")
            x, blocks = self.embed(images), self.blocks[:stop + 1]
            if carry_unsummed(blocks, x):
                x = summed(*run_unsummed(blocks, x, backend=backend))
            else:
                for block in blocks:
                    x = block(x, backend=backend)
        return x if include_cls else x[:, self.num_prefix_tokens:]

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new random head for ``num_classes`` (0: none, forward returns pooled features),
        and optionally a new pooling ("token", "avg", "max", "avgmax" or "" for none)."""
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS:
                raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got "
                                 f"{global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = self.norm.weight
        if num_classes > 0:
            head = nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
        else:
            head = nn.Identity()
        self.head = head.train(self.training)

    # -- checkpoints -------------------------------------------------------------------------

    def checkpoint_filter(self, state_dict: Mapping[str, torch.Tensor]) -> dict:
        """A timm ViT state dict mapped onto this model: "module." / "_orig_mod." prefixes
        stripped, pos_embed resampled from the checkpoint's (square) grid to the model's,
        the head dropped when the model has none. Anything else that does not fit (a missing
        or unknown key, another width, depth, patch size or number of classes) raises
        ValueError naming the key and the shapes."""
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"checkpoint must be a state dict (a mapping of names to tensors), "
                             f"got {type(state_dict).__name__}")
        expected = {k: v.shape for k, v in self.state_dict().items()}
        name = type(self).__name__
        out, unexpected = {}, []
        for key, value in state_dict.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a "
                                 f"tensor: not a state dict")
            k = strip_wrapper_prefixes(key)
            if self.num_classes == 0 and k.startswith("head."):
                continue
            if k not in expected:
                unexpected.append(key)
                continue
            if k == "pos_embed":
                value = self._fit_pos_embed(key, value)
            if value.shape != expected[k]:
                hint = ""
                if k == "patch_embed.proj.weight" and value.dim() == 4:
                    hint = (f" (a {value.shape[-2]}x{value.shape[-1]} patch checkpoint for a "
                            f"{self.patch_size}x{self.patch_size} patch model?)")
                elif k.startswith("head."):
                    hint = (f" (a {value.shape[0]}-class head; use num_classes="
                            f"{value.shape[0]}, or num_classes=0 to drop it)")
                raise ValueError(f"checkpoint entry {key!r} has shape {tuple(value.shape)}, "
                                 f"{name} expects {tuple(expected[k])}{hint}")
            out[k] = value
        missing = [k for k in expected if k not in out]
        if missing or unexpected:
            hint = ""
            if missing and all(k.startswith("head.") for k in missing):
                hint = " (a headless checkpoint, as timm's MAE ViT-H: use num_classes=0)"
            raise ValueError(f"checkpoint does not fit {name} (depth {len(self.blocks)}, width "
                             f"{self.embed_dim}): missing {len(missing)} keys {missing[:6]}, "
                             f"unexpected {len(unexpected)} keys {unexpected[:6]}{hint}")
        return out

    def _fit_pos_embed(self, key: str, value: torch.Tensor) -> torch.Tensor:
        want = self.pos_embed.shape
        if value.dim() != 3 or value.shape[0] != 1 or value.shape[2] != want[2] or \
                value.shape[1] <= self.num_prefix_tokens:
            raise ValueError(f"checkpoint entry {key!r} has shape {tuple(value.shape)}, "
                             f"{type(self).__name__} expects (1, 1 + patches, {want[2]}), "
                             f"{tuple(want)} at its grid {self.grid_size}")
        patches = value.shape[1] - self.num_prefix_tokens
        side = math.isqrt(patches)
        if side * side == patches:
            return resample_pos_embed(value, self.grid_size, (side, side),
                                      self.num_prefix_tokens)
        if value.shape == want:  # a non-square grid: taken to be the model's own
            return value
        raise ValueError(f"checkpoint entry {key!r} has shape {tuple(value.shape)}: "
                         f"{patches} patch positions are not a square grid, so it cannot be "
                         f"resampled to {tuple(want)} (grid {self.grid_size})")


def _build(name: str, img_size, overrides: dict) -> VisionTransformer:
    backend = overrides.pop("backend", None)
    return VisionTransformer(VIT_CONFIGS[name].replace(**overrides), img_size=img_size,
                             backend=backend)


@register_encoder
def vit_tiny_patch16(img_size=224, **overrides) -> VisionTransformer:
    """ViT-Ti/16 (timm vit_tiny_patch16_224): width 192, 12 blocks, 3 heads."""
    return _build("vit_tiny_patch16", img_size, overrides)


@register_encoder
def vit_small_patch16(img_size=224, **overrides) -> VisionTransformer:
    """ViT-S/16 (timm vit_small_patch16_224): width 384, 12 blocks, 6 heads."""
    return _build("vit_small_patch16", img_size, overrides)


@register_encoder
def vit_base_patch16(img_size=224, **overrides) -> VisionTransformer:
    """ViT-B/16 (timm vit_base_patch16_224): width 768, 12 blocks, 12 heads."""
    return _build("vit_base_patch16", img_size, overrides)


@register_encoder
def vit_large_patch16(img_size=224, **overrides) -> VisionTransformer:
    """ViT-L/16 (timm vit_large_patch16_224): width 1024, 24 blocks, 16 heads."""
    return _build("vit_large_patch16", img_size, overrides)


@register_encoder
def vit_huge_patch14(img_size=224, **overrides) -> VisionTransformer:
    """ViT-H/14 (timm vit_huge_patch14_224): width 1280, 32 blocks, 16 heads, 14 px patches."""
    return _build("vit_huge_patch14", img_size, overrides)
