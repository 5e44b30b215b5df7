"""Swapping pyssm's modules into timm ViTs (pyssm.integrations.timm) keeps outputs and weights:
the attention, the fused MLP, which takes linear_gelu in 16-bit inference and mlp_gelu in
16-bit training where their kernels run (Triton's interpreter here), timm's layers elsewhere,
and whole blocks, whose norms and residual adds take layer_norm and norm_mlp_residual."""

import pytest
import torch
from dispatched import Dispatched
from triton_params import CUDA, INTERPRETER, KERNEL_DEVICES, every_fused_path

timm = pytest.importorskip("timm")

import pyssm.integrations.timm as timm_integration  # noqa: E402
import pyssm.models.mlp as mlp_module  # noqa: E402
from pyssm import _extension  # noqa: E402
from pyssm.integrations.timm import (Attention, Block, Mlp, RopeAttention,  # noqa: E402
                                     swap_attention, swap_blocks, swap_mlp)


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


# timm ViTs whose blocks the swap takes: plain, with LayerScale (DINOv2's), q / k norms,
# register tokens and no class token, a norm inside the MLP (timm's layers run it), drop path
BLOCK_CASES = {"plain": {}, "layer-scale": dict(init_values=0.3),
               "qk-norm-registers": dict(qk_norm=True, reg_tokens=3, class_token=False,
                                         global_pool="avg"),
               "mlp-norm": dict(scale_mlp_norm=True), "drop-path": dict(drop_path_rate=0.3)}


def _block_pair(kw: dict, depth: int = 3, name: str = "vit_tiny_patch16_224"):
    """(timm's ViT, the same weights with its blocks swapped), float64, with norms' affine maps
    and biases drawn away from their 1 / 0 initialisation."""
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, img_size=32, depth=depth, **kw).double()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.LayerNorm) and m.weight is not None:
                m.weight.normal_(1, 0.3), m.bias.normal_(0, 0.3)
            elif isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.2)
    model = timm.create_model(name, pretrained=False, img_size=32, depth=depth, **kw).double()
    model.load_state_dict(ref.state_dict())
    keys = list(model.state_dict())
    assert swap_blocks(model) == depth
    assert all(type(b) is Block for b in model.blocks)
    assert list(model.state_dict()) == keys   # checkpoints load unchanged
    return ref, model


@pytest.mark.parametrize("kw", BLOCK_CASES.values(), ids=BLOCK_CASES.keys())
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_swapped_blocks_give_timms_outputs_and_gradients(kw, training):
    """float64 (torch's ops under pyssm's): timm's features, and in training (drop path drawn
    from the same seed) timm's gradients for every parameter."""
    ref, model = _block_pair(kw)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    results = []
    for m in (ref, model):
        m.train(training)
        torch.manual_seed(5)
        with torch.set_grad_enabled(training):
            out = m.forward_features(x)
        grads = torch.autograd.grad(out.square().mean(), list(m.parameters()),
                                    allow_unused=True) if training else ()
        results.append((out.detach(), grads))
    (want, want_g), (got, got_g) = results
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    for (name, _), g, w in zip(model.named_parameters(), got_g, want_g):
        assert (g is None) == (w is None) == name.startswith(("head.", "fc_norm.")), name
        if w is not None:
            torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-8, msg=name)
    if "drop_path_rate" in kw and training:   # (the drop path did drop: the seed mattered)
        torch.manual_seed(6)
        assert not torch.allclose(model.forward_features(x), got)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch16_224"],
                         ids=["192-wide", "384-wide"])
def test_swapped_blocks_take_the_fused_ops_in_bf16(device, training, name, monkeypatch):
    """bf16 autocast with the Triton backend: in inference each block's second half is one
    norm_mlp_residual pass up to 256 channels (FUSED_MLP_WIDTH), wider its add and norm one
    layer_norm pass, fc1 and the GELU one linear_gelu, fc2 and the add one linear_residual_; in
    training the add and norm one layer_norm pass and the MLP one mlp_gelu; the features are
    timm's within bf16."""
    every_fused_path(monkeypatch)
    ref, model = _block_pair({}, depth=2, name=name)
    ref, model = ref.float().to(device), model.float().to(device)
    assert swap_blocks(model) == 0   # (swapped already)
    for block in model.blocks:
        block.norm1.backend = block.norm2.backend = block.mlp.backend = "triton"
    x = torch.randn(2, 3, 32, 32, device=device)
    with torch.set_grad_enabled(training), torch.autocast(device, dtype=torch.bfloat16):
        want = ref.train(training).forward_features(x).float()
        with Dispatched() as seen:
            got = model.train(training).forward_features(x).float()
    ran = seen.pyssm_ops()
    if training:
        assert ran.count("mlp_gelu_triton") == 2 and "layer_norm_triton" in ran
        assert "norm_mlp_residual_triton" not in ran
    elif name == "vit_tiny_patch16_224":
        assert ran.count("norm_mlp_residual_triton") == 2 and "mlp_gelu_triton" not in ran
    else:
        assert "norm_mlp_residual_triton" not in ran
        assert ran.count("linear_gelu_triton") == ran.count("linear_residual_triton") == 2
        assert ran.count("layer_norm_triton") == 4   # (norm1, and add + norm2, a block)
    assert ran.count("attention_qkvpacked") == 2
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


def test_blocks_the_swap_does_not_take():
    """Blocks with RMSNorm, attention classes other than timm's Attention, or of other block
    classes stay timm's; a swapped block refuses an attention mask."""
    torch.manual_seed(0)
    rms = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2,
                            norm_layer="rmsnorm")
    assert swap_blocks(rms) == 0
    assert type(rms.blocks[0]).__name__ == "Block" and not isinstance(rms.blocks[0], Block)
    post = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2,
                             block_fn=timm.models.vision_transformer.ResPostBlock)
    assert swap_blocks(post) == 0
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    swap_mlp(model)
    seen = []   # (a hook on the block before the swap sees the new block's calls)
    handle = model.blocks[0].register_forward_hook(lambda m, args, out: seen.append(type(m)))
    assert swap_blocks(model) == 1 and isinstance(model.blocks[0].mlp, Mlp)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
        handle.remove()
        model(torch.randn(1, 3, 32, 32))
    assert seen == [Block]
    with pytest.raises(NotImplementedError, match="attn_mask"):
        model.blocks[0](torch.randn(1, 5, 192), attn_mask=torch.ones(5, 5, dtype=torch.bool))


# timm's rotary-embedding ViTs (timm.models.eva.Eva), whose attention is EvaAttention (EVA,
# EVA-02, EVA-CLIP) or AttentionRope (attn_type="rope": Perception Encoder, timm's RoPE ViTs)
ROPE_CASES = {
    "eva02": dict(use_rot_pos_emb=True, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True,
                  ref_feat_shape=(3, 3)),
    "eva-unfused-qkv": dict(use_rot_pos_emb=True, qkv_fused=False),
    "eva-no-rope": dict(),
    "rotate-half-no-cls": dict(use_rot_pos_emb=True, rope_rotate_half=True, class_token=False),
    "pe": dict(attn_type="rope", use_rot_pos_emb=True, use_abs_pos_emb=False,
               rope_grid_offset=1.0, rope_grid_indexing="xy", use_pre_transformer_norm=True),
    "pe-registers-unfused": dict(attn_type="rope", use_rot_pos_emb=True, num_reg_tokens=2,
                                 qkv_fused=False, no_embed_class=True),
    "pe-dynamic-size": dict(attn_type="rope", use_rot_pos_emb=True, dynamic_img_size=True),
    "patch-dropout": dict(use_rot_pos_emb=True, patch_drop_rate=0.4, drop_path_rate=0.2),
    # per-head learned frequencies: timm builds them in float32 only
    "mixed-rope": dict(attn_type="rope", use_rot_pos_emb=True, rope_type="mixed",
                       num_reg_tokens=1),
    "mixed-rope-patch-dropout": dict(use_rot_pos_emb=True, rope_type="mixed",
                                     patch_drop_rate=0.4),
}


def _rope_pair(kw: dict, dtype: torch.dtype):
    """(timm's Eva, the same weights with its attention swapped), tiny (48 wide, 2 heads of 24,
    two blocks), biases and norms' affine maps drawn away from their initialisation."""
    from timm.models.eva import Eva

    def make():
        torch.manual_seed(0)
        return Eva(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2,
                   num_classes=0, **kw).to(dtype)

    ref, model = make(), make()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias") or ".norm" in name or "_bias" in name:
                p.normal_(0.3, 0.3)
    model.load_state_dict(ref.state_dict())
    keys = list(model.state_dict())
    assert swap_attention(model) == 2
    assert all(type(b.attn) is RopeAttention for b in model.blocks)
    assert list(model.state_dict()) == keys   # checkpoints load unchanged, keys in timm's order
    return ref, model


@pytest.mark.parametrize("kw", ROPE_CASES.values(), ids=ROPE_CASES.keys())
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_swapped_rope_attention_gives_timms_outputs_and_gradients(kw, training, monkeypatch):
    """float64 (float32 for timm's mixed rope): timm's features and, in training (patch and
    path dropout drawn from the same seed), timm's gradients for every parameter; every block's
    attention ran through pyssm's op."""
    mixed = kw.get("rope_type") == "mixed"
    dtype, tol = (torch.float32, 1e-5) if mixed else (torch.float64, 1e-10)
    ref, model = _rope_pair(kw, dtype)
    calls = []
    real = timm_integration.attention
    monkeypatch.setattr(timm_integration, "attention",
                        lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    size = (40, 24) if kw.get("dynamic_img_size") else (32, 32)
    x = torch.randn(2, 3, *size, dtype=dtype)
    results = []
    for m in (ref, model):
        m.train(training)
        torch.manual_seed(5)
        with torch.set_grad_enabled(training):
            out = m.forward_features(x)
        grads = torch.autograd.grad(out.square().mean(), list(m.parameters()),
                                    allow_unused=True) if training else ()
        results.append((out.detach(), grads))
    (want, want_g), (got, got_g) = results
    tokens = want.shape[1]
    if kw.get("use_rot_pos_emb"):   # (with rope: q and k apart, never packed)
        assert calls == [(2, tokens, 2, 24)] * 2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    for (name, _), g, w in zip(model.named_parameters(), got_g, want_g):
        assert (g is None) == (w is None), name
        if w is not None:
            torch.testing.assert_close(g, w, atol=tol, rtol=tol * 100, msg=name)
    if "patch_drop_rate" in kw and training:   # (the patches were dropped: the seed mattered)
        assert tokens < 1 + 16
        torch.manual_seed(6)
        assert not torch.allclose(model.forward_features(x), got)


@pytest.mark.parametrize("cls_name", ["EvaAttention", "AttentionRope"])
@pytest.mark.parametrize("rope_shape", ["tokens", "heads", "batch", "batch-heads"])
def test_rope_attention_modules_alone(cls_name, rope_shape):
    """The modules with what Eva does not build: q / k norms, a gate, EVA's bias added apart,
    AttentionRope's own head_dim (3 heads of 20 over 32 channels; EvaAttention's output
    reshape takes only heads x head_dim = channels), a causal mask, and timm's sin / cos tables
    of every shape it hands over, over 3 prefix tokens; float64, timm's values."""
    from timm.layers import AttentionRope
    from timm.models.eva import EvaAttention

    torch.manual_seed(0)
    kw = dict(num_prefix_tokens=3, qk_norm=True, norm_layer=torch.nn.LayerNorm, gated=True)
    if cls_name == "EvaAttention":
        H, D = 2, 16
        ref = EvaAttention(32, num_heads=H, qkv_bias_separate=True, **kw).double()
    else:
        H, D = 3, 20
        ref = AttentionRope(32, num_heads=H, attn_head_dim=D, qkv_fused=False, scale_norm=True,
                            **kw).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.5)
    B, N = 2, 11
    shape = {"tokens": (N - 3, 2 * D), "heads": (H, N - 3, 2 * D),
             "batch": (B, 1, N - 3, 2 * D), "batch-heads": (B, H, N - 3, 2 * D)}[rope_shape]
    rope = torch.randn(shape, dtype=torch.float64)
    x = torch.randn(B, N, 32, dtype=torch.float64, requires_grad=True)
    model = RopeAttention(ref)
    for causal in (False, True):
        want = ref(x, rope=rope, is_causal=causal)
        got = model(x, rope=rope, is_causal=causal)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
        gw, = torch.autograd.grad(want.sum(), x)
        gg, = torch.autograd.grad(got.sum(), x)
        torch.testing.assert_close(gg, gw, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match=r"rope must be \(tokens, 2 \* head_dim\)"):
        model(x, rope=rope[..., :D])
    with pytest.raises(NotImplementedError, match="RopeAttention takes no attn_mask"):
        model(x, rope=rope, attn_mask=torch.ones(N, N, dtype=torch.bool))
    ref.attn_drop.p = model.attn_drop_p = 0.1
    with pytest.raises(NotImplementedError, match="attention dropout"):
        model.train()(x, rope=rope)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_swapped_eva02_in_bf16(device):
    """bf16 autocast, EVA-02's and PE's blocks: timm's features within bf16, through pyssm's
    attention op (the flash kernels on a GPU)."""
    for kw in (ROPE_CASES["eva02"], ROPE_CASES["pe"]):
        ref, model = _rope_pair(kw, torch.float32)
        ref, model = ref.eval().to(device), model.eval().to(device)
        x = torch.randn(2, 3, 32, 32, device=device)
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            want = ref.forward_features(x).float()
            with Dispatched() as seen:
                got = model.forward_features(x).float()
        if _extension.available():
            assert seen.pyssm_ops().count("attention") == 2
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)
