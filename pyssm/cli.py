"""The ``pyssm`` command line.

    pyssm encoders                                 list the registered encoders
    pyssm vlm train --encoder vmamba_tiny_s1l8 --lm tiny --out runs/vlm
    pyssm vlm eval --model runs/vlm --split test
    pyssm vlm generate --model runs/vlm --image scene.png --prompt "what color is the circle ?"
    pyssm study run --encoders vmamba_tiny_s1l8,vit_small_patch16 --seeds 3 --budget tiny
    pyssm bench all                                the main job: kernels, encoders, VLM, report
    pyssm bench compare A.json B.json              the ratio of two benchmark runs
    pyssm profile encoder vmamba_tiny_s1l8 --img-size 224 --batch 8

``--help`` on each command explains its options.
"""

from __future__ import annotations

import argparse
import json
import sys


def _load_image(path: str):
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (3, H, W) uint8


def cmd_encoders(args) -> int:
    from pyssm.models import list_encoders

    print("\n".join(list_encoders(args.filter)))
    return 0


def cmd_generate(args) -> int:
    from pyssm.vlm import VisionLanguageModel, prepare_images

    vlm = VisionLanguageModel.from_pretrained(args.model).eval()
    images = prepare_images([_load_image(p) for p in args.image], vlm.config.image_size,
                            letterbox=vlm.config.letterbox)
    prompts = args.prompt * len(args.image) if len(args.prompt) == 1 else args.prompt
    if len(prompts) != len(args.image):
        print(f"error: {len(args.image)} images but {len(args.prompt)} prompts", file=sys.stderr)
        return 2
    for answer in vlm.generate(images, prompts, max_new_tokens=args.max_new_tokens,
                               do_sample=args.temperature > 0,
                               **({"temperature": args.temperature} if args.temperature > 0
                                  else {})):
        print(answer)
    return 0


def cmd_train(args) -> int:
    from pyssm.vlm.recipes import train_vlm

    result = train_vlm(encoder=args.encoder, connector=args.connector, lm=args.lm,
                       stage=args.stage, steps=args.steps, batch_size=args.batch_size,
                       lr=args.lr, img_size=args.img_size, letterbox=not args.no_letterbox,
                       image_style=args.image_style, out_dir=args.out, seed=args.seed,
                       train_size=args.train_size, encoder_checkpoint=args.checkpoint,
                       bf16=args.bf16, parallel=args.parallel)
    print(json.dumps(result, indent=1))
    return 0


def cmd_eval(args) -> int:
    from pyssm.vlm.recipes import evaluate_vlm

    print(json.dumps(evaluate_vlm(args.model, split=args.split, size=args.size, seed=args.seed,
                                  batch_size=args.batch_size), indent=1))
    return 0


def cmd_study(args) -> int:
    from pyssm.study import run_study

    result = run_study([e.strip() for e in args.encoders.split(",") if e.strip()],
                       seeds=args.seeds, budget=args.budget,
                       objectives=tuple(args.objectives.split(",")), out_dir=args.out,
                       img_size=args.img_size, letterbox=not args.no_letterbox,
                       checkpoint=args.checkpoint, device=args.device)
    with open(f"{result['out_dir']}/table.md") as f:
        print(f.read())
    print(f"results, table and plots in {result['out_dir']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyssm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    enc = sub.add_parser("encoders", help="list the registered encoders")
    enc.add_argument("filter", nargs="?", default="", help="only names containing this")
    enc.set_defaults(fn=cmd_encoders)

    vlm = sub.add_parser("vlm", help="train, evaluate or query a vision-language model")
    vsub = vlm.add_subparsers(dest="vlm_command", required=True)

    train = vsub.add_parser("train", help="train a VLM on the synthetic spatial scenes",
                            description="Trains the connector (and the LM) of a VLM whose frozen "
                            "encoder is a pyssm encoder, on pyssm's procedurally generated "
                            "scenes, and saves it to --out (resumes if --out has a checkpoint).")
    train.add_argument("--encoder", default="vmamba_tiny_s1l8", help="a name from `pyssm encoders`")
    train.add_argument("--checkpoint", default=None,
                       help="encoder weights (.pth / .safetensors); default: random init")
    train.add_argument("--connector", default="mlp2x_gelu",
                       choices=("linear", "mlp2x_gelu", "fused-gelu-mlp"))
    train.add_argument("--lm", default="tiny",
                       help="'tiny' (a small Llama built from code) or a local HF model folder")
    train.add_argument("--stage", default="one-stage", choices=("align", "finetune", "one-stage"))
    train.add_argument("--image-style", default="prismatic", choices=("prismatic", "llava"))
    train.add_argument("--steps", type=int, default=200)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--img-size", type=int, default=64)
    train.add_argument("--no-letterbox", action="store_true", help="resize instead of letterbox")
    train.add_argument("--train-size", type=int, default=2000, help="training examples")
    train.add_argument("--bf16", action="store_true", help="bf16 autocast")
    train.add_argument("--parallel", default="ddp", choices=("ddp", "fsdp"),
                       help="under torchrun (several processes): ddp keeps a full model copy on "
                       "every rank; fsdp shards the connector and the LM over the ranks, for an "
                       "LM that does not fit one device (the frozen encoder is not sharded)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", required=True, help="run folder (checkpoint and saved model)")
    train.set_defaults(fn=cmd_train)

    ev = vsub.add_parser("eval", help="VQA exact match per type and grounding Acc@0.5")
    ev.add_argument("--model", required=True, help="a folder written by `pyssm vlm train`")
    ev.add_argument("--split", default="val", choices=("val", "test", "test_comp"))
    ev.add_argument("--size", type=int, default=200, help="examples to evaluate")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--seed", type=int, default=0)
    ev.set_defaults(fn=cmd_eval)

    gen = vsub.add_parser("generate", help="answer prompts about images")
    gen.add_argument("--model", required=True, help="a folder written by save_pretrained")
    gen.add_argument("--image", required=True, action="append", help="image file (repeatable)")
    gen.add_argument("--prompt", required=True, action="append",
                     help="prompt (one for all images, or one per --image)")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.set_defaults(fn=cmd_generate)

    study = sub.add_parser("study", help="the controlled encoder study")
    ssub = study.add_subparsers(dest="study_command", required=True)
    run = ssub.add_parser("run", help="pretrain, freeze, train the VLM, evaluate; per encoder",
                          description="For each encoder: pretrain it from scratch on the scene "
                          "generator (classification and dense objectives, the same budget for "
                          "every encoder) or load --checkpoint, freeze it, train the same VLM on "
                          "top and evaluate VQA per type and grounding Acc@0.5 on val, test and "
                          "the compositional split, over --seeds seeds.")
    run.add_argument("--encoders", default="vmamba_tiny_s1l8,vit_small_patch16",
                     help="comma-separated names from `pyssm encoders`")
    run.add_argument("--seeds", type=int, default=3)
    run.add_argument("--budget", default="tiny", choices=("tiny", "small", "medium"),
                     help="tiny: toy smoke run on CPU; small: laptop scale; medium: one GPU")
    run.add_argument("--objectives", default="classification,dense",
                     help="pretraining objectives (classification, dense)")
    run.add_argument("--checkpoint", default=None,
                     help="use these encoder weights instead of pretraining (one encoder)")
    run.add_argument("--img-size", type=int, default=None, help="override the budget's size")
    run.add_argument("--no-letterbox", action="store_true", help="resize instead of letterbox")
    run.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    run.add_argument("--out", default=None,
                     help="output folder (default profiles/study/<date>-<budget>)")
    run.set_defaults(fn=cmd_study)

    from pyssm.bench.cli import add_bench_parser, add_profile_parser
    add_bench_parser(sub)
    add_profile_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
