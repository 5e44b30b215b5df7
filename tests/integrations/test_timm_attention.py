"""Swapping pyssm's attention into timm ViTs by module replacement keeps outputs and weights."""

import pytest
import torch

timm = pytest.importorskip("timm")

from pyssm.integrations.timm import Attention, swap_attention  # noqa: E402


@pytest.mark.parametrize("name,kw", [("vit_tiny_patch16_224", {}),
                                     ("vit_small_patch16_224", {"qk_norm": True})])
def test_swapped_vit_gives_timm_outputs(name, kw):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=48, depth=3, **kw).eval()
    keys = set(model.state_dict())
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        want = model.forward_features(x)
        assert swap_attention(model) == 3
        got = model.forward_features(x)
    assert all(isinstance(b.attn, Attention) for b in model.blocks)
    assert set(model.state_dict()) == keys  # checkpoints load unchanged
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_swapped_attention_trains_and_rejects_what_it_lacks():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    swap_attention(model)
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(NotImplementedError, match="attn_mask"):
        model.blocks[0].attn(torch.randn(1, 5, 192), attn_mask=torch.ones(5, 5, dtype=torch.bool))
    dropped = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1,
                                attn_drop_rate=0.1)
    swap_attention(dropped)
    with pytest.raises(NotImplementedError, match="attention dropout"):
        dropped.train()(torch.randn(1, 3, 32, 32))
