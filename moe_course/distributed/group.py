"""The process group: how W processes find each other, and what happens when one goes missing.

Every collective operation (an all-to-all, an all-reduce) is a meeting: it
returns only when every rank of the group has called it. A rank that takes
another path, crashes or was built with another config never arrives, and
the others would wait for ever. Three guards keep that from happening here:

* ``require_process_group``: a clear error when there is no group at all
  (a script started with ``python`` instead of ``torchrun``);
* ``same_on_every_rank``: the ranks compare a value (a config) at
  construction and all raise the same clear error when they disagree;
* a timeout on every group (``init_process_group(timeout=...)``) and
  ``explain_collective_errors``, which turns the backend's timeout into a
  message that says what most likely went wrong.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "init_process_group",
    "require_process_group",
    "same_on_every_rank",
    "explain_collective_errors",
    "group_rank_zero",
]

# Far above any exchange of the course's sizes, far below PyTorch's default of 30 minutes.
DEFAULT_TIMEOUT_SECONDS = 60.0


def init_process_group(
    rank: int | None = None,
    world_size: int | None = None,
    *,
    init_method: str | None = None,
    backend: str | None = None,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
) -> tuple[int, int]:
    """Join (or create) the default process group: → (rank, world_size).

    Without arguments it reads what ``torchrun`` sets (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT). backend: "gloo" on the CPU (the default without
    CUDA), "nccl" for GPUs; the expert-parallel code is the same for both.
    ``timeout_seconds`` bounds every collective: a rank that waits longer for
    the others raises instead of hanging.
    """
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; expert parallelism needs it")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if rank is None:
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing and init_method is None:
            raise RuntimeError(
                f"no process group: the environment lacks {', '.join(missing)}. Start the script with "
                "`torchrun --standalone --nproc-per-node N ...`, or pass rank, world_size and init_method "
                "(moe_course.distributed.launch.run_on_processes does this for you)"
            )
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not (isinstance(timeout_seconds, (int, float)) and timeout_seconds > 0):
        raise ValueError(f"timeout_seconds must be > 0, got {timeout_seconds!r}")
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_seconds)
    )
    return dist.get_rank(), dist.get_world_size()


def require_process_group(group: Any = None, what: str = "expert parallelism") -> tuple[int, int]:
    """This process's (rank, world_size) in ``group`` (None: the default group), or a clear error."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{what} needs a torch.distributed process group, and this process has none. Launch with "
            "`torchrun --standalone --nproc-per-node N -m ...`, call "
            "moe_course.distributed.init_process_group() in each process, or run a function on several "
            "processes with moe_course.distributed.launch.run_on_processes"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def group_rank_zero(group: Any = None) -> int:
    """The global rank of ``group``'s first member (the source of broadcasts)."""
    return 0 if group is None else dist.get_global_rank(group, 0)


def _fingerprint(value: Any) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()[:16]


def same_on_every_rank(value: Any, what: str, group: Any = None) -> None:
    """Raise the same ``ValueError`` on every rank unless ``value`` (by its repr) is the same on all of them.

    A collective: every rank of the group must call it. Ranks built with
    different configs would otherwise exchange tensors of different sizes,
    mismatch silently, or wait for each other until the timeout.
    """
    _, world = require_process_group(group, f"comparing the {what} across ranks")
    seen: list[Any] = [None] * world
    with explain_collective_errors(f"comparing the {what} across ranks", group):
        dist.all_gather_object(seen, (_fingerprint(value), repr(value)), group=group)
    if len({fp for fp, _ in seen}) > 1:
        lines = "\n".join(f"  rank {r}: {text}" for r, (_, text) in enumerate(seen))
        raise ValueError(f"the ranks disagree on the {what}; every rank must build the same one:\n{lines}")


@contextmanager
def explain_collective_errors(what: str, group: Any = None) -> Iterator[None]:
    """Re-raise a failed or timed-out collective with a message that names the likely cause."""
    try:
        yield
    except RuntimeError as err:  # gloo and NCCL errors (DistBackendError) are RuntimeErrors
        rank = dist.get_rank(group) if dist.is_initialized() else "?"
        raise RuntimeError(
            f"{what} failed on rank {rank}: another rank did not take part in time. Usually one rank crashed, "
            f"took another code path (e.g. skipped a forward or a backward), or was built with another config. "
            f"The backend said: {err}"
        ) from err
