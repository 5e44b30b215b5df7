"""A seed's training scenes, made once and shared by every run of the seed.

Every (encoder, objective) run of a seed reads the same scenes: pretraining their images and
scene graphs, the VLM their images (once, for the frozen encoder's tokens) and their
questions. Making them is pure Python and numpy, one core's work: at 128 px about 550 scenes
a second on this project's CPU machine, so the medium budget's 50,000 scenes, rendered again
by every run and by pretraining at every step, would cost minutes a run. ``SeedScenes`` makes
them once, in worker processes (one per core, up to ``MAX_WORKERS``), and keeps them: the
scene graphs, the questions when asked for, and the images as float32 when they fit in
``max_bytes`` (a quarter of the machine's memory by default); otherwise images are rendered
when read. Either way an image is exactly ``render(scene)``.
"""

from __future__ import annotations

import os

import torch

from pyssm.data import SceneDataset, render_batch

MAX_WORKERS = 8
CHUNK = 256          # scenes a worker makes at a time


def default_max_bytes() -> int:
    """A quarter of the machine's physical memory."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 2**30


class _Chunks(torch.utils.data.Dataset):
    """Chunk c: scenes c * CHUNK ...: (images or None, scenes, [(prompt, answer)] or None)."""

    def __init__(self, data: SceneDataset, images: bool, texts: bool):
        self.data, self.images, self.texts = data, images, texts

    def __len__(self) -> int:
        return -(-self.data.num_scenes // CHUNK)

    def __getitem__(self, c: int):
        js = range(c * CHUNK, min(self.data.num_scenes, (c + 1) * CHUNK))
        scenes = [self.data.scene(j) for j in js]
        images = render_batch(scenes, self.data.size) if self.images else None
        texts = None
        if self.texts:
            q = self.data.questions_per_scene
            texts = [(ex.prompt, ex.answer) for j in js
                     for ex in (self.data.example(j * q + k) for k in range(q))]
        return images, scenes, texts


def _as_is(chunk):
    return chunk


class SeedScenes:
    """Scenes 0 .. data.num_scenes - 1 of ``data`` (a SceneDataset), made once: ``scenes``
    (the scene graphs), ``texts`` ((prompt, answer) of item i = scene i // q's question
    i % q, what ``data.example(i)`` gives; None unless ``texts``) and ``images`` (float32
    (N, 3, S, S), None when they do not fit in ``max_bytes``). ``workers``: processes that
    make them (default: one per core, up to MAX_WORKERS; 0 or 1: this process)."""

    def __init__(self, data: SceneDataset, texts: bool = False, workers: int | None = None,
                 max_bytes: int | None = None):
        self.data = data
        n, size = data.num_scenes, data.size
        limit = default_max_bytes() if max_bytes is None else max_bytes
        keep = n * 3 * size * size * 4 <= limit
        chunks = _Chunks(data, keep, texts)
        if workers is None:
            workers = min(MAX_WORKERS, os.cpu_count() or 1)
        workers = min(workers, len(chunks))
        if workers > 1:
            # collate_fn: the chunks as they are (the default turns tuples into lists)
            parts = iter(torch.utils.data.DataLoader(chunks, batch_size=None,
                                                     num_workers=workers, collate_fn=_as_is))
        else:
            parts = (chunks[c] for c in range(len(chunks)))
        self.scenes, self.texts = [], [] if texts else None
        self.images = torch.empty(n, 3, size, size) if keep else None
        for images, scenes, part_texts in parts:        # in order, whatever worker made them
            if keep:
                self.images[len(self.scenes):len(self.scenes) + len(scenes)] = images
            self.scenes += scenes
            if texts:
                self.texts += part_texts

    def __len__(self) -> int:
        return len(self.scenes)

    def batch(self, start: int, count: int) -> tuple[torch.Tensor, list]:
        """(images (count, 3, S, S) in [0, 1], scenes) of scenes start .. start + count - 1."""
        if start < 0 or start + count > len(self.scenes):
            raise IndexError(f"scenes {start} .. {start + count - 1} out of range "
                             f"[0, {len(self.scenes)})")
        scenes = self.scenes[start:start + count]
        if self.images is None:
            return render_batch(scenes, self.data.size), scenes
        return self.images[start:start + count], scenes
