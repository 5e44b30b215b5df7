"""The encoders' MLP and GELU (pyssm/models/mlp.py): the in-place GELU where autograd records
nothing gives the values of the out-of-place one, and leaves training untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyssm.models.mlp import GELU, Mlp
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
