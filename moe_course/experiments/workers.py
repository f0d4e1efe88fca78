"""Run independent jobs in worker processes: seeds and models side by side on a few CPU cores.

Small models use one CPU core badly and two cores hardly better, so the
course trains several of them at once, each in its own process on one thread
(lesson 04's approaches over seeds, lesson 08's language models).
``run_in_workers(fn, jobs, workers=2)`` calls ``fn(job)`` for every job and
returns the results in the order of ``jobs``, whatever order they finish in.

A result must not depend on where it ran: ``fn`` seeds everything it draws
from the job itself, and every worker runs PyTorch on one thread (a float sum
split over a different number of threads rounds differently), so
``workers=1`` (in this process) and ``workers=2`` give the same numbers.

Workers are started with "spawn", a fresh interpreter each: forking a process
that already runs PyTorch's thread pools can hang. So ``fn`` must be a
module-level function of an importable module (not one defined in a notebook)
and every job must pickle.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

__all__ = ["run_in_workers", "one_thread"]

Job = TypeVar("Job")


def _worker_init() -> None:
    torch.set_num_threads(1)


@contextmanager
def one_thread() -> Iterator[None]:
    """This process on one thread inside the block, as every worker is: then workers=1 gives the workers' numbers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_in_workers(
    fn: Callable[[Job], Any],
    jobs: Sequence[Job],
    *,
    workers: int = 2,
    on_done: Callable[[int, Any], None] | None = None,
    progress: bool = False,
    desc: str = "runs",
    name: Callable[[Job], str] = str,
) -> list[Any]:
    """``[fn(job) for job in jobs]``, ``workers`` jobs at a time, each worker a one-thread process.

    workers=1 (or a single job) runs them one after another in this process,
    with the thread count left as it is. ``on_done(i, result)`` is called as
    job i finishes. ``progress`` draws a progress bar titled ``desc`` that names
    each job with ``name(job)``. An exception in a job is raised here, after the
    pool has shut down.
    """
    jobs = list(jobs)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    if not callable(fn):
        raise TypeError(f"fn must be a function, got {type(fn).__name__}")
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc=desc, disable=not progress)
    results: list[Any] = [None] * len(jobs)

    def finished(i: int, result: Any) -> None:
        results[i] = result
        bar.set_postfix_str(f"finished {name(jobs[i])}")
        bar.update()
        if on_done is not None:
            on_done(i, result)

    try:
        if workers == 1 or len(jobs) <= 1:
            for i, job in enumerate(jobs):
                bar.set_postfix_str(name(job))
                finished(i, fn(job))
            return results
        with ProcessPoolExecutor(
            max_workers=min(workers, len(jobs)), mp_context=mp.get_context("spawn"), initializer=_worker_init
        ) as pool:
            futures = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
            for future in as_completed(futures):
                finished(futures[future], future.result())
        return results
    finally:
        bar.close()
