"""Expert parallelism on real processes (gloo on the CPU): equal to one process, clear failures, torchrun training.

Each ``run_on_processes`` call starts one process group and runs several
checks inside it; every collective times out and every run is bounded, so a
bug fails here instead of hanging the suite. Deselect with ``-m "not slow"``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from moe_course.data.clinic import make_clinic
from moe_course.device import seed_everything
from moe_course.distributed.launch import run_on_processes
from moe_course.distributed.traffic import exchange_matrices, record_traffic, traffic_table
from moe_course.distributed.verify import EquivalenceCase, compare_with_one_process, failure_messages
from moe_course.models import ClinicMoE
from moe_course.moe import MoEConfig
from moe_course.training import ClassificationTask, TrainConfig, train

pytestmark = pytest.mark.slow

TOLERANCE = 1e-5  # float32 round-off of sums taken in another order (the test prints the largest difference)

CASES = [
    EquivalenceCase(),  # top-1 (Switch), dropless
    EquivalenceCase(router="top_k", top_k=2),
    EquivalenceCase(capacity_factor=1.0),  # capacity-padded, tokens dropped
    EquivalenceCase(router="top_k", top_k=2, capacity_factor=1.25),
    EquivalenceCase(idle_rank=True),  # the last rank's experts receive no token
    EquivalenceCase(router="top_k", top_k=2, idle_rank=True),
    EquivalenceCase(idle_rank=True, capacity_factor=1.0),
    EquivalenceCase(router="top_k", top_k=2, uneven=True),  # ranks hold different numbers of tokens
    EquivalenceCase(router="mixtral", top_k=2, num_shared_experts=1, shared_expert_gate=True),  # lesson 10's options
    EquivalenceCase(router="sigmoid", top_k=2, num_shared_experts=2, capacity_factor=1.0),
]
CASES_4 = [CASES[0], CASES[1], CASES[3], CASES[4]]


@pytest.fixture(scope="module")
def two_ranks() -> list[list[dict]]:
    return run_on_processes(compare_with_one_process, 2, CASES, timeout=180)


@pytest.fixture(scope="module")
def four_ranks() -> list[list[dict]]:
    return run_on_processes(compare_with_one_process, 4, CASES_4, timeout=240)


def _check_equal(results: list[list[dict]]) -> float:
    worst = 0.0
    for rank_results in results:
        for r in rank_results:
            assert r["expert_grads_present"], f"rank {r['rank']}: an expert has no gradient in {r['case']}"
            assert set(r["max_diff"]) >= {
                "y",
                "dx",
                "router",
                "aux_loss",
                "z_loss",
                "experts.w_in",
                "experts.w_out",
                "experts.b_in",
                "experts.b_out",
            }
            if r["case"]["num_shared_experts"]:
                assert "shared_experts.w_in" in r["max_diff"], f"the shared experts' gradients were not compared in {r['case']}"
            if r["case"]["shared_expert_gate"]:
                assert "w_shared_gate" in r["max_diff"]
            for name, value in r["max_diff"].items():
                assert value < TOLERANCE, f"rank {r['rank']}, {name} differs by {value:.2e} in {r['case']}"
                worst = max(worst, value)
    return worst


@pytest.mark.timeout(300)
def test_two_processes_equal_one_process_in_outputs_and_every_gradient(two_ranks):
    assert len(two_ranks) == 2 and all(len(r) == len(CASES) for r in two_ranks)
    print(f"\nW=2: largest difference {_check_equal(two_ranks):.2e}")


@pytest.mark.timeout(300)
def test_four_processes_equal_one_process_in_outputs_and_every_gradient(four_ranks):
    assert [r[0]["rank"] for r in four_ranks] == [0, 1, 2, 3]
    print(f"\nW=4: largest difference {_check_equal(four_ranks):.2e}")


@pytest.mark.timeout(300)
def test_a_rank_whose_experts_receive_no_token_still_takes_part(two_ranks, four_ranks):
    for results in (two_ranks, four_ranks):
        idle = [r for rank in results for r in rank if r["case"]["idle_rank"]]
        last = max(r["rank"] for r in idle)
        assert idle and all(r["received_rows"] == 0 for r in idle if r["rank"] == last and r["case"]["capacity_factor"] is None)
        assert all(r["sent_tokens"][last] == 0 for r in idle)  # nobody sends it a token
        assert all(r["expert_grads_present"] for r in idle)  # its experts get zero gradients, not None


@pytest.mark.timeout(300)
def test_capacity_padded_drops_what_one_process_drops(two_ranks):
    padded = [r for rank in two_ranks for r in rank if r["case"]["capacity_factor"] is not None]
    assert all(r["dropped"] == r["dropped_reference"] for r in padded)
    assert sum(r["dropped"] for r in padded) > 0  # the check is not vacuous


@pytest.mark.timeout(120)
def test_errors_are_clear_and_a_missed_exchange_fails_within_seconds():
    wait = 2.0
    seen = run_on_processes(failure_messages, 2, wait, timeout=90)
    for rank_seen in seen:
        assert "cannot be shared evenly by 2 processes" in rank_seen["indivisible"]
        assert "disagree on the MoEConfig" in rank_seen["mismatched_config"] and "d_ff=32" in rank_seen["mismatched_config"]
    assert "another rank did not take part in time" in seen[0]["missed_exchange"]
    assert wait - 0.5 < seen[0]["missed_exchange_seconds"] < wait + 10  # the group's timeout, not 30 minutes
    print(f"\nmissed exchange failed after {seen[0]['missed_exchange_seconds']:.1f} s (timeout {wait} s)")


@pytest.mark.timeout(300)
def test_clinic_training_on_two_processes_equals_one_process_and_records_the_traffic():
    moe = MoEConfig(d_model=16, d_ff=32, num_experts=4)  # dropless
    cfg = TrainConfig(steps=12, batch_size=64, eval_every=4, lr=3e-3)
    data = {"num_specialties": 4, "n_train": 512, "n_val": 256}
    results = run_on_processes(record_traffic, 2, moe, cfg, data, timeout=180)

    clinic = make_clinic(**data)
    seed_everything(cfg.seed)
    one = train(ClinicMoE(clinic.d_in, clinic.num_diagnoses, moe), ClassificationTask.from_clinic(clinic), cfg, progress=False)
    for r in results:
        for column in ("train_loss", "val_loss", "val_acc"):
            diff = (r["history"][column] - one.history[column]).abs().max()
            assert diff < 1e-4, f"rank {r['rank']}: {column} differs from one process by {diff:.2e}"

    table = traffic_table(results)
    sent = exchange_matrices(table)  # (steps, layers, W, W)
    assert sent.shape == (12, 1, 2, 2)
    assert (sent.sum(-1) == 32).all()  # dropless top-1: each rank sends each of its 32 patients once
    load = torch.tensor(table[table.src == 0].sort_values(["step", "dst"])["load"].to_numpy()).view(12, 2)
    assert torch.equal(load, sent.sum(2)[:, 0])  # what a rank's experts get = the column sum of the matrix
    assert (table["exchange_seconds"] > 0).all() and (table["expert_seconds"] > 0).all()


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


@pytest.mark.timeout(400)
def test_torchrun_trains_the_switch_lm_with_the_loss_curve_of_one_process(tmp_path):
    from moe_course.training.cli import main as train_one

    args = [
        "--model",
        "switch",
        "--experts",
        "4",
        "--capacity-factor",
        "none",
        "--d-model",
        "16",
        "--d-ff",
        "32",
        "--layers",
        "2",
        "--heads",
        "2",
        "--context",
        "16",
        "--batch-size",
        "8",
        "--eval-rows",
        "8",
        "--facts",
        "20",
        "--quiet",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--warmup",
        "2",
        "--steps",
        "8",
        "--eval-every",
        "1",
    ]
    assert train_one([*args, "--out", str(tmp_path / "one")]) == 0
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(_repo_root()), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "moe_course.train",
        *args,
        "--timeout",
        "60",
        "--out",
        str(tmp_path / "ep"),
    ]  # the command
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the ranks it started
        proc.communicate()
        raise
    assert proc.returncode == 0, output
    one, ep = (pd.read_csv(tmp_path / d / "metrics.csv") for d in ("one", "ep"))
    assert one["step"].tolist() == ep["step"].tolist() == list(range(1, 9))
    diff = {c: (one[c] - ep[c]).abs().max() for c in ("train_loss", "router_loss", "val_loss")}
    assert all(d < 1e-4 for d in diff.values()), diff
    print("\ntorchrun vs one process, max |difference| per step: " + ", ".join(f"{k} {v:.1e}" for k, v in diff.items()))

    from moe_course.training.cli import load_run

    a, _, _ = load_run(tmp_path / "one")
    b, _, saved = load_run(tmp_path / "ep")  # every expert gathered into one checkpoint
    assert saved["distributed"]["world_size"] == 2
    assert max((a.state_dict()[k] - v).abs().max().item() for k, v in b.state_dict().items()) < 1e-4


@pytest.mark.timeout(120)
def test_imbalance_timings_steer_the_share_of_tokens_to_rank_0():
    from moe_course.distributed.traffic import imbalance_timings

    rows = run_on_processes(
        imbalance_timings, 2, [0.5, 1.0], timeout=90, kwargs=dict(tokens_per_rank=64, d_model=16, d_ff=16, repeats=1)
    )
    by = {(r["share"], r["rank"]): r for rank in rows for r in rank}
    assert by[0.5, 0]["received"] == by[0.5, 1]["received"] == 64  # balanced: each rank gets its share
    assert by[1.0, 0]["received"] == 128 and by[1.0, 1]["received"] == 0  # everything to rank 0's experts
    assert by[1.0, 0]["load"] == [128, 0]
    assert all(r["step_seconds"] > 0 and r["cpu_seconds"] >= 0 for r in by.values())


@pytest.mark.timeout(180)
def test_a_capacity_padded_switch_lm_trains_and_evaluates_on_two_processes():
    """The evaluation judges a sharded, capacity-padded model without dropping (it used to rebuild a full GPT and crash)."""
    from moe_course.data.corpus import Corpus, CorpusConfig
    from moe_course.transformer import GPTConfig

    corpus_cfg = CorpusConfig(num_facts=20)
    cfg = GPTConfig(
        vocab_size=Corpus(corpus_cfg).vocab_size,
        block_size=16,
        d_model=16,
        n_layers=2,
        n_heads=2,
        d_ff=16,
        ffn="switch",
        num_experts=4,
        moe_every=2,
        capacity_factor=1.0,
    )
    results = run_on_processes(
        record_traffic,
        2,
        cfg,
        TrainConfig(steps=2, batch_size=8, eval_every=2),
        corpus_cfg,
        kwargs=dict(eval_rows=8),
        timeout=150,
    )
    history = results[0]["history"]
    assert {"val_loss", "val_dropped"} <= set(history.columns) and history["val_loss"].notna().all()
    table = traffic_table(results)
    assert (table["rows"] == table["rows"].iloc[0]).all()  # padded: every (rank, rank) block the same size, full or empty
    assert (table["tokens"] <= table["rows"]).all()
