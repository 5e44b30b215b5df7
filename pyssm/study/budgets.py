"""Study budgets: the same images, steps, optimizer and schedule for every encoder.

tiny is a smoke run at toy scale for two CPU cores (reduced-depth encoders, 32 px, a tiny
LM, scenes of one or two objects); small is a laptop-scale run; medium uses the full encoders
at 128 px and is sized for one GPU (the wall times of small and medium have not been
measured yet).

The recipe is the same in every budget: the VLM's loss weighs every example equally (a box
answer is 17 tokens, "yes" 2; with the mean over tokens the boxes drown the questions) and
the image goes after the question, right before the answer. Both come from the tiny budget:
with the image right after BOS (even on one-object scenes, or for 1500 steps) or with the
token-mean loss, the from-scratch LM gave exactly the same answers with the images shuffled;
with both changes it read colours from the image.

At the tiny budget's scale (VMamba-T dense, 1-2 objects, no grounding, one seed; a diagnostic
run on two CPU cores, 2026-11-28) the VLM learned to read the image only with enough steps:
after 800 steps x 16 its VQA answers were the same with the images shuffled (colour 0.26 /
0.26), after 3000 steps it read colours (0.42 against 0.16 shuffled, 200 test questions); on
colour questions alone 800 steps sufficed (0.72 against 0.12). So the tiny budget's 800 steps
(what fits its ten minutes) show the pipeline working, not the encoders' difference: the
budgets that compare encoders need a few thousand VLM steps at least.
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
    pretrain_warmup: float = 0.1  # fraction of pretrain_steps with a linear warmup
    vlm_lr: float = 1e-3
    connector: str = "mlp2x_gelu"
    n_objects: tuple[int, int] = (2, 6)   # objects per scene of the VLM's data
    grounding_fraction: float = 0.5       # of the VLM's training examples (evaluation: 0.5)
    loss_weighting: str = "example"       # pyssm.vlm.train.TrainConfig.loss_weighting
    image_style: str = "llava"
    prompt_template: str | None = "{prompt} {image}"   # pyssm.vlm.VLMConfig
    # the connector standardises the frozen tokens per channel (pyssm.vlm.connector), with
    # statistics of the training scenes: one VLM on VMamba-T dense tokens (tiny budget, one
    # seed, 2026-11-29) read the image three times as much by its held-out answer NLL (rise
    # with shuffled images 0.074 against 0.027), and one on ViT-S tokens, whose offset is a
    # larger share of their norm, went from no rise at all to 0.004
    standardize_tokens: bool = True
    encoder_overrides: dict = field(default_factory=dict)   # family -> create_encoder kwargs


BUDGETS = {
    # ~55 s a run on two CPU cores (12 runs by default); 800 VLM steps cost what 400 did
    # before the frozen encoder's tokens were computed once per scene (pyssm.study.run). With fewer than ~200 pretraining
    # steps of 32 images the tokens tell an object's colour no better than a random encoder's;
    # 48 eval examples left most question types with 1-7 examples a seed
    "tiny": Budget(img_size=32, pretrain_steps=200, pretrain_batch=32, vlm_steps=800,
                   vlm_batch=16, train_scenes=2000, eval_examples=300, lm_hidden=64,
                   lm_layers=2, vlm_lr=3e-3, n_objects=(1, 2),
                   encoder_overrides={"vmamba": {"depths": (1, 1, 2, 1), "dims": 32},
                                      "vit": {"depth": 2}}),
    # one run (VMamba-T, dense) took 10.4 min on two CPU cores, 7 of them pretraining
    "small": Budget(img_size=64, pretrain_steps=300, pretrain_batch=32, vlm_steps=600,
                    vlm_batch=32, train_scenes=5000, eval_examples=400, lm_hidden=128,
                    lm_layers=2, encoder_overrides={"vmamba": {"depths": (2, 2, 4, 2)},
                                                    "vit": {"depth": 6}}),
    "medium": Budget(img_size=128, pretrain_steps=1500, pretrain_batch=64, vlm_steps=2000,
                     vlm_batch=64, train_scenes=50000, eval_examples=1000, lm_hidden=256,
                     lm_layers=4),
}
