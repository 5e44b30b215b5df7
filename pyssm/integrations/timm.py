"""pyssm's attention and fused MLPs inside timm ViTs, by swapping modules (timm's code is left
untouched):

    import timm
    from pyssm.integrations.timm import swap_attention, swap_blocks, swap_mlp
    model = timm.create_model("vit_base_patch16_224", pretrained=False)
    swap_attention(model)            # every timm Attention -> pyssm.integrations.timm.Attention
    swap_mlp(model)                  # every timm Mlp -> pyssm.integrations.timm.Mlp
    # or the whole blocks, their norms and residual adds too (their attention and MLP swapped):
    swap_blocks(model)               # every timm ViT Block -> pyssm.integrations.timm.Block

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
convolutions it runs timm's layers as they are. Block is a pre-norm ViT block as pyssm's own
ViT computes it (``pyssm.models.vit.Block``): the first residual add and the second norm as one
``layer_norm`` pass, and in 16-bit inference fc2 and the second add as one pass
(``linear_residual_``), or, for blocks up to 256 channels wide (``FUSED_MLP_WIDTH``), the first
add, the norm, the whole MLP and the second add as one ``norm_mlp_residual`` pass, where their
Triton kernels run; LayerScale, drop path and an MLP that runs timm's layers stay timm's
modules, applied where timm applies them.
"""

from __future__ import annotations

import torch
from torch import nn

from pyssm.integrations.swap import shared_layer_norm, swap_modules
from pyssm.models.mlp import Mlp as _PyssmMlp
from pyssm.models.mlp import add_mlp, norm_add_mlp
from pyssm.models.norms import triton_backend
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


def _swappable_block(block: nn.Module) -> bool:
    """A timm ViT Block whose norms are LayerNorms over the channels (nn.LayerNorm or timm's)
    and whose attention is timm's Attention (or pyssm's already): what ``Block`` computes."""
    from timm.layers import Attention as TimmAttention
    from timm.layers import LayerNorm as TimmLayerNorm

    norms = all(type(n) in (nn.LayerNorm, TimmLayerNorm) and len(n.normalized_shape) == 1
                for n in (block.norm1, block.norm2))
    return norms and type(block.attn) in (TimmAttention, Attention)


class Block(nn.Module):
    """timm's ViT ``Block`` (``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)))``, each
    branch through its drop path) on pyssm's fused ops (module docstring). Its attention and
    MLP are swapped as by swap_attention and swap_mlp; the norms are pyssm's LayerNorm over the
    same parameters, so the state dict keeps its keys."""

    def __init__(self, timm_block: nn.Module, backend: str | None = None):
        super().__init__()
        b = timm_block
        self.norm1 = shared_layer_norm(b.norm1)
        self.attn = b.attn if isinstance(b.attn, Attention) else Attention(b.attn, backend)
        self.ls1, self.drop_path1 = b.ls1, b.drop_path1
        self.norm2 = shared_layer_norm(b.norm2)
        from timm.layers import Mlp as TimmMlp
        self.mlp = Mlp(b.mlp, backend) if type(b.mlp) is TimmMlp else b.mlp
        self.ls2, self.drop_path2 = b.ls2, b.drop_path2
        self.backend = backend

    def _fused_mlp(self) -> bool:
        """Whether the MLP branch may go to add_mlp / norm_add_mlp: pyssm's MLP with nothing
        of timm's to run (Mlp._layers) and no LayerScale after it."""
        return (isinstance(self.mlp, Mlp) and not self.mlp._layers()
                and isinstance(self.ls2, nn.Identity))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        nb = triton_backend(self.backend)
        h = self.norm1(x, for_matmul=True, backend=nb)
        branch = self.drop_path1(self.ls1(self.attn(h, attn_mask=attn_mask,
                                                    is_causal=is_causal)))
        del h
        fused = self._fused_mlp()
        if fused:   # the add, the norm, the MLP and the add in one pass
            out = norm_add_mlp(self.norm2, self.mlp, branch, x, drop_path=self.drop_path2,
                               backend=nb)
            if out is not None:
                return out
        h, s = self.norm2.add(branch, x, for_matmul=True, backend=nb)  # the add and norm fused
        del branch
        if fused:   # s + mlp(h), in place in inference
            return add_mlp(self.mlp, h, s, x, drop_path=self.drop_path2, backend=nb)
        return s + self.drop_path2(self.ls2(self.mlp(h)))


def swap_blocks(model: nn.Module, backend: str | None = None) -> int:
    """Replaces every ``timm.models.vision_transformer.Block`` in ``model`` whose norms are
    LayerNorms and whose attention is timm's Attention (in place) by pyssm's ``Block``; returns
    how many it replaced. Other blocks (other norms or attention classes, other block
    classes: ResPostBlock, ParallelScalingBlock, EVA's) are left as they are."""
    from timm.models.vision_transformer import Block as TimmBlock

    return swap_modules(model, (TimmBlock,), lambda m: Block(m, backend=backend),
                        when=_swappable_block)
