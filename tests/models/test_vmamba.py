"""VMamba encoders: official layout and configurations, checkpoints, and equality with a
straightforward composition of pyssm's reference ops for the same weights."""

import re

import pytest
import torch
import torch.nn.functional as F
from triton_params import INTERPRETER

from pyssm.models import create_encoder, list_encoders
from pyssm.models import mlp as mlp_module
from pyssm.models import norms as norms_module
from pyssm.models import vmamba as vmamba_module
from pyssm.ops import cross_merge_reference, cross_scan_reference, selective_scan_reference, ss2d

F64 = torch.float64
SMALL = dict(depths=(1, 2, 1, 1), dims=16)   # dims 16, 32, 64, 128; dt_rank 1, 2, 4, 8


def official_forward(sd: dict, name: str, x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The official VMamba forward written out from the state dict, channel-last throughout,
    with pyssm's reference cross_scan / selective_scan / cross_merge (and einsum projections
    in scan order, as the official forward_corev2 does)."""
    vanilla = "vanilla" in name
    cl, cf = (lambda t: t.permute(0, 2, 3, 1)), (lambda t: t.permute(0, 3, 1, 2))

    def ln(t, p):
        return F.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)

    def ss2d_branch(h, p):
        xz = F.linear(h, sd[p + ".in_proj.weight"])
        x_, z = xz.chunk(2, -1) if vanilla else (xz, None)
        x_ = F.silu(F.conv2d(cf(x_), sd[p + ".conv2d.weight"], sd.get(p + ".conv2d.bias"),
                             padding=1, groups=x_.shape[-1]))
        B, D, H, W = x_.shape
        R, N = sd[p + ".dt_projs_weight"].shape[2], sd[p + ".A_logs"].shape[1]
        xs = cross_scan_reference(x_)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, sd[p + ".x_proj_weight"])
        dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, sd[p + ".dt_projs_weight"])
        ys = selective_scan_reference(xs.reshape(B, -1, H * W), dts.reshape(B, -1, H * W),
                                      -torch.exp(sd[p + ".A_logs"]), Bs, Cs, sd[p + ".Ds"],
                                      sd[p + ".dt_projs_bias"].flatten(), True)
        y = cross_merge_reference(ys.reshape(B, 4, D, H, W)).transpose(1, 2).reshape(B, H, W, D)
        y = ln(y, p + ".out_norm")
        if vanilla:
            y = y * F.silu(z)
        return F.linear(y, sd[p + ".out_proj.weight"])

    if vanilla:
        x = ln(cl(F.conv2d(x, sd["patch_embed.0.weight"], sd["patch_embed.0.bias"], stride=4)),
               "patch_embed.2")
    else:
        x = F.conv2d(x, sd["patch_embed.0.weight"], sd["patch_embed.0.bias"], stride=2, padding=1)
        x = F.gelu(cf(ln(cl(x), "patch_embed.2")))
        x = F.conv2d(x, sd["patch_embed.5.weight"], sd["patch_embed.5.bias"], stride=2, padding=1)
        x = ln(cl(x), "patch_embed.7")
    n_stages = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    for i in range(n_stages):
        depth = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith(f"layers.{i}.blocks."))
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}"
            x = x + ss2d_branch(ln(x, p + ".norm"), p + ".op")
            if p + ".mlp.fc1.weight" in sd:
                h = F.gelu(F.linear(ln(x, p + ".norm2"), sd[p + ".mlp.fc1.weight"],
                                    sd[p + ".mlp.fc1.bias"]))
                x = x + F.linear(h, sd[p + ".mlp.fc2.weight"], sd[p + ".mlp.fc2.bias"])
        d = f"layers.{i}.downsample"
        if d + ".1.weight" in sd:      # v3: 3x3 stride-2 conv, then LayerNorm
            x = ln(cl(F.conv2d(cf(x), sd[d + ".1.weight"], sd[d + ".1.bias"], stride=2,
                               padding=1)), d + ".3")
        elif d + ".reduction.weight" in sd:  # v1: patch merging
            H, W = x.shape[1:3]
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2],
                           x[:, 1::2, 1::2]], -1)
            x = F.linear(ln(x, d + ".norm"), sd[d + ".reduction.weight"])
    x = ln(x, "classifier.norm").mean(dim=(1, 2))
    return F.linear(x, sd["classifier.head.weight"], sd["classifier.head.bias"])


def randomized(model):
    """Moves every parameter off its init (LayerNorm 1/0, D = 1) so nothing is trivially equal."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("name,norm", [("vmamba_tiny_s1l8", "ln2d"), ("vmamba_tiny_s1l8", "ln"),
                                       ("vmamba_small_s2l15", "ln2d"),
                                       ("vmamba_tiny_vanilla", "ln")])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_equals_reference_composition(name, norm, backend):
    model = randomized(create_encoder(name, backend=backend, norm=norm, **SMALL).double())
    x = torch.randn(2, 3, 50, 38, dtype=F64)   # odd grids: 25x19 / 13x10 / ... after the stem
    with torch.no_grad():
        got = model(x)
    want = official_forward({k: v.detach() for k, v in model.state_dict().items()}, name, x)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


# Published parameter counts (official README / paper, millions).
PUBLISHED = {"vmamba_tiny_s1l8": 30, "vmamba_small_s2l15": 50, "vmamba_base_s2l15": 89,
             "vmamba_tiny_vanilla": 22, "vmamba_small_vanilla": 44, "vmamba_base_vanilla": 76}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts(name):
    params = sum(p.numel() for p in create_encoder(name).parameters()) / 1e6
    assert abs(params - PUBLISHED[name]) < 1.0, params


def test_official_key_layout():
    keys = set(create_encoder("vmamba_tiny_s1l8", depths=(1, 1, 1, 1)).state_dict())
    op = ["in_proj.weight", "conv2d.weight", "x_proj_weight", "dt_projs_weight",
          "dt_projs_bias", "A_logs", "Ds", "out_norm.weight", "out_norm.bias", "out_proj.weight"]
    block = [f"op.{k}" for k in op] + [f"{n}.{w}" for n in ("norm", "norm2")
                                       for w in ("weight", "bias")]
    block += [f"mlp.{fc}.{w}" for fc in ("fc1", "fc2") for w in ("weight", "bias")]
    want = {f"patch_embed.{i}.{w}" for i in (0, 2, 5, 7) for w in ("weight", "bias")}
    want |= {f"layers.{i}.blocks.0.{k}" for i in range(4) for k in block}
    want |= {f"layers.{i}.downsample.{j}.{w}" for i in range(3) for j in (1, 3)
             for w in ("weight", "bias")}
    want |= {f"classifier.{n}.{w}" for n in ("norm", "head") for w in ("weight", "bias")}
    assert keys == want
    vanilla = set(create_encoder("vmamba_tiny_vanilla", depths=(1, 1, 1, 1)).state_dict())
    assert "layers.0.downsample.reduction.weight" in vanilla and "layers.0.blocks.0.op.conv2d.bias" in vanilla
    assert not any("mlp" in k or "norm2" in k for k in vanilla)


def test_checkpoint_variants_load_unchanged(tmp_path):
    src = randomized(create_encoder("vmamba_tiny_s1l8", **SMALL))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = src(x)
    sd = src.state_dict()
    # DDP prefix, 1x1-conv-shaped linears, wrapped in {"model": ...} as the official .pth files
    odd = {f"module.{k}": (v[:, :, None, None] if k.endswith(("in_proj.weight", "fc1.weight")) else v)
           for k, v in sd.items()}
    path = tmp_path / "vssm.pth"
    torch.save({"model": odd, "epoch": 3}, path)
    for norm in ("ln2d", "ln"):  # the channel-first and channel-last variants share weights
        model = create_encoder("vmamba_tiny_s1l8", checkpoint=path, norm=norm, **SMALL).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
    headless = create_encoder("vmamba_tiny_s1l8", checkpoint=sd, num_classes=0, **SMALL).eval()
    with torch.no_grad():
        assert headless(x).shape == (1, 128)


def test_vanilla_old_key_names_load():
    src = randomized(create_encoder("vmamba_tiny_vanilla", **SMALL))
    renamed = {}
    for k, v in src.state_dict().items():
        k = re.sub(r"\.norm\.", ".ln_1.", k) if ".blocks." in k else k
        k = k.replace(".op.", ".self_attention.").replace("patch_embed.0.", "patch_embed.proj.")
        k = k.replace("patch_embed.2.", "patch_embed.norm.").replace("classifier.", "")
        renamed[k] = v
    model = create_encoder("vmamba_tiny_vanilla", checkpoint=renamed, **SMALL).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x))


def test_bad_checkpoints_are_named():
    sd = create_encoder("vmamba_tiny_s1l8", **SMALL).state_dict()
    with pytest.raises(ValueError, match=r"layers\.0\.blocks\.0\.op\.(x_proj_weight|A_logs).* has shape"):
        create_encoder("vmamba_tiny_s1l8", checkpoint=sd, d_state=4, **SMALL)
    partial = {k: v for k, v in sd.items() if "mlp" not in k}
    with pytest.raises(ValueError, match="missing"):
        create_encoder("vmamba_tiny_s1l8", checkpoint=partial, **SMALL)
    with pytest.raises(ValueError, match="not a state dict of tensors"):
        create_encoder("vmamba_tiny_s1l8", checkpoint={"model": {"a": 1}}, **SMALL)
    with pytest.raises(FileNotFoundError):
        create_encoder("vmamba_tiny_s1l8", checkpoint="/nonexistent/vssm.pth")
    with pytest.raises(ValueError, match="unknown encoder 'vmamba_huge'"):
        create_encoder("vmamba_huge")


def test_tokens_intermediates_and_head():
    model = create_encoder("vmamba_tiny_s1l8", depths=(1, 1, 1, 1)).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert model.tokens(x).shape == (1, 196, 384)        # the study's stage-3 tap
        assert model.tokens(x, tap=1).shape == (1, 56 * 56, 96)
        final, inter = model.forward_intermediates(x[:, :, :97, :131])
        assert [t.shape[1:] for t in inter] == [(96, 25, 33), (192, 13, 17), (384, 7, 9),
                                                (768, 4, 5)]
        assert final.shape == (1, 768, 4, 5)
        only = model.forward_intermediates(x[:, :, :64, :64], indices=[1], output_fmt="NHWC",
                                           intermediates_only=True)
        assert len(only) == 1 and only[0].shape == (1, 8, 8, 192)
        model.reset_classifier(7)
        assert model(x[:, :, :64, :64]).shape == (1, 7)
    with pytest.raises(ValueError, match="tap must be a stage number from 1 to 4"):
        model.tokens(x, tap=5)


def test_registry_lists_every_family():
    names = list_encoders("vmamba")
    for n in ("vmamba_tiny_s1l8", "vmamba_tiny_s2l5", "vmamba_small_s2l15", "vmamba_base_s2l15",
              "vmamba_tiny_vanilla", "vmamba_small_vanilla", "vmamba_base_vanilla"):
        assert n in names


@pytest.mark.parametrize("name,norm", [("vmamba_tiny_s1l8", "ln2d"), ("vmamba_tiny_s1l8", "ln"),
                                       ("vmamba_tiny_vanilla", "ln")])
@pytest.mark.parametrize("sliced", [False, True], ids=["whole", "sliced"])
def test_activations_stay_channels_last(name, norm, sliced, monkeypatch):
    """The fast path's layout: every block's input and every ss2d core's input and output are
    stored channels-last (torch.channels_last for channel-first configs, contiguous (B, H, W, C)
    for the others), so LayerNorm, the convolutions and the CUDA ss2d read them without a copy;
    also with the inference's MLPs run in slices of the batch (pyssm.models.mlp).
    (On the CPU the composed ss2d copies inside; the layout contract is what is checked.)"""
    if sliced:
        monkeypatch.setattr(mlp_module, "CHUNK_BYTES", 1)
    model = create_encoder(name, norm=norm, **SMALL).eval()
    seen = []

    def block_input(module, args):
        x = args[0]
        ok = (x.is_contiguous(memory_format=torch.channels_last) if model.cfg.channel_first
              else x.is_contiguous())
        seen.append(("block input", tuple(x.shape), ok))

    def core(x, *args, **kwargs):  # the depthwise conv's output, as the core reads it
        seen.append(("ss2d input", tuple(x.shape),
                     x.is_contiguous(memory_format=torch.channels_last)))
        return ss2d(x, *args, **kwargs)

    monkeypatch.setattr(vmamba_module, "ss2d", core)

    def norm_input(module, args):  # out_norm reads the core's output
        x = args[0]
        ok = (x.permute(0, 2, 3, 1).is_contiguous() if type(module).__name__ == "LayerNorm2d"
              else x.is_contiguous())
        seen.append(("out_norm input", tuple(x.shape), ok))

    for m in model.modules():
        if type(m).__name__ == "VSSBlock":
            m.register_forward_pre_hook(block_input)
        if type(m).__name__ == "SS2D":
            m.out_norm.register_forward_pre_hook(norm_input)
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 48))
    assert len(seen) == 3 * sum(model.cfg.depths)
    assert all(ok for *_, ok in seen), [s for s in seen if not s[2]]


@pytest.mark.parametrize("norm", ["ln2d", "ln"])
def test_stem_takes_its_first_norm_and_gelu_in_one_pass(norm, monkeypatch):
    """The v2 stem (vmamba.PatchEmbed2) gives its Sequential's module-by-module values and
    gradients (float64), and runs module by module where a hook is on its GELU; its second
    convolution reads the fused norm + GELU's output in the autocast dtype (the same values
    that convolution would cast to)."""
    model = randomized(create_encoder("vmamba_tiny_s1l8", norm=norm, **SMALL).double())
    stem = model.patch_embed
    assert isinstance(stem, vmamba_module.PatchEmbed2)
    x = torch.randn(2, 3, 50, 38, dtype=F64, requires_grad=True)
    got, want = stem(x), torch.nn.Sequential.forward(stem, x)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    for g, w in zip(*(torch.autograd.grad(y.square().sum(), [x, *stem.parameters()])
                      for y in (got, want))):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)
    # a hook on the GELU sees it called: the modules one by one, the same values
    gelus = []
    handle = stem[4].register_forward_hook(lambda m, args, out: gelus.append(out.dtype))
    torch.testing.assert_close(stem(x), want, atol=1e-12, rtol=1e-12)
    assert gelus == [F64]
    handle.remove()
    calls = []
    layer_norm = vmamba_module.LayerNorm.forward

    def spy(self, t, **kw):
        out = layer_norm(self, t, **kw)
        calls.append((kw.get("activation"), out.dtype))
        return out

    monkeypatch.setattr(vmamba_module.LayerNorm, "forward", spy)
    # the norms' output dtype as CUDA autocast decides it (float32 unless for a matrix product;
    # CPU autocast leaves the input's), so that the choice of for_matmul is what is seen
    monkeypatch.setattr(norms_module, "_out_dtype",
                        lambda t, for_matmul: torch.bfloat16 if for_matmul else torch.float32)
    seen = []
    stem[5].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    model.float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        stem(x.detach().float())
    assert calls[0] == ("gelu", torch.bfloat16) and calls[1][0] is None
    assert seen == [torch.bfloat16]


@pytest.mark.parametrize("norm", ["ln2d", "ln"])
def test_images_are_made_channels_last_and_cast_in_one_copy(norm, monkeypatch):
    """Under autocast a float32 NCHW batch reaches the stem's convolution channels-last in the
    autocast dtype (one copy, not a layout copy and then autocast's cast), with the logits
    of the two copies; outside autocast it stays float32."""
    model = create_encoder("vmamba_tiny_s1l8", norm=norm, **SMALL).eval()
    seen = []
    model.patch_embed[0].register_forward_pre_hook(lambda m, args: seen.append(
        (args[0].dtype, args[0].is_contiguous(memory_format=torch.channels_last))))
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            one_copy = model(x)
            monkeypatch.setattr(vmamba_module.VMamba, "_input",
                                staticmethod(lambda t: t.contiguous(memory_format=torch.channels_last)))
            two_copies = model(x)
    assert seen == [(torch.float32, True), (torch.bfloat16, True), (torch.float32, True)]
    assert torch.equal(one_copy, two_copies)


def test_a_stage_frees_each_block_input_as_the_next_block_runs():
    """Stage 2's input (stage 1's downsampled output) is gone by the time stage 2's second
    block runs (nn.Sequential's forward would keep it alive through the whole stage); a
    forward hook on a stage's blocks still sees them called as one module."""
    import weakref
    model = create_encoder("vmamba_tiny_s1l8", **SMALL).eval()
    seen = {}
    model.layers[0].downsample.register_forward_hook(
        lambda m, args, out: seen.__setitem__("input", weakref.ref(out)))
    model.layers[1].blocks[1].register_forward_pre_hook(
        lambda m, args: seen.__setitem__("alive", seen["input"]() is not None))
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        want = model(x)
        assert seen["alive"] is False
        calls = []
        model.layers[1].blocks.register_forward_hook(lambda m, args, out: calls.append(out.shape))
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    assert calls == [(2, 32, 8, 6)]


@pytest.mark.parametrize("name,norm", [("vmamba_tiny_s1l8", "ln2d"), ("vmamba_tiny_s1l8", "ln")])
def test_inference_in_slices_of_the_batch_gives_the_same_logits(name, norm, monkeypatch):
    """The MLPs run in up to 4 slices of the batch where their hidden layers are large
    (pyssm.models.mlp.CHUNK_BYTES, here made tiny): the official composition's values."""
    model = randomized(create_encoder(name, norm=norm, **SMALL).double())
    x = torch.randn(5, 3, 50, 38, dtype=F64)
    monkeypatch.setattr(mlp_module, "CHUNK_BYTES", 1)
    with torch.no_grad():
        sliced = model(x)
    want = official_forward({k: v.detach() for k, v in model.state_dict().items()}, name, x)
    torch.testing.assert_close(sliced, want, atol=1e-10, rtol=1e-10)


def _spy_norm_linear(monkeypatch):
    """The calls the SS2D modules make to layer_norm_linear, as (K, N, dtype)."""
    calls = []
    real = vmamba_module.layer_norm_linear

    def spy(x, nw, nb, w, b=None, **kwargs):
        calls.append((x.shape[-1], w.shape[0], kwargs.get("dtype")))
        return real(x, nw, nb, w, b, **kwargs)

    monkeypatch.setattr(vmamba_module, "layer_norm_linear", spy)
    return calls


def _triton_norms(model, backend="triton"):
    for m in model.modules():
        if isinstance(m, norms_module.LayerNorm):
            m.backend = backend


@INTERPRETER
@pytest.mark.parametrize("name,overrides,fused", [
    ("vmamba_tiny_s1l8", {}, 2), ("vmamba_tiny_s1l8", dict(norm="ln"), 2),
    ("vmamba_tiny_vanilla", {}, 1)], ids=["channel-first", "channel-last", "vanilla"])
def test_norms_fused_into_the_projections_in_16_bit_inference(name, overrides, fused,
                                                              monkeypatch):
    """bf16-autocast inference with the norms on Triton (its interpreter here): each block's
    norm runs inside in_proj and out_norm inside out_proj as layer_norm_linear passes (vanilla
    models gate out_norm's output by z first: only in_proj), in the product's bf16; the logits
    those of the separate norms and projections (PYSSM_NORM_LINEAR=0) within bf16 rounding."""
    calls = _spy_norm_linear(monkeypatch)
    torch.manual_seed(0)
    model = create_encoder(name, img_size=64, num_classes=10, depths=(1, 2, 1, 1), dims=16,
                           **overrides).eval()
    _triton_norms(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x).float()
        assert len(calls) == fused * 5 and {c[2] for c in calls} == {torch.bfloat16}
        monkeypatch.setenv("PYSSM_NORM_LINEAR", "0")
        want = model(x).float()
    assert len(calls) == fused * 5
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * want.abs().max().item())


@INTERPRETER
def test_norms_unfused_where_layer_norm_linear_does_not_apply(monkeypatch):
    """Recording autograd, float32 products (cuDNN's, TF32 on a GPU), the reference backend,
    or a hook on the mixer, a norm or a projection (which then sees the call it always saw):
    the norms and projections as modules (layer_norm_linear never called there), the same
    logits within bf16 rounding."""
    calls = _spy_norm_linear(monkeypatch)
    torch.manual_seed(0)
    model = create_encoder("vmamba_tiny_s1l8", img_size=64, num_classes=10,
                           depths=(1, 1, 1, 1), dims=16).eval()
    x = torch.randn(1, 3, 64, 64)
    _triton_norms(model)

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x).float()

    with torch.no_grad():
        fused = bf16()
    assert len(calls) == 8
    calls.clear()
    block = model.layers[0].blocks[0]
    bf16()  # recording
    with torch.no_grad():
        model(x)  # float32
        _triton_norms(model, "reference")
        bf16()
    _triton_norms(model)
    assert calls == []
    seen = []
    for module in (block.op, block.norm, block.op.in_proj, block.op.out_norm, block.op.out_proj):
        handle = module.register_forward_hook(lambda m, a, out: seen.append(m))
        with torch.no_grad():
            torch.testing.assert_close(bf16(), fused, rtol=0.05,
                                       atol=0.05 * fused.abs().max().item())
        handle.remove()
    assert len(seen) == 5
    # with a hook on the block's norm or its in_proj, out_norm -> out_proj stays fused (and
    # the other blocks' pairs): 7 of 8 passes; on out_norm or out_proj likewise; on the mixer,
    # the norm runs as a module and out_norm -> out_proj stays fused
    assert len(calls) == 5 * 7
