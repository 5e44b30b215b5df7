"""Study budgets: the same images, steps, optimizer and schedule for every encoder.

tiny is a smoke run at toy scale for two CPU cores (reduced-depth encoders, 32 px, a tiny
LM); small is a laptop-scale run; medium uses the full encoders at 128 px and is sized for
one GPU (its wall time has not been measured yet).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Budget:
    img_size: int
    pretrain_steps: int
    pretrain_batch: int
    vlm_steps: int
    vlm_batch: int
    train_scenes: int
    eval_examples: int            # per split
    lm_hidden: int
    lm_layers: int
    pretrain_lr: float = 1e-3
    vlm_lr: float = 1e-3
    connector: str = "mlp2x_gelu"
    encoder_overrides: dict = field(default_factory=dict)   # family -> create_encoder kwargs


BUDGETS = {
    "tiny": Budget(img_size=32, pretrain_steps=30, pretrain_batch=16, vlm_steps=60,
                   vlm_batch=16, train_scenes=400, eval_examples=48, lm_hidden=64,
                   lm_layers=2, encoder_overrides={"vmamba": {"depths": (1, 1, 2, 1), "dims": 32},
                                                   "vit": {"depth": 2}}),
    "small": Budget(img_size=64, pretrain_steps=300, pretrain_batch=32, vlm_steps=600,
                    vlm_batch=32, train_scenes=5000, eval_examples=400, lm_hidden=128,
                    lm_layers=2, encoder_overrides={"vmamba": {"depths": (2, 2, 4, 2)},
                                                    "vit": {"depth": 6}}),
    "medium": Budget(img_size=128, pretrain_steps=1500, pretrain_batch=64, vlm_steps=2000,
                     vlm_batch=64, train_scenes=50000, eval_examples=1000, lm_hidden=256,
                     lm_layers=4),
}
