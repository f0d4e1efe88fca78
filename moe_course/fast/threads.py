"""Expert parallelism on CPU cores: each core takes a share of the doctors.

Legend: E experts, M_e rows (tokens) of expert e.

On a cluster, expert parallelism puts different experts on different devices
(GShard, Lepikhin et al. 2020, arXiv:2006.16668; Switch Transformer, Fedus et
al. 2021, arXiv:2101.03961). The same idea pays on a laptop: one matmul on a
block of a few hundred tokens splits badly over cores (the cores wait for
each other after every small operation), but E independent blocks split
perfectly. So with T intra-op threads, ``over_experts`` runs T threads of one
core each, and each thread takes the next expert off a shared queue whenever
it is free, busiest experts first (so the last blocks to start are small ones
and the threads finish together). The clinic analogy: rather than two nurses
sharing every patient, each nurse takes the next doctor's queue of patients.

Only worth it for many small blocks (``worth_threading``); a few big blocks
are as fast one at a time with all cores on each, and split without imbalance.
Except on a busy machine (``shared_cores``): then every operation split over
the cores waits for a core another program holds, while a worker taking
whole experts off a queue delays only its own; so there any two busy experts
per worker are worth it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import flag
from .flag import expert_threads  # noqa: F401  (the switch lives with the fast path's other one)
from .shared_cores import sharing

__all__ = [
    "expert_order",
    "worth_threading",
    "threaded",
    "over_experts",
    "expert_threads",
    "MIN_EXPERTS_PER_THREAD",
    "MAX_BLOCK_FLOPS",
    "MIN_BLOCK_FLOPS",
    "MIN_EXPERTS_PER_THREAD_SHARED",
]

# Where threads pay depends on the machine; these bounds are a starting point, not a law. To set
# them for yours, time a layer's forward+backward with `expert_threads(False)` against the default,
# side by side with `moe_course.bench.paired_times`, at mean blocks on both sides of each bound
# (lesson 06's "experts on separate cores" does it for one size; `moe-bench` times whole layers).
MIN_EXPERTS_PER_THREAD = 8  # fewer busy experts per thread: one block at a time, all cores on it
MAX_BLOCK_FLOPS = 1e8  # mean FLOPs of one expert matmul (2·M_e·D·F) above which a block splits well by itself
MIN_BLOCK_FLOPS = 4e6  # ... and below which handing blocks to threads costs more than it saves
# On a busy machine (shared_cores.busy) two busy experts per worker are enough: a worker that
# waits for a core delays only its own experts. Check it with `python -m moe_course.bench --busy 2`.
MIN_EXPERTS_PER_THREAD_SHARED = 2

_pools: dict[int, ThreadPoolExecutor] = {}


def _forget_pools() -> None:  # a forked child has none of its parent's threads
    _pools.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def expert_order(counts: list[int]) -> list[int]:
    """Experts busiest first (ties: lower index first), idle ones last: the order the threads take them in.

    Taking the big blocks first leaves small ones for the end, so the threads
    finish at about the same time (the "longest job first" rule of scheduling).
    """
    return sorted(range(len(counts)), key=lambda e: -counts[e])


def worth_threading(counts: list[int], flops_per_row: int, threads: int | None = None, *, shared: bool = False) -> bool:
    """Whether to run the experts on separate threads: many busy experts with small blocks, and no dispatch mode.

    counts (E,) rows per expert; flops_per_row = 2·D·F, one row's share of one
    expert matmul. Small means a mean block between ``MIN_BLOCK_FLOPS`` and
    ``MAX_BLOCK_FLOPS``: tinier blocks cost more to hand over than they take.
    ``shared``: the cores are busy with other programs (``shared_cores``);
    then ``MIN_EXPERTS_PER_THREAD_SHARED`` busy experts per thread of at least
    ``MIN_BLOCK_FLOPS`` are enough, however big.

    A ``TorchDispatchMode`` (``moe_course.bench.memory.peak_bytes``, FLOP counters)
    sees only its own thread's operations, so under one everything stays on
    the calling thread.
    """
    threads = torch.get_num_threads() if threads is None else threads
    busy = [c for c in counts if c > 0]
    per_thread, most = (MIN_EXPERTS_PER_THREAD_SHARED, float("inf")) if shared else (MIN_EXPERTS_PER_THREAD, MAX_BLOCK_FLOPS)
    return (
        flag.THREADS
        and flag.ENABLED
        and threads > 1
        and len(busy) >= per_thread * threads
        and MIN_BLOCK_FLOPS * len(busy) <= sum(busy) * flops_per_row <= most * len(busy)
        and _get_current_dispatch_mode() is None
    )


def threaded(counts: list[int], flops_per_row: int) -> bool:
    """Whether ``over_experts`` would run these experts on threads now (``worth_threading``, inside a busy scope or not)."""
    shared = sharing()
    return worth_threading(counts, flops_per_row, shared or torch.get_num_threads(), shared=shared is not None)


def _pool(workers: int) -> ThreadPoolExecutor:
    if workers not in _pools:
        _pools[workers] = ThreadPoolExecutor(
            workers, thread_name_prefix="moe-experts", initializer=torch.set_num_threads, initargs=(1,)
        )
    return _pools[workers]


def _run_alone(fn: Callable[[], None], inference: bool) -> None:
    # grad mode and inference mode are per thread: a worker starts with neither
    with torch.inference_mode(inference), torch.no_grad():
        fn()


def over_experts(fn: Callable[[int], None], counts: list[int], flops_per_row: int) -> None:
    """Call ``fn(e)`` for every expert e: on several threads when worth it, busiest experts first.

    ``fn`` must only write to places no other expert writes to (its own rows
    and gradient slices), and runs without autograd recording. With threads,
    every thread (the caller's too) runs one intra-op thread and takes the next
    expert from a shared queue; the caller's thread count is restored afterwards.
    Inside a busy scope (``shared_cores.sharing``) the workers are as many as
    the threads the caller had before the scope put it on one.
    """
    before = torch.get_num_threads()
    threads = sharing() or before
    if not threaded(counts, flops_per_row):
        for e in range(len(counts)):
            fn(e)
        return
    queue, lock = iter(expert_order(counts)), threading.Lock()

    def take_until_empty() -> None:
        while True:
            with lock:
                e = next(queue, None)
            if e is None:
                return
            fn(e)

    inference = torch.is_inference_mode_enabled()
    torch.set_num_threads(1)
    try:
        futures = [_pool(threads - 1).submit(_run_alone, take_until_empty, inference) for _ in range(threads - 1)]
        try:
            take_until_empty()
        finally:
            wait(futures)  # never return while a worker still writes
        for future in futures:
            future.result()
    finally:
        torch.set_num_threads(before)
