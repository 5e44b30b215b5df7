"""The VLM: connectors, the frozen encoder, forward / generate, save and load, bad input."""

import pytest
import torch

from pyssm.vlm import CONNECTORS, VisionLanguageModel, VLMConfig, build_connector
from pyssm.vlm.tiny_lm import build_tiny_lm, build_word_tokenizer

WORDS = "what color is the square ? red blue answer".split()
ENCODERS = {"vmamba": ("vmamba_tiny_s1l8", {"depths": [1, 1, 1, 1], "dims": 16}, 64, 16),
            "vit": ("vit_tiny_patch16", {"depth": 1}, 64, 16)}


def tiny_vlm(encoder="vmamba", style="prismatic", connector="mlp2x_gelu", hidden=32,
             standardize=False):
    name, kwargs, size, _ = ENCODERS[encoder]
    tok = build_word_tokenizer(WORDS)
    torch.manual_seed(0)
    lm = build_tiny_lm(tok, hidden_size=hidden, num_layers=1, max_positions=64)
    cfg = VLMConfig(encoder=name, encoder_kwargs=kwargs, image_size=size, connector=connector,
                    image_style=style, standardize_tokens=standardize)
    return VisionLanguageModel.from_config(cfg, lm, tok)


def test_connector_shapes():
    x = torch.randn(2, 5, 24)
    for kind in CONNECTORS:
        assert build_connector(kind, 24, 40)(x).shape == (2, 5, 40)
    fused = build_connector("fused-gelu-mlp", 24, 40)
    assert [m.out_features for m in fused if isinstance(m, torch.nn.Linear)] == [96, 40, 40]
    with pytest.raises(ValueError, match="connector must be one of"):
        build_connector("qformer", 24, 40)


@pytest.mark.parametrize("encoder", ["vmamba", "vit"])
@pytest.mark.parametrize("style", ["prismatic", "llava"])
def test_forward_trains_connector_not_encoder(encoder, style):
    vlm = tiny_vlm(encoder, style).train()
    assert not vlm.encoder.training
    prompts = ["what color is the square ?", "what color ?"]
    if style == "llava":
        prompts = [vlm.format_prompt(p) for p in prompts]
    batch = vlm.tokenizer(prompts, padding=True, return_tensors="pt")
    images = torch.randn(2, 3, 64, 64)
    out = vlm(images, batch["input_ids"], batch["attention_mask"], labels=batch["input_ids"])
    tokens = vlm.encode_images(images)
    assert tokens.shape[1] == 16                      # 64 px: 4x4 tokens from either encoder
    out.loss.backward()
    assert all(p.grad is None for p in vlm.encoder.parameters())
    assert all(p.grad is not None for p in vlm.connector.parameters())
    with torch.no_grad():
        raw = vlm.encoder.tokens(images)
    assert not raw.requires_grad                      # no graph kept through the encoder


def test_generate_and_save_load_round_trip(tmp_path):
    vlm = tiny_vlm("vmamba", "llava").eval()
    images = torch.randn(2, 3, 64, 64)
    answers = vlm.generate(images, ["what color is the square ?", "what color ?"],
                           max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    batch = vlm.tokenizer([vlm.format_prompt("what color ?")] * 2, return_tensors="pt")
    with torch.no_grad():
        before = vlm(images, batch["input_ids"], batch["attention_mask"]).logits
    vlm.save_pretrained(tmp_path / "vlm")
    vlm.save_pretrained(tmp_path / "vlm")            # overwriting an existing save works
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "vlm").eval()
    with torch.no_grad():
        after = loaded(images, batch["input_ids"], batch["attention_mask"]).logits
    torch.testing.assert_close(after, before)
    assert loaded.generate(images, ["what color is the square ?", "what color ?"],
                           max_new_tokens=4) == answers
    assert sorted(p.name for p in (tmp_path).iterdir()) == ["vlm"]  # no temporaries left


def test_standardized_tokens_fit_on_training_images_and_survive_save_load(tmp_path):
    """The connector's first step maps the training tokens to zero mean and unit variance per
    channel (float64 statistics of the tokens, fit from images or from tokens alike); unfit,
    it raises; saved and loaded, it gives the same logits."""
    from pyssm.vlm.connector import Standardize

    vlm = tiny_vlm("vit", "llava", standardize=True).eval()
    g = torch.Generator().manual_seed(1)
    images = 3.0 + 2.0 * torch.randn(7, 3, 64, 64, generator=g)   # an offset and a scale
    batch = vlm.tokenizer([vlm.format_prompt("what color ?")] * 7, return_tensors="pt")
    with pytest.raises(RuntimeError, match="never fit"):
        vlm(images, batch["input_ids"], batch["attention_mask"])
    vlm.fit_token_statistics([images[:4], images[4:]])             # batches of images
    with torch.no_grad():
        tokens = vlm.encoder.tokens(images)
        standardized = vlm.connector[0](tokens).double().flatten(0, 1)
    torch.testing.assert_close(standardized.mean(0), torch.zeros(tokens.shape[-1],
                               dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(standardized.std(0, correction=0), torch.ones(
        tokens.shape[-1], dtype=torch.float64), atol=1e-4, rtol=0)
    mean = vlm.connector[0].mean.clone()
    vlm.fit_token_statistics(tokens)                               # or the tokens themselves
    torch.testing.assert_close(vlm.connector[0].mean, mean)
    with torch.no_grad():
        before = vlm(images, batch["input_ids"], batch["attention_mask"]).logits
    vlm.save_pretrained(tmp_path / "vlm")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "vlm").eval()
    assert isinstance(loaded.connector[0], Standardize) and loaded.connector[0].fitted
    with torch.no_grad():
        after = loaded(images, batch["input_ids"], batch["attention_mask"]).logits
    torch.testing.assert_close(after, before)
    with pytest.raises(ValueError, match="does not standardise"):
        tiny_vlm("vit", "llava").fit_token_statistics(tokens)
    with pytest.raises(ValueError, match=r"tokens must be \(\.\.\., "):
        Standardize(5).fit(torch.zeros(3, 4))


def test_a_few_steps_learn_the_colour():
    """Red images -> "red", blue -> "blue": the loss falls and greedy answers become right."""
    vlm = tiny_vlm("vmamba", "prismatic", connector="linear", hidden=32)
    tok = vlm.tokenizer
    colours = {"red": torch.tensor([1.0, -1.0, -1.0]), "blue": torch.tensor([-1.0, -1.0, 1.0])}

    def make(n):
        names = ["red", "blue"] * (n // 2)
        images = torch.stack([colours[c][:, None, None].expand(3, 64, 64) for c in names])
        return images + 0.1 * torch.randn_like(images), names

    prompt_len = len(tok("what color ?")["input_ids"])
    opt = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(60):
        images, names = make(8)
        batch = tok([f"what color ? {c}" for c in names], return_tensors="pt")
        labels = batch["input_ids"].clone()
        labels[:, :prompt_len] = -100                 # train on the answer only
        loss = vlm.train()(images, batch["input_ids"], batch["attention_mask"], labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    images, names = make(4)
    answers = vlm.eval().generate(images, ["what color ?"] * 4, max_new_tokens=1)
    assert [a.split()[-1] for a in answers] == names


def test_bad_configuration_and_input():
    tok = build_word_tokenizer(WORDS)
    lm = build_tiny_lm(tok, hidden_size=32, num_layers=1)
    name, kwargs, size, _ = ENCODERS["vmamba"]
    cfg = VLMConfig(encoder=name, encoder_kwargs=kwargs, image_size=size)
    vlm = VisionLanguageModel.from_config(cfg, lm, tok)
    with pytest.raises(ValueError, match="the connector outputs 48 features but the LM's hidden size is 32"):
        VisionLanguageModel(cfg, vlm.encoder, build_connector("linear", 64, 48), lm, tok)
    with pytest.raises(ValueError, match="image_style must be one of"):
        VisionLanguageModel.from_config(VLMConfig(encoder=name, encoder_kwargs=kwargs,
                                                  image_style="qwen"), lm, tok)
    with pytest.raises(ValueError, match="2 images for 1 prompts"):
        vlm.generate(torch.randn(2, 3, 64, 64), ["what color ?"])
    long_prompt = " ".join(["what"] * 600)
    with pytest.raises(ValueError, match="exceeds the LM's context of 512"):
        vlm.generate(torch.randn(1, 3, 64, 64), [long_prompt])


def test_prompt_template_puts_the_image_after_the_question():
    vlm = tiny_vlm("vmamba", "llava")
    vlm.config.prompt_template = "{prompt} {image}"
    assert vlm.format_prompt("what color ?") == "what color ? <image>"
    assert vlm.format_prompt("<image> what color ?") == "<image> what color ?"   # placed already
    batch = vlm.tokenizer([vlm.format_prompt("what color ?")], return_tensors="pt")
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        embeds, mask, _ = vlm.build_inputs(images, batch["input_ids"], batch["attention_mask"])
        image = vlm.encode_images(images)[0]
        words = vlm.lm.get_input_embeddings()(batch["input_ids"][0])
    # <s> what color ? then the 16 image tokens
    torch.testing.assert_close(embeds[0, :4], words[:4])
    torch.testing.assert_close(embeds[0, 4:], image)
    name, kwargs, size, _ = ENCODERS["vmamba"]
    for style, template in (("llava", "{prompt}"), ("prismatic", "{prompt} {image}")):
        cfg = VLMConfig(encoder=name, encoder_kwargs=kwargs, image_size=size, image_style=style,
                        prompt_template=template)
        with pytest.raises(ValueError, match="prompt_template must hold"):
            VisionLanguageModel.from_config(cfg, vlm.lm, vlm.tokenizer)
