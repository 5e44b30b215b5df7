"""pyssm's attention and fused MLPs inside timm ViTs, by swapping modules (timm's code is left
untouched):

    import timm
    from pyssm.integrations.timm import swap_attention, swap_blocks, swap_mlp
    model = timm.create_model("vit_base_patch16_224", pretrained=False)
    swap_attention(model)            # every timm Attention -> pyssm.integrations.timm.Attention
                                     # (EvaAttention, AttentionRope -> RopeAttention)
    swap_mlp(model)                  # every timm Mlp -> pyssm.integrations.timm.Mlp
    # or the whole blocks, their norms and residual adds too (their attention and MLP swapped):
    swap_blocks(model)               # every timm ViT Block -> pyssm.integrations.timm.Block

The new modules take over the old ones' submodules under the same names (Attention: qkv, q_norm,
k_norm, norm, gate, proj, proj_drop; Mlp: fc1, act, drop1, norm, fc2, drop2), so the state dict,
checkpoints and the outputs stay the same. Attention reads q, k, v straight out of the fused qkv
projection in the flash layout (batch, tokens, heads, head_dim), without the transposes timm
makes for SDPA (with no q / k norm, as ``attention_qkvpacked``: the kernels read them in place
and the backward writes one gradient for the projection). Padding masks, as timm's NaFlex ViTs
make them (``create_attention_mask`` from patch_valid: symmetric or key-only, boolean or
additive), are read once a forward (``pyssm.integrations.padding.key_padding``): each row's
valid keys, when they are one run, are read in place (``seqused_k`` / ``leftpad_k``), else
packed (``cu_seqlens_k``); every valid token gets timm's value, a padding token a finite one
nothing valid reads. Other masks (causal, per head, additive biases) and attention dropout
while training are not supported and raise. RopeAttention does the same for the rotary-embedding
attention of timm's ``Eva`` models (EVA and EVA-02's EvaAttention, and AttentionRope: Perception
Encoder, timm's RoPE ViTs): their projections (one fused qkv with EVA's q / v biases, or three),
q / k norms, the rotation of the tokens after the prefix by timm's own ``apply_rot_embed_cat``
(every sin / cos table shape timm hands over: shared, per head, per image after patch dropout),
then the kernels on q, k and v in the flash layout. Head sizes the flash kernels lack (EVA-CLIP
giant's 88) run on the composed path. Mlp runs as the encoders' MLP
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
import torch.nn.functional as F
from torch import nn

from pyssm.integrations.padding import key_padding, rows_for
from pyssm.integrations.swap import shared_layer_norm, swap_modules
from pyssm.models.mlp import Mlp as _PyssmMlp
from pyssm.models.mlp import add_mlp, norm_add_mlp
from pyssm.models.norms import triton_backend
from pyssm.ops import attention, attention_qkvpacked
from pyssm.ops.attention import trust_leftpad, trust_seqused


class Attention(nn.Module):
    """timm's ``timm.layers.Attention`` computed by ``pyssm.ops.attention``."""

    def __init__(self, timm_attention: nn.Module, backend: str | None = None):
        super().__init__()
        a = timm_attention
        self.num_heads, self.head_dim, self.scale = a.num_heads, a.head_dim, a.scale
        self.attn_dim = getattr(a, "attn_dim", a.num_heads * a.head_dim)
        self.qkv, self.q_norm, self.k_norm = a.qkv, a.q_norm, a.k_norm
        self._take_output_layers(a)
        self.backend = backend

    def _take_output_layers(self, a: nn.Module) -> None:
        """What follows the attention in timm's module: output norm, gate, projection."""
        self.norm = getattr(a, "norm", nn.Identity())
        self.gate = getattr(a, "gate", None)
        self.proj, self.proj_drop = a.proj, a.proj_drop
        self.attn_drop_p = a.attn_drop.p

    def _check(self, attn_mask: torch.Tensor | None, is_causal: bool) -> None:
        name = type(self).__name__
        if attn_mask is not None and is_causal:
            raise ValueError(f"pyssm's timm {name}: attn_mask and is_causal together (torch's "
                             f"SDPA refuses them too)")
        if self.training and self.attn_drop_p > 0:
            raise NotImplementedError(f"pyssm's timm {name} has no attention dropout "
                                      f"(attn_drop={self.attn_drop_p}) in training")

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                qkv: torch.Tensor | None, is_causal: bool,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of q, k, v (batch, tokens, heads, head_dim); from ``qkv`` (batch, tokens,
        3, heads, head_dim) in place when q, k and v are still its views; under a padding
        ``attn_mask`` (padding.key_padding) each query sees its row's valid keys."""
        call = dict(softmax_scale=self.scale, backend=self.backend)
        if attn_mask is not None:
            return self._attend_padded(q, k, v, attn_mask, call)
        if qkv is not None:   # q, k and v read in place, one gradient of qkv's shape
            return attention_qkvpacked(qkv, causal=is_causal, **call)
        return attention(q, k, v, causal=is_causal, **call)

    @staticmethod
    def _attend_padded(q, k, v, attn_mask, call):
        B, N = q.shape[:2]
        shape = tuple(attn_mask.shape)
        if shape[-1] != N or (len(shape) >= 2 and shape[-2] not in (1, N)) or \
                (len(shape) == 4 and shape[0] not in (1, B)):
            raise ValueError(f"attn_mask must be (batch, 1, queries, keys) for {B} rows of {N} "
                             f"tokens (queries {N} or 1, batch {B} or 1), got {shape}")
        pad = rows_for(key_padding(attn_mask), B)   # (read once a mask and batch size)
        if pad["all_valid"]:
            return attention(q, k, v, **call)
        if pad["lead"] is not None:   # each row's valid keys one run, read in place
            end, lead = pad["end"], pad["lead"]
            trust_seqused(end, N)
            trust_leftpad(lead, end, N)
            return attention(q, k, v, seqused_k=end, leftpad_k=lead, **call)
        # holes: every row's N queries against its valid keys, packed with offsets of their own
        idx = pad["keys"]
        kp, vp = (t.reshape(B * N, *t.shape[2:]).index_select(0, idx) for t in (k, v))
        out = attention(q.reshape(B * N, *q.shape[2:]), kp, vp, cu_seqlens=pad["cu_seqlens"],
                        max_seqlen=N, cu_seqlens_k=pad["cu_seqlens_k"],
                        max_seqlen_k=pad["longest_k"], **call)
        return out.view(q.shape)

    def _output(self, x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        B, N = x.shape[:2]
        x = self.norm(x.reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        self._check(attn_mask, is_causal)
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)
        if not (isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity)):
            q, k, qkv = self.q_norm(q), self.k_norm(k), None  # over head_dim: either layout
        return self._output(self._attend(q, k, v, qkv, is_causal, attn_mask), gate)


def rotate(t: torch.Tensor, rope: torch.Tensor, num_prefix_tokens: int,
           rotate_half: bool) -> torch.Tensor:
    """timm's rotary embedding (``apply_rot_embed_cat``) of t (batch, tokens, heads, head_dim)
    past its first ``num_prefix_tokens`` tokens. ``rope`` is timm's sin / cos table as timm's
    attention modules take it, in their (batch, heads, tokens, head_dim) layout: (tokens,
    2 head_dim), (heads, tokens, 2 head_dim) per-head (mixed) frequencies, or either with a
    leading batch dim after patch dropout."""
    from timm.layers import apply_rot_embed_cat

    if not 2 <= rope.dim() <= 4 or rope.shape[-1] != 2 * t.shape[-1]:
        raise ValueError(f"rope must be (tokens, 2 * head_dim) = (tokens, {2 * t.shape[-1]}), "
                         f"optionally with leading (batch, heads) dims, got {tuple(rope.shape)}")
    r = rope.reshape((1,) * (4 - rope.dim()) + tuple(rope.shape)).transpose(1, 2)
    rotated = apply_rot_embed_cat(t[:, num_prefix_tokens:], r, half=rotate_half)
    return torch.cat([t[:, :num_prefix_tokens], rotated], dim=1)


class RopeAttention(Attention):
    """timm's rotary-embedding attention, ``timm.models.eva.EvaAttention`` (EVA, EVA-02,
    EVA-CLIP) and ``timm.layers.AttentionRope`` (Perception Encoder, timm's RoPE ViTs),
    computed by ``pyssm.ops.attention`` in the flash layout: the projections (fused with EVA's
    q / v biases and zero k bias, or three), q / k norms, the rotation past the prefix tokens
    (timm's own function) and the output layers as timm's module computes them."""

    def __init__(self, timm_attention: nn.Module, backend: str | None = None):
        nn.Module.__init__(self)
        a = timm_attention
        self.num_heads, self.head_dim, self.scale = a.num_heads, a.head_dim, a.scale
        self.attn_dim = a.num_heads * a.head_dim
        self.num_prefix_tokens, self.rotate_half = a.num_prefix_tokens, a.rotate_half
        self.qkv_bias_separate = getattr(a, "qkv_bias_separate", False)
        # registered in timm's order, so the state dict lists its keys in timm's order
        self.qkv = a.qkv
        self.q_bias = getattr(a, "q_bias", None)
        k_bias = getattr(a, "k_bias", None)   # (EVA's: a zero buffer, not in the state dict)
        if k_bias is not None:
            self.register_buffer("k_bias", k_bias, persistent=False)
        else:
            self.k_bias = None
        self.v_bias = getattr(a, "v_bias", None)
        self.q_proj, self.k_proj, self.v_proj = a.q_proj, a.k_proj, a.v_proj
        self.q_norm, self.k_norm = a.q_norm, a.k_norm
        self._take_output_layers(a)
        self.backend = backend

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_bias is None:
            return self.qkv(x)
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        if self.qkv_bias_separate:
            out = self.qkv(x)
            out += bias
            return out
        return F.linear(x, self.qkv.weight, bias)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        self._check(attn_mask, is_causal)
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        shape = (B, N, self.num_heads, self.head_dim)
        if self.qkv is not None:
            qkv = self._qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
            q, k, v = qkv.unbind(2)
        else:
            qkv = None
            q, k, v = (p(x).reshape(shape) for p in (self.q_proj, self.k_proj, self.v_proj))
        if not (isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity)):
            q, k, qkv = self.q_norm(q), self.k_norm(k), None
        if rope is not None:
            npt, half = self.num_prefix_tokens, self.rotate_half
            q = rotate(q, rope, npt, half).type_as(v)
            k = rotate(k, rope, npt, half).type_as(v)
            qkv = None
        return self._output(self._attend(q, k, v, qkv, is_causal, attn_mask), gate)


def swap_attention(model: nn.Module, backend: str | None = None) -> int:
    """Replaces every ``timm.layers.Attention`` in ``model`` (in place) by pyssm's
    ``Attention``, and every ``timm.models.eva.EvaAttention`` and ``timm.layers.AttentionRope``
    by pyssm's ``RopeAttention``; returns how many it replaced. Other attention classes
    (pooling, 2D) are left as they are."""
    from timm.layers import Attention as TimmAttention
    from timm.layers import AttentionRope
    from timm.models.eva import EvaAttention

    def make(m: nn.Module) -> nn.Module:
        cls = Attention if type(m) is TimmAttention else RopeAttention
        return cls(m, backend=backend)

    return swap_modules(model, (TimmAttention, EvaAttention, AttentionRope), make)


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
