"""Encoder throughput and memory versus resolution: pyssm's VMamba and ViT, timm's ViT with
the same weights and (when importable) official VMamba, side by side.

GPU (bf16 autocast): VMamba-T s1l8 / S s2l15 / B s2l15, ViT-S/B/L 16 at 224, 384, 512, 768,
1024 px; inference at batch round(128 (224/R)^2), a training step (forward, backward of the
mean logit, all parameters) at round(64 (224/R)^2) for 224 and 512; ANCHORS.md's img/s beside
(official VMamba for the VMamba rows, timm for the ViT rows). pyssm rows whose kernels are
not built yet on this device say so instead of running the slow reference.
CPU (float32): VMamba-T s1l8 and ViT-S/16 at 64, 96, 128, 160 and 224 px (--quick: 64, 96),
batch 2, a training step at 64 px.
The default run also times timm's rotary ViTs (TIMM_ROPE: Perception Encoder core B/16 and
EVA-02 B/14) as timm builds them and with pyssm's attention swapped in: on a GPU at the same
resolutions, on the CPU at the first only.

Each row carries "tokens", the visual tokens the encoder gives the VLM at that resolution
(ViT: (R / patch)^2; VMamba: its stage-3 map, (R / 16)^2): the x axis of the cost fits.
Official VMamba runs when its classification/models/vmamba.py is importable as ``vmamba``
(put its folder on PYTHONPATH, or set PYSSM_OFFICIAL_VMAMBA to it); random weights, since
speed does not depend on them.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import sys

import torch

from pyssm.bench import harness
from pyssm.bench.results import ANCHOR_LABEL
from pyssm import _extension
from pyssm.models import create_encoder

# ANCHORS.md, H200, bf16 autocast: img/s by model -> resolution.
ANCHOR_INFER = {
    "vmamba_tiny_s1l8": {224: 3054, 384: 1066, 512: 643, 768: 267, 1024: 156},
    "vmamba_small_s2l15": {224: 1635, 384: 558, 512: 350, 768: 143, 1024: 87},
    "vmamba_base_s2l15": {224: 1307, 512: 261, 1024: 68},
    "vit_small_patch16": {224: 17757, 384: 5721, 512: 2993, 768: 1135, 1024: 543},
    "vit_base_patch16": {224: 8716, 384: 2813, 512: 1411, 768: 545, 1024: 254},
}
ANCHOR_TRAIN = {"vmamba_tiny_s1l8": {224: 912, 512: 183},
                "vit_small_patch16": {224: 3126, 512: 550},
                "vit_base_patch16": {224: 2380, 512: 405}}
KERNEL = {"vmamba": "ss2d", "vit": "attention"}  # the op each family's speed rests on
NOTES = [
    "img/s = batch / median time; MB/img = peak allocated above weights and inputs / batch.",
    f"anchor {ANCHOR_LABEL}: official VMamba (VMamba rows) and timm (ViT rows); "
    "vs anchor = measured img/s / anchor img/s.",
    "step = one training step: forward, mean of the logits, backward into every parameter.",
    "pyssm-mlp-unfused (GPU): the pyssm model with its MLPs' fc1 and GELU, and fc2 and the "
    "residual add, as separate kernels in inference, and the MLP as its three layers in training "
    "(PYSSM_LINEAR_GELU=0 PYSSM_LINEAR_RESIDUAL=0 PYSSM_MLP_GELU=0 PYSSM_MLP_RESIDUAL=0): what "
    "the fused Triton passes gain or lose, in the same run.",
    "pyssm-mlp-two-pass (GPU, VMamba forward rows): the pyssm model with its MLPs up to 256 "
    "wide as linear_gelu and then linear_residual_ (PYSSM_MLP_RESIDUAL=0), not one "
    "mlp_residual_ pass: what keeping the hidden layer on chip gains, in the same run.",
    "pyssm-norm-unfused (GPU, VMamba forward rows): the pyssm model with each norm written "
    "and then read by its projection (PYSSM_NORM_LINEAR=0), not one layer_norm_linear pass: "
    "what that fusion gains, in the same run.",
    "pyssm-norm-mlp-apart (GPU, VMamba forward rows): the pyssm model with each block's "
    "second residual add and norm as their own pass and then the MLP up to 256 wide as one "
    "mlp_residual_ (PYSSM_NORM_MLP=0), not one norm_mlp_residual pass (nor stages 1-2 ending "
    "in bf16 for the downsampling): what that fusion gains or loses (its weights read from the "
    "L2 twice as often), in the same run.",
    "pyssm-qkv-copied (GPU, ViT rows): the pyssm ViT with its attention on contiguous copies "
    "of q, k and v and their gradients stacked (PYSSM_QKVPACKED=0), as before the kernels read "
    "the fused qkv in place: what attention_qkvpacked gains, in the same run.",
    "pyssm-residual-summed (GPU, step rows): the pyssm model with each block's output summed "
    "before the next block (PYSSM_RESIDUAL_PAIRS=0), as before the blocks handed the residual "
    "stream on unsummed in training: what the pairs gain, in the same run.",
    "pyssm-ss2d-no-states (GPU, VMamba step rows): the pyssm model with the ss2d forward "
    "keeping no tile states (PYSSM_SS2D_STATES=0), so each backward runs its summary pass: "
    "what the states gain, in the same run.",
    "timm-pyssm-blocks (ViT rows; --quick: the first resolution only): timm's model with the "
    "same weights and its blocks swapped for pyssm's (pyssm.integrations.timm.swap_blocks): "
    "what the integration gives a timm user, beside timm and pyssm's own ViT.",
    "timm-pyssm-attention (rows of timm's rotary ViTs, Perception Encoder and EVA-02, which "
    "have no pyssm model): timm's model with its attention swapped for pyssm's "
    "(pyssm.integrations.timm.swap_attention), beside timm's own.",
]

# timm's rotary-embedding ViTs (timm name -> patch size), timed as timm
# builds them and with their attention swapped for pyssm's: Perception Encoder's core tower and
# EVA-02, vision towers of VLMs that pyssm has no model of
TIMM_ROPE = {"vit_pe_core_base_patch16_224": 16, "eva02_base_patch14_224": 14}


# the comparisons on a GPU (NOTES): the pyssm model with one fused path switched off, as
# (provider, modes, switches, the family it applies to or None for both)
COMPARISONS = [
    ("pyssm-mlp-unfused", ("forward", "step"),
     {"PYSSM_LINEAR_GELU": "0", "PYSSM_LINEAR_RESIDUAL": "0", "PYSSM_MLP_GELU": "0",
      "PYSSM_MLP_RESIDUAL": "0"}, None),
    ("pyssm-mlp-two-pass", ("forward",), {"PYSSM_MLP_RESIDUAL": "0"}, "vmamba"),  # <= 256 wide
    ("pyssm-norm-unfused", ("forward",), {"PYSSM_NORM_LINEAR": "0"}, "vmamba"),
    ("pyssm-norm-mlp-apart", ("forward",), {"PYSSM_NORM_MLP": "0"}, "vmamba"),  # <= 256 wide
    ("pyssm-residual-summed", ("step",), {"PYSSM_RESIDUAL_PAIRS": "0"}, None),
    ("pyssm-qkv-copied", ("forward", "step"), {"PYSSM_QKVPACKED": "0"}, "vit"),
    # the ss2d backward's summary pass, without the forward's tile states
    ("pyssm-ss2d-no-states", ("step",), {"PYSSM_SS2D_STATES": "0"}, "vmamba"),
]


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _runners(model: torch.nn.Module, device: torch.device):
    """(inference fn, training-step fn) of a model."""
    def infer(x):
        with _autocast(device):
            return model(x)

    def train_step(x):
        model.zero_grad(set_to_none=True)
        with _autocast(device):
            loss = model(x).float().mean()
        loss.backward()
        return loss

    return infer, train_step


def visual_tokens(name: str, res: int) -> int:
    """Tokens the encoder hands the VLM at ``res`` px: ViT patches, VMamba's stage-3 map."""
    if name in TIMM_ROPE:
        return (res // TIMM_ROPE[name]) ** 2
    if name.startswith("vit_"):
        patch = int(name.rsplit("patch", 1)[1])
        return (res // patch) ** 2
    return (res // 16) ** 2


def official_vmamba(name: str, res: int):
    """An official VMamba model for ``name`` (random weights), or the reason there is none."""
    folder = os.environ.get("PYSSM_OFFICIAL_VMAMBA")
    if folder and folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        module = importlib.import_module("vmamba")
        build = getattr(module, name)
    except ImportError:
        return None, "not installed (official VMamba's vmamba.py is not importable)"
    except AttributeError:
        return None, f"not in official vmamba.py: {name}"
    try:
        return build(), "ok"
    except Exception as exc:  # the official code needs its CUDA kernels, for example
        return None, f"error: {type(exc).__name__}: {str(exc)[:120]}"


def providers_for(name: str, res: int, device: torch.device,
                  comparisons: bool = True) -> dict[str, list[harness.Provider]]:
    """mode -> providers for one encoder at one resolution (models built once, shared);
    ``comparisons``: on a GPU, the pyssm model again with each of COMPARISONS' fused paths
    switched off, in its modes, for the families it applies to."""
    family = name.split("_")[0]
    kernel = device.type
    built = device.type == "cpu" or _extension.has_kernel(KERNEL[family], kernel)
    pyssm_model = create_encoder(name, img_size=res, backend=kernel if built else None)
    pyssm_model = pyssm_model.to(device)
    infer, step = _runners(pyssm_model.eval(), device)
    status = "ok" if built else f"not built ({KERNEL[family]} has no {kernel} kernel yet)"
    out = {"forward": [harness.Provider("pyssm", infer if built else None, status)],
           "step": [harness.Provider("pyssm", step if built else None, status)]}
    if device.type == "cuda" and comparisons:
        runners = {"forward": infer, "step": step}
        for label, modes, env, only in COMPARISONS:
            for mode in modes if only in (None, family) else ():
                out[mode].append(harness.Provider(label, runners[mode] if built else None,
                                                  status, env=env))
    if family == "vit":
        try:
            import timm
        except ImportError:
            timm = None
        if timm is None:
            other, why = None, "not installed"
        else:
            other = timm.create_model(f"{name}_224", pretrained=False, img_size=res)
            other.load_state_dict(pyssm_model.state_dict())  # the same weights
            why = "ok"
        label = "timm"
    else:
        other, why = official_vmamba(name, res)
        label = "official"
    if other is None:
        for mode in out:
            out[mode].append(harness.Provider(label, None, why))
    else:
        o_infer, o_step = _runners(other.to(device).eval(), device)
        out["forward"].append(harness.Provider(label, o_infer))
        out["step"].append(harness.Provider(label, o_step))
    if family == "vit" and other is not None and comparisons:
        # timm's model again, its blocks swapped for pyssm's (pyssm.integrations.timm)
        from pyssm.integrations.timm import swap_blocks

        swapped = copy.deepcopy(other)   # (the same weights, not built and loaded again)
        swap_blocks(swapped, backend=kernel if built else None)
        s_infer, s_step = _runners(swapped.to(device).eval(), device)
        out["forward"].append(harness.Provider("timm-pyssm-blocks", s_infer if built else None,
                                               status))
        out["step"].append(harness.Provider("timm-pyssm-blocks", s_step if built else None,
                                            status))
    return out


def timm_rope_providers(name: str, res: int,
                        device: torch.device) -> dict[str, list[harness.Provider]]:
    """mode -> providers for one of timm's rotary ViTs (TIMM_ROPE): timm's model, and the same
    model (the same weights) with its attention swapped for pyssm's."""
    labels = ("timm", "timm-pyssm-attention")
    try:
        import timm
    except ImportError:
        return {mode: [harness.Provider(label, None, "not installed") for label in labels]
                for mode in ("forward", "step")}
    from pyssm.integrations.timm import swap_attention

    kernel = device.type
    built = device.type == "cpu" or _extension.has_kernel("attention", kernel)
    status = "ok" if built else f"not built (attention has no {kernel} kernel yet)"
    model = timm.create_model(name, pretrained=False, img_size=res)
    swapped = copy.deepcopy(model)
    swap_attention(swapped, backend=kernel if built else None)
    runners = [_runners(model.to(device).eval(), device),
               _runners(swapped.to(device).eval(), device)]
    return {mode: [harness.Provider(labels[0], runners[0][i]),
                   harness.Provider(labels[1], runners[1][i] if built else None, status)]
            for i, mode in enumerate(("forward", "step"))}


def cases(device: torch.device, quick: bool = False,
          names: list[str] | None = None) -> list[harness.Case]:
    gpu = device.type == "cuda"
    if gpu:
        default = ["vmamba_tiny_s1l8", "vit_small_patch16", "vit_base_patch16"] if quick else [
            "vmamba_tiny_s1l8", "vmamba_small_s2l15", "vmamba_base_s2l15",
            "vit_small_patch16", "vit_base_patch16", "vit_large_patch16"]
        resolutions = [224, 512] if quick else [224, 384, 512, 768, 1024]
        train_at = {224, 512}
        batch = {"forward": lambda r: round(128 * (224 / r) ** 2),
                 "step": lambda r: round(64 * (224 / r) ** 2)}
    else:
        default = ["vmamba_tiny_s1l8", "vit_small_patch16"]
        resolutions, train_at = ([64, 96] if quick else [64, 96, 128, 160, 224]), {64}
        batch = {"forward": lambda r: 2, "step": lambda r: 2}
    if names is None:
        default += list(TIMM_ROPE)
    out = []
    for name in names or default:
        # (timm's rotary ViTs: base-sized, two copies a resolution, all built before the run:
        # on the CPU the first resolution only, which keeps the main job's memory down)
        for res in resolutions[:1] if name in TIMM_ROPE and not gpu else resolutions:
            if name in TIMM_ROPE:
                providers = timm_rope_providers(name, res, device)
            else:   # (--quick: the comparison rows at the first resolution only)
                providers = providers_for(name, res, device, not quick or res == resolutions[0])
            for mode in ("forward", "step"):
                if mode == "step" and res not in train_at:
                    continue
                b = batch[mode](res)
                anchors = (ANCHOR_INFER if mode == "forward" else ANCHOR_TRAIN).get(name, {})
                anchor_img_s = anchors.get(res) if gpu else None
                out.append(harness.Case(
                    op=name, size={"res": res, "batch": b},
                    make_inputs=lambda b=b, r=res: (torch.randn(b, 3, r, r, device=device),),
                    providers=providers[mode], modes=(mode,),
                    dtype="bf16-autocast" if gpu else "float32",
                    extra=(lambda p, m, a=anchor_img_s, b=b, t=visual_tokens(name, res):
                           {"tokens": t, **({"anchor_ms": b / a * 1e3}
                                            if a and p == "pyssm" else {})})))
    return out


def add_rates(rows: list[dict]) -> None:
    for row in rows:
        if row.get("ms"):
            row["img_s"] = row["batch"] / row["ms"] * 1e3
        if row.get("peak_mb") is not None:
            row["mb_per_img"] = row["peak_mb"] / row["batch"]
