"""Expert parallelism on CPU cores: each core takes a share of the doctors.

Legend: E experts, M_e rows (tokens) of expert e.

On a cluster, expert parallelism puts different experts on different devices
(GShard, Lepikhin et al. 2020, arXiv:2006.16668; Switch Transformer, Fedus et
al. 2021, arXiv:2101.03961). The same idea pays on a laptop: one matmul on a
block of a few hundred tokens splits badly over cores (the cores wait for
each other after every small operation), but E independent blocks split
perfectly. So with T intra-op threads, ``over_experts`` cuts the experts into
T contiguous groups with about the same number of tokens, and runs each group
on its own thread, one core each. The clinic analogy: rather than two nurses
sharing every patient, each nurse takes her own doctors' patients.

Only worth it for many small blocks (``worth_threading``); a few big blocks
are as fast one at a time with all cores on each, and split without imbalance.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["expert_groups", "worth_threading", "over_experts", "expert_threads", "MIN_EXPERTS_PER_THREAD", "MAX_BLOCK_FLOPS", "MIN_BLOCK_FLOPS"]

# Measured on 2 cores (torch 2.13), forward+backward: threads won with blocks of 64 and 256
# rows at D=128, F=512 (8.4M and 34M FLOPs per matmul), lost with 1024-row blocks there
# (134M) and with 64-row blocks at D=64, F=256 (2.1M). Re-measure on new hardware.
MIN_EXPERTS_PER_THREAD = 8  # fewer busy experts per thread: one block at a time, all cores on it
MAX_BLOCK_FLOPS = 1e8  # mean FLOPs of one expert matmul (2·M_e·D·F) above which a block splits well by itself
MIN_BLOCK_FLOPS = 4e6  # ... and below which handing blocks to threads costs more than it saves

_pools: dict[int, ThreadPoolExecutor] = {}
_enabled = True


@contextmanager
def expert_threads(enabled: bool) -> Iterator[None]:
    """``with expert_threads(False):`` runs every expert block on the calling thread (to compare, or to debug)."""
    global _enabled
    before, _enabled = _enabled, bool(enabled)
    try:
        yield
    finally:
        _enabled = before


def _forget_pools() -> None:  # a forked child has none of its parent's threads
    _pools.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def expert_groups(counts: list[int], parts: int) -> list[tuple[int, int]]:
    """Cut experts 0..E-1 into at most ``parts`` contiguous ranges [lo, hi) with about equal rows.

    counts (E,) rows per expert. A range ends once it holds its share of
    sum(counts); ranges never come out empty.
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    total, acc, bounds = sum(counts), 0, [0]
    for e, c in enumerate(counts[:-1]):
        acc += c
        if len(bounds) < parts and acc * parts >= total * len(bounds):
            bounds.append(e + 1)
    bounds.append(len(counts))
    return [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]


def worth_threading(counts: list[int], flops_per_row: int, threads: int | None = None) -> bool:
    """Whether to run the experts on separate threads: many busy experts with small blocks, and no dispatch mode.

    counts (E,) rows per expert; flops_per_row = 2·D·F, one row's share of one
    expert matmul. Small means a mean block between ``MIN_BLOCK_FLOPS`` and
    ``MAX_BLOCK_FLOPS``: tinier blocks cost more to hand over than they take.

    A ``TorchDispatchMode`` (``moe_course.memory.peak_bytes``, FLOP counters)
    sees only its own thread's operations, so under one everything stays on
    the calling thread.
    """
    threads = torch.get_num_threads() if threads is None else threads
    busy = [c for c in counts if c > 0]
    return (
        _enabled
        and threads > 1
        and len(busy) >= MIN_EXPERTS_PER_THREAD * threads
        and MIN_BLOCK_FLOPS * len(busy) <= sum(busy) * flops_per_row <= MAX_BLOCK_FLOPS * len(busy)
        and _get_current_dispatch_mode() is None
    )


def _pool(workers: int) -> ThreadPoolExecutor:
    if workers not in _pools:
        _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="moe-experts", initializer=torch.set_num_threads, initargs=(1,))
    return _pools[workers]


def _run_alone(fn: Callable[[int, int], None], lo: int, hi: int, inference: bool) -> None:
    # grad mode and inference mode are per thread: a worker starts with neither
    with torch.inference_mode(inference), torch.no_grad():
        fn(lo, hi)


def over_experts(fn: Callable[[int, int], None], counts: list[int], flops_per_row: int) -> None:
    """Call ``fn(lo, hi)`` for ranges of experts covering 0..E-1: on one thread per range when worth it.

    ``fn`` must only write to places no other range writes to (e.g. its own
    experts' rows and gradient slices), and runs without autograd recording.
    With threads, every thread (the caller's too) runs one intra-op thread;
    the caller's thread count is restored afterwards.
    """
    threads = torch.get_num_threads()
    if not worth_threading(counts, flops_per_row, threads):
        fn(0, len(counts))
        return
    first, *rest = expert_groups(counts, threads)
    inference = torch.is_inference_mode_enabled()
    torch.set_num_threads(1)
    try:
        futures = [_pool(threads - 1).submit(_run_alone, fn, lo, hi, inference) for lo, hi in rest]
        fn(*first)
        for future in futures:
            future.result()
    finally:
        torch.set_num_threads(threads)
