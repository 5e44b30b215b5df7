"""swap_mlp puts pyssm's fused MLP into transformers' CLIP and SigLIP towers: the state dict and
the float32 outputs stay the same, and in bf16 the fused ops run with each tower's activation
(CLIP's quick GELU, SigLIP's tanh GELU) where their kernels run (Triton's interpreter here)."""

import copy

import pytest
import torch
from triton_params import INTERPRETER

transformers = pytest.importorskip("transformers")

import pyssm.integrations.transformers as pyssm_hf  # noqa: E402
import pyssm.models.mlp as mlp_module  # noqa: E402


# the MLPs a tower has: one a layer, and SigLIP's attention-pooling head's
MLPS = {"clip": 2, "siglip": 3}


def _tower(name):
    """(model class, a tiny config, pixels, the activation its MLPs take)."""
    if name == "clip":
        from transformers import CLIPVisionConfig, CLIPVisionModel
        config = CLIPVisionConfig(image_size=40, patch_size=8, hidden_size=48,
                                  intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4)
        return CLIPVisionModel, config, torch.randn(2, 3, 40, 40), "quick_gelu"
    from transformers import SiglipVisionConfig, SiglipVisionModel
    config = SiglipVisionConfig(image_size=36, patch_size=6, hidden_size=40, intermediate_size=80,
                                num_hidden_layers=2, num_attention_heads=5)
    return SiglipVisionModel, config, torch.randn(2, 3, 36, 36), "gelu_tanh"


def _pair(name):
    cls, config, pixels, activation = _tower(name)
    torch.manual_seed(0)
    ref = cls(copy.deepcopy(config)).eval()
    ours = cls(copy.deepcopy(config)).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours, pixels, activation


def _spy(monkeypatch):
    calls = []
    for op in ("linear_gelu", "mlp_gelu"):
        def call(*args, _op=op, _real=getattr(mlp_module, op), **kwargs):
            calls.append((_op, kwargs.get("activation")))
            return _real(*args, **kwargs)
        monkeypatch.setattr(mlp_module, op, call)
    return calls


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_swapped_mlps_keep_the_keys_and_the_outputs(name):
    ref, ours, pixels, _ = _pair(name)
    keys = set(ours.state_dict())
    assert pyssm_hf.swap_mlp(ours) == MLPS[name]
    assert all(isinstance(m, pyssm_hf.MLP) for n, m in ours.named_modules() if n.endswith(".mlp"))
    assert set(ours.state_dict()) == keys  # checkpoints load unchanged
    with torch.no_grad():  # float32: the towers' own layers
        torch.testing.assert_close(ours(pixel_values=pixels).last_hidden_state,
                                   ref(pixel_values=pixels).last_hidden_state, rtol=0, atol=0)


@INTERPRETER
@pytest.mark.parametrize("name", ["clip", "siglip"])
@pytest.mark.parametrize("training", [False, True])
def test_swapped_mlps_run_fused_in_bf16(name, training, monkeypatch):
    """bf16 autocast, the Triton backend: one fused op an MLP with the tower's activation
    (linear_gelu in inference, mlp_gelu in a training step); the tower's features and its
    layers' MLP gradients as close to the float64 tower's as the unswapped bf16 tower's are
    (within twice their error, and a floor of bf16's resolution)."""
    ref, ours, pixels, activation = _pair(name)
    exact = copy.deepcopy(ref).double()
    pyssm_hf.swap_mlp(ours, backend="triton")
    calls = _spy(monkeypatch)
    results = []
    for model, dtype in ((exact, torch.float64), (ref, torch.float32), (ours, torch.float32)):
        with torch.set_grad_enabled(training), torch.autocast(
                "cpu", dtype=torch.bfloat16, enabled=dtype == torch.float32):
            out = model(pixel_values=pixels.to(dtype)).last_hidden_state
        grads = []
        if training:
            params = [p for n, p in model.named_parameters() if "encoder" in n and ".mlp." in n]
            grads = torch.autograd.grad(out.double().square().mean(), params)
        results.append([out.detach().double(), *(g.double() for g in grads)])
    assert calls == [("mlp_gelu" if training else "linear_gelu", activation)] * MLPS[name]
    for want, torchs, got in zip(*results):
        floor = 2 ** -8 * want.abs().max().item()
        assert (got - want).abs().max() <= 2 * (torchs - want).abs().max() + floor
