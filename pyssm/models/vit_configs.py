"""ViT configurations: the shapes of the plain ViTs of "An Image is Worth 16x16 Words"
(Dosovitskiy et al., 2021) as timm's ``vit_*_patch16_224`` / ``vit_huge_patch14_224`` build
them. The model code is in ``pyssm/models/vit.py``; this file holds only numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

GLOBAL_POOLS = ("token", "avg", "max", "avgmax", "")


@dataclass(frozen=True)
class ViTConfig:
    """One ViT: a class token, learned absolute position embeddings (for the class token and
    each patch of the ``img_size`` grid), ``depth`` pre-norm blocks of multi-head attention
    (fused qkv with bias) and a GELU MLP, LayerNorm(eps=norm_eps), a final norm, and a linear
    head on the pooled features (``num_classes=0``: no head, the model returns features)."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    in_chans: int = 3
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    global_pool: str = "token"  # "token" (class token), "avg" / "max" / "avgmax" of patches, ""

    def __post_init__(self):
        for name in ("patch_size", "embed_dim", "depth", "num_heads", "in_chans"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ViTConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"ViTConfig.num_classes must be an int >= 0, got "
                             f"{self.num_classes!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"ViTConfig.embed_dim ({self.embed_dim}) must be a multiple of "
                             f"num_heads ({self.num_heads})")
        if not self.mlp_ratio > 0:
            raise ValueError(f"ViTConfig.mlp_ratio must be positive, got {self.mlp_ratio!r}")
        if self.global_pool not in GLOBAL_POOLS:
            raise ValueError(f"ViTConfig.global_pool must be one of {GLOBAL_POOLS}, got "
                             f"{self.global_pool!r}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    def replace(self, **overrides) -> ViTConfig:
        """A copy with ``overrides``; an unknown name raises ValueError listing the fields."""
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown ViTConfig field(s) {unknown}; fields: "
                             f"{', '.join(sorted(fields))}")
        return dataclasses.replace(self, **overrides)


VIT_CONFIGS: dict[str, ViTConfig] = {
    "vit_tiny_patch16": ViTConfig(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16": ViTConfig(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16": ViTConfig(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16": ViTConfig(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14": ViTConfig(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}
