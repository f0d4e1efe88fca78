"""The switch of the fast path, and the one question every fast op asks before it runs.

``with enabled(False):`` makes every op of ``moe_course.fast`` step aside: the
dispatch methods run the readable ``sort_dispatch``, the router is a plain
``x @ w``, and no expert runs on a thread of its own. Use it to compare, or to debug.
``with expert_threads(False):`` turns off only the threads (lesson 06 times them).
``with contention(True):`` makes the fast ops act as on a busy machine (one thread; ``shared_cores.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .activations import ACTIVATION_GRADS

ENABLED = True  # the whole fast path; read through `applies`, set with `enabled(...)`
THREADS = True  # expert threads (threads.worth_threading); set with `expert_threads(...)`
CONTENTION: bool | None = (
    None  # None: read the machine's load (shared_cores.busy); True/False pins it, set with `contention(...)`
)


@contextmanager
def _setting(name: str, on: bool | None) -> Iterator[None]:
    before = globals()[name]
    globals()[name] = on if on is None else bool(on)
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


def contention(on: bool | None):
    """``with contention(True):`` the fast ops act as if other programs held the cores (False: as if the machine
    were quiet; None: read the load, the default). See ``shared_cores.py``."""
    return _setting("CONTENTION", on)


def applies(*tensors: torch.Tensor, activation: str | None = None) -> bool:
    """Whether a fast op may run on these tensors: the flag is on, one dtype throughout, no autocast,
    and (when named) an activation whose derivative ``ACTIVATION_GRADS`` knows."""
    if not ENABLED or not tensors:
        return False
    if activation is not None and activation not in ACTIVATION_GRADS:
        return False
    dtype = tensors[0].dtype
    return all(t.dtype == dtype for t in tensors) and not torch.is_autocast_enabled(tensors[0].device.type)
