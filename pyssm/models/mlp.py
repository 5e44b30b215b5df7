"""The encoders' MLP, fc1 -> GELU -> fc2 (timm's ``Mlp``: state dict keys ``fc1.*``, ``fc2.*``),
its GELU, and the blocks' second residual add around it.

Where autograd records nothing (inference, or a frozen encoder under ``torch.no_grad``), that
GELU runs in place on its input, a layer's fresh output that nothing else reads: the same
values (the same kernel, writing into its input's buffer), one activation alive instead of two.
The MLP's hidden layer is 4x the block's width, so that is where an encoder's inference peaks
(VMamba-T stage 1 at 224 px: 2.4 MB an image for each hidden tensor in bf16). ``add_mlp`` goes
further there: the MLP's output is added into the block's own residual sum in place, in slices
of the batch when the hidden layer is large, so only a quarter of it is ever alive. In 16-bit
inference fc1 and the GELU can be one pass (``pyssm.ops.linear_gelu``, see ``Mlp``), and so can
fc2 and that add (``pyssm.ops.linear_residual_``, see ``Mlp.add_into``), or, in MLPs up to 256
wide, the whole MLP and the add (``pyssm.ops.mlp_residual_``: the hidden layer never written);
and with the norm before it and the residual add before that (``norm_add_mlp``:
``pyssm.ops.norm_mlp_residual``, neither the sum nor its norm written); in 16-bit training the
whole MLP can be one op with its own backward (``pyssm.ops.mlp_gelu``).
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from pyssm.models.norms import LayerNorm, LayerNorm2d, matmul_dtype
from pyssm.ops.linear_gelu import GELU_APPROXIMATE, linear_gelu
from pyssm.ops.linear_gelu import uses_triton as linear_gelu_uses_triton
from pyssm.ops.linear_residual import linear_residual_
from pyssm.ops.linear_residual import uses_triton as linear_residual_uses_triton
from pyssm.ops.mlp_gelu import mlp_gelu
from pyssm.ops.mlp_gelu import uses_triton as mlp_gelu_uses_triton
from pyssm.ops.mlp_residual import mlp_residual_
from pyssm.ops.mlp_residual import uses_triton as mlp_residual_uses_triton
from pyssm.ops.norm_mlp_residual import norm_mlp_residual
from pyssm.ops.norm_mlp_residual import uses_triton as norm_mlp_residual_uses_triton

# the widest MLP (its input and output width) add_into runs as one mlp_residual_ pass; wider
# ones take linear_gelu and linear_residual_ (mlp_residual_triton.py says why)
FUSED_MLP_WIDTH = 256


def hooked(*modules: nn.Module) -> bool:
    """Whether a forward hook would see a call of any of ``modules`` (their own or a global
    one): the fused paths, which do not call them, then step aside."""
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def records(x: torch.Tensor, *modules: nn.Module) -> bool:
    """Whether autograd records a call of ``modules`` on x (x or one of their parameters needs
    a gradient, and grad mode is on): the inference-only fused paths then step aside."""
    return torch.is_grad_enabled() and (x.requires_grad or any(
        p.requires_grad for m in modules for p in m.parameters()))


# other libraries' activation modules the fused ops compute, by (module, class name)
NAMED_ACTIVATIONS = {
    ("timm.layers.activations", "GELU"): "gelu",
    ("timm.layers.activations", "GELUTanh"): "gelu_tanh",
    ("timm.layers.activations", "QuickGELU"): "quick_gelu",
    ("transformers.activations", "GELUActivation"): "gelu",
    ("transformers.activations", "GELUTanh"): "gelu_tanh",
    ("transformers.activations", "QuickGELUActivation"): "quick_gelu",
}


class GELU(nn.GELU):
    """``nn.GELU`` that overwrites its input where autograd records nothing: only for inputs
    nothing else reads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return super().forward(x)
        return torch.ops.aten.gelu_(x, approximate=self.approximate)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2. Where autograd records nothing, the GELU is exact and the product
    runs in 16 bits (bf16 / fp16 x, or under autocast), fc1 and the GELU are one pass of
    ``pyssm.ops.linear_gelu``'s Triton kernel when it runs (on a GPU once verified there, see
    the op; ``backend``: the op's, None for its automatic choice): the 4x-wide hidden layer is
    written once, rounded once, instead of written by fc1 and read and written again by the
    GELU. Elsewhere, and always with PYSSM_LINEAR_GELU=0 (the device check's switch after a
    failed Triton smoke), fc1 and then the GELU (in place where nothing records). add_mlp's
    in-place path calls ``add_into``, which fuses fc2 and the residual add likewise, or, up to
    FUSED_MLP_WIDTH wide, the whole MLP and the add (``pyssm.ops.mlp_residual_``). Where
    autograd records (training) in 16 bits, the whole MLP is one ``pyssm.ops.mlp_gelu`` when
    its kernels run: fc1 + GELU in one pass that keeps the pre-activation, and a backward whose
    first pass forms the GELU's gradient without fc2's input gradient stored (the parameters
    cast to 16 bits as autocast casts them, their gradients back through the casts);
    PYSSM_MLP_GELU=0 keeps the layers. A fused pass does not call the layers it stands in for,
    so where a forward hook is registered on them (or on the Mlp, for ``add_into``) they run as
    plain modules."""

    backend: str | None = None  # the fused ops'; the encoders' set_backend sets it

    def __init__(self, dim: int, hidden: int, linear: type[nn.Linear] = nn.Linear):
        super().__init__()
        self.fc1, self.act, self.fc2 = linear(dim, hidden), GELU(), linear(hidden, dim)

    def forward(self, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        backend = backend or self.backend
        out = self._mlp_gelu(x, backend)
        if out is not None:
            return out
        hidden = self._fc1_gelu(x, backend)
        return self.fc2(self.act(self.fc1(x)) if hidden is None else hidden)

    def add_into(self, s: torch.Tensor, x: torch.Tensor, backend: str | None = None,
                 whole: bool | None = None) -> None:
        """``s += self(x)`` in place, where autograd records nothing (add_mlp's in-place path).
        In 16-bit inference, where ``pyssm.ops.linear_residual_``'s kernel runs, fc2 and the
        add are one pass: fc2's output is rounded to 16 bits in registers and added to s there,
        not written and read again (the same values); PYSSM_LINEAR_RESIDUAL=0 (the device
        check's switch after a failed Triton smoke) keeps fc2 and then the add. Up to
        FUSED_MLP_WIDTH wide, where ``pyssm.ops.mlp_residual_``'s kernel runs, the whole MLP
        and the add are one pass that never writes the hidden layer (the same values as
        linear_gelu and then linear_residual_; PYSSM_MLP_RESIDUAL=0 keeps those two).
        ``whole``: ``fuses_whole(s, x, backend)`` where the caller has it already (add_mlp),
        so that it is not worked out twice a call."""
        backend = backend or self.backend
        if hooked(self):  # (its hooks see the call and its output)
            s.add_(self(x, backend=backend))
            return
        if self._mlp_into(s, x, backend, whole):
            return
        hidden = self._fc1_gelu(x, backend)
        if hidden is None:
            hidden = self.act(self.fc1(x))
        if not self._fc2_into(s, hidden, backend):
            s.add_(self.fc2(hidden))

    @staticmethod
    def _channels_dim(layer: nn.Module, x: torch.Tensor) -> int | None:
        """-1 for an nn.Linear, 1 for VMamba's Linear2d on a (B, C, H, W) x, None otherwise (a
        layer the fused ops do not stand in for)."""
        channels_dim = getattr(layer, "channels_dim", -1)  # 1: VMamba's Linear2d
        if (not isinstance(layer, nn.Linear) or (type(layer) is not nn.Linear and channels_dim != 1)
                or (channels_dim == 1 and x.dim() != 4)):
            return None
        return channels_dim

    @staticmethod
    def _low_dtype(x: torch.Tensor) -> torch.dtype | None:
        """The 16-bit dtype a product of x runs in (autocast's, else x's), or None."""
        device = x.device.type
        autocast = device in ("cpu", "cuda") and torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
        return dtype if dtype in (torch.float16, torch.bfloat16) else None

    def _fc2_into(self, s: torch.Tensor, hidden: torch.Tensor, backend: str | None) -> bool:
        """s += fc2(hidden) by linear_residual_'s Triton kernel; False where it does not apply
        (nothing done)."""
        if os.environ.get("PYSSM_LINEAR_RESIDUAL", "") == "0" or hooked(self.fc2):
            return False
        fc2 = self.fc2
        channels_dim, dtype = self._channels_dim(fc2, hidden), self._low_dtype(hidden)
        if channels_dim is None or dtype is None or not linear_residual_uses_triton(
                s, hidden, fc2.weight, fc2.bias, backend):
            return False
        weight, bias = self._cast_params("fc2", dtype)
        hidden = hidden.to(dtype)
        if channels_dim == 1:  # channels-last storage makes these views contiguous
            s, hidden = s.permute(0, 2, 3, 1), hidden.permute(0, 2, 3, 1)
        linear_residual_(s, hidden, weight, bias, backend=backend)
        return True

    def fuses_whole(self, s: torch.Tensor, x: torch.Tensor, backend: str | None = None) -> bool:
        """Whether ``add_into(s, x, backend)`` runs as one mlp_residual_ pass (its Triton kernel,
        the hidden layer never written): a GELU MLP of nn.Linear or Linear2d layers up to
        FUSED_MLP_WIDTH wide, 16-bit products, nothing recorded, no hooks on its layers, and
        PYSSM_MLP_RESIDUAL not 0."""
        if self._whole_layout(x) is None or self._low_dtype(x) is None:
            return False
        fc1, fc2 = self.fc1, self.fc2
        return mlp_residual_uses_triton(s, x, fc1.weight, fc1.bias, fc2.weight, fc2.bias,
                                        backend or self.backend)

    def _whole_layout(self, x: torch.Tensor) -> int | None:
        """The channels dimension (-1, or 1 for Linear2d layers) where the whole MLP on x can be
        one pass (mlp_residual_, norm_mlp_residual), whatever the products' dtype: a GELU MLP of
        nn.Linear or Linear2d layers up to FUSED_MLP_WIDTH wide, nothing recorded, no hooks on
        its layers, PYSSM_MLP_RESIDUAL not 0; None otherwise."""
        if os.environ.get("PYSSM_MLP_RESIDUAL", "") == "0":
            return None
        fc1, fc2 = self.fc1, self.fc2
        channels_dim = self._channels_dim(fc1, x)
        if (self._activation() is None or channels_dim is None
                or self._channels_dim(fc2, x) != channels_dim
                or max(fc1.in_features, fc2.out_features) > FUSED_MLP_WIDTH
                or hooked(fc1, self.act, fc2) or records(x, fc1, fc2)):
            return None
        return channels_dim

    def _mlp_into(self, s: torch.Tensor, x: torch.Tensor, backend: str | None,
                  whole: bool | None = None) -> bool:
        """s += self(x) by mlp_residual_ where ``fuses_whole`` (``whole``, where given);
        False elsewhere (nothing done)."""
        if not (self.fuses_whole(s, x, backend) if whole is None else whole):
            return False
        dtype = self._low_dtype(x)
        x = x.to(dtype)
        params = (*self._cast_params("fc1", dtype), *self._cast_params("fc2", dtype))
        if self._channels_dim(self.fc1, x) == 1:  # channels-last storage: contiguous views
            s, x = s.permute(0, 2, 3, 1), x.permute(0, 2, 3, 1)
        mlp_residual_(s, x, *params, activation=self._activation(), backend=backend)
        return True

    def _fc1_gelu(self, x: torch.Tensor, backend: str | None) -> torch.Tensor | None:
        """GELU(fc1(x)) by linear_gelu's Triton kernel, or None where it does not apply."""
        if os.environ.get("PYSSM_LINEAR_GELU", "") == "0":
            return None
        fc1 = self.fc1
        channels_dim, dtype = self._channels_dim(fc1, x), self._low_dtype(x)
        activation = self._activation()
        if activation is None or channels_dim is None or dtype is None or hooked(fc1, self.act):
            return None
        if records(x, fc1):
            return None
        if not linear_gelu_uses_triton(x, fc1.weight, fc1.bias, dtype, backend):
            return None
        x = x.to(dtype)
        weight, bias = self._cast_params("fc1", dtype)
        return _over_last_dim(x, channels_dim, lambda x: linear_gelu(
            x, weight, bias, out_dtype=dtype, activation=activation, backend=backend))

    def _activation(self) -> str | None:
        """The fused ops' name (pyssm.ops.linear_gelu.ACTIVATIONS) for ``self.act``: nn.GELU's
        two, and timm's and transformers' GELU, tanh GELU and quick GELU modules (for
        pyssm.integrations); None for any other (the layers then run as they are)."""
        act = self.act
        if isinstance(act, nn.GELU):
            return next((name for name, approximate in GELU_APPROXIMATE.items()
                         if approximate == act.approximate), None)
        return NAMED_ACTIVATIONS.get((type(act).__module__, type(act).__qualname__))

    def _mlp_gelu(self, x: torch.Tensor, backend: str | None) -> torch.Tensor | None:
        """fc2(GELU(fc1(x))) by mlp_gelu's Triton kernels where autograd records (training) in
        16 bits, or None where that does not apply (PYSSM_MLP_GELU=0 among them)."""
        if os.environ.get("PYSSM_MLP_GELU", "") == "0":
            return None
        fc1, fc2 = self.fc1, self.fc2
        channels_dim, dtype = self._channels_dim(fc1, x), self._low_dtype(x)
        activation = self._activation()
        if (activation is None or channels_dim is None or dtype is None
                or self._channels_dim(fc2, x) != channels_dim or not records(x, fc1, fc2)
                or hooked(fc1, self.act, fc2)):
            return None
        x = x.to(dtype)
        if not mlp_gelu_uses_triton(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, backend):
            return None
        # cast as autocast casts them, once a step and recorded (their gradients come back
        # through the casts), so the op's backward does not cast them again
        params = [None if p is None else p.to(dtype)
                  for p in (fc1.weight, fc1.bias, fc2.weight, fc2.bias)]
        return _over_last_dim(x, channels_dim, lambda x: mlp_gelu(
            x, *params, activation=activation, backend=backend))

    @contextlib.contextmanager
    def casts_kept(self):
        """Within: each layer's weight and bias cast to a low precision once and reused, as
        autocast keeps a parameter's cast for its region (add_mlp calls the MLP once a slice of
        the batch; ViT-B's fc1 weight is 14 MB of traffic to cast). Nothing is kept after it,
        so a write to the parameters between calls, through ``.data`` too, is always seen."""
        if "_casts" in self.__dict__:  # (nested: the outer one keeps them)
            yield
            return
        self.__dict__["_casts"] = {}
        try:
            yield
        finally:
            self.__dict__.pop("_casts", None)

    def _cast_params(self, name: str, dtype: torch.dtype):
        """Layer ``name``'s (fc1's, fc2's) weight and bias in ``dtype``: cast once within
        casts_kept, once a call elsewhere."""
        layer = getattr(self, name)
        w, b = layer.weight, layer.bias
        if w.dtype == dtype and (b is None or b.dtype == dtype):
            return w, b
        casts = self.__dict__.get("_casts")
        if casts is None or torch.compiler.is_compiling():
            return w.detach().to(dtype), None if b is None else b.detach().to(dtype)
        if (name, dtype) not in casts:
            casts[name, dtype] = (w.detach().to(dtype),
                                  None if b is None else b.detach().to(dtype))
        return casts[name, dtype]


def _over_last_dim(x: torch.Tensor, channels_dim: int, op) -> torch.Tensor:
    """``op`` (which works over the last dimension) on x's channels: for VMamba's Linear2d
    (channels_dim 1, (B, C, H, W)) through the (B, H, W, C) view, which channels-last storage
    makes contiguous, and its result viewed back."""
    if channels_dim == 1:
        return op(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return op(x)


# add_mlp in place: the batch in slices whose hidden layer is at most CHUNK_BYTES, at most
# INFERENCE_CHUNKS of them (VMamba-T stage 1, 128 images at 224 px: 308 MB of bf16 hidden
# layer, 4 slices; small hidden layers stay whole, where more launches would cost more than
# the memory is worth)
INFERENCE_CHUNKS, CHUNK_BYTES = 4, 64 * 2**20


def batch_slices(nbytes: float) -> int:
    """How many slices of the batch to run an inference step in whose largest activation is
    ``nbytes``: up to INFERENCE_CHUNKS, so that a slice's is at most CHUNK_BYTES."""
    return int(min(INFERENCE_CHUNKS, max(1, -(-nbytes // CHUNK_BYTES))))


def _same_buffer(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b are views of one buffer; meta tensors (which have no data, so every
    data_ptr is 0) compare by their storage object."""
    sa, sb = a.untyped_storage(), b.untyped_storage()
    if a.device.type == "meta" or b.device.type == "meta":
        return sa._cdata == sb._cdata
    return sa.data_ptr() == sb.data_ptr()


def add_mlp(mlp: nn.Module, h: torch.Tensor, s: torch.Tensor, x: torch.Tensor,
            drop_path: nn.Module | None = None, backend: str | None = None) -> torch.Tensor:
    """``s + drop_path(mlp(h))``: a pre-norm block's second residual add, with ``s`` the block's
    sum after its first branch and ``h`` its norm, ``x`` the block's input. Where autograd
    records nothing, drop path is the identity and ``s`` has storage of its own (not ``x``'s),
    the MLP's output is added into ``s`` in place, a slice of the batch at a time (up to
    INFERENCE_CHUNKS, see CHUNK_BYTES): the same values, no second sum allocated, and a quarter
    of a large 4x-wide hidden layer alive instead of all of it (in one piece where the whole
    MLP is one mlp_residual_ pass, ``Mlp.fuses_whole``, which writes no hidden layer). (Under
    torch.compile the plain sum: the compiler plans the buffers itself.) ``backend``, where
    given, goes to ``mlp(h, backend=backend)``."""
    recording = records(h, mlp) or records(s)
    identity = drop_path is None or not drop_path.training or getattr(drop_path, "p", 0) == 0
    if torch.compiler.is_compiling() or recording or not identity or _same_buffer(s, x):
        out = mlp(h) if backend is None else mlp(h, backend=backend)
        return s + (out if drop_path is None else drop_path(out))
    fc1 = getattr(mlp, "fc1", None)
    ratio = fc1.out_features / fc1.in_features if isinstance(fc1, nn.Linear) else 4
    chunks = batch_slices(h.numel() * ratio * h.element_size())
    whole = isinstance(mlp, Mlp) and mlp.fuses_whole(s, h, backend)
    if whole:
        chunks = 1  # (one mlp_residual_ pass: no hidden layer alive to bound, one launch)
    with mlp.casts_kept() if isinstance(mlp, Mlp) else contextlib.nullcontext():
        for hc, sc in zip(h.chunk(chunks), s.chunk(chunks)):
            if isinstance(mlp, Mlp):  # (fc2 and the add in one pass where it can)
                mlp.add_into(sc, hc, backend, whole)
            else:
                sc.add_(mlp(hc) if backend is None else mlp(hc, backend=backend))
    return s


def norm_add_mlp(norm: nn.Module, mlp: nn.Module, branch: torch.Tensor, x: torch.Tensor,
                 drop_path: nn.Module | None = None, backend: str | None = None,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """A pre-norm block's second half, ``s + mlp(norm(s))`` with ``s = x + branch``, as one
    ``pyssm.ops.norm_mlp_residual`` pass (the sum, its norm and the hidden layer never
    written; the values of ``norm.add(branch, x, for_matmul=True)`` and then ``add_mlp``), or
    None where that does not apply: PYSSM_NORM_MLP=0 or PYSSM_MLP_RESIDUAL=0 (the device
    check's switch after a failed smoke of either whole-MLP kernel), torch.compile tracing,
    autograd recording, a drop path that is not the identity, hooks on the norm, the MLP or
    its layers, a norm other than pyssm's LayerNorm / LayerNorm2d or an MLP that ``add_mlp``
    would not run as one mlp_residual_ pass (``Mlp.fuses_whole``'s conditions: a GELU MLP up to
    FUSED_MLP_WIDTH wide in 16-bit products, its layers matching the norm's layout), or the
    kernel not running (the backend's choice: ``backend``, else the MLP's). x and branch and the
    result are (B, C, H, W) stored channels-last for VMamba's channel-first configs, (..., C)
    otherwise; the result in ``out_dtype`` where given (the op's cast in its pass), else in
    the promoted dtype of x and branch."""
    if os.environ.get("PYSSM_NORM_MLP", "") == "0" or torch.compiler.is_compiling():
        return None
    identity = drop_path is None or not drop_path.training or getattr(drop_path, "p", 0) == 0
    if (not identity or type(norm) not in (LayerNorm, LayerNorm2d) or not isinstance(mlp, Mlp)
            or hooked(norm, mlp) or records(x, norm) or records(branch)):
        return None
    channels_dim = mlp._whole_layout(x)  # (PYSSM_MLP_RESIDUAL=0: no whole-MLP pass at all)
    dtype = matmul_dtype(branch) or torch.promote_types(x.dtype, branch.dtype)
    if (channels_dim != (1 if type(norm) is LayerNorm2d else -1)
            or dtype not in (torch.float16, torch.bfloat16)):
        return None
    fc1, fc2 = mlp.fc1, mlp.fc2
    backend = backend or mlp.backend
    if not norm_mlp_residual_uses_triton(x, branch, norm.weight, norm.bias, fc1.weight, fc1.bias,
                                         fc2.weight, fc2.bias, dtype, backend, out_dtype):
        return None
    params = (*mlp._cast_params("fc1", dtype), *mlp._cast_params("fc2", dtype))
    if channels_dim == 1:  # channels-last storage: (B, H, W, C) views, no copies
        x, branch = x.permute(0, 2, 3, 1), branch.permute(0, 2, 3, 1)
    out = norm_mlp_residual(x, branch, norm.weight, norm.bias, *params, eps=norm.eps,
                            activation=mlp._activation(), dtype=dtype, out_dtype=out_dtype,
                            backend=backend)
    return out.permute(0, 3, 1, 2) if channels_dim == 1 else out
