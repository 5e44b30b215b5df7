"""End-to-end recipes behind ``pyssm vlm train`` / ``pyssm vlm eval``: a VLM on pyssm's
synthetic spatial scenes (pyssm.data), with a tiny LM built from code or a local HF model."""

from __future__ import annotations

import math
import os
import re

import torch

from pyssm.vlm.model import VisionLanguageModel, VLMConfig, _tokens
from pyssm.vlm.preprocess import prepare_images
from pyssm.vlm.tiny_lm import build_tiny_lm, build_word_tokenizer
from pyssm.vlm.train import Trainer, TrainConfig, answer_batch, init_distributed

QUESTIONS_PER_SCENE = 4


class Preprocessed:
    """A (image, prompt, answer) dataset with images letterboxed / resized and normalised as
    ``VisionLanguageModel.generate``'s callers do (pyssm.vlm.preprocess)."""

    def __init__(self, dataset, size: int, letterbox: bool):
        self.dataset, self.size, self.letterbox = dataset, size, letterbox

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        image, prompt, answer = self.dataset[i]
        return prepare_images([image], self.size, letterbox=self.letterbox)[0], prompt, answer


def load_lm(lm: str, image_style: str):
    """("tiny" | a local HF folder) -> (causal LM, tokenizer) ready for the VLM."""
    if lm == "tiny":
        from pyssm.data import vocabulary
        tokenizer = build_word_tokenizer(vocabulary())
        return build_tiny_lm(tokenizer, hidden_size=128, num_layers=2), tokenizer
    if not os.path.isdir(lm):
        raise FileNotFoundError(f"--lm must be 'tiny' or a local Hugging Face model folder; "
                                f"{lm!r} is not a folder (nothing is downloaded)")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(lm)
    model = AutoModelForCausalLM.from_pretrained(lm)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if image_style == "llava" and "<image>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
        model.resize_token_embeddings(len(tokenizer))
    return model, tokenizer


def train_vlm(*, encoder: str, connector: str, lm: str, stage: str, steps: int,
              batch_size: int, lr: float, img_size: int, letterbox: bool, image_style: str,
              out_dir: str, seed: int = 0, train_size: int = 2000, encoder_checkpoint=None,
              bf16: bool = False, parallel: str = "ddp") -> dict:
    from pyssm.data import SceneDataset

    several = init_distributed()      # under torchrun
    torch.manual_seed(seed)
    model, tokenizer = load_lm(lm, image_style)
    config = VLMConfig(encoder=encoder, image_size=img_size, letterbox=letterbox,
                       connector=connector, image_style=image_style)
    vlm = VisionLanguageModel.from_config(config, model, tokenizer, checkpoint=encoder_checkpoint)
    if torch.cuda.is_available():
        # FSDP moves each rank's shard of the LM to its GPU itself: the whole LM need not fit
        (vlm.encoder if several and parallel == "fsdp" else vlm).cuda()
    scenes = math.ceil(train_size / QUESTIONS_PER_SCENE)
    data = Preprocessed(SceneDataset("train", num_scenes=scenes, size=img_size, base_seed=seed,
                                     questions_per_scene=QUESTIONS_PER_SCENE), img_size, letterbox)
    trainer = Trainer(vlm, data, TrainConfig(stage=stage, steps=steps, batch_size=batch_size,
                                             lr=lr, seed=seed, out_dir=out_dir, bf16=bf16,
                                             parallel=parallel))
    losses = trainer.fit()
    model_dir = os.path.join(out_dir, "model")
    trainer.save_model(model_dir)
    return {"steps": trainer.step, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "model": model_dir}


def detokenize(text: str) -> str:
    """Undoes a word-level tokenizer's spacing inside numbers: "0 . 25" -> "0.25"."""
    return re.sub(r"(\d)\s*\.\s*(\d)", r"\1.\2", text)


@torch.no_grad()
def evaluate(vlm: VisionLanguageModel, split: str = "val", size: int = 200, seed: int = 0,
             batch_size: int = 32, max_new_tokens: int = 24, scene_kwargs: dict | None = None,
             shuffle_images: bool = False, answer_nll: bool = True) -> dict:
    """VQA exact match per type, grounding Acc@0.5 and the overall score of ``vlm`` on ``size``
    examples of ``split`` (pyssm.data.score), greedy decoding. ``scene_kwargs`` go to
    SceneDataset (e.g. n_objects). With ``shuffle_images`` every question is asked about the
    next scene's image: a control for how much of the score the image explains (a model that
    does not read the image scores the same).

    Besides the scores (unless ``answer_nll`` is False), ``answer_nll``: the mean over
    examples of the reference answer's negative log-likelihood per token (its tokens and EOS,
    teacher-forced), a finer measure than exact match of how much the image tells the model:
    with shuffled images it rises as far as the model reads the image, long before greedy
    answers change."""
    from pyssm.data import SceneDataset, render, score

    vlm.eval()
    device = next(vlm.connector.parameters()).device
    cfg = vlm.config
    scenes = math.ceil(size / QUESTIONS_PER_SCENE)
    if shuffle_images and scenes < 2:
        raise ValueError("shuffle_images needs examples from at least two scenes")
    data = SceneDataset(split, num_scenes=scenes, size=cfg.image_size, base_seed=seed,
                        questions_per_scene=QUESTIONS_PER_SCENE, **(scene_kwargs or {}))
    examples = [data.example(i) for i in range(size)]
    # the image of example i (+ one scene, wrapping around, when shuffled)
    shift = QUESTIONS_PER_SCENE if shuffle_images else 0
    image_of = [(i + shift) % (scenes * QUESTIONS_PER_SCENE) for i in range(size)]
    rendered = {}           # scene -> image: its questions share it, rendered once

    def image(i):
        j = image_of[i] // QUESTIONS_PER_SCENE
        if j not in rendered:
            rendered[j] = render(data.scene(j), cfg.image_size)
        return rendered[j]

    predictions, nll_sum = [], 0.0
    for start in range(0, size, batch_size):
        chunk = range(start, min(size, start + batch_size))
        images = prepare_images([image(i) for i in chunk], cfg.image_size,
                                letterbox=cfg.letterbox).to(device)
        if answer_nll:      # the encoder once for both uses (the VLM takes its tokens)
            images = _tokens(vlm.encoder, images, cfg.tap)
        prompts = [examples[i].prompt for i in chunk]
        answers = vlm.generate(images, prompts, max_new_tokens=max_new_tokens)
        predictions += [detokenize(a) for a in answers]
        if answer_nll:
            texts = answer_batch(vlm, prompts, [examples[i].answer for i in chunk], device)
            nll_sum += float(vlm(images, *texts, loss_reduction="sequence_sum").loss)
    result = score(predictions, examples)
    result["split"], result["examples"] = split, size
    if answer_nll:
        result["answer_nll"] = nll_sum / size
    return result


def evaluate_vlm(model_dir: str, split: str = "val", size: int = 200, seed: int = 0,
                 batch_size: int = 32, max_new_tokens: int = 24) -> dict:
    """``evaluate`` on a model saved by ``pyssm vlm train`` / ``save_pretrained``."""
    vlm = VisionLanguageModel.from_pretrained(model_dir)
    if torch.cuda.is_available():
        vlm = vlm.cuda()
    return evaluate(vlm, split, size, seed, batch_size, max_new_tokens)
