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
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    with pytest.raises(NotImplementedError, match="padding masks only"):
        model.blocks[0].attn(torch.randn(1, 5, 192), attn_mask=causal)
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


def _features_and_grads(m, x, training):
    """m's features of x and, in training, the gradients of their mean square for every
    parameter (None where unused), drop paths and patch dropout drawn from seed 5."""
    m.train(training)
    torch.manual_seed(5)
    with torch.set_grad_enabled(training):
        out = m.forward_features(x)
    grads = torch.autograd.grad(out.square().mean(), list(m.parameters()),
                                allow_unused=True) if training else ()
    return out.detach(), grads


@pytest.mark.parametrize("kw", BLOCK_CASES.values(), ids=BLOCK_CASES.keys())
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_swapped_blocks_give_timms_outputs_and_gradients(kw, training):
    """float64 (torch's ops under pyssm's): timm's features, and in training (drop path drawn
    from the same seed) timm's gradients for every parameter."""
    ref, model = _block_pair(kw)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    (want, want_g), (got, got_g) = (_features_and_grads(m, x, training) for m in (ref, model))
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
    classes stay timm's; a swapped block refuses an attention mask that is not padding."""
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
    with pytest.raises(NotImplementedError, match="padding masks only"):
        model.blocks[0](torch.randn(1, 5, 192),
                        attn_mask=torch.ones(5, 5, dtype=torch.bool).tril())


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
    (want, want_g), (got, got_g) = (_features_and_grads(m, x, training) for m in (ref, model))
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
    with pytest.raises(NotImplementedError, match="padding masks only"):
        model(x, rope=rope, attn_mask=torch.ones(N, N, dtype=torch.bool).tril())
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


# Padding masks (timm's NaFlex ViTs: variable resolutions batched with padding patches, the
# mask made by timm's create_attention_mask from patch_valid): rows all valid, padded at the end
# (each row's valid keys one run: read in place), and with holes (valid keys packed)
PATCH_VALID = {"all-valid": [], "end-padded": [(1, slice(8, None))],
               "holes": [(1, slice(8, None)), (2, slice(3, 4)), (2, slice(10, None))]}


def _naflex_inputs(holes):
    B, N = 3, 12
    torch.manual_seed(3)
    patches = torch.randn(B, N, 16 * 16 * 3, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij"), -1)
    valid = torch.ones(B, N, dtype=torch.bool)
    for row, cols in holes:
        valid[row, cols] = False
    return dict(patches=patches, patch_coord=grid.reshape(1, N, 2).expand(B, N, 2),
                patch_valid=valid)


@pytest.mark.parametrize("holes", PATCH_VALID.values(), ids=PATCH_VALID.keys())
@pytest.mark.parametrize("key_only", [False, True], ids=["symmetric", "key-only"])
@pytest.mark.parametrize("swap", [swap_attention, swap_blocks])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_naflex_padding_masks(holes, key_only, swap, training, monkeypatch):
    """A NaFlex ViT (float64, 4 prefix tokens) with swapped attention or blocks: timm's tokens
    wherever they are valid, timm's pooled output and, in training, timm's gradients for every
    parameter; the mask read once a forward (padding.key_padding)."""
    import pyssm.integrations.padding as padding

    torch.manual_seed(0)
    kw = dict(pretrained=False, depth=2, embed_dim=64, num_heads=2, num_classes=5,
              use_key_only_attn_mask=key_only)
    ref = timm.create_model("naflexvit_base_patch16_gap", **kw).double()
    with torch.no_grad():   # (weights large enough that attention moves the tokens)
        for name, p in ref.named_parameters():
            p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.3)
    model = timm.create_model("naflexvit_base_patch16_gap", **kw).double()
    model.load_state_dict(ref.state_dict())
    assert swap(model) == 2
    reads = []
    real = padding.mask_summary
    monkeypatch.setattr(padding, "mask_summary", lambda m: reads.append(1) or real(m))
    inputs = _naflex_inputs(holes)
    valid = torch.cat([torch.ones(3, ref.num_prefix_tokens, dtype=torch.bool),
                       inputs["patch_valid"]], 1)
    results = []
    for m in (ref, model):
        m.train(training)
        with torch.set_grad_enabled(training):
            tokens = m.forward_features(**inputs)["patches"]
            pooled = m.forward_head(tokens, patch_valid=inputs["patch_valid"])
        grads = torch.autograd.grad(pooled.square().mean(), list(m.parameters()),
                                    allow_unused=True) if training else ()
        results.append((tokens.detach()[valid], pooled.detach(), grads))
    (want_t, want_p, want_g), (got_t, got_p, got_g) = results
    torch.testing.assert_close(got_t, want_t, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got_p, want_p, atol=1e-10, rtol=1e-10)
    for (name, _), g, w in zip(model.named_parameters(), got_g, want_g):
        assert (g is None) == (w is None), name
        if w is not None:
            torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-8, msg=name)
    assert len(reads) == 1   # (one mask, two blocks)
    if holes:   # (the mask mattered: attention over every token differs)
        with torch.no_grad():
            unmasked = model.forward_features(inputs["patches"].clone(), inputs["patch_coord"],
                                              torch.ones_like(inputs["patch_valid"]))
        assert (unmasked["patches"][valid] - want_t).abs().max() > 1e-3


def test_padding_masks_in_rope_attention():
    """Eva's rotary attention under a padding mask (timm's create_attention_mask): timm's
    values at the valid tokens, float64."""
    from timm.models.naflexvit import create_attention_mask

    ref, model = _rope_pair(ROPE_CASES["pe"], torch.float64)
    valid = torch.ones(2, 16, dtype=torch.bool)
    valid[1, 5:] = False
    mask = create_attention_mask(valid, num_prefix_tokens=1, dtype=torch.float64)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want, got = (m.eval().forward_features(x, attn_mask=mask) for m in (ref, model))
    keep = torch.cat([torch.ones(2, 1, dtype=torch.bool), valid], 1)
    torch.testing.assert_close(got[keep], want[keep], atol=1e-10, rtol=1e-10)


def test_masks_the_swap_refuses():
    """What is not padding raises instead of being dropped: a causal mask, a mask per head, an
    additive bias, a mask with is_causal, a mask of the wrong size."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    swap_attention(model)
    attn, x = model.blocks[0].attn.eval(), torch.randn(2, 5, 192)
    bias = torch.zeros(2, 1, 5, 5)
    bias[0, 0, :, 1] = -2.0
    for mask in (torch.ones(5, 5, dtype=torch.bool).tril(), torch.ones(2, 3, 5, 5) == 1, bias):
        with pytest.raises(NotImplementedError, match="padding mask|one mask for every head"):
            attn(x, attn_mask=mask)
    with pytest.raises(ValueError, match="attn_mask and is_causal together"):
        attn(x, attn_mask=torch.ones(5, 5, dtype=torch.bool), is_causal=True)
    with pytest.raises(ValueError, match=r"attn_mask must be \(batch, 1, queries, keys\)"):
        attn(x, attn_mask=torch.ones(2, 1, 5, 6, dtype=torch.bool))
    # a mask hiding the same keys by -inf, by timm's finfo.min or as booleans: one result
    keys = torch.tensor([True, True, False, True, False])
    want = attn(x, attn_mask=keys.expand(5, 5))
    for fill in (float("-inf"), torch.finfo(torch.float32).min):
        additive = torch.zeros(1, 1, 1, 5).masked_fill(~keys, fill)
        torch.testing.assert_close(attn(x, attn_mask=additive), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("form", ["bool", "additive"])
def test_padding_masks_of_every_layout(form):
    """The swapped Attention against timm's own under masks NaFlex does not make: padding in
    front (a run from key 2: leftpad_k), a run in the middle, holes, a row with no valid key,
    one mask broadcast over the batch, key-only (B, 1, 1, N) and 2D ones; float64, timm's
    values at every query that sees a key."""
    from timm.layers import Attention as TimmAttention

    torch.manual_seed(0)
    ref = TimmAttention(32, num_heads=2).double().eval()
    ours = Attention(ref)
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    runs = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    holes = torch.tensor([[1, 0, 1, 1, 0, 1, 1], [0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]])

    def as_mask(valid, symmetric=True):
        v = valid.bool()
        ok = (v[:, :, None] & v[:, None, :]) if symmetric else v[:, None, :]
        ok = ok[:, None]
        return ok if form == "bool" else torch.zeros(ok.shape, dtype=torch.float64).masked_fill(
            ~ok, torch.finfo(torch.float64).min)

    cases = [(as_mask(runs), runs), (as_mask(holes), holes), (as_mask(runs, False), None),
             (as_mask(holes, False), None), (as_mask(holes[:1], False), None),
             (as_mask(holes[:1], False)[0, 0], None)]
    for mask, queries in cases:
        with torch.no_grad():
            want, got = ref(x, attn_mask=mask), ours(x, attn_mask=mask)
        seen = torch.ones(3, 7, dtype=torch.bool) if queries is None else queries.bool()
        if mask.shape[-2] == 1:   # key-only: rows with no valid key see nothing
            seen &= (mask.reshape(-1, 7) == (True if form == "bool" else 0)).any(-1)[:, None]
        torch.testing.assert_close(got[seen], want[seen], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_naflex_padding_masks_in_bf16(device):
    """bf16 autocast (on a GPU the kernels): a NaFlex ViT with end padding and holes, its attention swapped
    (the kernels reading the valid keys in place, and packed): timm's valid tokens within
    bf16, through pyssm's attention op."""
    torch.manual_seed(0)
    kw = dict(pretrained=False, depth=2, embed_dim=128, num_heads=2, num_classes=0)
    ref = timm.create_model("naflexvit_base_patch16_gap", **kw).to(device).eval()
    model = timm.create_model("naflexvit_base_patch16_gap", **kw).to(device).eval()
    model.load_state_dict(ref.state_dict())
    swap_attention(model)
    for holes in (PATCH_VALID["end-padded"], PATCH_VALID["holes"]):
        inputs = {k: v.to(device) for k, v in _naflex_inputs(holes).items()}
        inputs["patches"] = inputs["patches"].float()
        valid = torch.cat([torch.ones(3, ref.num_prefix_tokens, dtype=torch.bool,
                                      device=device), inputs["patch_valid"]], 1)
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            want = ref.forward_features(**inputs)["patches"].float()
            with Dispatched() as seen:
                got = model.forward_features(**inputs)["patches"].float()
        if _extension.available():
            assert seen.pyssm_ops().count("attention") == 2
        torch.testing.assert_close(got[valid], want[valid], rtol=0.05, atol=0.05)
