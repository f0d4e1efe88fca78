"""The rounds benchmark's bookkeeping (interleaving, pooling) and the LM benchmark's models and steps. No timings are asserted."""

import statistics

import pytest
import torch

from moe_course.bench.benchmark import PairedTiming
from moe_course.bench.lm import LMBenchConfig, hash_twin, lm_steps
from moe_course.bench.rounds import Round, interleaved_rounds, pooled, spinning
from moe_course.transformer import GPT


def test_interleaved_rounds_rotate_the_configurations_and_label_every_round():
    order = []

    def measure(config):
        order.append(config)
        return {"dense": PairedTiming([1.0], [1.0]), "moe": PairedTiming([2.0], [2.0 if config == "a" else 3.0])}

    rounds = interleaved_rounds(measure, ["a", "b", "c"], rounds=3, log=None)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # round r starts at config r
    assert [r.index for r in rounds] == [0] * 3 + [1] * 3 + [2] * 3
    assert {r.phase for r in rounds} == {"quiet"}  # no busy processes asked for: quiet phases only
    with pytest.raises(ValueError, match="rounds"):
        interleaved_rounds(measure, ["a"], rounds=0, log=None)


def _round(index, ratios, config="c", phase="quiet"):
    return Round(
        index,
        phase,
        config,
        {"dense": [1.0] * len(ratios), "moe": ratios},
        {"dense": [1.0] * len(ratios), "moe": ratios},
        1.0,
        1.0,
        2,
    )


def test_pooled_takes_the_median_of_every_pair_of_every_round():
    rounds = [_round(0, [1.0, 1.2, 1.4]), _round(1, [2.0, 2.2, 2.4]), _round(2, [1.1, 1.3, 5.0])]
    row = pooled(rounds).set_index("candidate").loc["moe"]
    pairs = [1.0, 1.2, 1.4, 2.0, 2.2, 2.4, 1.1, 1.3, 5.0]
    assert row["ratio"] == statistics.median(pairs) == 1.4  # not the median of the round medians (1.3)
    assert (row["round_low"], row["round_high"]) == (1.2, 2.2)
    assert (row["rounds"], row["pairs"]) == (3, 9)
    q1, _, q3 = statistics.quantiles(pairs, n=4, method="inclusive")
    assert (row["q1"], row["q3"]) == (q1, q3)


def test_spinning_starts_and_stops_its_processes():
    with spinning(1, settle=0) as procs:
        assert len(procs) == 1 and procs[0].poll() is None  # still running inside the block
    assert procs[0].poll() is not None  # stopped after it
    with pytest.raises(ValueError, match="processes"):
        with spinning(-1):
            pass


def test_lm_bench_builds_lesson_08s_dense_model_and_its_switch_twin_and_trains_both():
    config = LMBenchConfig(n_layers=1, batch_size=2, block_size=8, dispatch="masks_loop")
    dense, switch = config.models(vocab_size=40)
    assert (dense.d_model, dense.d_ff) == (64, 128)
    assert switch.num_experts == 8 and switch.dispatch == "masks_loop" and switch.d_ff == dense.d_ff
    assert LMBenchConfig(width=4).models(40)[0].d_model == 256
    with pytest.raises(ValueError, match="batch_size"):
        LMBenchConfig(batch_size=0)
    steps = lm_steps(config, batches=2)
    assert set(steps) == {"dense", "switch", "hash"}
    assert set(lm_steps(config, batches=2, hash_floor=False)) == {"dense", "switch"}
    for step in steps.values():
        model = step.__defaults__[0]  # the step's own model
        before = [p.detach().clone() for p in model.parameters()]
        step()
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # one optimiser step moved the weights


def test_lm_bench_hash_twin_has_the_switch_models_experts_and_no_router():
    _, switch = LMBenchConfig(n_layers=2, batch_size=2, block_size=8).models(vocab_size=40)
    hashed = hash_twin(switch)
    assert hashed.router == "hash" and hashed.capacity_factor is None
    a, b = GPT(switch), GPT(hashed)
    experts = {n: p.shape for n, p in a.named_parameters() if "router" not in n}
    assert experts == {n: p.shape for n, p in b.named_parameters()}  # the same parameters, less the router's
    assert sum(p.numel() for p in a.parameters()) - sum(p.numel() for p in b.parameters()) == 2 * 64 * 8  # two routers (D, E)
    # a hash layer sends a token to one expert: no twin for top-2
    _, top2 = LMBenchConfig(n_layers=1, top_k=2, router="top_k").models(vocab_size=40)
    assert hash_twin(top2) is None
    assert set(lm_steps(LMBenchConfig(n_layers=1, batch_size=2, block_size=8, top_k=2, router="top_k"), batches=1)) == {
        "dense",
        "switch",
    }
