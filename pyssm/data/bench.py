"""Generator throughput, in scenes per minute (a measurement, not a test):

    python -m pyssm.data.bench --sizes 64 128 --workers 1 2

"scenes": sampling the scene graph and rendering it; "items": the dataset's path, which also
generates questions_per_scene questions / expressions per scene. With --workers > 1 the work
runs in a torch DataLoader with that many worker processes, batches coming back through
shared memory; with batches of 64 scenes, the rate of the last scenes//64 of them."""

from __future__ import annotations

import argparse
import time

import torch

from pyssm.data.dataset import SceneDataset, scene_batch


class _Batches(torch.utils.data.Dataset):
    def __init__(self, mode, size, batch, n_batches, questions):
        self.mode, self.size, self.batch, self.n = mode, size, batch, n_batches
        self.ds = SceneDataset("train", num_scenes=batch * n_batches, size=size,
                               questions_per_scene=questions)

    def __len__(self):
        return self.n

    def __getitem__(self, b):
        if self.mode == "scenes":
            return scene_batch("train", b * self.batch, self.batch, self.size)[0]
        q = self.ds.questions_per_scene
        return self.ds.batch(range(b * self.batch * q, (b + 1) * self.batch * q, q))[0]


def measure(mode: str = "scenes", size: int = 128, workers: int = 1, scenes: int = 4096,
            batch: int = 64, questions: int = 4) -> float:
    """Scenes per minute."""
    n = scenes // batch
    if workers <= 1:
        data = _Batches(mode, size, batch, n + 1, questions)
        data[n]                                   # warm-up: glyphs, caches
        start = time.perf_counter()
        for b in range(n):
            data[b]
    else:
        # the clock starts once every worker has delivered a batch (worker start-up, the
        # glyphs and sklearn's import excluded); at most workers batches were prefetched then
        data = _Batches(mode, size, batch, n + workers, questions)
        loader = iter(torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers,
                                                  prefetch_factor=1))
        for _ in range(workers):
            next(loader)
        start = time.perf_counter()
        for _ in loader:
            pass
    return n * batch * 60 / (time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--modes", nargs="+", default=["scenes", "items"])
    parser.add_argument("--scenes", type=int, default=4096)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for mode in args.modes:
        for size in args.sizes:
            for workers in args.workers:
                rate = measure(mode, size, workers, args.scenes)
                print(f"{mode:6s} {size:4d}px workers={workers}: {rate:10,.0f} scenes/min",
                      flush=True)


if __name__ == "__main__":
    main()
