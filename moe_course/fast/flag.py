"""The switch of the fast path, and the one question every fast op asks before it runs.

``with enabled(False):`` makes every op of ``moe_course.fast`` step aside: the
dispatch methods run the readable ``sort_dispatch``, the router is a plain
``x @ w``, and no expert runs on a thread of its own. Use it to compare, or to debug.
``with expert_threads(False):`` turns off only the threads (lesson 06 times them).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .activations import ACTIVATION_GRADS

ENABLED = True  # the whole fast path; read through `applies`, set with `enabled(...)`
THREADS = True  # expert threads (threads.worth_threading); set with `expert_threads(...)`


@contextmanager
def _setting(name: str, on: bool) -> Iterator[None]:
    before = globals()[name]
    globals()[name] = bool(on)
    try:
        yield
    finally:
        globals()[name] = before


def enabled(on: bool):
    """``with enabled(False):`` runs the readable computations instead of the fast ones."""
    return _setting("ENABLED", on)


def expert_threads(on: bool):
    """``with expert_threads(False):`` runs every expert block on the calling thread (to compare, or to debug)."""
    return _setting("THREADS", on)


def applies(*tensors: torch.Tensor, activation: str | None = None) -> bool:
    """Whether a fast op may run on these tensors: the flag is on, one dtype throughout, no autocast,
    and (when named) an activation whose derivative ``ACTIVATION_GRADS`` knows."""
    if not ENABLED or not tensors:
        return False
    if activation is not None and activation not in ACTIVATION_GRADS:
        return False
    dtype = tensors[0].dtype
    return all(t.dtype == dtype for t in tensors) and not torch.is_autocast_enabled(tensors[0].device.type)
