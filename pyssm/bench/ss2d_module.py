"""ss2d_module: a VMamba block's SS2D module (in_proj, the depthwise convolution and SiLU, the
ss2d core, out_norm, out_proj: `pyssm.models.vmamba.SS2D`), the unit whose time the official
anchors give (ANCHORS.md "Official SS2D pieces") and the SS2D issue's module targets name;
forward, backward and both, the backward into the input and every parameter.

GPU (bf16 autocast, float32 parameters as a model holds them): stage 1 of VMamba-T s1l8
(d_model 96, d_inner 96, dt_rank 6) and S s2l15 (96, 192, 6); input (B, 96, R/4, R/4) in bf16,
stored channels-last, as a block hands its op the norm's output; batch 64 / 12 / 3 at 224 /
512 / 1024 px (--quick: 224). Rows: "pyssm" (the module as the encoders run it: the Triton
convolution + SiLU and norm, the fused ss2d core) and "pyssm-torch-glue" (PYSSM_TRITON=0:
torch's convolution, SiLU and LayerNorm around the same core), with the official module's
times beside.
CPU (float32, no autocast): VMamba-T's widths at 32 / 64 px, batch 2.
"""

from __future__ import annotations

import contextlib

import torch
from torch.func import functional_call

from pyssm.bench import harness
from pyssm.bench.results import ANCHOR_LABEL
from pyssm.models.vmamba import SS2D
from pyssm.models.vmamba_configs import CONFIGS

# ANCHORS.md: the official stage-1 SS2D module, bf16 autocast, H200: (forward, full) ms
ANCHOR_MS = {("T", 224): (2.418, 7.136), ("T", 512): (2.156, 6.468), ("T", 1024): (2.212, 6.765),
             ("S", 224): (4.368, 12.730), ("S", 512): (3.566, 13.427),
             ("S", 1024): (3.504, 12.544)}
MODELS = {"T": "vmamba_tiny_s1l8", "S": "vmamba_small_s2l15"}
NOTES = [
    "ss2d_module: a VMamba block's SS2D module (in_proj, depthwise conv + SiLU, ss2d, out_norm, "
    "out_proj), stage 1; backward and full take the gradients of the input and of every "
    "parameter; GB/s: x read and the output written once, bf16, over the median time.",
    f"anchor {ANCHOR_LABEL}: the official VMamba module of the same stage, bf16 autocast "
    "(ANCHORS.md); vs anchor = anchor ms / measured ms. The SS2D issue's targets at VMamba-T "
    "224 px x 64: forward <= 0.30 ms, forward + backward <= 1.0 ms.",
    "pyssm-torch-glue: the same module with PYSSM_TRITON=0 (torch's convolution, SiLU and "
    "LayerNorm around pyssm's ss2d core), in the same run.",
]


def stage1_module(model: str, device: torch.device) -> SS2D:
    """Stage 1's SS2D module of ``model`` ("T" or "S"), freshly initialised (seeded)."""
    cfg = CONFIGS[MODELS[model]]
    torch.manual_seed(0)
    return SS2D(cfg, cfg.dims[0], cfg.d_inner(0), cfg.rank(0)).to(device)


class ModuleCase:
    """A stage-1 module made on first use (so that the cases list without a GPU): ``fn(x,
    *params)`` runs it on x with ``params`` in place of its own, so that the harness's backward
    takes their gradients too, under bf16 autocast on a GPU; ``inputs(batch, grid, dtype)``
    gives x (batch, d_model, grid, grid), stored channels-last, and a copy of the parameters."""

    def __init__(self, model: str, device: torch.device):
        self.model, self.device = model, device
        self._module: SS2D | None = None
        self._names: list[str] = []

    @property
    def module(self) -> SS2D:
        if self._module is None:
            self._module = stage1_module(self.model, self.device)
            self._names = [name for name, _ in self._module.named_parameters()]
        return self._module

    def fn(self, x, *params):
        module = self.module  # (made, with its parameter names, once: not in the timed call)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                    else contextlib.nullcontext())
        with autocast:
            return functional_call(module, dict(zip(self._names, params)), (x,))

    def inputs(self, batch: int, grid: int, dtype: torch.dtype) -> tuple:
        d_model = CONFIGS[MODELS[self.model]].dims[0]
        x = torch.randn(batch, grid, grid, d_model, device=self.device, dtype=dtype)
        return (x.permute(0, 3, 1, 2), *(p.detach().clone() for p in self.module.parameters()))


def cases(device: torch.device, quick: bool = False) -> list[harness.Case]:
    gpu = device.type == "cuda"
    if gpu:
        models, dtype = ["T", "S"], torch.bfloat16
        sizes = [(224, 64), (512, 12), (1024, 3)][: 1 if quick else 3]
    else:
        models, dtype = ["T"], torch.float32
        sizes = [(32, 2), (64, 2)][: 1 if quick else 2]
    out = []
    for model in models:
        case = ModuleCase(model, device)
        ours = harness.Provider("pyssm", case.fn)
        torch_glue = harness.Provider("pyssm-torch-glue", case.fn, env={"PYSSM_TRITON": "0"})
        cfg = CONFIGS[MODELS[model]]
        d_model, d_inner = cfg.dims[0], cfg.d_inner(0)
        for res, batch in sizes:
            grid = res // 4
            forward_ms, full_ms = ANCHOR_MS.get((model, res), (None, None)) if gpu else (None,
                                                                                         None)
            anchors = {"forward": forward_ms, "full": full_ms}
            out.append(harness.Case(
                op="ss2d_module",
                size={"model": model, "res": res, "grid": f"{grid}x{grid}", "batch": batch,
                      "d_model": d_model, "d_inner": d_inner},
                make_inputs=lambda c=case, b=batch, g=grid: c.inputs(b, g, dtype),
                providers=[ours, torch_glue] if gpu else [ours],
                modes=("forward", "backward", "full"),
                dtype=str(dtype).removeprefix("torch."),
                bytes={"forward": 2 * batch * grid * grid * d_model * dtype.itemsize},
                extra=lambda provider, mode, a=anchors: {"anchor_ms": a.get(mode)}))
    return out
