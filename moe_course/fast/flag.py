"""The one switch of the fast path, and the one question every fast op asks before it runs.

``with enabled(False):`` makes every op of ``moe_course.fast`` step aside: the
dispatch methods run the readable ``sort_dispatch``, the router is a plain
``x @ w``, and no expert runs on a thread of its own. Use it to compare, or to debug.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from .activations import ACTIVATION_GRADS

ENABLED = True  # read through `applies`; set with `enabled(...)`


@contextmanager
def enabled(on: bool) -> Iterator[None]:
    """``with enabled(False):`` runs the readable computations instead of the fast ones."""
    global ENABLED
    before, ENABLED = ENABLED, bool(on)
    try:
        yield
    finally:
        ENABLED = before


def applies(*tensors: torch.Tensor, activation: str | None = None) -> bool:
    """Whether a fast op may run on these tensors: the flag is on, one dtype throughout, no autocast,
    and (when named) an activation whose derivative ``ACTIVATION_GRADS`` knows."""
    if not ENABLED or not tensors:
        return False
    if activation is not None and activation not in ACTIVATION_GRADS:
        return False
    dtype = tensors[0].dtype
    return all(t.dtype == dtype for t in tensors) and not torch.is_autocast_enabled(tensors[0].device.type)
