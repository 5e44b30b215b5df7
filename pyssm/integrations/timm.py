"""pyssm's attention and fused MLPs inside timm ViTs, by swapping modules (timm's code is left
untouched):

    import timm
    from pyssm.integrations.timm import swap_attention, swap_mlp
    model = timm.create_model("vit_base_patch16_224", pretrained=False)
    swap_attention(model)            # every timm Attention -> pyssm.integrations.timm.Attention
    swap_mlp(model)                  # every timm Mlp -> pyssm.integrations.timm.Mlp

The new modules take over the old ones' submodules under the same names (Attention: qkv, q_norm,
k_norm, norm, gate, proj, proj_drop; Mlp: fc1, act, drop1, norm, fc2, drop2), so the state dict,
checkpoints and the outputs stay the same. Attention reads q, k, v straight out of the fused qkv
projection in the flash layout (batch, tokens, heads, head_dim), without the transposes timm
makes for SDPA (with no q / k norm, as ``attention_qkvpacked``: the kernels read them in place
and the backward writes one gradient for the projection); attention masks and attention dropout
while training are not supported and raise. Mlp runs as the encoders' MLP
(``pyssm.models.mlp.Mlp``): in 16-bit inference fc1 and the GELU as one ``linear_gelu`` pass, in
16-bit training the whole MLP as one ``mlp_gelu`` with its fused backward, where their Triton
kernels run, for the exact GELU, its tanh form (SigLIP's) and the quick GELU (OpenAI CLIP's);
with dropout active in training, a norm between the layers, another activation or 1 x 1
convolutions it runs timm's layers as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from pyssm.integrations.swap import swap_modules
from pyssm.models.mlp import Mlp as _PyssmMlp
from pyssm.ops import attention, attention_qkvpacked


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
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        if isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity):
            # q, k and v read in place, one gradient of qkv's shape
            x = attention_qkvpacked(qkv, causal=is_causal, softmax_scale=self.scale,
                                    backend=self.backend)
        else:
            q, k, v = qkv.unbind(2)
            q, k = self.q_norm(q), self.k_norm(k)  # over head_dim: the same in either layout
            x = attention(q, k, v, causal=is_causal, softmax_scale=self.scale,
                          backend=self.backend)
        x = self.norm(x.reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def swap_attention(model: nn.Module, backend: str | None = None) -> int:
    """Replaces every ``timm.layers.Attention`` in ``model`` (in place) by pyssm's; returns how
    many it replaced. Other attention classes (RoPE, pooling) are left as they are."""
    from timm.layers import Attention as TimmAttention

    return swap_modules(model, (TimmAttention,), lambda m: Attention(m, backend=backend))


class Mlp(_PyssmMlp):
    """timm's ``timm.layers.Mlp`` on pyssm's fused MLP ops (module docstring)."""

    def __init__(self, timm_mlp: nn.Module, backend: str | None = None):
        nn.Module.__init__(self)
        m = timm_mlp
        self.fc1, self.act, self.drop1, self.norm = m.fc1, m.act, m.drop1, m.norm
        self.fc2, self.drop2 = m.fc2, m.drop2
        self.backend = backend

    def _layers(self) -> bool:
        """Whether timm's layers must run as they are (nothing fused stands in for them)."""
        dropping = self.training and (self.drop1.p > 0 or self.drop2.p > 0)
        return (dropping or type(self.norm) is not nn.Identity
                or type(self.fc1) is not nn.Linear or type(self.fc2) is not nn.Linear)

    def forward(self, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        if self._layers():
            return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))
        return super().forward(x, backend)


def swap_mlp(model: nn.Module, backend: str | None = None) -> int:
    """Replaces every ``timm.layers.Mlp`` in ``model`` (in place) by pyssm's; returns how many
    it replaced. Other MLP classes (GluMlp, SwiGLU) are left as they are."""
    from timm.layers import Mlp as TimmMlp

    return swap_modules(model, (TimmMlp,), lambda m: Mlp(m, backend=backend))
