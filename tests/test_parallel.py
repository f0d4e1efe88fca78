"""Expert parallelism on CPU threads: the grouping, when it is used, and that it changes no result."""

import threading

import pytest
import torch

import moe_course.fast.threads as parallel
from moe_course.bench.memory import MemoryRecorder
from moe_course.dispatch import METHODS, sort_split
from moe_course.experts import Experts
from moe_course.fast import sorted_experts
from moe_course.fast.shared_cores import contention
from moe_course.fast.threads import expert_order, over_experts, worth_threading
from moe_course.routing import capacity_mask, top_k_routing

from helpers import outputs_and_grads


def test_expert_order_takes_the_busiest_experts_first_and_idle_ones_last():
    assert expert_order([5, 0, 9, 5, 1]) == [2, 0, 3, 4, 1]
    assert expert_order([]) == []


def test_worth_threading_only_for_many_small_blocks_on_several_threads():
    many_small = [256] * 64
    assert worth_threading(many_small, 2 * 128 * 512, threads=2)
    assert not worth_threading(many_small, 2 * 128 * 512, threads=1)  # one thread: nothing to share
    assert not worth_threading([256] * 8, 2 * 128 * 512, threads=2)  # too few experts per thread
    assert not worth_threading([4096] * 64, 2 * 128 * 512, threads=2)  # big blocks split well inside the matmul
    assert not worth_threading([8] * 64, 2 * 128 * 512, threads=2)  # tiny blocks cost more to hand over
    assert not worth_threading([256] * 15 + [0] * 49, 2 * 128 * 512, threads=2)  # idle experts do not count
    with MemoryRecorder():  # dispatch modes see only their own thread
        assert not worth_threading(many_small, 2 * 128 * 512, threads=2)


@pytest.fixture
def two_threads(monkeypatch):
    """Two intra-op threads, and threads for any number of experts of any size, however busy the machine."""
    monkeypatch.setattr(parallel, "MIN_EXPERTS_PER_THREAD", 1)
    monkeypatch.setattr(parallel, "MAX_BLOCK_FLOPS", float("inf"))
    monkeypatch.setattr(parallel, "MIN_BLOCK_FLOPS", 0)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    with contention(False):
        yield
    torch.set_num_threads(before)


def test_over_experts_runs_every_expert_once_on_two_threads_and_restores_the_thread_count(two_threads):
    seen: dict[int, tuple[str, int]] = {}
    both_started = threading.Barrier(2, timeout=30)  # fails unless a second thread takes an expert

    def fn(e):
        if e in (0, 1):  # the two busiest experts go first, one to each thread
            both_started.wait()
        seen[e] = (threading.current_thread().name, torch.get_num_threads())

    over_experts(fn, [9, 8, 3, 3, 0, 1], flops_per_row=1)
    assert sorted(seen) == [0, 1, 2, 3, 4, 5]  # every expert once, the idle one too
    names = {name for name, _ in seen.values()}
    assert len(names) == 2 and any(n.startswith("moe-experts") for n in names)
    assert all(n == 1 for _, n in seen.values())  # one intra-op thread each while they share the cores
    assert torch.get_num_threads() == 2


def test_over_experts_runs_in_order_on_the_calling_thread_when_not_worth_it():
    order = []
    over_experts(lambda e: order.append((e, threading.current_thread().name)), [1, 2, 3], flops_per_row=1)
    assert [e for e, _ in order] == [0, 1, 2] and {n for _, n in order} == {threading.current_thread().name}


def test_over_experts_passes_on_a_worker_error_and_still_restores_threads(two_threads):
    def fn(e):
        if e == 2:
            raise RuntimeError(f"expert {e} failed")

    with pytest.raises(RuntimeError, match="expert 2 failed"):
        over_experts(fn, [1, 1, 1, 1], flops_per_row=1)
    assert torch.get_num_threads() == 2


def _routing(n=40, e=6, k=1, capacity=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    experts = Experts(e, 8, 16)
    x = torch.randn(n, 8, generator=g)
    logits = torch.randn(n, e, generator=g)
    logits[:, 5] = -1e4  # an idle expert
    routing = top_k_routing(logits, k)
    keep = capacity_mask(routing.expert_index, e, capacity).keep if capacity else None
    return x, experts, routing.expert_index, routing.gates, keep


@pytest.mark.parametrize("all_rows", [True, False], ids=["batched", "blocked"])
@pytest.mark.parametrize("k,capacity", [(1, None), (2, None), (1, 5), (2, 9)])
def test_threaded_sort_split_gives_the_same_outputs_and_gradients(two_threads, monkeypatch, k, capacity, all_rows):
    monkeypatch.setattr(sorted_experts, "BATCHED_ELEMENTS", 2**40 if all_rows else 0)
    monkeypatch.setattr(sorted_experts, "GROUPED", False)  # on a quiet machine small layers take one grouped call instead
    x, experts, expert_index, gates, keep = _routing(k=k, capacity=capacity)
    calls = []
    real = parallel.threaded  # over_experts asks it once per loop over the experts
    monkeypatch.setattr(parallel, "threaded", lambda *a, **kw: calls.append(real(*a, **kw)) or calls[-1])
    got = outputs_and_grads(sort_split, x, experts, expert_index, gates, keep)
    # forward and backward on two threads: once each block by block, twice each (around the activation) batched
    assert calls == [True] * (4 if all_rows else 2), "forward and backward should both have run on two threads"
    want = outputs_and_grads(METHODS["masks_loop"], x, experts, expert_index, gates, keep)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    assert got[3][5].abs().sum() == 0  # the idle expert's w_in gradient is zero, not left uninitialised


def test_threaded_sort_split_works_under_inference_mode(two_threads):
    x, experts, expert_index, gates, _ = _routing()
    want = sort_split(x, experts, expert_index, gates)
    with torch.inference_mode():
        got = sort_split(x, experts, expert_index, gates)
    torch.testing.assert_close(got, want)


def test_expert_threads_off_keeps_everything_on_the_calling_thread():
    from moe_course.fast import expert_threads

    assert worth_threading([256] * 64, 2 * 128 * 512, threads=2)
    with expert_threads(False):
        assert not worth_threading([256] * 64, 2 * 128 * 512, threads=2)
        with expert_threads(True):
            assert worth_threading([256] * 64, 2 * 128 * 512, threads=2)
        assert not worth_threading([256] * 64, 2 * 128 * 512, threads=2)
    assert worth_threading([256] * 64, 2 * 128 * 512, threads=2)


def test_a_small_layer_takes_one_grouped_call_on_a_quiet_machine_and_the_workers_on_a_busy_one(two_threads):
    if not sorted_experts.HAS_GROUPED_MM:
        pytest.skip("this torch has no grouped_mm")
    from moe_course.fast.shared_cores import fitted_threads

    xs, w_in, counts = torch.randn(4096, 64), torch.randn(32, 64, 256), [128] * 32  # M·F = 2^20: small enough to batch
    assert parallel.threaded(counts, 2 * 64 * 256)  # 32 blocks of 4 MFLOP: worth threads
    with contention(False), fitted_threads():
        assert sorted_experts.arrangement(xs, w_in, counts) == "grouped"  # quiet: one call per product won
    with contention(True), fitted_threads():
        assert sorted_experts.arrangement(xs, w_in, counts) == "batched"  # busy: the one-thread workers won
    assert sorted_experts.arrangement(torch.randn(4097, 64), w_in, counts) == "blocked"  # too big to batch
