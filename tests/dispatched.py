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

    def pyssm_ops(self) -> list[str]:
        """The pyssm ops among them, by name (in order, repeated as dispatched)."""
        return [op._schema.name.split("::")[1] for op in self.ops
                if op._schema.name.startswith("pyssm::")]
