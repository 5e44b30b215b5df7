"""VMamba configurations, as the official MzeroMiko/VMamba ``classification/models/vmamba.py``
defines them (dims, depths, d_state, ssm_ratio, dt_rank "auto", stem / downsample versions,
LayerNorm placement, forward type).

v2 models (forward type "v05_noz"): d_state 1, no z gate, a depthwise 3x3 conv without bias,
an MLP branch (ratio 4), the two-conv stem ("v2") and 3x3 stride-2 conv downsampling ("v3");
channel-first LayerNorm2d ("ln2d") by default, or channel-last "ln" (the same weights).
Vanilla models (forward type "v0"): d_state 16, ssm_ratio 2, a SiLU z gate, conv bias, no
MLP branch, the patchify stem ("v1") and patch merging ("v1"), channel-last LayerNorm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class VMambaConfig:
    depths: tuple[int, ...] = (2, 2, 8, 2)
    dims: tuple[int, ...] = (96, 192, 384, 768)
    d_state: int = 1
    ssm_ratio: float = 1.0
    dt_rank: int | str = "auto"     # "auto": ceil(d_model / 16) per block
    ssm_conv: int = 3
    ssm_conv_bias: bool = False
    forward_type: str = "v05_noz"   # "v05_noz" (v2 models) or "v0" (vanilla)
    mlp_ratio: float = 4.0
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    patchembed_version: str = "v2"  # "v1": conv k=s=patch; "v2": two 3x3 stride-2 convs
    downsample_version: str = "v3"  # "v1": patch merging; "v3": 3x3 stride-2 conv
    norm: str = "ln2d"              # "ln2d": channel-first; "ln": channel-last
    norm_eps: float = 1e-5
    drop_path_rate: float = 0.0     # stochastic depth, training only

    @property
    def channel_first(self) -> bool:
        return self.norm == "ln2d"

    @property
    def with_z(self) -> bool:
        return not self.forward_type.endswith("_noz")

    def d_inner(self, stage: int) -> int:
        return int(self.ssm_ratio * self.dims[stage])

    def rank(self, stage: int) -> int:
        return math.ceil(self.dims[stage] / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    def with_overrides(self, **kw) -> VMambaConfig:
        if "dims" in kw and isinstance(kw["dims"], int):
            kw["dims"] = tuple(kw["dims"] * 2 ** i for i in range(len(kw.get("depths",
                                                                             self.depths))))
        if "depths" in kw and "dims" not in kw and len(kw["depths"]) != len(self.dims):
            kw["dims"] = tuple(self.dims[0] * 2 ** i for i in range(len(kw["depths"])))
        return replace(self, **{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})


def _dims(base: int) -> tuple[int, ...]:
    return tuple(base * 2 ** i for i in range(4))


V2 = VMambaConfig()
VANILLA = VMambaConfig(d_state=16, ssm_ratio=2.0, ssm_conv_bias=True, forward_type="v0",
                       mlp_ratio=0.0, patchembed_version="v1", downsample_version="v1",
                       norm="ln")

CONFIGS: dict[str, VMambaConfig] = {
    "vmamba_tiny_s1l8": replace(V2, depths=(2, 2, 8, 2), dims=_dims(96), ssm_ratio=1.0,
                                drop_path_rate=0.2),
    "vmamba_small_s1l20": replace(V2, depths=(2, 2, 20, 2), dims=_dims(96), ssm_ratio=1.0,
                                  drop_path_rate=0.3),
    "vmamba_base_s1l20": replace(V2, depths=(2, 2, 20, 2), dims=_dims(128), ssm_ratio=1.0,
                                 drop_path_rate=0.5),
    "vmamba_tiny_s2l5": replace(V2, depths=(2, 2, 5, 2), dims=_dims(96), ssm_ratio=2.0,
                                drop_path_rate=0.2),
    "vmamba_small_s2l15": replace(V2, depths=(2, 2, 15, 2), dims=_dims(96), ssm_ratio=2.0,
                                  drop_path_rate=0.3),
    "vmamba_base_s2l15": replace(V2, depths=(2, 2, 15, 2), dims=_dims(128), ssm_ratio=2.0,
                                 drop_path_rate=0.6),
    "vmamba_tiny_vanilla": replace(VANILLA, depths=(2, 2, 9, 2), dims=_dims(96),
                                   drop_path_rate=0.2),
    "vmamba_small_vanilla": replace(VANILLA, depths=(2, 2, 27, 2), dims=_dims(96),
                                    drop_path_rate=0.3),
    "vmamba_base_vanilla": replace(VANILLA, depths=(2, 2, 27, 2), dims=_dims(128),
                                   drop_path_rate=0.6),
}
