"""The encoders' MLP, GELU and second residual add (pyssm/models/mlp.py): the in-place GELU and
the in-place, batch-sliced residual MLP where autograd records nothing give the values of the
out-of-place ones, and leave training untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyssm.models.mlp import GELU, Mlp, add_mlp
from pyssm.models.vmamba import Linear2d


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
