"""bench/roofline_model.py: its byte and FLOP counts on a case counted by hand, its emulated
autocast, and traces of small encoders (inference and a training step) that take the GPU's path
and put the ops it stands in back."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
try:
    import roofline_model as rm
finally:
    sys.path.pop(0)


def test_a_linear_layer_counted_by_hand():
    """fp32 x (B, K) through a fp32 Linear(K, N) twice under the emulated autocast: x cast each
    time, the weight and bias once (autocast's cache), one addmm each time reading bf16
    operands; then a GELU in place and a view, which is no kernel."""
    B, K, N = 6, 10, 14
    layer = torch.nn.Linear(K, N).to("meta")
    x = torch.empty(B, K, device="meta")
    trace = rm.KernelTrace()
    with rm.Autocast(layer.parameters()), trace, torch.no_grad():
        for _ in range(2):
            y = layer(x)
        torch.ops.aten.gelu_(y)
        y.view(N, B)
    got = [(k.op, k.kind, k.read, k.written, k.flops) for k in trace.kernels]
    cast_x = ("aten._to_copy", "cast/copy", 4 * B * K, 2 * B * K, 0)
    addmm = ("aten.addmm", "gemm", 2 * (N + B * K + K * N), 2 * B * N, 2 * B * K * N)
    want = [("aten._to_copy", "cast/copy", 4 * K * N, 2 * K * N, 0),  # the weight, once
            ("aten._to_copy", "cast/copy", 4 * N, 2 * N, 0), cast_x, addmm, cast_x, addmm,
            ("aten.gelu_", "other", 2 * B * N, 2 * B * N, 0)]
    assert sorted(got[:4]) == sorted(want[:4]) and got[4:] == want[4:]
    assert y.dtype == torch.bfloat16
    floor = trace.kernels[3].floor_s
    assert floor == pytest.approx((addmm[2] + addmm[3]) / rm.BANDWIDTH)


def test_a_matrix_product_bound_by_flops():
    k = rm.Kernel("aten.mm", "gemm", read=10, written=10, flops=10**15)
    assert k.floor_s == pytest.approx(1e15 / rm.MATRIX_RATE)
    rows = rm.summarize([k, rm.Kernel("x", "other", 4.3e6, 0)])
    assert rows["total"]["kernels"] == 2 and rows["other"]["ms"] == pytest.approx(1e-3)


@pytest.mark.parametrize("encoder,overrides", [
    ("vmamba_tiny_s1l8", dict(depths=(1, 1, 1, 1), dims=16)),
    ("vit_small_patch16", dict(depth=2)),
])
def test_encoders_trace_the_gpu_inference_path(encoder, overrides):
    def stood_in():
        return (rm.vmamba_module.ss2d, rm.vit_module.attention_qkvpacked,
                rm.norms_module.layer_norm, rm.norms_module._out_dtype, rm.mlp_module.linear_gelu,
                rm.mlp_module.linear_gelu_uses_triton, rm.mlp_module.linear_residual_,
                rm.mlp_module.linear_residual_uses_triton, rm.mlp_module.mlp_residual_,
                rm.mlp_module.mlp_residual_uses_triton, rm.mlp_module.norm_mlp_residual,
                rm.mlp_module.norm_mlp_residual_uses_triton)

    real = stood_in()
    normed = rm.trace_inference(encoder, 64, 3, **overrides)
    whole = rm.trace_inference(encoder, 64, 3, norm_mlp=False, **overrides)
    kernels = rm.trace_inference(encoder, 64, 3, whole_mlp=False, **overrides)
    unfused = rm.trace_inference(encoder, 64, 3, fused_mlp=False, **overrides)
    assert stood_in() == real
    residual = rm.trace_inference(encoder, 64, 3, fused_residual=False, **overrides)
    # MLPs up to 256 wide (these VMamba's 16) as one mlp_residual_: x and the sum read, the sum
    # written, no hidden layer; its FLOPs fc1's and fc2's (16 outputs: no padded columns).
    # ViT-S's 384-wide MLPs keep the two passes.
    if encoder.startswith("vmamba"):
        mlps = [k for k in whole if k.op == "mlp_residual"]
        assert mlps and not {"linear_gelu", "linear_residual"} & {k.op for k in whole}
        assert rm.summarize(whole)["total"]["mb"] < rm.summarize(kernels)["total"]["mb"]
        first = mlps[0]  # stage 1: 3 images of 16 x 16 positions, 16 -> 64 -> 16
        params = 2 * (64 * 16 + 64 + 16 * 64 + 16)
        assert (first.read, first.written) == (3 * 256 * 16 * (2 + 4) + params, 3 * 256 * 16 * 4)
        assert first.flops == 2 * 3 * 256 * 64 * (16 + 16)
        # with the residual add and the norm before it: one norm_mlp_residual a block in place
        # of the norm's pass and mlp_residual_, x (float32) and the bf16 branch read, the
        # output written: in bf16 at the ends of stages 1-3 (these have a block each), whose
        # outputs only the downsampling convolution reads (its cast gone), float32 at stage 4's;
        # the same FLOPs (16 wide: no padding)
        fused = [k for k in normed if k.op == "norm_mlp_residual"]
        assert len(fused) == len(mlps) == 4
        assert not [k for k in normed if k.op == "mlp_residual"]
        assert (fused[0].read, fused[0].written) == (3 * 256 * 16 * (4 + 2) + params + 2 * 4 * 16,
                                                     3 * 256 * 16 * 2)
        assert fused[0].flops == first.flops
        norms = [rm.summarize(t, "op")["layer_norm"]["kernels"] for t in (normed, whole)]
        assert norms[1] - norms[0] == len(mlps)
        casts = [rm.summarize(t, "op")["aten._to_copy"]["kernels"] for t in (normed, whole)]
        assert casts[1] - casts[0] == 3
        # an element less: h (2 B) and the sum (4 B) neither written nor read again (12 B), and
        # at a bf16 end 2 B of the output and the cast (4 B read, 2 written) too (20 B)
        ends = [(k.written // 2, 20) for k in fused[:3]] + [(fused[3].written // 4, 12)]
        assert (rm.summarize(whole)["total"]["mb"] - rm.summarize(normed)["total"]["mb"]
                == pytest.approx(sum(n * b for n, b in ends) / 1e6, rel=0.01))
    else:
        assert [(k.op, k.read, k.written) for k in whole] == [
            (k.op, k.read, k.written) for k in kernels]
    ops, ops_unfused = {k.op for k in kernels}, {k.op for k in unfused}
    # fc1 + GELU as linear_gelu and fc2 + the residual add as linear_residual; or fc1, the GELU
    # in place, fc2 and the residual add in place, as an inference on the GPU runs them
    assert {"linear_gelu", "linear_residual", "layer_norm"} <= ops
    assert not {"aten.gelu", "aten.gelu_", "aten.add_"} & ops
    assert {"aten.gelu_", "aten.add_"} <= ops_unfused
    assert not {"linear_gelu", "linear_residual"} & ops_unfused
    assert {"linear_gelu", "aten.add_"} <= {k.op for k in residual}
    mb = [rm.summarize(t)["total"]["mb"] for t in (kernels, residual, unfused)]
    assert mb[0] < mb[1] < mb[2]
    # the same matrix products either way; fc2 + add: the sum read and written, 8 B an element
    # of the width, instead of fc2's 2-byte output written, then read with the sum and the sum
    # written (12 B)
    assert len({sum(k.flops for k in t if k.kind == "gemm") for t in (kernels, residual,
                                                                     unfused)}) == 1
    adds = [k for k in residual if k.op == "aten.add_"]
    assert adds and mb[1] - mb[0] == pytest.approx(sum(k.written for k in adds) / 1e6)
    if encoder.startswith("vmamba"):
        assert {"ss2d.x_proj", "ss2d.zero_y", "ss2d.scan", "depthwise_conv2d+silu"} <= ops
        # the stem's norm + GELU: one pass reading the conv's bf16 output and writing bf16 (3
        # images of 8 channels at 32 x 32), instead of the norm written in float32, the GELU
        # in place on it and the next convolution's cast
        stem = rm.trace_inference(encoder, 64, 3, fused_stem=False, **overrides)
        stems = [k for k in kernels if k.op == "layer_norm+gelu"]
        assert [(k.read - 2 * 8 * 4, k.written) for k in stems] == [(2 * 3 * 8 * 32**2,) * 2]
        assert "layer_norm+gelu" not in {k.op for k in stem}
        gelus = [k for k in stem if k.op == "aten.gelu_"]
        assert [(k.read, k.written) for k in gelus] == [(4 * 3 * 8 * 32**2,) * 2]
        saved = rm.summarize(stem)["total"]["mb"] - rm.summarize(normed)["total"]["mb"]
        assert saved == pytest.approx(16 * 3 * 8 * 32**2 / 1e6)
        x_proj = next(k for k in kernels if k.op == "ss2d.x_proj")
        B, L, D, K = 3, 16 * 16, 16, 4 * (1 + 2)  # stage 1: 64 / 4 px, d_inner 16, dt_rank 1
        assert x_proj.flops == 2 * B * L * D * K and x_proj.written == 4 * B * L * K
    else:
        attn = [k for k in kernels if k.op == "attention"]
        assert len(attn) == 2 and attn[0].flops == 4 * 3 * 6 * 17**2 * 64
    assert all(k.read >= 0 and k.written > 0 for k in kernels)
    assert rm.summarize(kernels)["total"]["ms"] > 0


@pytest.mark.parametrize("encoder,overrides", [
    ("vmamba_tiny_s1l8", dict(depths=(1, 1, 1, 1), dims=16)),
    ("vmamba_tiny_s1l8", dict(depths=(1, 1, 1, 1), dims=16, dt_rank=20)),
    ("vit_small_patch16", dict(depth=2)),
])
def test_a_training_step_traces_forward_and_backward(encoder, overrides):
    """--train: each MLP as mlp_gelu (the inference-only ops step aside), or as its layers
    with fused_mlp=False (fewer bytes with the op, the same FLOPs), every stood-in op's
    backward recorded beside torch's own backward ops, the stand-ins put back after."""
    real = (rm.vmamba_module.ss2d, rm.vmamba_module.depthwise_conv2d,
            rm.vit_module.attention_qkvpacked, rm.norms_module.layer_norm,
            rm.norms_module._out_dtype, rm.mlp_module.mlp_gelu)
    kernels = rm.trace_training(encoder, 64, 3, **overrides)
    unfused = rm.trace_training(encoder, 64, 3, fused_mlp=False, **overrides)
    assert (rm.vmamba_module.ss2d, rm.vmamba_module.depthwise_conv2d,
            rm.vit_module.attention_qkvpacked, rm.norms_module.layer_norm,
            rm.norms_module._out_dtype, rm.mlp_module.mlp_gelu) == real
    ops, ops_unfused = {k.op for k in kernels}, {k.op for k in unfused}
    assert {"layer_norm", "layer_norm.backward", "mlp_gelu.fc1_gelu",
            "mlp_gelu.backward.da"} <= ops
    assert {"aten.gelu", "aten.gelu_backward"} <= ops_unfused
    assert not {"linear_gelu", "linear_residual", "aten.gelu", "aten.gelu_backward"} & ops
    assert not {"linear_gelu", "linear_residual", "mlp_gelu.fc1_gelu"} & ops_unfused
    totals = [rm.summarize(t)["total"] for t in (kernels, unfused)]
    assert totals[0]["gflop"] == pytest.approx(totals[1]["gflop"])
    assert totals[0]["mb"] < totals[1]["mb"]
    inference = rm.trace_inference(encoder, 64, 3, **overrides)
    gemm = [sum(k.flops for k in t if k.kind == "gemm") for t in (inference, kernels)]
    assert gemm[1] > 2.5 * gemm[0]  # (the backward's two products a layer, and the MLP's)
    if encoder.startswith("vmamba"):
        assert {"ss2d.backward.summary", "ss2d.backward.main", "ss2d.backward.x_proj_adjoint",
                "depthwise_conv2d+silu.backward_dx"} <= ops
        assert ("ss2d.backward.dpre_gemms" in ops) == ("dt_rank" in overrides)
        # stage 1: 3 images of 16 x 16 pixels, d_inner 16: one block of channels a direction,
        # 256 positions in 4 tiles of 64 -> 3 x 4 x 256 warp-steps
        main = next(k for k in kernels if k.op == "ss2d.backward.main")
        instructions = rm.ss2d_backward_instructions(overrides.get("dt_rank", 1))[1]
        assert main.fixed_s == pytest.approx(3 * 4 * 256 * instructions / rm.ISSUE_RATE)
    else:
        back = [k for k in kernels if k.op == "attention.backward"]
        assert len(back) == 2 and back[0].flops == 10 * 3 * 6 * 17**2 * 64
        # attention_qkvpacked: one gradient of the fused qkv (3 x 17 x 3 x 384 bf16), no stack
        assert back[0].written == 2 * 3 * 17 * 3 * 384 and "aten.stack" not in ops


def test_a_training_step_keeps_the_ss2d_states_where_the_gpu_would():
    """With 66 images the ss2d forward's blocks (66 x 4 x 1 channel group) reach 2 an SM of
    132: it writes its tile states and the backward has no summary pass; with 65, or with
    ss2d_states=False, the summary pass runs and nothing is kept."""
    small = dict(depths=(1, 1, 1, 1), dims=16)  # stage 1: d_inner 16, 16 x 16 pixels at 64 px

    def ops_of(batch, **kw):
        kernels = rm.trace_training("vmamba_tiny_s1l8", 64, batch, **kw, **small)
        return kernels, {k.op for k in kernels}

    kept, ops = ops_of(66)
    assert "ss2d.backward.summary" not in ops
    # float32, a tile of 64 positions, direction and channel: stages of 16, 32, 64 and 128
    # channels on 16 x 16 (4 tiles), 8 x 8, 4 x 4 and 2 x 2 pixels (one tile each)
    states = 66 * 4 * 4 * (16 * 4 + 32 + 64 + 128)
    plain, plain_ops = ops_of(66, ss2d_states=False)
    assert "ss2d.backward.summary" in plain_ops

    def total(kernels, op, field):
        return sum(getattr(k, field) for k in kernels if k.op == op)

    assert total(kept, "ss2d.scan", "written") - total(plain, "ss2d.scan", "written") == states
    assert (total(kept, "ss2d.backward.main", "read")
            - total(plain, "ss2d.backward.main", "read")) == states
    assert "ss2d.backward.summary" in ops_of(65)[1]
    assert rm.SS2D_STATES  # (put back)
    totals = [rm.summarize(t)["total"]["ms"] for t in (kept, plain)]
    assert totals[0] < totals[1]


def test_the_cli_takes_train():
    assert rm.main(["--encoder", "vit_small_patch16", "--img-size", "32", "--train",
                    "--batch", "2"]) == 0
    assert rm.main(["--encoder", "vit_small_patch16", "--img-size", "32", "--train",
                    "--unfused-mlp", "--batch", "2"]) == 0
    assert rm.main(["--encoder", "vmamba_tiny_s1l8", "--img-size", "32", "--train",
                    "--no-ss2d-states", "--batch", "2"]) == 0
    assert rm.SS2D_STATES
    with pytest.raises(SystemExit):
        rm.main(["--train", "--unfused-residual"])


@pytest.mark.parametrize("name", ["vit_tiny_patch16", "vit_small_patch16"])
def test_timm_models_traced_as_they_are_and_swapped(name):
    """--timm: timm's ViT with its blocks swapped traces the same kernels as pyssm's ViT (the
    swap computes its blocks; only the final norm, timm's own, differs); timm's own modules
    trace more bytes (norms in float32, the GELU and the adds as kernels of their own), SDPA
    counted as flash (ViT-Ti's whole-MLP pass adds FLOPs on its padded tile, not bytes)."""
    pytest.importorskip("timm")
    ours = rm.trace_inference(name, 224, 16, depth=2)
    swapped = rm.trace_inference(name, 224, 16, timm_model="swapped", depth=2)
    own = rm.trace_inference(name, 224, 16, timm_model="own", depth=2)
    key = lambda k: (k.op, k.read, k.written, k.flops)  # noqa: E731
    differ = [(a.op, b.op) for a, b in zip(ours, swapped) if key(a) != key(b)]
    assert len(swapped) == len(ours) and differ == [("layer_norm", "aten.native_layer_norm")]
    total = {k: rm.summarize(t)["total"] for k, t in (("own", own), ("ours", ours),
                                                       ("swapped", swapped))}
    assert total["swapped"]["mb"] == pytest.approx(total["ours"]["mb"], rel=1e-3)
    assert total["own"]["gflop"] <= total["ours"]["gflop"]
    assert total["own"]["mb"] > 1.3 * total["ours"]["mb"]
    assert [k.flops for k in own if k.kind == "attention"] == \
        [k.flops for k in ours if k.kind == "attention"]
    with pytest.raises(ValueError, match="timm_model"):
        rm.trace_inference("vmamba_tiny_s1l8", 64, 3, timm_model="own")
    with pytest.raises(SystemExit):
        rm.main(["--encoder", name, "--timm", "own", "--train"])
