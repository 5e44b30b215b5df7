"""VMamba encoders (v2 and vanilla) on pyssm's ``ss2d`` op, with the official module layout so
official checkpoints load unchanged (configs in vmamba_configs.py).

    stem (patch_embed) -> 4 stages (layers.i.blocks, then layers.i.downsample) -> classifier
    VSSBlock:  x = x + SS2D(norm(x));  x = x + MLP(norm2(x))      (no MLP in vanilla models)
    SS2D:      in_proj -> [z gate] -> depthwise conv -> SiLU -> ss2d core -> out_norm
               -> [* SiLU(z)] -> out_proj
    (the norms are pyssm.models.norms' fused LayerNorms, the convolution and SiLU one
    pyssm.ops.depthwise_conv2d; both Triton on a GPU, torch's ops on the CPU)

Layouts: channel-first (B, C, H, W) with LayerNorm2d for "ln2d" configs, channel-last
(B, H, W, C) for "ln"; the weights are the same either way. Any input size works (the stem and
downsampling convs round odd sizes up, as the official code does).
"""

from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from collections.abc import Container

import torch
import torch.nn.functional as F
from torch import nn

from pyssm.models.mlp import GELU, Mlp, add_mlp, hooked, norm_add_mlp, records
from pyssm.models.norms import LayerNorm, LayerNorm2d, matmul_dtype, triton_backend
from pyssm.models.registry import register_encoder, strip_wrapper_prefixes
from pyssm.models.residual import carry_unsummed, run_unsummed, summed
from pyssm.models.vmamba_configs import CONFIGS, VMambaConfig
from pyssm.ops import ss2d
from pyssm.ops.depthwise_conv2d import MAX_KERNEL, depthwise_conv2d, uses_triton
from pyssm.ops.layer_norm_linear import layer_norm_linear
from pyssm.ops.layer_norm_linear import uses_triton as layer_norm_linear_uses_triton


class Linear2d(nn.Linear):
    """A Linear applied to the channels of a (B, C, H, W) tensor (weight (out, in))."""

    channels_dim = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)


class Permute(nn.Module):
    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


class DropPath(nn.Module):
    """Stochastic depth on the residual branch (training only)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


def _norm(cfg: VMambaConfig, dim: int) -> nn.Module:
    return (LayerNorm2d if cfg.channel_first else LayerNorm)(dim, eps=cfg.norm_eps)


def _to_cf(cfg: VMambaConfig) -> nn.Module:  # channel-last -> channel-first, when needed
    return nn.Identity() if cfg.channel_first else Permute(0, 3, 1, 2)


def _to_cl(cfg: VMambaConfig) -> nn.Module:  # channel-first -> channel-last, when needed
    return nn.Identity() if cfg.channel_first else Permute(0, 2, 3, 1)


class SS2D(nn.Module):
    """The SS2D mixer of one block; its core is ``pyssm.ops.ss2d``."""

    def __init__(self, cfg: VMambaConfig, d_model: int, d_inner: int, rank: int):
        super().__init__()
        self.channel_first, self.with_z = cfg.channel_first, cfg.with_z
        self.backend: str | None = None       # the ss2d core's
        self.conv_backend: str | None = None  # depthwise_conv2d's (None: automatic)
        Lin = Linear2d if cfg.channel_first else nn.Linear
        N = cfg.d_state
        self.in_proj = Lin(d_model, d_inner * (2 if self.with_z else 1), bias=False)
        self.act = nn.SiLU()
        self.conv2d = (nn.Conv2d(d_inner, d_inner, cfg.ssm_conv, padding=(cfg.ssm_conv - 1) // 2,
                                 groups=d_inner, bias=cfg.ssm_conv_bias)
                       if cfg.ssm_conv > 1 else nn.Identity())
        self.x_proj_weight = nn.Parameter(torch.empty(4, rank + 2 * N, d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(4, d_inner, rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(4, d_inner))
        self.A_logs = nn.Parameter(torch.empty(4 * d_inner, N))
        self.Ds = nn.Parameter(torch.empty(4 * d_inner))
        # vanilla (v0) normalises channel-last whatever the model's layout
        self.out_norm = (_norm(cfg, d_inner) if not self.with_z else
                         LayerNorm(d_inner, eps=cfg.norm_eps))
        self.out_proj = Lin(d_inner, d_model, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min=1e-3, dt_max=0.1, dt_floor=1e-4):
        """mamba's initialisation: dt spread log-uniformly in [dt_min, dt_max] through the
        softplus-inverse bias, A = -(1 ... N), D = 1."""
        d_inner, rank = self.dt_projs_weight.shape[1:]
        bound = 1.0 / math.sqrt(self.x_proj_weight.shape[2])
        self.x_proj_weight.uniform_(-bound, bound)
        self.dt_projs_weight.uniform_(-rank ** -0.5, rank ** -0.5)
        dt = torch.exp(torch.rand(4, d_inner) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp_min(dt_floor)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        N = self.A_logs.shape[1]
        self.A_logs.copy_(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).expand_as(self.A_logs))
        self.Ds.fill_(1.0)

    def _conv_act(self, x: torch.Tensor) -> torch.Tensor:
        """SiLU(conv2d(x)) on a channels-last (B, H, W, C) map (pyssm's fused depthwise_conv2d
        when conv2d is the usual odd-sized depthwise one), back as (B, C, H, W) stored
        channels-last, as the ss2d core reads it."""
        conv = self.conv2d
        if not isinstance(conv, nn.Conv2d):
            return self.act(x).permute(0, 3, 1, 2)
        K = conv.kernel_size[0]
        if K % 2 == 0 or K > MAX_KERNEL:  # not "same" padding or too wide: torch's conv
            return self.act(conv(x.permute(0, 3, 1, 2)))
        device = x.device.type
        autocast = device in ("cpu", "cuda") and torch.is_autocast_enabled(device)
        out_dtype = torch.get_autocast_dtype(device) if autocast else None
        if not uses_triton(x, conv.weight, conv.bias, out_dtype, self.conv_backend):
            return self.act(conv(x.permute(0, 3, 1, 2)))  # torch's, in the model's dtypes
        y = depthwise_conv2d(x, conv.weight, conv.bias, activation="silu", out_dtype=out_dtype,
                             backend="triton")
        return y.permute(0, 3, 1, 2)

    def normed_projection(self, x: torch.Tensor, norm: nn.Module, proj: nn.Module,
                          dtype: torch.dtype | None) -> torch.Tensor | None:
        """``proj(norm(x))`` as one ``pyssm.ops.layer_norm_linear`` pass (the normalised x,
        rounded to ``dtype``, never written), or None where that does not apply: autograd
        recording (training keeps the norm's own backward), hooks on either module, other
        module types, a product not in 16 bits, the Triton kernel not running
        (``norm.backend``'s choice), or PYSSM_NORM_LINEAR=0. x and the result are (B, C, H, W)
        stored channels-last for channel-first configs, (B, H, W, C) otherwise, as the modules
        read and write them."""
        if os.environ.get("PYSSM_NORM_LINEAR", "") == "0":
            return None
        channel_first = isinstance(norm, LayerNorm2d)
        fits = (type(norm) in (LayerNorm, LayerNorm2d) and type(proj) is (
            Linear2d if channel_first else nn.Linear) and x.dim() == 4)
        if not fits or hooked(norm, proj) or records(x, norm, proj):
            return None
        dtype = dtype or x.dtype
        if dtype not in (torch.float16, torch.bfloat16):  # (float32: cuDNN's TF32 products)
            return None
        if not layer_norm_linear_uses_triton(x, norm.weight, norm.bias, proj.weight, proj.bias,
                                             dtype, norm.backend):
            return None
        rows = x.permute(0, 2, 3, 1) if channel_first else x
        y = layer_norm_linear(rows, norm.weight, norm.bias, proj.weight, proj.bias,
                              eps=norm.eps, dtype=dtype, backend=norm.backend)
        return y.permute(0, 3, 1, 2) if channel_first else y

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """The mixer on x, or with ``norm`` on norm(x) (the block's norm, fused into in_proj
        where ``normed_projection`` applies)."""
        if norm is None:
            x = self.in_proj(x)
        else:
            projected = self.normed_projection(x, norm, self.in_proj, matmul_dtype(x))
            x = (projected if projected is not None
                 else self.in_proj(norm(x, for_matmul=True)))
        if self.with_z:
            x, z = x.chunk(2, dim=1 if self.channel_first else -1)
            z = self.act(z)
        x = self._conv_act(x.permute(0, 2, 3, 1) if self.channel_first else x)
        # 16-bit activations: the core returns float32 (as the official oflex path) for out_norm
        dtype = x.dtype
        low = dtype in (torch.float16, torch.bfloat16)
        y = ss2d(x, self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias, self.A_logs,
                 self.Ds, channels_first=True, out_float32=low, backend=self.backend)
        del x  # (not held while out_norm runs)
        if not self.channel_first or self.with_z:
            y = y.permute(0, 2, 3, 1)
        if not self.with_z:  # out_norm into out_proj, one pass where it applies
            out = self.normed_projection(y, self.out_norm, self.out_proj, dtype)
            if out is not None:
                return out
        y = self.out_norm(y, out_dtype=dtype)  # normalised from float32, rounded once
        if self.with_z:  # gated channel-last, as the official v0 forward
            y = y * (z.permute(0, 2, 3, 1) if self.channel_first else z)
            if self.channel_first:
                y = y.permute(0, 3, 1, 2)
        return self.out_proj(y)


class VSSBlock(nn.Module):
    def __init__(self, cfg: VMambaConfig, stage: int, drop_path: float = 0.0):
        super().__init__()
        dim = cfg.dims[stage]
        self.norm = _norm(cfg, dim)
        self.op = SS2D(cfg, dim, cfg.d_inner(stage), cfg.rank(stage))
        self.drop_path = DropPath(drop_path)
        self.has_mlp = cfg.mlp_ratio > 0
        if self.has_mlp:
            self.norm2 = _norm(cfg, dim)
            self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio),
                           Linear2d if cfg.channel_first else nn.Linear)

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The block on x. ``out_dtype``: a dtype the output may come in where the block's last
        pass (norm_mlp_residual) can write it directly, for a caller whose next layer reads it
        in that dtype only (VMamba._stages: the downsampling convolution under autocast); the
        output's dtype is x's where that pass does not run."""
        if hooked(self.op) or not isinstance(self.op, SS2D):  # (hooks see what they always saw)
            branch = self.drop_path(self.op(self.norm(x, for_matmul=True)))
        else:  # (the norm fused into in_proj in inference)
            branch = self.drop_path(self.op(x, norm=self.norm))
        if not self.has_mlp:
            return x + branch
        out = norm_add_mlp(self.norm2, self.mlp, branch, x, self.drop_path,  # all of it, one pass
                           out_dtype=out_dtype)
        if out is not None:
            return out
        h, s = self.norm2.add(branch, x, for_matmul=True)  # x + branch and its norm, one pass
        del branch  # (not held while the MLP's hidden layer is alive)
        return add_mlp(self.mlp, h, s, x, self.drop_path)  # s + mlp(h); in place in inference

    def forward_unsummed(self, branch: torch.Tensor | None,
                         s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` on the stream ``s + branch`` given unsummed (``branch`` None: s alone),
        its output likewise, as (last branch, the sum before it), whose sum is forward's output
        (``pyssm.models.residual``: the first norm makes the input's sum)."""
        if branch is None:
            x, h = s, self.norm(s, for_matmul=True)
        else:
            h, x = self.norm.add(branch, s, for_matmul=True)
        branch = self.drop_path(self.op(h))
        if not self.has_mlp:
            return branch, x
        h, s = self.norm2.add(branch, x, for_matmul=True)
        del branch
        return self.drop_path(self.mlp(h)), s


class PatchMerging2D(nn.Module):
    """Vanilla downsampling (channel-last): 2x2 neighbours concatenated, LayerNorm, Linear."""

    def __init__(self, cfg: VMambaConfig, dim: int, out_dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.norm = LayerNorm(4 * dim, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class PatchEmbed2(nn.Sequential):
    """The v2 stem, the official Sequential (conv, [permute], norm, [permute], GELU, conv,
    [permute], norm: the state dict keys are its indices), with the first norm and the GELU as
    one pass of pyssm's layer_norm (``activation="gelu"``): its output, which only feeds the
    second convolution, is written once in the dtype that convolution reads (bf16 under
    autocast, where torch writes the norm in float32, runs the GELU on it and casts it again;
    the same values, rounded once). Where a forward hook is registered on the GELU or on the
    permute beside it, which that pass does not call, the modules run one by one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv1, to_cl1, norm1, to_cf, gelu, conv2, to_cl2, norm2 = self
        if hooked(to_cf, gelu):
            return super().forward(x)
        x = norm1(to_cl1(conv1(x)), for_matmul=True, activation="gelu")
        return norm2(to_cl2(conv2(to_cf(x))))


def _patch_embed(cfg: VMambaConfig) -> nn.Sequential:
    dim = cfg.dims[0]
    if cfg.patchembed_version == "v1":
        return nn.Sequential(nn.Conv2d(cfg.in_chans, dim, cfg.patch_size, cfg.patch_size),
                             _to_cl(cfg), _norm(cfg, dim))
    if cfg.patchembed_version == "v2":
        stride = cfg.patch_size // 2
        return PatchEmbed2(
            nn.Conv2d(cfg.in_chans, dim // 2, stride + 1, stride, 1), _to_cl(cfg),
            _norm(cfg, dim // 2), _to_cf(cfg), GELU(),  # (the GELU: in norm's pass)
            nn.Conv2d(dim // 2, dim, stride + 1, stride, 1), _to_cl(cfg), _norm(cfg, dim))
    raise ValueError(f"patchembed_version must be 'v1' or 'v2', got {cfg.patchembed_version!r}")


def _downsample(cfg: VMambaConfig, dim: int, out_dim: int) -> nn.Module:
    if cfg.downsample_version == "v3":
        return nn.Sequential(_to_cf(cfg), nn.Conv2d(dim, out_dim, 3, 2, 1), _to_cl(cfg),
                             _norm(cfg, out_dim))
    if cfg.downsample_version == "v1":
        if cfg.channel_first:
            raise ValueError("downsample_version 'v1' (patch merging) needs norm='ln'")
        return PatchMerging2D(cfg, dim, out_dim)
    raise ValueError(f"downsample_version must be 'v1' or 'v3', got {cfg.downsample_version!r}")


class VMamba(nn.Module):
    """A VMamba classifier / encoder with timm's API (see the module docstring)."""

    def __init__(self, cfg: VMambaConfig, img_size: int | tuple[int, int] = 224,
                 backend: str | None = None):
        super().__init__()
        self.cfg, self.img_size = cfg, img_size
        self.num_classes, self.num_features = cfg.num_classes, cfg.dims[-1]
        self.patch_embed = _patch_embed(cfg)
        rates = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
        self.layers = nn.ModuleList()
        for i, depth in enumerate(cfg.depths):
            first = sum(cfg.depths[:i])
            blocks = nn.Sequential(*(VSSBlock(cfg, i, rates[first + j]) for j in range(depth)))
            down = (_downsample(cfg, cfg.dims[i], cfg.dims[i + 1]) if i + 1 < len(cfg.depths)
                    else nn.Identity())
            self.layers.append(nn.Sequential(OrderedDict(blocks=blocks, downsample=down)))
        self.classifier = nn.Sequential(OrderedDict(
            norm=_norm(cfg, self.num_features), permute=_to_cf(cfg),
            avgpool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(1),
            head=(nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes
                  else nn.Identity())))
        self.apply(self._init_weights)
        self.set_backend(backend)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def set_backend(self, backend: str | None) -> VMamba:
        """The pyssm backend every SS2D core uses ("cuda", "cpu", "reference" or None), and
        the matching one for the LayerNorms, the depthwise convolutions and the MLPs' fused fc1
        + GELU (pyssm.models.norms.triton_backend)."""
        for m in self.modules():
            if isinstance(m, SS2D):
                m.backend, m.conv_backend = backend, triton_backend(backend)
            elif isinstance(m, (LayerNorm, Mlp)):
                m.backend = triton_backend(backend)
        return self

    # ---- the timm API -----------------------------------------------------------------------

    def _stages(self, x: torch.Tensor, last: int, kept: Container[int] | None = None):
        """Yields each stage's output (before its downsampling), channel-first, up to ``last``
        (whose downsampling does not run). Activations are stored channels-last throughout
        (torch.channels_last for the (B, C, H, W) tensors of channel-first configs, plain (B, H,
        W, C) for the others), so LayerNorm, the 1x1 and depthwise convolutions and the CUDA
        ss2d core read them without a layout copy. ``kept``: the stages whose outputs the caller
        reads (None: all); another's last block may write its output in the dtype the
        downsampling convolution reads it in (``_downsampled_dtype``: bf16 under autocast), the
        values the convolution's own cast would make, without that cast's pass."""
        x = self.patch_embed(self._input(x))
        for i, layer in enumerate(self.layers[: last + 1]):
            if hooked(layer.blocks):  # (its hooks see the call and its output)
                x = layer.blocks(x)
            elif carry_unsummed(layer.blocks, x):  # (training: one stream add a stage)
                x = summed(*run_unsummed(layer.blocks, x))
            else:  # one block at a time: each block's input is freed as the next one runs
                # (nn.Sequential's forward keeps the stage's input alive to its end: a fifth of
                # inference's peak)
                unread = i < last and kept is not None and i not in kept
                cast = self._downsampled_dtype(layer.downsample, x) if unread else None
                blocks = list(layer.blocks)
                for j, block in enumerate(blocks):
                    if (cast is not None and j == len(blocks) - 1 and type(block) is VSSBlock
                            and not hooked(block)):
                        x = block(x, out_dtype=cast)
                    else:
                        x = block(x)
            yield x if self.cfg.channel_first else x.permute(0, 3, 1, 2)
            if i == last:
                return
            x = layer.downsample(x)

    @staticmethod
    def _downsampled_dtype(down: nn.Module, x: torch.Tensor) -> torch.dtype | None:
        """The 16-bit dtype a v3 downsampling (a convolution after a layout permute, no forward
        hooks) reads x in under autocast, None otherwise (the v1 patch merging normalises x
        first; outside autocast the convolution reads x's dtype)."""
        dtype = matmul_dtype(x)
        if dtype not in (torch.float16, torch.bfloat16) or not isinstance(down, nn.Sequential):
            return None
        layers = list(down)
        if (len(layers) < 2 or type(layers[0]) not in (nn.Identity, Permute)
                or type(layers[1]) is not nn.Conv2d or hooked(down, *layers)):
            return None
        return dtype

    @staticmethod
    def _input(x: torch.Tensor) -> torch.Tensor:
        """The images channels-last, in the stem convolution's dtype under autocast: one pass
        (a float32 NCHW batch would otherwise be copied to channels-last, then cast by autocast
        for the convolution; the same values)."""
        dtype = matmul_dtype(x)
        if dtype is not None and x.dtype == torch.float32:
            return x.to(dtype, memory_format=torch.channels_last)
        return x.contiguous(memory_format=torch.channels_last)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's features after the final norm, (B, C, H/32, W/32)."""
        last = len(self.layers) - 1
        *_, y = self._stages(x, last, kept=(last,))
        return self._final_norm(y)

    def _final_norm(self, x_cf: torch.Tensor) -> torch.Tensor:
        if self.cfg.channel_first:
            return self.classifier.norm(x_cf)
        return self.classifier.norm(x_cf.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.classifier.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices=None, norm: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Stage outputs (before downsampling) for ``indices`` (None: all, int n: the last n,
        or a list of stage indices), as NCHW or NHWC; ``norm`` applies the final norm to the
        last stage. Returns (final features, intermediates), or the intermediates alone."""
        n = len(self.layers)
        if indices is None:
            take = list(range(n))
        elif isinstance(indices, int):
            take = list(range(n - indices, n))
        else:
            take = [i % n for i in indices]
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        outs, last = [], None
        end = n - 1 if not intermediates_only else max(take)
        for i, y in enumerate(self._stages(x, end, kept=(*take, end))):
            last = y
            if i in take:
                y = self._final_norm(y) if norm and i == n - 1 else y
                outs.append(y if output_fmt == "NCHW" else y.permute(0, 2, 3, 1))
        if intermediates_only:
            return outs
        return self._final_norm(last), outs

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"VMamba pools by average only, got global_pool={global_pool!r}")
        self.num_classes = num_classes
        self.classifier.head = (nn.Linear(self.num_features, num_classes) if num_classes
                                else nn.Identity())

    def tokens(self, images: torch.Tensor, tap: int = 3) -> torch.Tensor:
        """Visual tokens (B, T, C) for a VLM: the output of stage ``tap`` (1-based, as the
        study's "stage 3": 14 x 14 = 196 tokens at 224 px), flattened row-major."""
        n = len(self.layers)
        if not 1 <= tap <= n:
            raise ValueError(f"tap must be a stage number from 1 to {n}, got {tap}")
        *_, y = self._stages(images, tap - 1, kept=(tap - 1,))
        return y.flatten(2).transpose(1, 2)

    # ---- checkpoints ------------------------------------------------------------------------

    _RENAMES = ((r"^patch_embed\.proj\.", "patch_embed.0."),
                (r"^patch_embed\.norm\.", "patch_embed.2."), (r"\.ln_1\.", ".norm."),
                (r"\.self_attention\.", ".op."), (r"^norm\.", "classifier.norm."),
                (r"^head\.", "classifier.head."))

    def checkpoint_filter(self, state: dict) -> dict:
        """An official VMamba state dict (v2 or vanilla; channel-first or channel-last; older
        key names; DDP / torch.compile prefixes) mapped onto this model's keys and shapes."""
        own = self.state_dict()
        out = {}
        for key, value in state.items():
            key = strip_wrapper_prefixes(key)
            for pattern, repl in self._RENAMES:
                key = re.sub(pattern, repl, key)
            if key.startswith("classifier.head.") and not self.num_classes:
                continue
            if key in own and value.dim() == 4 and own[key].dim() == 2 and value.shape[2:] == (1, 1):
                value = value.flatten(1)  # a 1x1 conv stored for a Linear
            if key in own and value.shape != own[key].shape:
                raise ValueError(f"checkpoint entry {key!r} has shape {tuple(value.shape)} but "
                                 f"this model expects {tuple(own[key].shape)} (a different "
                                 f"VMamba configuration?)")
            out[key] = value
        return out


def _create(name: str, img_size, backend, overrides: dict) -> VMamba:
    return VMamba(CONFIGS[name].with_overrides(**overrides), img_size=img_size, backend=backend)


@register_encoder
def vmamba_tiny_s1l8(img_size=224, backend=None, **overrides) -> VMamba:
    return _create("vmamba_tiny_s1l8", img_size, backend, overrides)


@register_encoder
def vmamba_small_s1l20(img_size=224, backend=None, **overrides) -> VMamba:
    return _create("vmamba_small_s1l20", img_size, backend, overrides)


@register_encoder
def vmamba_base_s1l20(img_size=224, backend=None, **overrides) -> VMamba:
    return _create("vmamba_base_s1l20", img_size, backend, overrides)


@register_encoder
def vmamba_tiny_s2l5(img_size=224, backend=None, **overrides) -> VMamba:
    return _create("vmamba_tiny_s2l5", img_size, backend, overrides)


@register_encoder
def vmamba_small_s2l15(img_size=224, backend=None, **overrides) -> VMamba:
    return _create("vmamba_small_s2l15", img_size, backend, overrides)


@register_encoder
def vmamba_base_s2l15(img_size=224, backend=None, **overrides) -> VMamba:
    return _create("vmamba_base_s2l15", img_size, backend, overrides)


@register_encoder
def vmamba_tiny_vanilla(img_size=224, backend=None, **overrides) -> VMamba:
    return _create("vmamba_tiny_vanilla", img_size, backend, overrides)


@register_encoder
def vmamba_small_vanilla(img_size=224, backend=None, **overrides) -> VMamba:
    return _create("vmamba_small_vanilla", img_size, backend, overrides)


@register_encoder
def vmamba_base_vanilla(img_size=224, backend=None, **overrides) -> VMamba:
    return _create("vmamba_base_vanilla", img_size, backend, overrides)
