"""The PyTorch dataset of the study: ``dataset[i] -> (image, prompt, answer)`` as the VLM
trainer consumes it, with the metadata of each example from ``dataset.example(i)``.

Item i is question slot i % questions_per_scene of scene i // questions_per_scene. Each slot
is a VQA question or (with probability grounding_fraction) a referring expression, all a pure
function of (base_seed, split, scene index, slot). In test_comp, questions and expressions are
drawn (when the scene allows) about an object of a held-out colour-name pair.

    ds = SceneDataset("train", num_scenes=10_000, size=128)
    image, prompt, answer = ds[0]           # (3, 128, 128) float in [0, 1], str, str
    ex = ds.example(0)                      # Example: task, type, target_box, scene, ...
    images, examples = ds.batch(range(64))  # rendered straight into one (64, 3, S, S) tensor
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from pyssm.data.describe import EDGES, RELATIONS
from pyssm.data.grounding import GROUNDING_TYPES, refer
from pyssm.data.questions import QUESTION_TYPES, ask
from pyssm.data.render import render, render_batch
from pyssm.data.scenes import COLOURS, DIGITS, SHAPES, SIZES, Scene
from pyssm.data.splits import HELD_OUT, STREAM_ITEMS, forbidden_pairs, make_scene, rng_for

TASKS = ("vqa", "grounding")
_TRIES = 12


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    task: str                      # "vqa" | "grounding"
    type: str                      # a QUESTION_TYPES or GROUNDING_TYPES entry
    split: str
    scene_index: int
    slot: int
    target_box: tuple[float, float, float, float] | None   # grounding: the rounded box
    objects: tuple[int, ...]       # indices (into scene.objects) the example is about
    scene: Scene


class SceneDataset(Dataset):
    def __init__(self, split: str = "train", num_scenes: int = 1000, size: int = 128,
                 questions_per_scene: int = 4, grounding_fraction: float = 0.5,
                 base_seed: int = 0, n_objects: tuple[int, int] = (2, 6),
                 digit_fraction: float = 0.4, question_types=QUESTION_TYPES,
                 grounding_types=GROUNDING_TYPES):
        if not 0.0 <= grounding_fraction <= 1.0:
            raise ValueError(f"grounding_fraction must be in [0, 1], got {grounding_fraction}")
        forbidden_pairs(split)                              # validates the split name
        self.split, self.num_scenes, self.size = split, num_scenes, size
        self.questions_per_scene, self.grounding_fraction = questions_per_scene, grounding_fraction
        self.base_seed, self.n_objects, self.digit_fraction = base_seed, n_objects, digit_fraction
        self.question_types, self.grounding_types = tuple(question_types), tuple(grounding_types)
        self._items = functools.lru_cache(maxsize=256)(self._make_items)

    def __getstate__(self) -> dict:                     # for DataLoader workers under spawn
        state = self.__dict__.copy()
        del state["_items"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._items = functools.lru_cache(maxsize=256)(self._make_items)

    def __len__(self) -> int:
        return self.num_scenes * self.questions_per_scene

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, str]:
        ex = self.example(i)
        return render(ex.scene, self.size), ex.prompt, ex.answer

    def scene(self, j: int) -> Scene:
        if not 0 <= j < self.num_scenes:
            raise IndexError(f"scene {j} out of range [0, {self.num_scenes})")
        return make_scene(self.split, j, self.base_seed, self.n_objects, self.digit_fraction)

    def example(self, i: int) -> Example:
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} out of range [0, {len(self)})")
        j, slot = divmod(i % len(self), self.questions_per_scene)
        return self._items(j)[slot]

    def batch(self, indices: Iterable[int]) -> tuple[torch.Tensor, list[Example]]:
        """Examples and their images as one (B, 3, size, size) tensor."""
        examples = [self.example(i) for i in indices]
        return render_batch([e.scene for e in examples], self.size), examples

    def _draw(self, scene, j, slot, rng, grounding, forbidden, prefer) -> Example:
        if grounding:
            g = refer(scene, rng, self.grounding_types, forbidden,
                      targets=sorted(prefer) if prefer else None)
            if g is None:
                g = refer(scene, rng, self.grounding_types, forbidden)
            if g is not None:
                return Example(g.prompt, g.answer, "grounding", g.type, self.split, j, slot,
                               g.box, g.objects, scene)
            # no object can be singled out (every one has a twin): a question instead
        q = ask(scene, rng, self.question_types or ("exist",), forbidden)
        return Example(q.prompt, q.answer, "vqa", q.type, self.split, j, slot, None,
                       q.objects, scene)

    def _make_items(self, j: int) -> tuple[Example, ...]:
        scene = self.scene(j)
        forbidden = forbidden_pairs(self.split)
        held = [i for i, o in enumerate(scene.objects) if (o.colour, o.name) in HELD_OUT]
        prefer = set(held) if self.split == "test_comp" else None
        items, seen = [], set()
        for slot in range(self.questions_per_scene):
            rng = rng_for(self.split, j, self.base_seed, STREAM_ITEMS, slot)
            grounding = bool(self.grounding_types) and rng.random() < self.grounding_fraction
            ex = None
            for _ in range(_TRIES):         # avoid repeats, and in test_comp prefer held-out
                cand = self._draw(scene, j, slot, rng, grounding, forbidden, prefer)
                ex = ex or cand
                if cand.prompt not in seen and (not prefer or prefer & set(cand.objects)):
                    ex = cand
                    break
            seen.add(ex.prompt)
            items.append(ex)
        return tuple(items)


def scene_batch(split: str, start: int, count: int, size: int, base_seed: int = 0,
                **scene_kwargs) -> tuple[torch.Tensor, list[Scene]]:
    """Scenes start..start+count-1 of ``split`` and their images (count, 3, size, size)."""
    scenes = [make_scene(split, j, base_seed, **scene_kwargs) for j in range(start, start + count)]
    return render_batch(scenes, size), scenes


def vocabulary() -> list[str]:
    """Every word the prompts and answers can contain, as split by a whitespace-and-punctuation
    pre-tokenizer (``\\w+|[^\\w\\s]+``): for pyssm.vlm.tiny_lm.build_word_tokenizer."""
    words = ["Is", "How", "Are", "What", "Locate"]
    words += """is there a an how many are more fewer than what colour shape digit the object
    objects shapes digits of nearest to farthest from locate edge yes no left right above
    below top bottom""".split()
    words += list(COLOURS) + list(SIZES) + list(SHAPES) + list(DIGITS)
    words += [s + ("es" if s.endswith("s") else "s") for s in SHAPES] + [d + "s" for d in DIGITS]
    words += [w for r in RELATIONS for w in r.split()] + list(EDGES)
    words += ["?", ".", ",", "[", "]"] + [f"{v:02d}" for v in range(100)]
    return list(dict.fromkeys(words))
