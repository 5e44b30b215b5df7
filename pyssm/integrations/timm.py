"""pyssm's attention inside timm ViTs, by swapping modules (timm's code is left untouched):

    import timm
    from pyssm.integrations.timm import swap_attention
    model = timm.create_model("vit_base_patch16_224", pretrained=False)
    swap_attention(model)            # every timm Attention -> pyssm.integrations.timm.Attention

The new module takes over the old one's submodules (qkv, q_norm, k_norm, norm, gate, proj,
proj_drop) under the same names, so the state dict, checkpoints and the outputs stay the same;
it reads q, k, v straight out of the fused qkv projection in the flash layout (batch, tokens,
heads, head_dim), without the transposes timm makes for SDPA. Attention masks and attention
dropout while training are not supported and raise.
"""

from __future__ import annotations

import torch
from torch import nn

from pyssm.ops import attention


class Attention(nn.Module):
    """timm's ``timm.layers.Attention`` computed by ``pyssm.ops.attention``."""

    def __init__(self, timm_attention: nn.Module, backend: str | None = None):
        super().__init__()
        a = timm_attention
        self.num_heads, self.head_dim, self.scale = a.num_heads, a.head_dim, a.scale
        self.attn_dim = getattr(a, "attn_dim", a.num_heads * a.head_dim)
        self.qkv, self.q_norm, self.k_norm = a.qkv, a.q_norm, a.k_norm
        self.norm = getattr(a, "norm", nn.Identity())
        self.gate = getattr(a, "gate", None)
        self.proj, self.proj_drop = a.proj, a.proj_drop
        self.attn_drop_p = a.attn_drop.p
        self.backend = backend

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None:
            raise NotImplementedError("pyssm's timm Attention takes no attn_mask")
        if self.training and self.attn_drop_p > 0:
            raise NotImplementedError(f"pyssm's timm Attention has no attention dropout "
                                      f"(attn_drop={self.attn_drop_p}) in training")
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)  # over head_dim: the same in either layout
        x = attention(q, k, v, causal=is_causal, softmax_scale=self.scale, backend=self.backend)
        x = self.norm(x.reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def swap_attention(model: nn.Module, backend: str | None = None) -> int:
    """Replaces every ``timm.layers.Attention`` in ``model`` (in place) by pyssm's; returns how
    many it replaced. Other attention classes (RoPE, pooling) are left as they are."""
    from timm.layers import Attention as TimmAttention

    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is TimmAttention]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Attention(module, backend=backend))
    return len(targets)
