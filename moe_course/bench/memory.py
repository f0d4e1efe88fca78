"""Peak memory of a piece of PyTorch code, measured on any device, CPU included.

``peak_bytes(fn)`` runs ``fn`` under a ``TorchDispatchMode`` that sees every
tensor an operator creates, counts its storage while it is alive, and
reports the largest total reached. Tensors that existed before the call
(weights, inputs) are not counted: the result is the *extra* memory the code
needs, e.g. the (N, E, C) one-hot tensors of GShard-style dispatch.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["MemoryRecorder", "peak_bytes"]


class MemoryRecorder(TorchDispatchMode):
    """Tracks the live bytes of storages created inside the ``with`` block, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self._before: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in self._sizes or key in inputs:
                continue  # empty, already counted, or a view of an input
            size = storage.nbytes()
            self._sizes[key] = size
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)


def peak_bytes(fn: Callable[[], Any]) -> int:
    """Largest total size of the tensors ``fn`` creates that are alive at the same time."""
    with MemoryRecorder() as recorder:
        fn()
    return recorder.peak
