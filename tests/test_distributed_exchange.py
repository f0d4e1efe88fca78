"""Tests of moe_course.distributed that need no process group: formulas, split sizes, clear errors."""

from __future__ import annotations

import pytest
import torch

from moe_course.distributed.exchange import all_to_all, bytes_per_token, exchange_counts, exchange_matrix, rows_per_rank
from moe_course.distributed.group import init_process_group, require_process_group
from moe_course.distributed.launch import run_on_processes
from moe_course.distributed.layer import ExpertParallelMoE, shard_moe_layers
from moe_course.moe import MoEConfig, MoELayer


def test_bytes_per_token_counts_rows_width_directions_and_the_remote_share():
    # dropless top-1, D=64, float32: 64·4 bytes there, back, and twice again in the backward
    assert bytes_per_token(64) == 64 * 4 * 4
    assert bytes_per_token(64, backward=False) == 64 * 4 * 2
    assert bytes_per_token(64, top_k=2) == 2 * bytes_per_token(64)
    assert bytes_per_token(64, capacity_factor=1.25) == pytest.approx(1.25 * bytes_per_token(64))
    assert bytes_per_token(64, bytes_per_value=2) == bytes_per_token(64) / 2
    assert bytes_per_token(64, world_size=4) == pytest.approx(0.75 * bytes_per_token(64))
    assert bytes_per_token(64, world_size=1) == 0.0  # one process: nothing leaves it


def test_bytes_per_token_matches_the_rows_a_capacity_padded_layer_sends():
    # padded: E·C rows per rank per direction with C = ceil(K·N/E·cf); per token that is K·cf when it divides evenly
    from moe_course.routing import expert_capacity

    N, E, K, cf, D = 96, 8, 2, 1.5, 16
    rows = E * expert_capacity(N, E, cf, top_k=K)
    assert rows * D * 4 * 2 / N == bytes_per_token(D, K, cf, backward=False)


@pytest.mark.parametrize(
    "bad, name",
    [
        (dict(d_model=0), "d_model"),
        (dict(d_model=8.0), "d_model"),
        (dict(d_model=8, top_k=0), "top_k"),
        (dict(d_model=8, capacity_factor=0.0), "capacity_factor"),
        (dict(d_model=8, capacity_factor=float("inf")), "capacity_factor"),
        (dict(d_model=8, world_size=0), "world_size"),
    ],
)
def test_bytes_per_token_rejects_bad_input_by_name(bad, name):
    with pytest.raises(ValueError, match=name):
        bytes_per_token(**bad)


def test_rows_per_rank_sums_each_ranks_experts():
    counts = torch.tensor([3, 0, 5, 1, 2, 2])  # E=6
    assert rows_per_rank(counts, 2).tolist() == [8, 5]
    assert rows_per_rank(counts, 3).tolist() == [3, 6, 4]
    with pytest.raises(ValueError, match="divisible"):
        rows_per_rank(counts, 4)


def test_exchange_matrix_rows_are_input_splits_and_columns_output_splits():
    per_rank = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])  # (W=2, E=4): tokens per expert on each rank
    m = exchange_matrix(per_rank)
    assert m.tolist() == [[3, 7], [11, 15]]
    assert m[0].tolist() == rows_per_rank(per_rank[0], 2).tolist()  # rank 0 sends
    assert m[:, 1].tolist() == [7, 15]  # rank 1 receives from 0 and from itself
    with pytest.raises(ValueError):
        exchange_matrix(torch.tensor([[1, 2, 3]]).repeat(2, 1))


def test_everything_that_needs_a_process_group_says_so():
    assert not torch.distributed.is_initialized()
    for call in (
        lambda: ExpertParallelMoE(MoEConfig(8, 16, 4)),
        lambda: all_to_all(torch.zeros(2, 3), [2], [2]),
        lambda: exchange_counts(torch.zeros(4, dtype=torch.int64)),
        lambda: shard_moe_layers(torch.nn.Sequential(MoELayer(MoEConfig(8, 16, 4)))),
        lambda: require_process_group(),
    ):
        with pytest.raises(RuntimeError, match="process group.*torchrun"):
            call()


def test_init_process_group_without_torchrun_names_the_missing_variables(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="WORLD_SIZE.*torchrun"):
        init_process_group()


def _local_function(rank, world):  # importable, but the test passes a nested one below
    return rank


def test_run_on_processes_refuses_functions_that_cannot_travel_by_name():
    def nested(rank, world):
        return rank

    for fn in (nested, lambda r, w: r):
        with pytest.raises(ValueError, match="top level of an importable module"):
            run_on_processes(fn, 2)
    with pytest.raises(ValueError, match="world_size"):
        run_on_processes(_local_function, 0)


def test_simulate_all_to_all_delivers_every_block_in_sender_order():
    from moe_course.distributed.exchange import simulate_all_to_all

    splits = torch.tensor([[2, 5, 1], [1, 2, 5], [5, 1, 2]])  # (W, W): row s, what rank s sends to each rank
    rows = [torch.arange(8.0)[:, None] + 100 * s for s in range(3)]  # rank s's rows: 100·s + 0..7
    received = simulate_all_to_all(rows, splits)
    assert [r.shape[0] for r in received] == splits.sum(0).tolist()  # column sums: what each rank receives
    assert received[0].flatten().tolist() == [0, 1, 100, 200, 201, 202, 203, 204]  # from rank 0, then 1, then 2
    assert received[2].flatten().tolist() == [7, 103, 104, 105, 106, 107, 206, 207]
    assert torch.equal(
        exchange_matrix(torch.tensor([[2, 5, 1], [1, 2, 5], [5, 1, 2]])), splits
    )  # one expert per rank: the same table


def test_simulate_all_to_all_backward_is_the_exchange_with_the_splits_swapped():
    from moe_course.distributed.exchange import simulate_all_to_all

    g = torch.Generator().manual_seed(0)
    splits = torch.tensor([[3, 0, 2], [1, 4, 0], [0, 2, 2]])
    rows = [torch.randn(int(n), 4, generator=g, requires_grad=True) for n in splits.sum(1)]
    received = simulate_all_to_all(rows, splits)
    upstream = [torch.randn(r.shape, generator=g) for r in received]
    grads = torch.autograd.grad(sum((r * u).sum() for r, u in zip(received, upstream)), rows)
    back = simulate_all_to_all(upstream, splits.T)
    assert all(torch.equal(a, b) for a, b in zip(grads, back))


@pytest.mark.parametrize(
    "rows, splits, match",
    [
        ([torch.zeros(3, 2)], torch.tensor([[3]]).float(), "integer"),
        ([torch.zeros(3, 2)], torch.tensor([[1, 2], [0, 0]]), "one tensor per rank"),
        ([torch.zeros(3, 2), torch.zeros(1, 2)], torch.tensor([[1, 2], [0, 0]]), "rank 1 holds 1 rows"),
        ([torch.zeros(3, 2), torch.zeros(0, 2)], torch.tensor([[4, -1], [0, 0]]), "negative"),
    ],
)
def test_simulate_all_to_all_rejects_tables_that_do_not_fit_by_name(rows, splits, match):
    from moe_course.distributed.exchange import simulate_all_to_all

    with pytest.raises(ValueError, match=match):
        simulate_all_to_all(rows, splits)


def test_in_sequence_runs_each_call_and_refuses_calls_that_cannot_travel():
    from moe_course.distributed.launch import in_sequence

    def local(rank, world_size):  # defined in a function: cannot be found by name in a new process
        return rank

    assert in_sequence(1, 2, [(divmod, (), {}), (max, (5,), {})]) == [(0, 1), 5]  # fn(rank, world_size, *args)
    with pytest.raises(ValueError, match="top level of an importable module"):
        run_on_processes(in_sequence, 2, [(local, (), {})])
    with pytest.raises(ValueError, match="triples"):
        run_on_processes(in_sequence, 2, [local])


def test_options_whose_statistics_are_per_rank_are_refused_by_name():
    for options, name in (
        ({"balance_scope": "sequence"}, "balance_scope"),
        ({"router": "sigmoid", "top_k": 2, "bias_update_rate": 1e-3}, "bias_update_rate"),
    ):
        with pytest.raises(ValueError, match=f"does not support MoEConfig.{name}"):
            ExpertParallelMoE(MoEConfig(8, 16, 4, **options))
