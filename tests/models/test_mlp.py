"""The encoders' MLP, GELU and second residual add (pyssm/models/mlp.py): the in-place GELU and
the in-place, batch-sliced residual MLP where autograd records nothing give the values of the
out-of-place ones, and leave training untouched; fc1 + GELU as pyssm.ops.linear_gelu and fc2 +
the residual add as pyssm.ops.linear_residual_ in 16-bit inference where their kernels run, and
only there."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from triton_params import INTERPRETER

from pyssm.models.mlp import GELU, Mlp, add_mlp, norm_add_mlp
from pyssm.models.norms import LayerNorm, LayerNorm2d
from pyssm.models.vmamba import Linear2d
from pyssm.ops import _triton
from pyssm.ops.linear_gelu import linear_gelu
from pyssm.ops.linear_residual import linear_residual_
from pyssm.ops.mlp_gelu import mlp_gelu
from pyssm.ops.mlp_residual import mlp_residual_
from pyssm.ops.norm_mlp_residual import norm_mlp_residual


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("channel_first", [False, True])
def test_inference_equals_the_plain_composition(approximate, channel_first):
    torch.manual_seed(0)
    mlp = Mlp(6, 17, Linear2d if channel_first else torch.nn.Linear)
    mlp.act.approximate = approximate
    x = torch.randn(3, 6, 5, 7) if channel_first else torch.randn(3, 5, 6)
    want = mlp.fc2(F.gelu(mlp.fc1(x), approximate=approximate))
    with torch.no_grad():
        assert torch.equal(mlp(x), want.detach())
    with torch.inference_mode():
        assert torch.equal(mlp(x), want.detach())
    mlp.requires_grad_(False)  # a frozen MLP with grad mode on: nothing recorded either
    assert torch.equal(mlp(x), want.detach())


def test_training_keeps_gelus_input_for_the_backward():
    torch.manual_seed(0)
    mlp = Mlp(6, 17)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    mlp.double()
    torch.autograd.gradcheck(mlp, (x,))
    out = mlp(x)
    out.sum().backward()
    assert all(p.grad is not None for p in mlp.parameters())


def test_gelu_in_place_only_where_nothing_is_recorded():
    x = torch.randn(5, 7)
    want = F.gelu(x)
    with torch.no_grad():
        y = GELU()(x)
    assert torch.equal(y, want) and y.data_ptr() == x.data_ptr()  # (x's buffer, overwritten)
    leaf = torch.randn(5, 7, requires_grad=True)
    y = GELU()(leaf)
    assert y.data_ptr() != leaf.data_ptr() and y.grad_fn is not None


@pytest.mark.parametrize("chunk_bytes", [2**30, 1000, 1], ids=["whole", "2-slices", "at-most-4"])
def test_add_mlp_in_place_in_inference(chunk_bytes, monkeypatch):
    import pyssm.models.mlp as mlp_module
    monkeypatch.setattr(mlp_module, "CHUNK_BYTES", chunk_bytes)  # (hidden: 5 x 3 x 24 x 4 B = 1440)
    calls = []
    torch.manual_seed(0)
    mlp = Mlp(6, 24)
    mlp.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    x, h, s = torch.randn(5, 3, 6), torch.randn(5, 3, 6), torch.randn(5, 3, 6)
    want = s + mlp(h).detach()
    calls.clear()
    with torch.no_grad():
        out = add_mlp(mlp, h, s.clone(), x)
        assert calls == {2**30: [5], 1000: [3, 2], 1: [2, 2, 1]}[chunk_bytes]
        s_own = s.clone()
        assert add_mlp(mlp, h, s_own, x) is s_own  # into the block's own sum
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
        # a sum that is the block's input itself (no storage of its own): out of place
        kept = x.clone()
        out = add_mlp(mlp, h, x, x)
        assert torch.equal(x, kept) and out is not x
        torch.testing.assert_close(out, x + mlp(h), rtol=0, atol=0)


def test_add_mlp_out_of_place_when_recording_or_dropping():
    torch.manual_seed(0)
    mlp = Mlp(6, 24).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    h = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    s = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda h, s: add_mlp(mlp, h, s, x), (h, s))
    from pyssm.models.vmamba import DropPath
    drop = DropPath(0.5).train()
    s2 = torch.randn(4, 6, dtype=torch.float64)
    with torch.no_grad():
        kept = s2.clone()
        torch.manual_seed(1)
        out = add_mlp(mlp, h.detach(), s2, x, drop)
        assert torch.equal(s2, kept) and out is not s2


def test_add_mlp_trains_an_mlp_behind_frozen_inputs():
    """Inputs that need no gradient but an MLP that does (a frozen trunk, a trained MLP): the
    out-of-place sum, and the MLP's gradients as plain autograd gives them."""
    torch.manual_seed(0)
    mlp = Mlp(6, 24).double()
    x, h, s = (torch.randn(4, 6, dtype=torch.float64) for _ in range(3))
    out = add_mlp(mlp, h, s, x)
    assert out is not s
    got = torch.autograd.grad(out.square().sum(), list(mlp.parameters()))
    want = torch.autograd.grad((s + mlp(h)).square().sum(), list(mlp.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_add_mlp_tells_meta_buffers_apart():
    """Meta tensors (bench/roofline_model.py traces the encoders on them) have no data, so every
    data_ptr is 0: a sum with its own storage still takes the in-place path, the block's input
    itself still the out-of-place one."""
    mlp = Mlp(6, 24).to("meta")
    x, h, s = (torch.empty(4, 6, device="meta") for _ in range(3))
    with torch.no_grad():
        assert add_mlp(mlp, h, s, x) is s
        assert add_mlp(mlp, h, x, x) is not x
        assert add_mlp(mlp, h[1:], x[1:], x) is not x  # a view of x, at an offset




def _spy_fused(monkeypatch):
    """The calls the MLPs make to linear_gelu, as (out_dtype, the weight passed)."""
    import pyssm.models.mlp as mlp_module
    calls = []

    def spy(x, weight, bias=None, **kwargs):
        calls.append((kwargs.get("out_dtype"), weight))
        return linear_gelu(x, weight, bias, **kwargs)

    monkeypatch.setattr(mlp_module, "linear_gelu", spy)
    return calls


@INTERPRETER
@pytest.mark.parametrize("channel_first", [False, True])
def test_fc1_and_gelu_fused_in_16_bit_inference(channel_first, monkeypatch):
    """bf16 inference with linear_gelu's kernel asked for (backend "triton"; Triton's
    interpreter here): fc1 + GELU run as that op, the rest as before; within bf16's rounding of
    the float64 MLP; channels-last in, channels-last out for VMamba's channel-first MLP."""
    calls = _spy_fused(monkeypatch)
    torch.manual_seed(0)
    mlp = Mlp(6, 17, Linear2d if channel_first else torch.nn.Linear).to(torch.bfloat16)
    x = (torch.randn(3, 6, 5, 7).contiguous(memory_format=torch.channels_last) if channel_first
         else torch.randn(3, 5, 6)).to(torch.bfloat16)
    with torch.no_grad():
        got = mlp(x, backend="triton")
        assert [dtype for dtype, _ in calls] == [torch.bfloat16]
        want = mlp.double()(x.double())
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=0.03, atol=0.02)
    if channel_first:
        assert got.is_contiguous(memory_format=torch.channels_last)


def _mlp_and_inputs():
    """A float32 Mlp(8, 32) and a block's (h, s, x), (2, 3, 8) each, the same every call."""
    torch.manual_seed(0)
    return Mlp(8, 32), torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8)


@INTERPRETER
def test_fc1_and_gelu_fused_under_cpu_autocast_and_through_add_mlp(monkeypatch):
    """float32 parameters and input under bf16 autocast: the fused op in bf16 (as autocast would
    run fc1), and add_mlp passes its backend to the MLP."""
    _two_passes(monkeypatch)  # (MLPs up to 256 wide are one mlp_residual_ pass)
    calls = _spy_fused(monkeypatch)
    mlp, h, s, x = _mlp_and_inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = add_mlp(mlp, h, s.clone(), x, backend="triton")
    assert [dtype for dtype, _ in calls] == [torch.bfloat16]
    torch.testing.assert_close(out.double(), (s + mlp(h)).double(), rtol=0.03, atol=0.03)


def _spy_residual(monkeypatch):
    """The calls add_mlp's MLPs make to linear_residual_, as (x's dtype, the weight passed)."""
    import pyssm.models.mlp as mlp_module
    calls = []

    def spy(s, x, weight, bias=None, **kwargs):
        calls.append((x.dtype, weight))
        return linear_residual_(s, x, weight, bias, **kwargs)

    monkeypatch.setattr(mlp_module, "linear_residual_", spy)
    return calls


def _two_passes(monkeypatch):
    """add_into as for an MLP wider than FUSED_MLP_WIDTH: linear_gelu, then linear_residual_
    (not the whole MLP as one mlp_residual_)."""
    import pyssm.models.mlp as mlp_module
    monkeypatch.setattr(mlp_module, "FUSED_MLP_WIDTH", 0)


def _spy_whole(monkeypatch):
    """The calls add_mlp's MLPs make to mlp_residual_, as (x's dtype, fc1's weight, fc2's)."""
    import pyssm.models.mlp as mlp_module
    calls = []

    def spy(s, x, w1, b1, w2, b2, **kwargs):
        calls.append((x.dtype, w1, w2))
        return mlp_residual_(s, x, w1, b1, w2, b2, **kwargs)

    monkeypatch.setattr(mlp_module, "mlp_residual_", spy)
    return calls


@INTERPRETER
@pytest.mark.parametrize("channel_first", [False, True])
def test_fc2_and_the_residual_add_fused_in_16_bit_inference(channel_first, monkeypatch):
    """bf16 inference through add_mlp with the Triton ops asked for: each slice of the batch
    (here 3, CHUNK_BYTES made small) adds fc2's output into the float32 sum in place as one
    linear_residual_ pass; the values of s + mlp(h) within bf16's rounding of fc2's output;
    channels-last (B, C, H, W) sums for VMamba's channel-first MLP."""
    _two_passes(monkeypatch)  # (MLPs up to 256 wide are one mlp_residual_ pass)
    import pyssm.models.mlp as mlp_module
    calls = _spy_residual(monkeypatch)
    monkeypatch.setattr(mlp_module, "CHUNK_BYTES", 1)
    torch.manual_seed(0)
    mlp = Mlp(6, 17, Linear2d if channel_first else torch.nn.Linear).to(torch.bfloat16)
    shape = (3, 6, 5, 7) if channel_first else (3, 5, 6)
    fmt = torch.channels_last if channel_first else torch.contiguous_format
    h, x = (torch.randn(shape).to(torch.bfloat16).contiguous(memory_format=fmt)
            for _ in range(2))
    s = torch.randn(shape).contiguous(memory_format=fmt)
    with torch.no_grad():
        want = s + mlp(h)  # fc2's bf16 output, then the promoted add
        got = add_mlp(mlp, h, s.clone(), x, backend="triton")
    assert [dtype for dtype, _ in calls] == [torch.bfloat16] * 3
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(got, want, rtol=0, atol=2 ** -7 * want.abs().max().item())


@INTERPRETER
@pytest.mark.parametrize("write", ["in_place", "data"])
def test_fc2_weight_cast_once_an_add_mlp_call(write, monkeypatch):
    """float32 parameters under bf16 autocast: fc2's weight cast to bf16 once for an add_mlp
    call (its two slices of the batch, CHUNK_BYTES made small, get the same tensor) and again
    at the next, so that a write between calls is seen, an in-place one (as an optimizer's)
    and one through ``.data`` (which bypasses the version counter) alike."""
    _two_passes(monkeypatch)  # (MLPs up to 256 wide are one mlp_residual_ pass)
    import pyssm.models.mlp as mlp_module
    monkeypatch.setattr(mlp_module, "CHUNK_BYTES", 1)
    calls = _spy_residual(monkeypatch)
    mlp, h, s, x = _mlp_and_inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = add_mlp(mlp, h, s.clone(), x, backend="triton")
        want = s + mlp(h, backend="triton")  # fc2's bf16 output, then the promoted add
        if write == "data":
            mlp.fc2.weight.data.mul_(2)
        else:
            mlp.fc2.weight.mul_(2)
        doubled = add_mlp(mlp, h, s.clone(), x, backend="triton")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # (autocast's own cast
        want_doubled = s + mlp(h, backend="triton")  # of fc2 is kept for its region)
    weights = [w for _, w in calls]
    assert [d for d, _ in calls] == [torch.bfloat16] * 4 and weights[0].dtype == torch.bfloat16
    assert weights[0] is weights[1] and weights[2] is weights[3]
    assert weights[2] is not weights[0]
    assert torch.equal(weights[2], mlp.fc2.weight.to(torch.bfloat16))
    for got, ref in ((out, want), (doubled, want_doubled)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=0, atol=2 ** -7 * ref.abs().max().item())
    assert not torch.allclose(out, doubled)


@INTERPRETER
def test_fused_paths_step_aside_for_forward_hooks(monkeypatch):
    """A forward hook on fc1 or fc2 sees its layer called (the fused op that would skip it is
    not used), the other layer stays fused; the values are the same."""
    _two_passes(monkeypatch)  # (MLPs up to 256 wide are one mlp_residual_ pass)
    fc1_calls, fc2_calls = _spy_fused(monkeypatch), _spy_residual(monkeypatch)
    torch.manual_seed(0)
    mlp = Mlp(8, 32).to(torch.bfloat16)
    h, x = torch.randn(2, 3, 8).bfloat16(), torch.randn(2, 3, 8).bfloat16()
    s = torch.randn(2, 3, 8)
    seen = []
    with torch.no_grad():
        fused = add_mlp(mlp, h, s.clone(), x, backend="triton")
        assert len(fc1_calls) == len(fc2_calls) == 1
        handle = mlp.fc2.register_forward_hook(lambda m, a, out: seen.append("fc2"))
        torch.testing.assert_close(add_mlp(mlp, h, s.clone(), x, backend="triton"), fused,
                                   rtol=0, atol=2 ** -7 * fused.abs().max().item())
        assert (len(fc1_calls), len(fc2_calls), seen) == (2, 1, ["fc2"])
        handle.remove()
        mlp.fc1.register_forward_hook(lambda m, a, out: seen.append("fc1"))
        add_mlp(mlp, h, s.clone(), x, backend="triton")
        assert (len(fc1_calls), len(fc2_calls), seen) == (2, 2, ["fc2", "fc1"])


def test_fc2_and_add_unfused_where_the_op_does_not_apply(monkeypatch):
    """float32 products, the reference backend, the plain sum (recording autograd), or
    PYSSM_LINEAR_RESIDUAL=0: fc2 and then the add (the op is never called)."""
    calls = _spy_residual(monkeypatch)
    torch.manual_seed(0)
    mlp = Mlp(6, 17)
    h, s, x = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 6)
    triton = "triton" if _triton.available() and _triton.interpreting() else None
    with torch.no_grad():
        add_mlp(mlp, h, s.clone(), x, backend=triton)  # float32, no autocast
        mlp.bfloat16()
        add_mlp(mlp, h.bfloat16(), s.clone(), x, backend="reference")
    add_mlp(mlp, h.bfloat16(), s.clone(), x, backend=triton)  # recording: the plain sum
    monkeypatch.setenv("PYSSM_LINEAR_RESIDUAL", "0")  # the device check's switch
    with torch.no_grad():
        out = add_mlp(mlp, h.bfloat16(), s.clone(), x, backend=triton)
        want = s + mlp(h.bfloat16(), backend=triton)
    assert calls == []
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_fc1_and_gelu_unfused_where_the_op_does_not_apply(monkeypatch):
    """Recording autograd, a SiLU, a float32 product, or the reference backend: fc1 and
    then the GELU, as before (the op is never called)."""
    calls = _spy_fused(monkeypatch)
    torch.manual_seed(0)
    mlp = Mlp(6, 17)
    x = torch.randn(4, 6)
    triton = "triton" if _triton.available() and _triton.interpreting() else None
    with torch.no_grad():
        mlp(x)  # float32, no autocast
        mlp.bfloat16()
        mlp(x.bfloat16(), backend="reference")
        gelu, mlp.act = mlp.act, torch.nn.SiLU()  # an activation the op does not compute
        if triton:
            mlp(x.bfloat16(), backend=triton)
        mlp.act = gelu
    mlp(x.bfloat16(), backend=triton)  # recording
    monkeypatch.setenv("PYSSM_LINEAR_GELU", "0")  # the device check's switch
    with torch.no_grad():
        mlp(x.bfloat16(), backend=triton)
    assert calls == []


def test_encoders_set_the_mlps_backend(monkeypatch):
    """set_backend gives the MLPs the backend of the models' Triton ops: Triton for "cuda",
    torch's ops when PYSSM_TRITON=0 (the device check's switch after a failed Triton smoke)."""
    from pyssm.models import create_encoder
    model = create_encoder("vmamba_tiny_s1l8", img_size=64, depths=(1, 1, 1, 1), dims=8)
    mlps = [m for m in model.modules() if isinstance(m, Mlp)]
    model.set_backend("cpu")
    assert {m.backend for m in mlps} == {"reference"}
    model.set_backend(None)
    assert {m.backend for m in mlps} == {None}
    model.set_backend("cuda")
    assert {m.backend for m in mlps} == {"triton"}
    monkeypatch.setenv("PYSSM_TRITON", "0")
    model.set_backend("cuda")
    assert {m.backend for m in mlps} == {"reference"}
    assert {m.backend for m in model.modules() if isinstance(m, LayerNorm)} == {"reference"}


@INTERPRETER
def test_fc1_weight_cast_once_within_casts_kept(monkeypatch):
    """Under autocast the fused path casts fc1's float32 weight to bf16 once within
    Mlp.casts_kept (add_mlp's slices), once a call outside it: a write through ``.data``
    between calls is seen."""
    calls = _spy_fused(monkeypatch)
    torch.manual_seed(0)
    mlp = Mlp(8, 32)
    x = torch.randn(3, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with mlp.casts_kept():
            first = mlp(x, backend="triton")
            mlp(x, backend="triton")
        seen = [weight for _, weight in calls]
        assert len(seen) == 2 and seen[0] is seen[1] and seen[0].dtype == torch.bfloat16
        mlp.fc1.weight.data.mul_(2)  # (unseen by the version counter)
        again = mlp(x, backend="triton")
    seen = [weight for _, weight in calls]
    assert seen[2] is not seen[0]
    assert torch.equal(seen[2], mlp.fc1.weight.to(torch.bfloat16))
    assert not torch.equal(first, again)
    assert "_casts" not in mlp.__dict__


def _spy_norm_whole(monkeypatch):
    """The calls norm_add_mlp makes to norm_mlp_residual, as the products' dtype, or as (that,
    the output's dtype) where the output's is asked for."""
    import pyssm.models.mlp as mlp_module
    calls = []

    def spy(*args, **kwargs):
        out = kwargs.get("out_dtype")
        calls.append(kwargs["dtype"] if out is None else (kwargs["dtype"], out))
        return norm_mlp_residual(*args, **kwargs)

    monkeypatch.setattr(mlp_module, "norm_mlp_residual", spy)
    return calls


@INTERPRETER
@pytest.mark.parametrize("path", ["norm_mlp_residual", "mlp_residual", "two-passes"])
@pytest.mark.parametrize("name,size", [("vmamba_tiny_s1l8", 64), ("vit_tiny_patch16", 48)])
def test_encoders_take_the_fused_mlp_ops_in_16_bit_inference(name, size, path, monkeypatch):
    """A whole encoder in bf16-autocast inference with every MLP's backend set to Triton (its
    interpreter here; on a GPU set_backend("cuda") sets it): every MLP (these are at most 192
    wide) runs with its norm and the residual add before it as one norm_mlp_residual; with
    PYSSM_NORM_MLP=0 as one mlp_residual_ after the norm; or, as wider MLPs do, fc1 + GELU as
    linear_gelu and fc2 + the add as linear_residual_; the logits are those of torch's ops
    within bf16 rounding."""
    from pyssm.models import create_encoder
    fc1_calls, fc2_calls = _spy_fused(monkeypatch), _spy_residual(monkeypatch)
    whole_calls, norm_calls = _spy_whole(monkeypatch), _spy_norm_whole(monkeypatch)
    whole = path == "mlp_residual"
    if path != "norm_mlp_residual":
        monkeypatch.setenv("PYSSM_NORM_MLP", "0")
    if path == "two-passes":
        _two_passes(monkeypatch)
    torch.manual_seed(0)
    small = dict(depths=(1, 2, 1, 1), dims=16) if name.startswith("vmamba") else dict(depth=2)
    model = create_encoder(name, img_size=size, num_classes=10, **small).eval()
    mlps = [m for m in model.modules() if isinstance(m, Mlp)]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for m in mlps:
            m.backend = "reference"
        want = model(x).float()
        assert fc1_calls == [] and fc2_calls == [] and whole_calls == [] and norm_calls == []
        for m in mlps:
            m.backend = "triton"
        got = model(x).float()
    if path == "norm_mlp_residual":  # (VMamba: the ends of stages 1-3 written in bf16)
        ends = 3 if name.startswith("vmamba") else 0
        assert len(norm_calls) == len(mlps) > 0
        assert norm_calls.count((torch.bfloat16, torch.bfloat16)) == ends
        assert norm_calls.count(torch.bfloat16) == len(mlps) - ends
        assert fc1_calls == [] and fc2_calls == [] and whole_calls == []
    elif whole:
        assert len(whole_calls) == len(mlps) > 0 and fc1_calls == [] and fc2_calls == []
        assert norm_calls == []
    else:
        assert len(fc1_calls) == len(fc2_calls) == len(mlps) > 0 and whole_calls == []
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * want.abs().max().item())


@INTERPRETER
@pytest.mark.parametrize("channel_first", [False, True])
def test_whole_mlp_and_the_residual_add_fused_in_16_bit_inference(channel_first, monkeypatch):
    """bf16 inference through add_mlp with the Triton ops asked for, an MLP up to
    FUSED_MLP_WIDTH wide: the MLP's output added into the float32 sum in place as one
    mlp_residual_ pass for the whole batch (no slices, though CHUNK_BYTES is made small: there
    is no hidden layer to bound); the values of s + mlp(h) within bf16's rounding of fc2's
    output; channels-last (B, C, H, W) sums for VMamba's channel-first MLP."""
    import pyssm.models.mlp as mlp_module
    calls = _spy_whole(monkeypatch)
    fc1_calls, fc2_calls = _spy_fused(monkeypatch), _spy_residual(monkeypatch)
    monkeypatch.setattr(mlp_module, "CHUNK_BYTES", 1)
    torch.manual_seed(0)
    mlp = Mlp(6, 17, Linear2d if channel_first else torch.nn.Linear)
    shape = (3, 6, 5, 7) if channel_first else (3, 5, 6)
    fmt = torch.channels_last if channel_first else torch.contiguous_format
    h, x = (torch.randn(shape).contiguous(memory_format=fmt) for _ in range(2))
    s = torch.randn(shape).contiguous(memory_format=fmt)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = s + mlp(h)  # autocast's bf16 fc1, GELU, fc2, then the promoted add
        got = add_mlp(mlp, h, s.clone(), x, backend="triton")
    assert [d for d, _, _ in calls] == [torch.bfloat16] and not fc1_calls and not fc2_calls
    assert calls[0][1].dtype == calls[0][2].dtype == torch.bfloat16  # (autocast's cast)
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(got, want, rtol=0, atol=2 ** -6 * want.abs().max().item())


@INTERPRETER
def test_whole_mlp_unfused_where_mlp_residual_does_not_apply(monkeypatch):
    """Wider than FUSED_MLP_WIDTH, a hook on fc1, the GELU or fc2, a SiLU, float32 products,
    the reference backend, recording autograd, or PYSSM_MLP_RESIDUAL=0: not one mlp_residual_
    (the two passes where they apply, the layers elsewhere), the same values within bf16's
    rounding."""
    import pyssm.models.mlp as mlp_module
    calls = _spy_whole(monkeypatch)
    torch.manual_seed(0)
    mlp = Mlp(8, 32)
    h, s, x = torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = add_mlp(mlp, h, s.clone(), x, backend="triton")
        assert len(calls) == 1
        results = []
        with monkeypatch.context() as m:
            m.setattr(mlp_module, "FUSED_MLP_WIDTH", 7)
            results.append(add_mlp(mlp, h, s.clone(), x, backend="triton"))
        for layer in (mlp.fc1, mlp.act, mlp.fc2):
            handle = layer.register_forward_hook(lambda *a: None)
            results.append(add_mlp(mlp, h, s.clone(), x, backend="triton"))
            handle.remove()
        add_mlp(mlp, h, s.clone(), x, backend="reference")
        with monkeypatch.context() as m:
            m.setenv("PYSSM_MLP_RESIDUAL", "0")
            results.append(add_mlp(mlp, h, s.clone(), x, backend="triton"))
        gelu, mlp.act = mlp.act, torch.nn.SiLU()
        add_mlp(mlp, h, s.clone(), x, backend="triton")
        mlp.act = gelu
    with torch.no_grad():
        add_mlp(mlp, h, s.clone(), x, backend="triton")  # float32 products
    with torch.autocast("cpu", dtype=torch.bfloat16):
        add_mlp(mlp, h, s.clone(), x, backend="triton")  # recording: the plain sum
    assert len(calls) == 1
    for got in results:
        torch.testing.assert_close(got, fused, rtol=0, atol=2 ** -6 * fused.abs().max().item())


@INTERPRETER
@pytest.mark.parametrize("channel_first", [False, True])
def test_norm_add_mlp_fused_in_16_bit_inference(channel_first, monkeypatch):
    """bf16 inference, the Triton ops asked for, an MLP up to FUSED_MLP_WIDTH wide: the residual
    add, the norm and the whole MLP as one norm_mlp_residual, with the values of the norm's add
    and then add_mlp (the norm rounded to bf16, the hidden layer and the MLP's output too)
    within bf16's rounding of the MLP's output; x untouched; channels-last (B, C, H, W) in and
    out for VMamba's channel-first blocks."""
    calls = _spy_norm_whole(monkeypatch)
    torch.manual_seed(0)
    mlp = Mlp(6, 17, Linear2d if channel_first else torch.nn.Linear)
    norm = (LayerNorm2d if channel_first else LayerNorm)(6)
    with torch.no_grad():
        norm.weight.normal_(1, 0.3), norm.bias.normal_(0, 0.2)
    shape = (3, 6, 5, 7) if channel_first else (3, 5, 6)
    fmt = torch.channels_last if channel_first else torch.contiguous_format
    x = (torch.randn(shape) * 2 + 1).contiguous(memory_format=fmt)
    branch = torch.randn(shape).contiguous(memory_format=fmt)
    kept = x.clone()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        h, s = norm.add(branch.bfloat16(), x, for_matmul=True, backend="reference")
        want = add_mlp(mlp, h, s, x, backend="reference")
        got = norm_add_mlp(norm, mlp, branch.bfloat16(), x, backend="triton")
        cast = norm_add_mlp(norm, mlp, branch.bfloat16(), x, backend="triton",
                            out_dtype=torch.bfloat16)
    assert calls == [torch.bfloat16, (torch.bfloat16, torch.bfloat16)]
    assert torch.equal(cast, got.bfloat16()) and cast.is_contiguous(memory_format=fmt)
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=fmt)
    assert torch.equal(x, kept)
    torch.testing.assert_close(got, want, rtol=0, atol=2 ** -6 * want.abs().max().item())


@INTERPRETER
def test_vmamba_stage_ends_written_for_the_downsampling(monkeypatch):
    """bf16 inference through the Triton ops: in forward the last block of each stage whose
    output only the downsampling convolution reads writes it in bf16 (norm_mlp_residual's
    out_dtype), the features bitwise those of forward_intermediates, which keeps every stage's
    output in float32 (the same values: the convolution's cast made in the pass); tokens() runs
    no downsampling after its tap; a hook on the last block, or a v1 patch merging (whose norm
    reads float32), keeps the stage's output float32."""
    from pyssm.models import create_encoder
    from pyssm.models.vmamba import PatchMerging2D
    calls = _spy_norm_whole(monkeypatch)
    torch.manual_seed(0)
    model = create_encoder("vmamba_tiny_s1l8", img_size=64, num_classes=0, depths=(1, 2, 1, 1),
                           dims=16).eval()
    for m in model.modules():
        if isinstance(m, Mlp):
            m.backend = "triton"
    x = torch.randn(2, 3, 64, 64)
    downsampled = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.forward_features(x)
        assert [c for c in calls if isinstance(c, tuple)] == [(torch.bfloat16,) * 2] * 3
        calls.clear()
        kept, _ = model.forward_intermediates(x)
        assert calls == [torch.bfloat16] * 5
        assert torch.equal(features, kept)
        handle = model.layers[2].downsample.register_forward_hook(
            lambda *a: downsampled.append(1))
        tokens = model.tokens(x, tap=3)
        handle.remove()
        assert downsampled == [] and tokens.shape == (2, 4 * 4, 64)
        calls.clear()
        handle = model.layers[0].blocks[-1].register_forward_hook(lambda *a: None)
        model.forward_features(x)
        handle.remove()
        assert calls.count((torch.bfloat16,) * 2) == 2  # (stage 1's end stays float32)
        assert model._downsampled_dtype(model.layers[0].downsample, x) == torch.bfloat16
        assert model._downsampled_dtype(PatchMerging2D(model.cfg, 16, 32), x) is None
    assert model._downsampled_dtype(model.layers[0].downsample, x) is None  # (no autocast)


@INTERPRETER
def test_norm_add_mlp_steps_aside_where_the_op_does_not_apply(monkeypatch):
    """None (the caller's norm.add and add_mlp then run) with PYSSM_NORM_MLP=0 or
    PYSSM_MLP_RESIDUAL=0, a hook on the norm, the MLP or one of its layers, a drop path that
    drops, autograd recording, float32 products, a norm or an activation the op does not
    compute, an MLP wider than FUSED_MLP_WIDTH, layers in the other layout, or the reference
    backend; one pass otherwise."""
    import pyssm.models.mlp as mlp_module
    from pyssm.models.vmamba import DropPath
    calls = _spy_norm_whole(monkeypatch)
    torch.manual_seed(0)
    mlp, norm = Mlp(8, 32), LayerNorm(8)
    x, branch = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    dropping = DropPath(0.5).train()

    def fused(norm=norm, mlp=mlp, drop_path=None, backend="triton"):
        return norm_add_mlp(norm, mlp, branch, x, drop_path, backend=backend)

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused() is not None and fused(drop_path=DropPath(0.5).eval()) is not None
        assert len(calls) == 2
        for switch in ("PYSSM_NORM_MLP", "PYSSM_MLP_RESIDUAL"):
            with monkeypatch.context() as m:
                m.setenv(switch, "0")
                assert fused() is None
        for module in (norm, mlp, mlp.fc1, mlp.act, mlp.fc2):
            handle = module.register_forward_hook(lambda *a: None)
            assert fused() is None
            handle.remove()
        assert fused(drop_path=dropping) is None
        assert fused(norm=torch.nn.LayerNorm(8)) is None
        assert fused(norm=LayerNorm2d(8)) is None  # (nn.Linear layers: channel-last)
        assert fused(mlp=Mlp(8, 32, Linear2d)) is None
        gelu, mlp.act = mlp.act, torch.nn.SiLU()
        assert fused() is None
        mlp.act = gelu
        with monkeypatch.context() as m:
            m.setattr(mlp_module, "FUSED_MLP_WIDTH", 7)
            assert fused() is None
        assert fused(backend="reference") is None
    with torch.no_grad():
        assert fused() is None  # float32 products
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused() is None  # recording
    assert len(calls) == 2


def _spy_training(monkeypatch):
    """The calls the MLPs make to mlp_gelu, as x's dtype."""
    import pyssm.models.mlp as mlp_module
    calls = []

    def spy(x, *params, **kwargs):
        calls.append(x.dtype)
        return mlp_gelu(x, *params, **kwargs)

    monkeypatch.setattr(mlp_module, "mlp_gelu", spy)
    return calls


@INTERPRETER
@pytest.mark.parametrize("channel_first", [False, True])
def test_whole_mlp_fused_in_16_bit_training(channel_first, monkeypatch):
    """float32 parameters under bf16 autocast with gradients recorded and the Triton ops asked
    for: the MLP runs as one mlp_gelu (bf16), its output and the gradients into x and every
    parameter (float32, as autocast's are) within bf16's rounding of the float64 MLP;
    channels-last in, channels-last out for VMamba's channel-first MLP."""
    calls, fc1_calls = _spy_training(monkeypatch), _spy_fused(monkeypatch)
    torch.manual_seed(0)
    mlp = Mlp(6, 40, Linear2d if channel_first else torch.nn.Linear)
    x = (torch.randn(3, 6, 5, 7).contiguous(memory_format=torch.channels_last) if channel_first
         else torch.randn(3, 5, 6)).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mlp(x, backend="triton")
    assert calls == [torch.bfloat16] and fc1_calls == []
    assert got.dtype == torch.bfloat16
    if channel_first:
        assert got.is_contiguous(memory_format=torch.channels_last)
    cot = torch.randn(got.shape)
    grads = torch.autograd.grad(got.float(), [x, *mlp.parameters()], cot)
    mlp64 = Mlp(6, 40, Linear2d if channel_first else torch.nn.Linear)
    mlp64.load_state_dict(mlp.state_dict())
    mlp64.double()
    x64 = x.detach().double().requires_grad_()
    want = mlp64(x64)
    wants = torch.autograd.grad(want, [x64, *mlp64.parameters()], cot.double())
    torch.testing.assert_close(got.double(), want, rtol=0.03, atol=0.03)
    for g, w, p in zip(grads, wants, [x, *mlp.parameters()]):
        assert g.dtype == p.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, rtol=0.03, atol=0.03 * w.abs().max().item())


def test_whole_mlp_unfused_where_the_op_does_not_apply(monkeypatch):
    """Nothing recorded, float32 products, the reference backend, a SiLU, a hook on a
    layer, or PYSSM_MLP_GELU=0: the layers as before (the op is never called); the switch gives
    the same gradients within bf16's rounding."""
    calls = _spy_training(monkeypatch)
    torch.manual_seed(0)
    mlp = Mlp(6, 17)
    x = torch.randn(4, 6, requires_grad=True)
    triton = "triton" if _triton.available() and _triton.interpreting() else None
    mlp(x, backend=triton).sum().backward()  # float32, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            mlp(x, backend=triton)
        mlp(x, backend="reference")
        gelu, mlp.act = mlp.act, torch.nn.SiLU()  # an activation the op does not compute
        if triton:
            mlp(x, backend=triton)
        mlp.act = gelu
        handle = mlp.fc2.register_forward_hook(lambda m, a, out: None)
        if triton:
            mlp(x, backend=triton)
        handle.remove()
        monkeypatch.setenv("PYSSM_MLP_GELU", "0")  # the device check's switch
        unfused = mlp(x, backend=triton)
    assert calls == []
    if triton:
        monkeypatch.delenv("PYSSM_MLP_GELU")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused = mlp(x, backend=triton)
        assert calls == [torch.bfloat16]
        (g_fused,), (g_unfused,) = (torch.autograd.grad(y.float().sum(), [mlp.fc1.weight])
                                    for y in (fused, unfused))
        torch.testing.assert_close(g_fused, g_unfused, rtol=0.03,
                                   atol=0.03 * g_unfused.abs().max().item())


@INTERPRETER
@pytest.mark.parametrize("name,size", [("vmamba_tiny_s1l8", 64), ("vit_tiny_patch16", 48)])
def test_encoders_take_the_whole_mlp_op_in_16_bit_training(name, size, monkeypatch):
    """A training step of a whole encoder under bf16 autocast with every MLP's backend set to
    Triton: every MLP runs as mlp_gelu, and the loss and the parameters' gradients are those of
    torch's ops within bf16 rounding."""
    from pyssm.models import create_encoder
    calls = _spy_training(monkeypatch)
    torch.manual_seed(0)
    small = dict(depths=(1, 2, 1, 1), dims=16) if name.startswith("vmamba") else dict(depth=2)
    # (eval: drop path off, as the encoders benchmark's training step has it)
    model = create_encoder(name, img_size=size, num_classes=10, **small).eval()
    mlps = [m for m in model.modules() if isinstance(m, Mlp)]
    x = torch.randn(2, 3, size, size)
    results = []
    for backend in ("reference", "triton"):
        for m in mlps:
            m.backend = backend
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        named = [(n, p) for n, p in model.named_parameters() if "mlp" in n]
        results.append((loss, torch.autograd.grad(loss, [p for _, p in named])))
    assert len(calls) == len(mlps) > 0
    (loss_ref, g_ref), (loss, g) = results
    torch.testing.assert_close(loss, loss_ref, rtol=0.03, atol=1e-3)
    for (n, _), a, b in zip(named, g, g_ref):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05 * b.abs().max().item(), msg=n)


@INTERPRETER
@pytest.mark.parametrize("make,name", [
    (lambda: torch.nn.GELU(approximate="tanh"), "gelu_tanh"),
    (lambda: __import__("timm.layers.activations").layers.activations.QuickGELU(), "quick_gelu"),
    (lambda: __import__("transformers.activations").activations.GELUTanh(), "gelu_tanh"),
    (lambda: __import__("transformers.activations").activations.QuickGELUActivation(),
     "quick_gelu")])
@pytest.mark.parametrize("grad", [False, True])
def test_other_libraries_gelus_run_fused_with_their_activation(make, name, grad, monkeypatch):
    """nn.GELU's tanh form, timm's and transformers' tanh and quick GELU modules as the MLP's
    act: the fused op (linear_gelu in inference, mlp_gelu in training) with that activation,
    the module's own values within bf16's rounding."""
    import pyssm.models.mlp as mlp_module
    seen = []

    def spy(op):
        real = getattr(mlp_module, op)

        def call(*args, **kwargs):
            seen.append((op, kwargs.get("activation")))
            return real(*args, **kwargs)
        monkeypatch.setattr(mlp_module, op, call)

    spy("linear_gelu"), spy("mlp_gelu")
    torch.manual_seed(0)
    mlp = Mlp(8, 32)
    mlp.act = make()
    x = torch.randn(3, 5, 8, requires_grad=grad)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        got = mlp(x, backend="triton")
        want = mlp(x, backend="reference")
    assert seen == [("mlp_gelu" if grad else "linear_gelu", name)]
    torch.testing.assert_close(got.float(), want.float(), rtol=0.03, atol=0.03)
