"""Run a function on W processes joined in a gloo group, from a script or a notebook, and get its results back.

    results = run_on_processes(record_traffic, 2, settings)   # [rank 0's result, rank 1's result]

``torchrun`` is the launcher for training scripts; this one is for a notebook
or a test that wants the results back as Python objects. The function must
live in a module (``multiprocessing`` sends it to the new processes by name,
so a function defined in a notebook cell cannot travel) and is called as
``fn(rank, world_size, *args)``; each rank's return value comes back through a
file (``torch.save``), in rank order.

In a script, call it under ``if __name__ == "__main__":``: each new process
imports the script that started it (a notebook has no such file; nothing to do).

Nothing can hang: every collective times out after ``collective_timeout``
seconds, and the whole run is killed after ``timeout`` seconds. Processes
start from a "forkserver" that imported torch once, so after the first call
a new group starts in well under a second (a fresh interpreter takes seconds).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["run_on_processes", "in_sequence"]


def _check_travels(fn: Any) -> None:
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not callable(fn) or module in (None, "__main__") or "<locals>" in qualname or "<lambda>" in qualname:
        raise ValueError(
            f"run_on_processes needs a function defined at the top level of an importable module, got {qualname or fn!r} "
            f"from {module!r}: new processes receive the function by name, and a function defined in a notebook or "
            "inside another function cannot be found by name. Put it in a .py file (or use one from moe_course.distributed)"
        )


def in_sequence(rank: int, world_size: int, calls: list[tuple[Callable, tuple, dict]]) -> list[Any]:
    """Several functions in one launch: ``[fn(rank, world_size, *args, **kwargs) for fn, args, kwargs in calls]``.

    Starting a process group costs seconds, so a notebook that wants several
    measurements from the same W processes asks for them in one go::

        traffic, equal = run_on_processes(in_sequence, 2, [(record_traffic, (moe, train), {}),
                                                            (compare_with_one_process, (cases,), {})])[0]

    Each rank returns the list of its results (``run_on_processes`` gives one such list per rank).
    """
    return [fn(rank, world_size, *args, **dict(kwargs)) for fn, args, kwargs in calls]


def _context():
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        # Imported once in the server, and every rank forks from it (takes effect before the server starts).
        # torch._dynamo: the first optimizer a process builds imports it, which alone takes seconds.
        ctx.set_forkserver_preload(
            [
                "torch",
                "torch.distributed",
                "torch._dynamo",
                "pandas",
                "moe_course.distributed.traffic",
                "moe_course.distributed.verify",
            ]
        )
        return ctx
    return mp.get_context("spawn")  # Windows


def _run_rank(
    fn: Callable, rank: int, world_size: int, folder: str, args: tuple, kwargs: dict, collective_timeout: float, threads: int
) -> None:
    import torch.distributed as dist

    from .group import init_process_group

    torch.set_num_threads(threads)  # W processes share the cores
    out = Path(folder) / f"rank{rank}.pt"
    try:
        init_process_group(
            rank, world_size, init_method=f"file://{folder}/store", backend="gloo", timeout_seconds=collective_timeout
        )
        payload = {"result": fn(rank, world_size, *args, **kwargs)}
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        payload = {"error": traceback.format_exc()}
    try:
        torch.save(payload, out.with_suffix(".tmp"))
        os.replace(out.with_suffix(".tmp"), out)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_processes(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    collective_timeout: float = 30.0,
    threads: int = 1,
    kwargs: dict[str, Any] | None = None,
) -> list[Any]:
    """Call ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` new processes in one gloo group; → their results, by rank.

    Raises ``RuntimeError`` with every failed rank's traceback if any rank
    raised, and ``TimeoutError`` (after killing the processes) if they are
    not done within ``timeout`` seconds.
    """
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    _check_travels(fn)
    if fn is in_sequence:
        calls = args[0] if args else (kwargs or {}).get("calls")
        if not isinstance(calls, (list, tuple)) or not all(isinstance(c, (list, tuple)) and len(c) == 3 for c in calls):
            raise ValueError("in_sequence expects a list of (function, args tuple, kwargs dict) triples")
        for c in calls:
            _check_travels(c[0])
    for name, value in (("timeout", timeout), ("collective_timeout", collective_timeout)):
        if not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
    ctx = _context()
    with tempfile.TemporaryDirectory(prefix="moe-ranks-") as folder:
        procs = [
            ctx.Process(
                target=_run_rank,
                args=(fn, rank, world_size, folder, args, dict(kwargs or {}), collective_timeout, threads),
                name=f"moe-rank-{rank}",
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        stuck = [rank for rank, p in enumerate(procs) if p.is_alive()]
        for rank in stuck:
            procs[rank].terminate()
        for rank in stuck:
            procs[rank].join(5)
            if procs[rank].is_alive():
                procs[rank].kill()
                procs[rank].join(5)
        if stuck:
            raise TimeoutError(
                f"{getattr(fn, '__name__', fn)} did not finish within {timeout:g} s on ranks {stuck}; they were stopped"
            )
        results, errors = [], []
        for rank, p in enumerate(procs):
            path = Path(folder) / f"rank{rank}.pt"
            if not path.exists():
                errors.append(f"--- rank {rank} exited with code {p.exitcode} and returned nothing")
                continue
            payload = torch.load(path, map_location="cpu", weights_only=False)
            if "error" in payload:
                errors.append(f"--- rank {rank}:\n{payload['error']}")
            else:
                results.append(payload["result"])
        if errors:
            raise RuntimeError(
                f"{getattr(fn, '__name__', fn)} failed on {len(errors)} of {world_size} ranks:\n" + "\n".join(errors)
            )
    return results
