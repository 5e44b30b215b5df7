"""Caching a frozen encoder's visual tokens to disk, for repeated VLM runs on the same data.

    cached = cache_tokens(vlm, dataset, "runs/tokens.safetensors")   # computes once, then reuses
    Trainer(vlm, cached, config).fit()       # items are (tokens (T, C), prompt, answer)

The file holds the tokens of every item in order (float16 unless ``dtype`` says otherwise) and
a fingerprint of what they depend on: the encoder's weights, its tap, the stored dtype, the
dataset's length and the images of its first, middle and last items (so another seed, split or
resolution of the same length is seen). A file whose fingerprint differs is recomputed, never
reused; a change to the other images alone is not seen, as the fingerprint samples three.
"""

from __future__ import annotations

import os

import torch

from pyssm.vlm.model import VisionLanguageModel, _tokens, encoder_fingerprint


def _fingerprint(vlm: VisionLanguageModel, dataset, dtype: torch.dtype) -> torch.Tensor:
    """float64 checksums: the encoder's weights, the tap, the dtype, the length, and for the
    first, middle and last images their shape, sum and absolute sum."""
    n = len(dataset)
    values = [encoder_fingerprint(vlm), float(n), float(_text_sum(repr(vlm.config.tap))),
              float(_text_sum(str(dtype)))]
    for i in sorted({0, n // 2, n - 1} if n else set()):
        image = torch.as_tensor(dataset[i][0]).double()
        values += [float(image.numel()), *map(float, image.shape[-2:]), float(image.sum()),
                   float(image.abs().sum())]
    return torch.tensor(values, dtype=torch.float64)


def _text_sum(text: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(text))


class TokenDataset:
    """(tokens, prompt, answer) items: the cached tokens beside the base dataset's text."""

    def __init__(self, base, tokens: torch.Tensor):
        if tokens.shape[0] != len(base):
            raise ValueError(f"{tokens.shape[0]} cached token sets for {len(base)} items")
        self.base, self.tokens = base, tokens

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        _, prompt, answer = self.base[i]
        return self.tokens[i], prompt, answer


@torch.no_grad()
def cache_tokens(vlm: VisionLanguageModel, dataset, path: str | os.PathLike,
                 batch_size: int = 32, dtype: torch.dtype = torch.float16) -> TokenDataset:
    """The encoder tokens of every item of ``dataset`` ((image, prompt, answer) items), read
    from ``path`` when it was written for this encoder and dataset length, else computed and
    written atomically."""
    from safetensors.torch import load_file, save_file

    path = os.fspath(path)
    fingerprint = _fingerprint(vlm, dataset, dtype)
    if os.path.exists(path):
        stored = load_file(path)
        seen = stored["fingerprint"]
        if seen.shape == fingerprint.shape and torch.allclose(seen, fingerprint, rtol=1e-9,
                                                               atol=0):
            return TokenDataset(dataset, stored["tokens"])
    device = next(vlm.encoder.parameters()).device
    chunks = []
    for start in range(0, len(dataset), batch_size):
        images = torch.stack([dataset[i][0] for i in range(start, min(len(dataset),
                                                                       start + batch_size))])
        chunks.append(_tokens(vlm.encoder.eval(), images.to(device), vlm.config.tap)
                      .to("cpu", dtype))
    tokens = torch.cat(chunks)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({"tokens": tokens.contiguous(), "fingerprint": fingerprint}, tmp)
    os.replace(tmp, path)
    return TokenDataset(dataset, tokens)
