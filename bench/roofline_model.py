"""An encoder's bf16 inference on a GPU, counted kernel by kernel on a machine without one: the
bytes each kernel must move and the matrix FLOPs it must do, and the time that would take at
the H200's measured ceilings (a floor, not a prediction of the measured time).

The model runs on meta tensors, so nothing is computed. Each aten op it dispatches counts as
one kernel that reads its tensor inputs and writes its outputs once (views and empty
allocations count as nothing), with CUDA autocast's casts emulated: a matrix product or
convolution takes float32 inputs as bf16 (a cast kernel each; a parameter's cast once a step,
as autocast caches it) and returns bf16, and LayerNorm returns bf16 before a matrix product
and float32 elsewhere, as pyssm's norms do under CUDA autocast. The ops the GPU runs as pyssm
kernels are stood in by the kernels' own traffic:
  - LayerNorm (the Triton kernel, with the residual add or the GELU where fused): x (and the
    residual), weight and bias read once, the output (and the sum) written once;
  - VMamba's depthwise convolution + SiLU (Triton): x read and the output written once;
  - ss2d (csrc/ss2d, 16-bit x, the fused path): the x_proj kernel (x and W read, z written in
    float32), the float32 y zeroed, the scan kernel (x and z read; y read and written once, its
    four directions' atomic adds combined in the L2, the best case); the scan kernel is bound
    by issue, not by bytes: its time is the forward v3's prediction at VMamba-T stage 1 (0.14
    ms for 77 M position-channel-direction steps, csrc/ss2d/NOTES.md), scaled by steps;
  - attention (flash): q, k, v read and the output written once; 4 N^2 d FLOPs a head;
  - the MLPs' fc1 + GELU (linear_gelu, Triton), where the models take it (16-bit inference,
    the kernel running): x and W read, the hidden layer written once (W's cast to bf16 is the
    Mlp's own, traced); and their fc2 + residual add (linear_residual_, Triton): the hidden
    layer, W and the sum read, the sum written once; MLPs up to 256 wide as one mlp_residual_
    pass instead (Triton: x, both weights and the sum read, the sum written; fc2's FLOPs on
    its padded tile), with the residual add and the norm before it as one norm_mlp_residual
    pass (Triton: x, the branch and the parameters read, the output written;
    --unfused-norm-mlp: the norm's pass, then mlp_residual_), --two-pass-mlp as the two
    (linear_gelu, linear_residual_); --unfused-mlp traces fc1, the GELU, fc2
    and the add instead, as before those ops (--unfused-residual: fc2 and the add alone);
  - VMamba's norm -> in_proj and out_norm -> out_proj as layer_norm_linear passes (Triton: x
    and the parameters read, the projection written); --unfused-norm-linear traces each norm
    and then its projection;
  - and --unfused-stem VMamba's stem module by module (its first norm written in float32, the
    GELU, the next convolution's cast), as before layer_norm's GELU.

With --train, one training step as the encoders benchmark times it (bf16 autocast forward, the
mean of the logits, backward into every parameter, the model in eval mode: no drop path; batch
64 x (224 / img-size)^2): the fused
inference-only MLP ops step aside as on the GPU, each MLP is one mlp_gelu (--unfused-mlp:
torch's fc1, GELU and fc2, forward and backward), and the stood-in ops record their backward
kernels too:
  - mlp_gelu: fc1 + GELU writing a and h, fc2; in the backward the da pass (dy,
    W2 and a read, da and fc1's bias gradient's row-tile sums written), dx, dW1 and dW2
    (cuBLAS's products) and the bias sums (the tiles', and dy's for fc2);
  - layer_norm: dy (and the sum's gradient) and what the forward kept read (the float32
    sum it returned, else x and the residual), dx (and the residual's gradient, where its
    dtype is not x's) written;
  - depthwise_conv2d + SiLU: its two backward kernels (dx; the weight's partial sums) each
    read dy and x, dx written;
  - ss2d (csrc/ss2d/ss2d_cuda.cpp's backward): x_proj recomputed, dx and dz zeroed, v3's
    summary and main passes (issue-bound: NOTES.md's instruction counts a warp-step at the
    full issue rate, the 64-position tiles padded; dx by atomics combined in the L2; the
    summary pass not where the forward kept its tile states, B x 4 x ceil(D / 32) blocks at
    2 an SM on the H200's 132, written by the forward and read by the main pass, unless
    --no-ss2d-states), over
    dt_rank 16 dpre written and its two GEMMs, x_proj's adjoint (dz and the fp32 dx read, dx
    and dz's bf16 split written) and dW_x's GEMM on the split;
  - attention (flash): q, k, v, the output, its gradient and the LSE read, dq, dk, dv
    written; 2.5 times the forward's FLOPs.
No optimizer step (the benchmark's step has none).

Floor of a kernel = max(bytes / bandwidth, FLOPs / matrix rate), with the ceilings measured on
an H200 here (/work/.library/device/KINDS.md: a 4.3 TB/s device-to-device copy, 790 TFLOP/s
for an 8192^3 bf16 product); launch overheads are not counted, their number is reported.

With --timm (ViT names only), timm's model of that name instead of pyssm's, the same weights'
shapes: "own", timm's modules as they are (its F.scaled_dot_product_attention stood in by a
flash kernel's traffic: q, k, v read, the output written, 4 N^2 d FLOPs a head), or
"swapped", its blocks swapped for pyssm's (pyssm.integrations.timm.swap_blocks), whose pyssm
ops are stood in as above. Inference only.

    python bench/roofline_model.py [--encoder vmamba_tiny_s1l8] [--img-size 224] [--batch 128]
                                   [--train] [--timm own|swapped]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import defaultdict
from dataclasses import dataclass
from unittest import mock

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

import pyssm.models.mlp as mlp_module
import pyssm.models.norms as norms_module
import pyssm.models.vit as vit_module
import pyssm.models.vmamba as vmamba_module
from pyssm.models import create_encoder
from pyssm.ops import mlp_residual_triton, norm_mlp_residual_triton

BANDWIDTH = 4.3e12      # B/s, device-to-device copy counting bytes read and written
MATRIX_RATE = 790e12    # FLOP/s, dense bf16 on tensor cores
SCAN_STEP_S = 0.14e-3 / 77e6  # the ss2d forward v3's predicted time per step (see above)
SMS = 132  # the H200's
ISSUE_RATE = 4 * SMS * 1.98e9  # warp instructions a second: 4 an SM a clock
LOW = torch.bfloat16
aten = torch.ops.aten

# the matrix products (the ops a linear / conv2d decomposes into on meta tensors), and the
# functions CUDA autocast runs in bf16
GEMM_OPS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.convolution,
            aten.convolution_backward}
AUTOCAST_FUNCTIONS = {F.linear, F.conv2d, torch.matmul, torch.Tensor.matmul,
                      torch.Tensor.__matmul__, torch.mm, torch.bmm, torch.addmm, torch.baddbmm}
# kernels that write without reading their first argument
WRITE_ONLY = {aten.zero_, aten.fill_, aten.zeros, aten.full, aten.ones}


@dataclass
class Kernel:
    op: str         # what it is, e.g. "aten.addmm" or "ss2d.scan"
    kind: str       # the table's grouping: gemm, norm, ss2d, conv, attention, cast, other
    read: int       # bytes
    written: int
    flops: int = 0  # on tensor cores
    fixed_s: float = 0.0  # a time from elsewhere (the scan's prediction), 0 for none

    @property
    def floor_s(self) -> float:
        return max((self.read + self.written) / BANDWIDTH, self.flops / MATRIX_RATE,
                   self.fixed_s)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _is_view(func) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write
                                 for r in returns)


def _kind(func) -> str:
    if func.overloadpacket in GEMM_OPS:
        return "gemm"
    if func.overloadpacket in (aten._to_copy, aten.copy_, aten.clone, aten.cat):
        return "cast/copy"
    return "other"


class KernelTrace(TorchDispatchMode):
    """Records a Kernel for every aten op dispatched on meta tensors (module docstring)."""

    def __init__(self):
        super().__init__()
        self.kernels: list[Kernel] = []
        self.paused = 0

    @contextlib.contextmanager
    def untraced(self):
        """A stand-in's own allocations: no kernels of their own."""
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    def add(self, op: str, kind: str, read: int, written: int, flops: int = 0,
            fixed_s: float = 0.0) -> None:
        if not self.paused:
            self.kernels.append(Kernel(op, kind, int(read), int(written), int(flops), fixed_s))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        if _is_view(func) or packet in (aten.empty, aten.empty_strided, aten.empty_like,
                                        aten.lift_fresh, aten.detach):
            return out
        inputs = {id(t): t for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outputs:  # a host-side op (torch.promote_types): no kernel
            return out
        if packet in WRITE_ONLY:
            read = 0
        elif packet is aten.copy_:
            read = nbytes(args[1])
        else:
            read = sum(nbytes(t) for t in inputs.values())
        written = sum(nbytes(t) for t in outputs)
        flops = (flop_registry[packet](*args, **kwargs, out_val=out)
                 if packet in flop_registry else 0)
        self.add(str(packet), _kind(func), read, written, flops)
        return out


class Autocast(TorchFunctionMode):
    """CUDA autocast for meta tensors (which autocast leaves alone): a matrix product's or a
    convolution's float32 tensor arguments are cast to bf16 first, a parameter's once."""

    def __init__(self, params):
        super().__init__()
        self.params = {p.untyped_storage()._cdata for p in params}
        self.cache: dict[tuple, torch.Tensor] = {}

    def cast(self, t):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            return t
        key = (t.untyped_storage()._cdata, t.shape, t.stride(), t.storage_offset())
        if key[0] not in self.params:
            return t.to(LOW)
        if key not in self.cache:
            self.cache[key] = t.to(LOW)
        return self.cache[key]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in AUTOCAST_FUNCTIONS:
            args = tuple(self.cast(a) for a in args)
            kwargs = {k: self.cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


TRACE: KernelTrace | None = None


def cuda_out_dtype(x, for_matmul):
    """pyssm.models.norms._out_dtype as it decides under CUDA bf16 autocast (also
    bench/memory_model.py's)."""
    return None if x.dtype == torch.float64 else (LOW if for_matmul else torch.float32)


@contextlib.contextmanager
def stood_in(stand_ins):
    """Each (module, name, value) of ``stand_ins`` set for the block and put back after it
    (also bench/memory_model.py's)."""
    with contextlib.ExitStack() as stack:
        for module, name, value in stand_ins:
            stack.enter_context(mock.patch.object(module, name, value))
        yield


def layer_norm_stand_in(x, weight=None, bias=None, eps=1e-5, *, residual=None, out_dtype=None,
                        return_residual=False, activation=None, backend=None):
    s_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    with TRACE.untraced():
        y = torch.empty(x.shape, dtype=out_dtype or s_dtype, device=x.device)
        s = torch.empty(x.shape, dtype=s_dtype, device=x.device) if return_residual else None
    read = nbytes(x) + (nbytes(residual) if residual is not None else 0) + sum(
        nbytes(p) for p in (weight, bias) if p is not None)
    op = "layer_norm" if activation is None else f"layer_norm+{activation}"
    TRACE.add(op, "norm", read, nbytes(y) + (nbytes(s) if s is not None else 0))
    return (y, s) if return_residual else y


def conv_silu_stand_in(x, weight, bias, activation="silu", out_dtype=None, backend=None):
    with TRACE.untraced():
        y = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    TRACE.add("depthwise_conv2d+silu", "conv", nbytes(x) + nbytes(weight), nbytes(y))
    return y


def ss2d_stand_in(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, *,
                  channels_first=True, out_float32=False, backend=None, states_bytes=0):
    """states_bytes: the tile states the scan kernel also writes (training)."""
    B, D, H, W = x.shape if channels_first else x.permute(0, 3, 1, 2).shape
    L, K = H * W, x_proj_weight.shape[0] * x_proj_weight.shape[1]
    with TRACE.untraced():
        y = torch.empty(B, H, W, D, dtype=torch.float32, device=x.device)
        out = y.permute(0, 3, 1, 2) if channels_first else y
        if not out_float32:
            out = out.to(x.dtype)
    x_bytes, z_bytes, y_bytes = nbytes(x), B * L * K * 4, nbytes(y)
    TRACE.add("ss2d.x_proj", "ss2d", x_bytes + nbytes(x_proj_weight), z_bytes,
              2 * B * L * D * K)
    TRACE.add("ss2d.zero_y", "ss2d", 0, y_bytes)
    params = sum(nbytes(p) for p in (dt_projs_weight, dt_projs_bias, A_logs, Ds))
    TRACE.add("ss2d.scan", "ss2d", x_bytes + z_bytes + y_bytes + params, y_bytes + states_bytes,
              fixed_s=4 * B * L * D * SCAN_STEP_S)
    if not out_float32:
        TRACE.add("ss2d.cast", "cast/copy", y_bytes, nbytes(out))
    return out


def linear_gelu_stand_in(x, weight, bias=None, *, out_dtype=None, activation="gelu",
                         backend=None):
    N, K = weight.shape
    with TRACE.untraced():
        y = torch.empty(*x.shape[:-1], N, dtype=out_dtype or x.dtype, device=x.device)
    params = nbytes(weight) + (nbytes(bias) if bias is not None else 0)  # (cast by the Mlp)
    TRACE.add("linear_gelu", "gemm", nbytes(x) + params, nbytes(y), 2 * (x.numel() // K) * K * N)
    return y


def linear_residual_stand_in(s, x, weight, bias=None, *, backend=None):
    N, K = weight.shape
    params = nbytes(weight) + (nbytes(bias) if bias is not None else 0)  # (cast by the Mlp)
    TRACE.add("linear_residual", "gemm", nbytes(x) + params + nbytes(s), nbytes(s),
              2 * (x.numel() // K) * K * N)
    return s


def layer_norm_linear_stand_in(x, norm_weight, norm_bias, weight, bias=None, *, eps=1e-5,
                               dtype=None, backend=None):
    """A norm and its projection in one pass: x, the norm's and the projection's parameters
    read, y written."""
    N, K = weight.shape
    with TRACE.untraced():
        y = torch.empty(*x.shape[:-1], N, dtype=dtype or x.dtype, device=x.device)
    params = sum(nbytes(p) for p in (norm_weight, norm_bias, weight, bias) if p is not None)
    TRACE.add("layer_norm_linear", "gemm", nbytes(x) + params, nbytes(y),
              2 * (x.numel() // K) * K * N)
    return y


def mlp_residual_stand_in(s, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *,
                          activation="gelu", backend=None):
    """The whole MLP and the add in one pass: x, the weights and the sum read, the sum
    written; both products' FLOPs, fc2's on the output padded to the kernel's column tiles
    (mlp_residual_triton.tiles), each of which recomputes fc1."""
    H, C = fc1_weight.shape
    N = fc2_weight.shape[0]
    params = sum(nbytes(p) for p in (fc1_weight, fc1_bias, fc2_weight, fc2_bias)
                 if p is not None)  # (cast by the Mlp)
    tile = mlp_residual_triton.tiles(N)[1]
    columns = -(-N // tile)
    TRACE.add("mlp_residual", "gemm", nbytes(x) + params + nbytes(s), nbytes(s),
              2 * (x.numel() // C) * H * (C + tile) * columns)
    return s


def norm_mlp_residual_stand_in(x, branch, norm_weight, norm_bias, fc1_weight, fc1_bias,
                               fc2_weight, fc2_bias, *, eps=1e-5, activation="gelu",
                               dtype=None, out_dtype=None, backend=None):
    """The residual add, the norm and the whole MLP in one pass: x, the branch and the
    parameters read, the output written (in out_dtype where given: a VMamba stage's end, bf16
    for the downsampling); both products' FLOPs, fc1's on the input padded to the kernel's
    power-of-two width (norm_mlp_residual_triton.tiles)."""
    H, C = fc1_weight.shape
    with TRACE.untraced():
        out = torch.empty(x.shape, dtype=out_dtype or torch.promote_types(x.dtype, branch.dtype),
                          device=x.device)
    params = sum(nbytes(p) for p in (norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight,
                                     fc2_bias) if p is not None)
    width = norm_mlp_residual_triton.tiles(C)[1]
    TRACE.add("norm_mlp_residual", "gemm", nbytes(x) + nbytes(branch) + params, nbytes(out),
              2 * (x.numel() // C) * H * (width + C))
    return out


def sdpa_stand_in(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  **kwargs):
    """F.scaled_dot_product_attention (B, heads, N, d) as a flash kernel: q, k, v read once,
    the output written once."""
    B, heads, N, d = q.shape
    with TRACE.untraced():
        out = torch.empty_like(q)
    TRACE.add("attention", "attention", nbytes(q) + nbytes(k) + nbytes(v), nbytes(out),
              4 * B * heads * N * k.shape[-2] * d)
    return out


def attention_stand_in(qkv, **kwargs):
    """pyssm.ops.attention_qkvpacked on the fused projection (B, N, 3, heads, d), as the ViT
    calls it: q, k and v read in place."""
    B, N, _, heads, d = qkv.shape
    with TRACE.untraced():
        out = qkv.new_empty(B, N, heads, d)
    TRACE.add("attention", "attention", nbytes(qkv), nbytes(out), 4 * B * heads * N * N * d)
    return out


# ---- the stand-ins' backward (--train) ----------------------------------------------------------

def ss2d_backward_instructions(rank: int) -> tuple[int, int]:
    """Warp instructions a warp-step of the ss2d backward's (summary, main) pass, d_state 1
    (csrc/ss2d/NOTES.md: ~55 and ~160 counted in the SASS at dt_rank <= 8; ~100 and ~185 for
    the dpre variant over 16, from those; dt_rank 9-16 estimated for the 16-wide registers)."""
    return (55, 160) if rank <= 8 else (65, 190) if rank <= 16 else (100, 185)


def _empty_like(meta):
    with TRACE.untraced():
        return None if meta is None else torch.empty(meta[0], dtype=meta[1], device="meta")


def _metas(*tensors):
    return [None if t is None else (t.shape, t.dtype) for t in tensors]


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, kwargs):
        ctx.metas = _metas(x, weight, bias, residual)
        out = layer_norm_stand_in(x, weight, bias, residual=residual, **kwargs)
        # what the op keeps (pyssm/ops/layer_norm.py's _setup): a float32 sum it returned,
        # else x and the residual
        ctx.keeps_sum = kwargs["return_residual"] and out[1].dtype == torch.float32
        return out if isinstance(out, tuple) else (out,)

    @staticmethod
    def backward(ctx, *grads):
        x, weight, bias, residual = ctx.metas
        read = sum(nbytes(g) for g in grads if g is not None) + (
            _meta_bytes((x[0], torch.float32)) if ctx.keeps_sum
            else _meta_bytes(x) + _meta_bytes(residual))
        # dx, and the residual's gradient apart only in a dtype of its own
        separate = residual is not None and residual[1] != x[1]
        written = _meta_bytes(x) + (_meta_bytes(residual) if separate else 0)
        TRACE.add("layer_norm.backward", "norm", read, written)
        return (*(_empty_like(m) for m in ctx.metas), None)


def _meta_bytes(meta) -> int:
    return 0 if meta is None else meta[0].numel() * meta[1].itemsize


def layer_norm_trainable(x, weight=None, bias=None, eps=1e-5, *, residual=None, out_dtype=None,
                         return_residual=False, activation=None, backend=None):
    out = _LayerNorm.apply(x, weight, bias, residual,
                           dict(eps=eps, out_dtype=out_dtype, return_residual=return_residual,
                                activation=activation))
    return out if return_residual else out[0]


class _ConvSilu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, out_dtype):
        ctx.metas = _metas(x, weight, bias)
        return conv_silu_stand_in(x, weight, bias, out_dtype=out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x = ctx.metas[0]
        TRACE.add("depthwise_conv2d+silu.backward_dx", "conv", nbytes(dy) + _meta_bytes(x),
                  _meta_bytes(x))
        TRACE.add("depthwise_conv2d+silu.backward_dw", "conv", nbytes(dy) + _meta_bytes(x), 0)
        return (*(_empty_like(m) for m in ctx.metas), None)


def conv_silu_trainable(x, weight, bias, activation="silu", out_dtype=None, backend=None):
    return _ConvSilu.apply(x, weight, bias, out_dtype)


# training: whether the ss2d forward keeps its tile states for the backward (PYSSM_SS2D_STATES;
# main's --no-ss2d-states turns it off)
SS2D_STATES = True


def ss2d_states_bytes(B: int, D: int, L: int) -> int:
    """The tile states the fused forward keeps in training (float32, one per 64-position
    tile, direction and channel), or 0 where it keeps none: its scans run in chunks unless
    B x 4 x ceil(D / 32) blocks reach 2 an SM (csrc/ss2d/ss2d_cuda.cpp)."""
    if not SS2D_STATES or B * 4 * -(-D // 32) < 2 * SMS:
        return 0
    return B * 4 * D * -(-L // 64) * 4


class _Ss2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, kwargs):
        ctx.metas = _metas(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds)
        ctx.channels_first = kwargs["channels_first"]
        B, D, H, W = x.shape if ctx.channels_first else x.permute(0, 3, 1, 2).shape
        ctx.states = ss2d_states_bytes(B, D, H * W)
        return ss2d_stand_in(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                             states_bytes=ctx.states, **kwargs)

    @staticmethod
    def backward(ctx, dy):
        (shape, dtype), xw = ctx.metas[0], ctx.metas[1]
        B, D, H, W = shape if ctx.channels_first else (shape[0], shape[3], shape[1], shape[2])
        L, zw, R = H * W, xw[0][1], ctx.metas[2][0][2]
        K = 4 * zw
        x_bytes, z_bytes, acc_bytes = B * L * D * dtype.itemsize, B * L * K * 4, B * L * D * 4
        w_bytes = _meta_bytes(xw)
        TRACE.add("ss2d.backward.x_proj", "ss2d", x_bytes + w_bytes, z_bytes, 2 * B * L * D * K)
        TRACE.add("ss2d.backward.zero", "ss2d", 0, acc_bytes + z_bytes)
        warp_steps = B * 4 * -(-D // 32) * -(-L // 64) * 64
        summary, main = ss2d_backward_instructions(R)
        reads = x_bytes + z_bytes + nbytes(dy)
        if not ctx.states:  # (with the forward's states the main pass runs alone)
            TRACE.add("ss2d.backward.summary", "ss2d", reads, 0,
                      fixed_s=warp_steps * summary / ISSUE_RATE)
        TRACE.add("ss2d.backward.main", "ss2d", reads + acc_bytes + z_bytes + ctx.states,
                  acc_bytes + z_bytes, fixed_s=warp_steps * main / ISSUE_RATE)
        if R > 16:  # dpre out, then dz's dt part and dt_projs_weight's gradient by two GEMMs
            dpre = 4 * B * L * D * 4
            TRACE.add("ss2d.backward.dpre", "ss2d", 0, dpre)
            TRACE.add("ss2d.backward.dpre_gemms", "gemm", 2 * dpre + 2 * B * L * 4 * R * 4,
                      B * L * 4 * R * 4, 2 * 2 * 4 * B * L * D * R)
        # x_proj's adjoint (dx += dz W_x, dz's bf16 hi / lo split written) and dW_x's GEMM on
        # the split (two products each, hi and lo)
        split = B * L * K * 2 * 2
        TRACE.add("ss2d.backward.x_proj_adjoint", "ss2d", z_bytes + acc_bytes + w_bytes,
                  x_bytes + split, 2 * 2 * B * L * D * K)
        TRACE.add("ss2d.backward.dW_x", "gemm", split + x_bytes, w_bytes, 2 * 2 * B * L * D * K)
        return (*(_empty_like(m) for m in ctx.metas), None)


def ss2d_trainable(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, *,
                   channels_first=True, out_float32=False, backend=None):
    return _Ss2d.apply(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                       dict(channels_first=channels_first, out_float32=out_float32))


class _Attention(torch.autograd.Function):
    """attention_qkvpacked's backward: one gradient of the fused qkv's shape, written by the
    kernel (no stack of three)."""

    @staticmethod
    def forward(ctx, qkv):
        (ctx.meta,) = _metas(qkv)
        return attention_stand_in(qkv)

    @staticmethod
    def backward(ctx, do):
        B, N, _, heads, d = ctx.meta[0]
        qkv = _meta_bytes(ctx.meta)
        lse = B * heads * N * 4
        TRACE.add("attention.backward", "attention", qkv + 2 * nbytes(do) + lse, qkv,
                  10 * B * heads * N * N * d)
        return _empty_like(ctx.meta)


def attention_trainable(qkv, **kwargs):
    return _Attention.apply(qkv)


class _MlpGelu(torch.autograd.Function):
    """pyssm.ops.mlp_gelu (its parameters cast by the Mlp, traced there): forward linear_gelu's
    pass writing a and h, then fc2; backward the da pass (dy, W2 and a read, da
    and fc1's bias gradient's row-tile sums written), dx, dW1 and dW2 as three products, and
    the bias sums (the tiles' sums; dy's for fc2)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        ctx.metas = _metas(x, w1, b1, w2, b2)
        H, C = w1.shape
        M = x.numel() // C
        with TRACE.untraced():
            y = torch.empty(*x.shape[:-1], w2.shape[0], dtype=x.dtype, device=x.device)
        hidden = M * H * x.dtype.itemsize
        ctx.hidden = hidden
        params1 = nbytes(w1) + (nbytes(b1) if b1 is not None else 0)
        params2 = nbytes(w2) + (nbytes(b2) if b2 is not None else 0)
        TRACE.add("mlp_gelu.fc1_gelu", "gemm", nbytes(x) + params1, 2 * hidden, 2 * M * C * H)
        TRACE.add("mlp_gelu.fc2", "gemm", hidden + params2, nbytes(y), 2 * M * H * w2.shape[0])
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w1, _, w2, _ = ctx.metas
        hidden, (H, C), C2 = ctx.hidden, w1[0], w2[0][0]
        M = x[0].numel() // C
        xb, w1b, w2b = _meta_bytes(x), _meta_bytes(w1), _meta_bytes(w2)
        tiles = -(-M // 64) * H * 4  # fc1's bias gradient, a row tile's column sums
        TRACE.add("mlp_gelu.backward.da", "gemm", nbytes(dy) + w2b + hidden, hidden + tiles,
                  2 * M * C2 * H)
        TRACE.add("mlp_gelu.backward.dx", "gemm", hidden + w1b, xb, 2 * M * H * C)
        TRACE.add("mlp_gelu.backward.dw1", "gemm", hidden + xb, w1b, 2 * M * H * C)
        TRACE.add("mlp_gelu.backward.dw2", "gemm", nbytes(dy) + hidden, w2b, 2 * M * C2 * H)
        TRACE.add("mlp_gelu.backward.bias_sums", "other", tiles + nbytes(dy), 4 * (H + C2))
        return tuple(_empty_like(m) for m in ctx.metas)


def mlp_gelu_trainable(x, w1, b1, w2, b2, *, activation="gelu", backend=None):
    return _MlpGelu.apply(x, w1, b1, w2, b2)


def trace_inference(encoder: str, img_size: int, batch: int, fused_mlp: bool = True,
                    fused_stem: bool = True, fused_residual: bool = True,
                    whole_mlp: bool = True, norm_linear: bool = True,
                    norm_mlp: bool = True, timm_model: str | None = None,
                    **overrides) -> list[Kernel]:
    """The kernels of one bf16-autocast inference step of ``batch`` images (module docstring);
    ``fused_mlp``: fc1 + GELU as linear_gelu and fc2 + the residual add as linear_residual_
    (else fc1, the GELU, fc2, the add; ``fused_residual=False``: fc2 and the add alone), and
    ``whole_mlp``: MLPs up to 256 wide as one mlp_residual_ pass (else those two);
    ``norm_linear``: VMamba's norm -> in_proj and out_norm -> out_proj as layer_norm_linear
    passes (else each norm, then its projection);
    ``norm_mlp``: where an MLP is one mlp_residual_ pass, the residual add and the norm before
    it in that pass too (norm_mlp_residual; else the norm's pass, then mlp_residual_);
    ``fused_stem``: VMamba's stem norm + GELU as one layer_norm pass (else its modules one by
    one); ``timm_model``: "own" or "swapped", timm's model instead (module docstring)."""
    stand_ins = [] if fused_stem else [
        (vmamba_module.PatchEmbed2, "forward", torch.nn.Sequential.forward)]
    stand_ins += [(mlp_module, "linear_gelu", linear_gelu_stand_in),
                 (mlp_module, "linear_gelu_uses_triton", lambda *a, **k: fused_mlp),
                 (mlp_module, "linear_residual_", linear_residual_stand_in),
                 (mlp_module, "linear_residual_uses_triton",
                  lambda *a, **k: fused_mlp and fused_residual),
                 (vmamba_module, "layer_norm_linear", layer_norm_linear_stand_in),
                 (vmamba_module, "layer_norm_linear_uses_triton", lambda *a, **k: norm_linear),
                 (mlp_module, "mlp_residual_", mlp_residual_stand_in),
                 (mlp_module, "mlp_residual_uses_triton",
                  lambda *a, **k: fused_mlp and fused_residual and whole_mlp),
                 (mlp_module, "norm_mlp_residual", norm_mlp_residual_stand_in),
                 (mlp_module, "norm_mlp_residual_uses_triton",
                  lambda *a, **k: fused_mlp and fused_residual and whole_mlp and norm_mlp),
                 *_kernel_stand_ins(ss2d_stand_in, conv_silu_stand_in, attention_stand_in,
                                    layer_norm_stand_in)]
    if timm_model is not None:
        import pyssm.integrations.timm as timm_integration
        stand_ins += [(F, "scaled_dot_product_attention", sdpa_stand_in),
                      (timm_integration, "attention_qkvpacked", attention_stand_in)]

    def infer(model, images):
        with Autocast(model.parameters()), torch.no_grad():
            model(images)

    return _trace(encoder, img_size, batch, stand_ins, infer, overrides, timm_model)


def trace_training(encoder: str, img_size: int, batch: int, fused_mlp: bool = True,
                   ss2d_states: bool = True, **overrides) -> list[Kernel]:
    """The kernels of one training step of ``batch`` images (module docstring, --train);
    ``fused_mlp``: each MLP as mlp_gelu (else fc1, the GELU and fc2, with their backwards);
    ``ss2d_states``: the ss2d forward keeps its tile states where it would on the GPU (else
    never: each backward runs its summary pass)."""
    global SS2D_STATES
    saved, SS2D_STATES = SS2D_STATES, ss2d_states
    try:
        return _trace_training(encoder, img_size, batch, fused_mlp, overrides)
    finally:
        SS2D_STATES = saved


def _trace_training(encoder, img_size, batch, fused_mlp, overrides) -> list[Kernel]:
    def step(model, images):
        with Autocast(model.parameters()):
            loss = model(images).float().mean()
        loss.backward()

    stand_ins = _kernel_stand_ins(ss2d_trainable, conv_silu_trainable, attention_trainable,
                                  layer_norm_trainable)
    stand_ins += [(mlp_module, "mlp_gelu", mlp_gelu_trainable),
                  (mlp_module, "mlp_gelu_uses_triton", lambda *a, **k: fused_mlp)]
    return _trace(encoder, img_size, batch, stand_ins, step, overrides)


def _kernel_stand_ins(ss2d, conv_silu, attention, layer_norm) -> list:
    """The pyssm kernels' stand-ins, the models' choices as on a GPU under CUDA autocast."""
    return [(vmamba_module, "ss2d", ss2d),
            (vmamba_module, "depthwise_conv2d", conv_silu),
            (vmamba_module, "uses_triton", lambda *a, **k: True),
            (vit_module, "attention_qkvpacked", attention),
            (norms_module, "layer_norm", layer_norm),
            (norms_module, "_out_dtype", cuda_out_dtype)]


def _model(encoder, img_size, overrides, timm_model):
    """pyssm's encoder, or timm's model of that name as it is ("own") or with its blocks
    swapped for pyssm's ("swapped")."""
    if timm_model is None:
        return create_encoder(encoder, img_size=img_size, **overrides)
    if timm_model not in ("own", "swapped") or not encoder.startswith("vit_"):
        raise ValueError(f"timm_model must be 'own' or 'swapped' for a ViT, got {timm_model!r} "
                         f"for {encoder}")
    import timm

    from pyssm.integrations.timm import swap_blocks

    model = timm.create_model(f"{encoder}_224", pretrained=False, img_size=img_size,
                              **overrides)
    if timm_model == "swapped":
        swap_blocks(model)
    return model


def _trace(encoder, img_size, batch, stand_ins, run, overrides,
           timm_model=None) -> list[Kernel]:
    """The kernels ``run(model, images)`` dispatches on meta tensors with ``stand_ins`` set."""
    global TRACE
    try:
        with stood_in(stand_ins):
            model = _model(encoder, img_size, overrides, timm_model).eval().to("meta")
            images = torch.empty(batch, 3, img_size, img_size, device="meta")
            TRACE = KernelTrace()
            with TRACE:
                run(model, images)
            return TRACE.kernels
    finally:
        TRACE = None


def summarize(kernels: list[Kernel], by: str = "kind") -> dict[str, dict[str, float]]:
    """Per kind (by="kind") or per op (by="op"), and "total": kernels, MB moved, matrix GFLOP,
    floor in ms."""
    rows: dict[str, dict[str, float]] = defaultdict(lambda: dict(kernels=0, mb=0.0, gflop=0.0,
                                                                  ms=0.0))
    for k in kernels:
        for key in (getattr(k, by), "total"):
            row = rows[key]
            row["kernels"] += 1
            row["mb"] += (k.read + k.written) / 1e6
            row["gflop"] += k.flops / 1e9
            row["ms"] += k.floor_s * 1e3
    return dict(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="vmamba_tiny_s1l8")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=None,
                        help="default: the benchmark's, 128 x (224 / img-size)^2 (64 x with "
                             "--train)")
    parser.add_argument("--train", action="store_true",
                        help="a training step (forward, backward) instead of an inference")
    parser.add_argument("--unfused-mlp", action="store_true",
                        help="fc1, the GELU, fc2 and the residual add (without pyssm's "
                             "linear_gelu and linear_residual_)")
    parser.add_argument("--unfused-residual", action="store_true",
                        help="fc2 and then the residual add (without linear_residual_)")
    parser.add_argument("--two-pass-mlp", action="store_true",
                        help="MLPs up to 256 wide as linear_gelu and linear_residual_ (without "
                             "mlp_residual_)")
    parser.add_argument("--unfused-norm-linear", action="store_true",
                        help="VMamba's norms, then their projections (without "
                             "layer_norm_linear)")
    parser.add_argument("--unfused-norm-mlp", action="store_true",
                        help="the norm's pass (with the residual add), then mlp_residual_ "
                             "(without norm_mlp_residual)")
    parser.add_argument("--unfused-stem", action="store_true",
                        help="VMamba's stem module by module (its norm, then the GELU)")
    parser.add_argument("--timm", choices=("own", "swapped"), default=None,
                        help="timm's ViT of that name instead of pyssm's: as it is, or with its "
                             "blocks swapped for pyssm's (inference only)")
    parser.add_argument("--no-ss2d-states", action="store_true",
                        help="with --train: the ss2d forward keeps no tile states, so its "
                             "backward runs the summary pass (PYSSM_SS2D_STATES=0)")
    args = parser.parse_args(argv)
    if args.train and (args.unfused_residual or args.unfused_stem or args.two_pass_mlp
                       or args.unfused_norm_linear or args.unfused_norm_mlp):
        parser.error("--train traces the training path: no --unfused-residual, --unfused-stem, "
                     "--two-pass-mlp, --unfused-norm-linear or --unfused-norm-mlp "
                     "(inference-only ops); "
                     "--unfused-mlp traces the MLP as its layers")
    if args.timm and args.train:
        parser.error("--timm traces inference only")
    batch = args.batch or max(1, round((64 if args.train else 128) * (224 / args.img_size) ** 2))
    if args.train:
        kernels = trace_training(args.encoder, args.img_size, batch, not args.unfused_mlp,
                                 not args.no_ss2d_states)
        what = (f"training step (forward, backward; MLP "
                f"{'as its layers' if args.unfused_mlp else 'as mlp_gelu'}"
                f"{'; ss2d without tile states' if args.no_ss2d_states else ''})")
    else:
        kernels = trace_inference(args.encoder, args.img_size, batch, not args.unfused_mlp,
                                  not args.unfused_stem, not args.unfused_residual,
                                  not args.two_pass_mlp, not args.unfused_norm_linear,
                                  not args.unfused_norm_mlp, timm_model=args.timm)
        mlp = ("MLP unfused" if args.unfused_mlp else "fc1 + GELU fused, fc2 then add"
               if args.unfused_residual else "fc1 + GELU and fc2 + add fused"
               if args.two_pass_mlp else "MLP + add as one pass up to 256 wide"
               f"{' after the norm' if args.unfused_norm_mlp else ' with the add and norm'}"
               ", else fc1 + GELU and fc2 + add fused")
        what = (f"inference ({mlp}{'; stem norm then GELU' if args.unfused_stem else ''}"
                f"{'; norms then projections' if args.unfused_norm_linear else ''})")
        if args.timm:
            what = ("inference, timm's modules as they are (SDPA as flash)" if args.timm == "own"
                    else f"inference, timm's blocks swapped for pyssm's ({mlp})")
    model = f"timm's {args.encoder} ({args.timm})" if args.timm else args.encoder
    print(f"{model}, {args.img_size} px x {batch}, bf16 autocast {what}, "
          f"floors at {BANDWIDTH / 1e12:.1f} TB/s and {MATRIX_RATE / 1e12:.0f} TFLOP/s")
    for by in ("kind", "op"):
        rows = summarize(kernels, by)
        total = rows["total"]
        print(f"\n| {by} | kernels | MB | GFLOP | floor ms | share |")
        print("|---|---:|---:|---:|---:|---:|")
        for key, row in sorted(rows.items(), key=lambda kv: (kv[0] == "total", -kv[1]["ms"])):
            print(f"| {key} | {row['kernels']:.0f} | {row['mb']:.0f} | {row['gflop']:.1f} | "
                  f"{row['ms']:.3f} | {row['ms'] / total['ms']:.2f} |")
    print(f"\nfloor: {batch / total['ms'] * 1e3:.0f} img/s ({total['ms'] / batch * 1e3:.1f} us "
          f"an image), {total['kernels']:.0f} kernels a step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
