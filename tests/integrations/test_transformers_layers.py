"""swap_layers runs transformers' CLIP, SigLIP and SmolVLM encoder layers on pyssm's fused ops:
the state dict and activation checkpointing stay, float64 outputs and gradients are the
unswapped model's (CLIP's text tower with its causal and padding masks, SmolVLM's with padding
patches), and in bf16 each layer's second half is one norm_mlp_residual pass in inference
(Triton's interpreter here, the kernels on a GPU)."""

import copy

import pytest
import torch
from dispatched import Dispatched
from triton_params import KERNEL_DEVICES, every_fused_path

transformers = pytest.importorskip("transformers")

import pyssm.integrations.transformers as pyssm_hf  # noqa: E402
from pyssm.integrations import transformers_swaps  # noqa: E402


def _model(name):
    """(model class, a tiny config, the inputs)."""
    if name == "clip-vision":
        from transformers import CLIPVisionConfig, CLIPVisionModel
        config = CLIPVisionConfig(image_size=40, patch_size=8, hidden_size=48,
                                  intermediate_size=96, num_hidden_layers=3,
                                  num_attention_heads=4)
        return CLIPVisionModel, config, dict(pixel_values=torch.randn(2, 3, 40, 40))
    if name == "clip-text":
        from transformers import CLIPTextConfig, CLIPTextModel
        config = CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=3, num_attention_heads=4,
                                max_position_embeddings=16)
        ids = torch.randint(0, 50, (3, 9))
        mask = torch.ones_like(ids)
        mask[0, 6:] = 0   # right padding, as CLIP's tokenizer pads
        mask[2, 4:] = 0
        return CLIPTextModel, config, dict(input_ids=ids, attention_mask=mask)
    if name == "smolvlm-vision":   # (padding patches masked: a padded image batch)
        from transformers import SmolVLMVisionConfig
        from transformers.models.smolvlm.modeling_smolvlm import SmolVLMVisionTransformer
        config = SmolVLMVisionConfig(image_size=32, patch_size=8, hidden_size=32,
                                     intermediate_size=64, num_hidden_layers=3,
                                     num_attention_heads=4)
        patches = torch.ones(2, 4, 4, dtype=torch.bool)
        patches[1, :, 3:] = False   # the second image is 24 px wide
        return SmolVLMVisionTransformer, config, dict(pixel_values=torch.randn(2, 3, 32, 32),
                                                      patch_attention_mask=patches)
    from transformers import SiglipVisionConfig, SiglipVisionModel
    config = SiglipVisionConfig(image_size=36, patch_size=6, hidden_size=40, intermediate_size=80,
                                num_hidden_layers=3, num_attention_heads=5)
    return SiglipVisionModel, config, dict(pixel_values=torch.randn(2, 3, 36, 36))


def _pair(name, attn="sdpa"):
    """(the model, the same weights with its layers swapped), norms and biases drawn away from
    their 1 / 0 initialisation; float32."""
    cls, config, inputs = _model(name)
    torch.manual_seed(0)
    ref = cls(copy.deepcopy(config)).eval()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1, 0.3), m.bias.normal_(0, 0.3)
            elif isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.2)
    ours = cls(copy.deepcopy(config)).eval()
    ours.load_state_dict(ref.state_dict())
    for model in (ref, ours):
        model.set_attn_implementation(attn)
    keys = list(ours.state_dict())
    assert pyssm_hf.swap_layers(ours) == 3
    assert list(ours.state_dict()) == keys   # checkpoints load unchanged
    layers = [m for m in ours.modules() if isinstance(m, pyssm_hf.EncoderLayer)]
    assert len(layers) == 3 and all(isinstance(m.mlp, pyssm_hf.MLP) for m in layers)
    return ref, ours, inputs


def test_a_swapped_model_pickles(monkeypatch, tmp_path):
    """torch.save of a whole swapped model and torch.load with no hybrid class made yet (as in a
    fresh process): the layers come back as the same hybrids, with the same outputs."""
    ref, ours, inputs = _pair("clip-vision")
    torch.save(ours, tmp_path / "model.pt")
    monkeypatch.setattr(transformers_swaps, "_HYBRIDS", {})
    back = torch.load(tmp_path / "model.pt", weights_only=False)
    layers = [m for m in back.modules() if isinstance(m, pyssm_hf.EncoderLayer)]
    assert len(layers) == 3 and type(layers[0]).__name__ == "PyssmCLIPEncoderLayer"
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs).last_hidden_state,
                                   ours(**inputs).last_hidden_state, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["clip-vision", "siglip-vision", "clip-text", "smolvlm-vision"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "checkpointed"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_swapped_layers_give_the_models_outputs_and_gradients(name, checkpointing, training,
                                                             monkeypatch):
    """float64: the last hidden state (valid tokens) and every parameter's gradient; with
    activation checkpointing the swapped layers run again in the backward."""
    ref, ours, inputs = _pair(name)
    calls = []
    real = transformers_swaps.add_mlp
    monkeypatch.setattr(transformers_swaps, "add_mlp",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    results = []
    for model in (ref, ours):
        model.double().train(training)
        if checkpointing:
            model.activation_checkpointing_enable()
        inp = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
        with torch.set_grad_enabled(training):
            out = model(**inp).last_hidden_state
        if "attention_mask" in inputs:
            out = out[inputs["attention_mask"].bool()]
        if "patch_attention_mask" in inputs:
            out = out[inputs["patch_attention_mask"].flatten(1)]
        grads = torch.autograd.grad(out.square().mean(), list(model.parameters()),
                                    allow_unused=True) if training else ()
        results.append((out.detach(), grads))
    (want, want_g), (got, got_g) = results
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    for (pname, _), g, w in zip(ours.named_parameters(), got_g, want_g):
        assert (g is None) == (w is None), pname
        if w is not None:
            torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-8, msg=pname)
    assert len(calls) == (6 if checkpointing and training else 3)   # (float64: add_mlp's path)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("name", ["clip-vision", "siglip-vision", "smolvlm-vision"])
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_swapped_layers_take_the_fused_ops_in_bf16(device, name, training, monkeypatch):
    """bf16 autocast with the Triton backend, attention on pyssm's: in inference each layer's
    second half is one norm_mlp_residual pass, in a training step its first add and second norm
    one layer_norm pass and its MLP one mlp_gelu; the features are the model's within bf16."""
    every_fused_path(monkeypatch)
    pyssm_hf.register()
    ref, ours, inputs = _pair(name, attn="pyssm")
    ref, ours = ref.to(device), ours.to(device)
    inputs = {key: value.to(device) for key, value in inputs.items()}
    for m in ours.modules():
        if isinstance(m, pyssm_hf.EncoderLayer):
            m.layer_norm1.backend = m.layer_norm2.backend = m.mlp.backend = "triton"
    with torch.set_grad_enabled(training), torch.autocast(device, dtype=torch.bfloat16):
        want = ref.train(training)(**inputs).last_hidden_state.float()
        with Dispatched() as seen:
            got = ours.train(training)(**inputs).last_hidden_state.float()
    ran = seen.pyssm_ops()
    if training:
        assert ran.count("mlp_gelu_triton") >= 3 and ran.count("layer_norm_triton") >= 6
        assert "norm_mlp_residual_triton" not in ran
    else:
        assert ran.count("norm_mlp_residual_triton") == 3
    assert ran.count("attention") == 3
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


def test_models_without_those_layers_are_left_alone():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4)
    assert pyssm_hf.swap_layers(LlamaForCausalLM(config)) == 0


def test_hidden_states_and_hooks_survive_the_swap():
    """The swapped layers are instances of transformers' own classes, so its output recorders
    hook them (hidden states, as LLaVA's vision_feature_layer reads them); hooks on a layer
    before the swap (transformers' recorders after an earlier forward, a user's) move to the
    new layer, and their handles still remove them."""
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    cls, config, inputs = _model("clip-vision")
    torch.manual_seed(0)
    ref = cls(copy.deepcopy(config)).eval()
    early, late = (cls(copy.deepcopy(config)).eval() for _ in range(2))
    for model in (early, late):
        model.load_state_dict(ref.state_dict())
    calls = []
    with torch.no_grad():
        want = ref(**inputs, output_hidden_states=True).hidden_states
        early(**inputs, output_hidden_states=True)   # (its recorders hook the layers now)
        handle = early.encoder.layers[1].register_forward_hook(
            lambda *args: calls.append(1))
        for model in (early, late):
            assert pyssm_hf.swap_layers(model) == 3
            layers = model.encoder.layers
            assert all(isinstance(m, CLIPEncoderLayer) and isinstance(m, pyssm_hf.EncoderLayer)
                       for m in layers)
            got = model(**inputs, output_hidden_states=True).hidden_states
            assert len(got) == len(want) == 4
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        assert calls == [1]
        handle.remove()
        early(**inputs)
    assert calls == [1]
