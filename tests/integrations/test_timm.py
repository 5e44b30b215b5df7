"""Swapping pyssm's modules into timm ViTs (pyssm.integrations.timm) keeps outputs and weights:
the attention, and the fused MLP, which takes linear_gelu in 16-bit inference and mlp_gelu in
16-bit training where their kernels run (Triton's interpreter here), timm's layers elsewhere."""

import pytest
import torch
from triton_params import INTERPRETER

timm = pytest.importorskip("timm")

import pyssm.models.mlp as mlp_module  # noqa: E402
from pyssm.integrations.timm import Attention, Mlp, swap_attention, swap_mlp  # noqa: E402


@pytest.mark.parametrize("name,kw", [("vit_tiny_patch16_224", {}),
                                     ("vit_small_patch16_224", {"qk_norm": True})])
@pytest.mark.parametrize("swap,attr,cls,tol", [(swap_attention, "attn", Attention, 2e-5),
                                               (swap_mlp, "mlp", Mlp, 0.0)])
def test_swapped_vit_gives_timm_outputs(name, kw, swap, attr, cls, tol):
    """float32: the MLP runs timm's own layers there (0 tolerance), the attention pyssm's."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=48, depth=3, **kw).eval()
    keys = set(model.state_dict())
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        want = model.forward_features(x)
        assert swap(model) == 3
        got = model.forward_features(x)
    assert all(isinstance(getattr(b, attr), cls) for b in model.blocks)
    assert set(model.state_dict()) == keys  # checkpoints load unchanged
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


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


def _vit(**kw):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2,
                             **kw)


def _spy(monkeypatch, name):
    """The calls the MLPs make to mlp_module's ``name`` (linear_gelu or mlp_gelu)."""
    calls, real = [], getattr(mlp_module, name)

    def spy(x, *args, **kwargs):
        calls.append(x.dtype)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(mlp_module, name, spy)
    return calls


@INTERPRETER
@pytest.mark.parametrize("training", [False, True])
def test_swapped_mlp_takes_the_fused_ops_in_bf16(training, monkeypatch):
    """bf16 autocast with the Triton backend: inference calls linear_gelu once an MLP, a
    training step mlp_gelu; the features and the MLPs' gradients are timm's within bf16."""
    fc1_calls, mlp_calls = _spy(monkeypatch, "linear_gelu"), _spy(monkeypatch, "mlp_gelu")
    timm_model, model = _vit().eval(), _vit().eval()
    swap_attention(model)
    assert swap_mlp(model, backend="triton") == 2
    x = torch.randn(2, 3, 32, 32)
    results = []
    for m in (timm_model, model):
        with torch.set_grad_enabled(training), torch.autocast("cpu", dtype=torch.bfloat16):
            out = m.forward_features(x).float()
        grads = []
        if training:
            params = [p for n, p in m.named_parameters() if ".mlp." in n]
            grads = torch.autograd.grad(out.square().mean(), params)
        results.append((out.detach(), grads))
    assert (fc1_calls, mlp_calls) == (([], [torch.bfloat16] * 2) if training
                                      else ([torch.bfloat16] * 2, []))
    (want, want_g), (got, got_g) = results
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, rtol=0.05, atol=0.05 * w.abs().max().item())


@INTERPRETER
@pytest.mark.parametrize("grad", [False, True])
def test_swapped_mlp_runs_timms_layers_where_nothing_fuses(grad, monkeypatch):
    """bf16 autocast with the Triton backend, but dropout while training, an activation the
    ops do not compute (SiLU) or a norm between the layers: timm's layers (the ops are never
    called), timm's values."""
    fc1_calls, mlp_calls = _spy(monkeypatch, "linear_gelu"), _spy(monkeypatch, "mlp_gelu")
    x = torch.randn(2, 3, 32, 32)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        for kw in (dict(proj_drop_rate=0.1), dict(act_layer="silu")):
            ref, model = _vit(**kw).train(), _vit(**kw).train()
            assert swap_mlp(model, backend="triton") == 2
            torch.manual_seed(1)
            want = ref.forward_features(x)
            torch.manual_seed(1)
            got = model.forward_features(x)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        m = timm.layers.Mlp(8, 32, norm_layer=torch.nn.LayerNorm)
        h = torch.randn(4, 8)
        torch.testing.assert_close(Mlp(m, backend="triton")(h), m(h), rtol=0, atol=0)
    assert fc1_calls == [] and mlp_calls == []
    # (and the same modules do take the ops where nothing stands in the way)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        Mlp(timm.layers.Mlp(8, 32), backend="triton")(h)
    assert fc1_calls == [torch.bfloat16]
