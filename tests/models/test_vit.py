"""pyssm's ViT against timm's VisionTransformer holding the same weights: logits, features,
intermediates, other resolutions, gradients; and the checkpoint filter's errors."""

import copy

import pytest
import timm
import torch
from conftest import backend_params
from timm.models.vision_transformer import checkpoint_filter_fn

import pyssm.models.vit  # noqa: F401  (registers the vit_* encoders)
from pyssm.models import create_encoder, list_encoders
from pyssm.models.vit import VisionTransformer, resample_pos_embed
from pyssm.models.vit_configs import VIT_CONFIGS, ViTConfig

DEPTH = 2
NAMES = {"vit_tiny_patch16": "vit_tiny_patch16_224", "vit_small_patch16": "vit_small_patch16_224",
         "vit_base_patch16": "vit_base_patch16_224", "vit_large_patch16": "vit_large_patch16_224",
         "vit_huge_patch14": "vit_huge_patch14_224"}
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def timm_vit(name="vit_small_patch16_224", seed=0, **kw):
    """A random timm ViT in eval mode, with its 1-D parameters (norms, biases) and tokens moved
    off their initial ones / zeros so that every parameter matters."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, depth=DEPTH, **kw).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 1 or "token" in pname:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def reference():
    model = timm_vit()
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def images(*size, batch=2, seed=1, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size, generator=g, dtype=dtype).to(device)


def test_registered():
    assert set(NAMES) <= set(list_encoders("vit_"))
    assert VIT_CONFIGS["vit_huge_patch14"].patch_size == 14


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("device,backend", backend_params("attention"))
def test_logits_match_timm(reference, device, backend, dtype):
    timm_model, sd = reference
    timm_model = copy.deepcopy(timm_model).to(device, dtype)
    model = create_encoder("vit_small_patch16", checkpoint=sd, depth=DEPTH, backend=backend)
    model = model.eval().to(device, dtype)
    x = images(224, 224, device=device, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(model(x), timm_model(x), **TOL[dtype])
        torch.testing.assert_close(model.forward_features(x), timm_model.forward_features(x),
                                   **TOL[dtype])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_other_resolution_matches_timm(reference, backend):
    """A 224 checkpoint at img_size=160 (pos_embed resampled by our filter) against timm built
    at 160 and loaded through timm's own filter."""
    _, sd = reference
    timm_model = timm.create_model("vit_small_patch16_224", pretrained=False, depth=DEPTH,
                                   img_size=160).eval()
    timm_model.load_state_dict(checkpoint_filter_fn(sd, timm_model))
    model = create_encoder("vit_small_patch16", img_size=160, checkpoint=sd, depth=DEPTH,
                           backend=backend).eval()
    assert model.pos_embed.shape == (1, 1 + 10 * 10, 384)
    torch.testing.assert_close(model.pos_embed.detach(), timm_model.pos_embed.detach(),
                               rtol=0, atol=0)
    x = images(160, 160)
    with torch.no_grad():
        torch.testing.assert_close(model(x), timm_model(x), **TOL[torch.float32])


@pytest.mark.parametrize("size", [(208, 208), (192, 240)], ids=["208", "192x240"])
def test_dynamic_resolution_matches_timm(reference, size):
    """A model stored for 224 fed other (also non-square) sizes resamples pos_embed per call,
    as timm's dynamic_img_size=True does."""
    _, sd = reference
    timm_model = timm.create_model("vit_small_patch16_224", pretrained=False, depth=DEPTH,
                                   dynamic_img_size=True).eval()
    timm_model.load_state_dict(sd)
    model = create_encoder("vit_small_patch16", checkpoint=sd, depth=DEPTH).eval()
    x = images(*size, batch=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), timm_model(x), **TOL[torch.float32])
        feats = model.forward_features(x)
    assert feats.shape == (1, 1 + (size[0] // 16) * (size[1] // 16), 384)


def test_non_square_img_size_from_square_checkpoint(reference):
    _, sd = reference
    timm_model = timm.create_model("vit_small_patch16_224", pretrained=False, depth=DEPTH,
                                   img_size=(160, 224)).eval()
    timm_model.load_state_dict(checkpoint_filter_fn(sd, timm_model))
    model = create_encoder("vit_small_patch16", img_size=(160, 224), checkpoint=sd,
                           depth=DEPTH).eval()
    x = images(160, 224, batch=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), timm_model(x), **TOL[torch.float32])
    # its own (non-square) state dict reloads unchanged
    again = create_encoder("vit_small_patch16", img_size=(160, 224),
                           checkpoint=model.state_dict(), depth=DEPTH)
    torch.testing.assert_close(again.pos_embed, model.pos_embed, rtol=0, atol=0)


def test_resample_identity_and_prefix_kept():
    pos = torch.randn(1, 1 + 4 * 4, 8)
    assert resample_pos_embed(pos, (4, 4), (4, 4)) is pos
    out = resample_pos_embed(pos, (6, 3), (4, 4))
    assert out.shape == (1, 1 + 18, 8)
    torch.testing.assert_close(out[:, :1], pos[:, :1], rtol=0, atol=0)


INTERMEDIATE_CASES = [
    dict(),
    dict(indices=1),
    dict(indices=[0, -1], norm=True),
    dict(indices=[1], output_fmt="NLC"),
    dict(indices=2, intermediates_only=True),
    dict(indices=[0], return_prefix_tokens=True, output_fmt="NLC"),
    dict(indices=[0], stop_early=True, norm=True),
]


@pytest.mark.parametrize("kw", INTERMEDIATE_CASES, ids=lambda kw: "-".join(
    f"{k}={v}" for k, v in kw.items()) or "default")
def test_forward_intermediates_match_timm(reference, kw):
    _, sd = reference
    model = create_encoder("vit_small_patch16", checkpoint=sd, depth=DEPTH,
                           backend="reference").eval()
    x = images(160, 192, batch=1)
    timm_dyn = timm.create_model("vit_small_patch16_224", pretrained=False, depth=DEPTH,
                                 dynamic_img_size=True).eval()
    timm_dyn.load_state_dict(sd)
    with torch.no_grad():
        ours = model.forward_intermediates(x, **kw)
        theirs = timm_dyn.forward_intermediates(x, **kw)
    torch.testing.assert_close(ours, theirs, **TOL[torch.float32])
    inter = ours if kw.get("intermediates_only") else ours[1]
    first = inter[0][0] if kw.get("return_prefix_tokens") else inter[0]
    expect = (1, 384, 10, 12) if kw.get("output_fmt", "NCHW") == "NCHW" else (1, 120, 384)
    assert first.shape == expect


def test_forward_intermediates_rejects_bad_arguments(reference):
    _, sd = reference
    model = create_encoder("vit_small_patch16", checkpoint=sd, depth=DEPTH)
    x = images(32, 32, batch=1)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=3)
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[2])


def test_tokens(reference):
    _, sd = reference
    model = create_encoder("vit_small_patch16", checkpoint=sd, depth=DEPTH,
                           backend="reference").eval()
    x = images(224, 224)
    with torch.no_grad():
        inter = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True,
                                            return_prefix_tokens=True)
        for tap in (0, 1, -1, -2):
            patches, cls = inter[tap]
            t = model.tokens(x, tap=tap)
            assert t.shape == (2, 196, 384)
            torch.testing.assert_close(t, patches, rtol=0, atol=0)
            t = model.tokens(x, tap=tap, include_cls=True)
            assert t.shape == (2, 197, 384)
            torch.testing.assert_close(t, torch.cat([cls, patches], 1), rtol=0, atol=0)
        final = model.forward_features(x)
        torch.testing.assert_close(model.tokens(x, tap="final", include_cls=True), final)
        torch.testing.assert_close(model.tokens(x, tap="final"), final[:, 1:])
        assert model.tokens(images(160, 96), tap=0).shape == (2, 60, 384)
    for bad in (2, -3, "last", 1.0):
        with pytest.raises(ValueError, match="block index|tap"):
            model.tokens(x, tap=bad)


def test_reset_classifier(reference):
    _, sd = reference
    model = create_encoder("vit_small_patch16", checkpoint=sd, depth=DEPTH).eval()
    x = images(64, 64)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        model.reset_classifier(10)
        assert model(x).shape == (2, 10) and model.num_classes == 10
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pooled, rtol=0, atol=0)
        model.reset_classifier(0, global_pool="avg")
        timm_dyn = timm.create_model("vit_small_patch16_224", pretrained=False, depth=DEPTH,
                                     dynamic_img_size=True).eval()
        timm_dyn.load_state_dict(sd)
        timm_dyn.reset_classifier(0, global_pool="avg")
        torch.testing.assert_close(model(x), timm_dyn(x), **TOL[torch.float32])
    assert not model.head.training and not model.training
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(5, global_pool="mean")


def test_gradients_match_timm(reference):
    _, sd = reference
    model = create_encoder("vit_small_patch16", checkpoint=sd, depth=DEPTH).eval()
    timm_dyn = timm.create_model("vit_small_patch16_224", pretrained=False, depth=DEPTH,
                                 dynamic_img_size=True).eval()
    timm_dyn.load_state_dict(sd)
    x = images(48, 64, batch=2)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    model(xa).square().sum().backward()
    timm_dyn(xb).square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    ours = dict(model.named_parameters())
    for name, p in timm_dyn.named_parameters():
        torch.testing.assert_close(ours[name].grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("name", list(NAMES))
def test_state_dict_layout_is_timms(name):
    """Every named config builds timm's keys and shapes (depth 1; no forward comparison).
    timm's vit_huge_patch14_224 defaults to its headless MAE weights (num_classes=0); ours
    has the 1000-class head of the others, so timm is asked for 1000 classes here."""
    ours = create_encoder(name, depth=1, backend="reference")
    theirs = timm.create_model(NAMES[name], pretrained=False, depth=1, num_classes=1000)
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k: v.shape for k, v in theirs.state_dict().items()}


def test_huge_patch14_shapes():
    model = create_encoder("vit_huge_patch14", depth=1, backend="reference").eval()
    x = images(224, 224, batch=1)
    with torch.no_grad():
        assert model(x).shape == (1, 1000)
        assert model.tokens(x).shape == (1, 256, 1280)
        assert model.tokens(images(98, 140, batch=1), include_cls=True).shape == (1, 71, 1280)


def test_backend_is_used(reference):
    _, sd = reference
    model = create_encoder("vit_small_patch16", checkpoint=sd, depth=DEPTH, backend="reference")
    x = images(32, 32, batch=1)
    assert model.backend == "reference"
    with pytest.raises(ValueError, match="backend"):
        model(x, backend="bogus")  # the per-call backend reaches pyssm.ops.attention
    model.backend = "cuda"  # the stored one too: the CUDA kernel cannot take CPU tensors
    with pytest.raises(ValueError, match="cannot run"):
        model(x)
    with pytest.raises(ValueError, match="backend must be"):
        model.backend = "gpu"


def test_config_and_size_errors():
    with pytest.raises(ValueError, match="unknown ViTConfig field"):
        create_encoder("vit_small_patch16", depht=2)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        ViTConfig(patch_size=16, embed_dim=100, depth=1, num_heads=3)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        create_encoder("vit_small_patch16", img_size=200, depth=1)
    model = create_encoder("vit_tiny_patch16", depth=1)
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        model(torch.randn(1, 3, 40, 48))
    with pytest.raises(ValueError, match="expected images"):
        model(torch.randn(1, 1, 32, 32))
    assert isinstance(model, VisionTransformer)


def test_checkpoint_prefix_and_headless(reference):
    _, sd = reference
    model = create_encoder("vit_small_patch16", checkpoint=sd, depth=DEPTH)
    wrapped = create_encoder("vit_small_patch16", depth=DEPTH,
                             checkpoint={"module." + k: v for k, v in sd.items()})
    for k, v in model.state_dict().items():
        torch.testing.assert_close(wrapped.state_dict()[k], v, rtol=0, atol=0)
    headless = create_encoder("vit_small_patch16", checkpoint=sd, depth=DEPTH, num_classes=0)
    assert not any(k.startswith("head.") for k in headless.state_dict())
    x = images(32, 32, batch=1)
    with torch.no_grad():
        torch.testing.assert_close(headless(x), model.forward_head(model.forward_features(x),
                                                                   pre_logits=True))


def test_bad_checkpoints_rejected(reference, tmp_path):
    _, sd = reference

    def load(checkpoint, **kw):
        return create_encoder("vit_small_patch16", checkpoint=checkpoint, **{"depth": DEPTH, **kw})

    missing = {k: v for k, v in sd.items() if k != "norm.weight"}
    with pytest.raises(ValueError, match=r"missing 1 keys \['norm.weight'\]"):
        load(missing)
    with pytest.raises(ValueError, match=r"unexpected 1 keys \['blocks.2.norm1.weight'\]"):
        load({**sd, "blocks.2.norm1.weight": torch.ones(384)})
    with pytest.raises(ValueError, match=r"depth 3.*missing 12 keys \['blocks\.2\."):
        load(sd, depth=3)
    headless = {k: v for k, v in sd.items() if not k.startswith("head.")}
    with pytest.raises(ValueError, match=r"missing 2 keys.*use num_classes=0"):
        load(headless)
    tiny = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=DEPTH).state_dict()
    with pytest.raises(ValueError, match=r"'cls_token' has shape \(1, 1, 192\), "
                                         r"VisionTransformer expects \(1, 1, 384\)"):
        load(tiny)
    with pytest.raises(ValueError, match=r"'pos_embed' has shape \(1, 197, 192\)"):
        load({**sd, "pos_embed": tiny["pos_embed"]})
    patch14 = {**sd, "patch_embed.proj.weight": torch.randn(384, 3, 14, 14)}
    with pytest.raises(ValueError, match=r"'patch_embed.proj.weight' has shape \(384, 3, 14, 14\)"
                                         r", VisionTransformer expects \(384, 3, 16, 16\)"):
        load(patch14)
    with pytest.raises(ValueError, match=r"'head.weight' has shape \(1000, 384\).*num_classes"):
        load(sd, num_classes=10)
    with pytest.raises(ValueError, match="not a square grid"):
        load({**sd, "pos_embed": torch.randn(1, 1 + 195, 384)})
    with pytest.raises(ValueError, match="not a state dict"):
        load({"epoch": 3, "optimizer": {"lr": 0.1}})
    path = tmp_path / "trainer_state.pth"
    torch.save({"epoch": 3, "args": "--lr 0.1"}, path)
    with pytest.raises(ValueError, match="not a state dict"):
        load(path)
    model = load(sd)
    with pytest.raises(ValueError, match="must be a state dict"):
        model.checkpoint_filter([("cls_token", sd["cls_token"])])


def test_checkpoint_files(reference, tmp_path):
    from safetensors.torch import save_file

    _, sd = reference
    expect = create_encoder("vit_small_patch16", checkpoint=sd, depth=DEPTH).state_dict()
    torch.save(sd, tmp_path / "vit.pth")
    torch.save({"model": sd, "epoch": 9}, tmp_path / "trainer.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "vit.safetensors"))
    for name in ("vit.pth", "trainer.pth", "vit.safetensors"):
        got = create_encoder("vit_small_patch16", checkpoint=tmp_path / name,
                             depth=DEPTH).state_dict()
        for k, v in expect.items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=f"{name}: {k}")
    at160 = create_encoder("vit_small_patch16", img_size=160, depth=DEPTH,
                           checkpoint=str(tmp_path / "vit.safetensors"))
    assert at160.pos_embed.shape == (1, 101, 384)
