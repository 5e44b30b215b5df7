"""A dispatch mode that records the ops a block of code dispatches (aten's and pyssm's)."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class Dispatched(TorchDispatchMode):
    """``with Dispatched() as seen: ...``; ``seen.ops`` lists every op overload dispatched."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **kwargs or {})
