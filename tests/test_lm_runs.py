"""Tests for moe_course.experiments.lm_runs: several LM runs, in this process or in worker processes, with the same results."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from moe_course.data.corpus import Corpus, CorpusConfig
from moe_course.experiments.lm_runs import LMRun, results_table, run_lm, run_lms, seed_verdict, summarise
from moe_course.experiments.workers import run_in_workers
from moe_course.training import TrainConfig
from moe_course.transformer import GPTConfig

CORPUS = CorpusConfig(num_facts=20)
TINY = TrainConfig(steps=4, batch_size=4, eval_every=2, lr=1e-2)


def _config(**kw) -> GPTConfig:
    base = dict(vocab_size=Corpus(CORPUS).vocab_size, block_size=16, d_model=16, n_layers=1, n_heads=2, d_ff=16)
    base.update(kw)
    return GPTConfig(**base)


@pytest.fixture(scope="module")
def runs() -> list[LMRun]:
    dense = _config()
    return [
        LMRun("dense", dense, TINY, seed=0),
        LMRun("dense", dense, TINY, seed=1),
        LMRun("switch E=2", dense.switch_twin(2), TINY, seed=0, track_routing=True),
    ]


@pytest.fixture(scope="module")
def in_process(runs):
    return run_lms(runs, CORPUS, workers=1, eval_rows=8, progress=False)


@pytest.mark.slow  # spawns worker processes
def test_in_process_and_worker_processes_give_identical_runs(runs, in_process):
    in_workers = run_lms(runs, CORPUS, workers=2, eval_rows=8, progress=False)
    assert [r.run for r in in_workers] == runs  # the order of the runs, not of their completion
    for a, b in zip(in_process, in_workers):
        cols = [c for c in a.history.columns if c != "seconds"]
        assert a.history[cols].equals(b.history[cols])
        assert a.state_dict.keys() == b.state_dict.keys()
        assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
        assert a.routing.keys() == b.routing.keys()


def test_seeds_differ_and_a_run_is_reproducible(runs, in_process):
    a, b = in_process[0], in_process[1]
    assert not torch.equal(a.state_dict["tok_emb.weight"], b.state_dict["tok_emb.weight"])
    again = run_lm(runs[0], CORPUS, eval_rows=8)
    assert all(torch.equal(again.state_dict[k], a.state_dict[k]) for k in a.state_dict)


def test_run_lm_leaves_the_thread_count_as_it_found_it(runs):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_lm(runs[0], CORPUS, eval_rows=8)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_rebuilt_model_matches_the_final_evaluation(runs, in_process):
    from moe_course.training.lm import LMTask

    res = in_process[2]
    model = res.model()
    assert not model.training
    task = LMTask(Corpus(CORPUS), block_size=16, eval_rows=8, eval_chunk=TINY.batch_size)
    assert task.evaluation(model, "cpu").loss == pytest.approx(res.final["val_loss"], rel=1e-6)
    assert sorted(res.routing) == [2, 4]  # one routing record per evaluation
    tracker = res.routing_tracker(task)
    assert set(tracker.summary["step"]) == {2, 4}
    shares = tracker.history.groupby(["step", "layer"])["share"].sum()
    assert torch.allclose(torch.tensor(shares.values), torch.ones(len(shares), dtype=torch.float64))


def test_results_table_and_summary(in_process):
    table = results_table(in_process)
    assert list(table["label"]) == ["dense", "dense", "switch E=2"]
    assert list(table["experts"]) == [1, 1, 2]
    assert (table["seconds_per_step"] > 0).all()
    assert table.loc[0, "val_loss"] == pytest.approx(in_process[0].final["val_loss"])
    summary = summarise(table, ["val_loss"])
    assert list(summary.index) == ["dense", "switch E=2"]
    assert summary.loc["dense", ("seeds", "")] == 2
    assert summary.loc["dense", ("val_loss", "mean")] == pytest.approx(table["val_loss"][:2].mean())
    assert summary.loc["dense", ("val_loss", "std")] == pytest.approx(table["val_loss"][:2].std())
    with pytest.raises(ValueError, match="no column"):
        summarise(table, ["val_loss_nonsense"])


def test_bad_runs_are_refused():
    with pytest.raises(TypeError, match="GPTConfig"):
        LMRun("x", "not a config", TINY)
    with pytest.raises(ValueError, match="track_routing needs a Switch model"):
        LMRun("dense", _config(), TINY, track_routing=True)
    with pytest.raises(ValueError, match="seed"):
        LMRun("dense", _config(), TINY, seed=-1)
    with pytest.raises(ValueError, match="at least one"):
        run_lms([], CORPUS)
    with pytest.raises(ValueError, match="workers"):
        run_lms([LMRun("dense", _config(), TINY)], CORPUS, workers=0)


def test_run_in_workers_keeps_the_order_of_the_jobs():
    assert run_in_workers(abs, [-3, 2, -1], workers=1, progress=False) == [3, 2, 1]
    assert run_in_workers(abs, [-3, 2, -1, -7], workers=2, progress=False) == [3, 2, 1, 7]
    assert run_in_workers(abs, [], progress=False) == []
    with pytest.raises(ValueError, match="workers"):
        run_in_workers(abs, [1], workers=0, progress=False)


def test_seed_verdict_needs_every_seed_to_agree():
    table = pd.DataFrame(
        {
            "label": ["dense"] * 3 + ["switch"] * 3,
            "seed": [0, 1, 2] * 2,
            "recall": [0.40, 0.45, 0.42, 0.60, 0.62, 0.58],  # switch ahead on every seed
            "loss": [0.30, 0.35, 0.32, 0.31, 0.29, 0.40],  # seed 1 favours switch, seeds 0 and 2 dense
            "skill": [1.0, 1.1, 1.05, 1.3, 1.2, 1.25],  # dense lower (better) on every seed
            "paired": [0.40, 0.50, 0.60, 0.45, 0.55, 0.65],  # the ranges overlap, but switch wins each seed
        }
    )
    v = seed_verdict(table, "dense", "switch", {"recall": True, "loss": False, "skill": False, "paired": True})
    assert list(v["verdict"]) == ["B better", "within seed noise", "A better", "B better"]
    assert list(v["B won"]) == ["3 of 3", "1 of 3", "0 of 3", "3 of 3"]
    assert list(v["better"]) == ["higher", "lower", "lower", "higher"] and set(v["A"]) == {"dense"} and set(v["B"]) == {"switch"}
    assert v.loc["recall", "B − A"] == pytest.approx(0.60 - 0.42333, abs=1e-4)
    assert v.loc["recall", "A mean ± sd"] == "0.423 ± 0.025" and v.loc["recall", "B range"] == "0.580–0.620"
    # without matching seeds the ranges decide: overlapping ranges are noise
    unpaired = table.assign(seed=[0, 1, 2, 3, 4, 5])
    u = seed_verdict(unpaired, "dense", "switch", {"recall": True, "paired": True})
    assert list(u["verdict"]) == ["B better", "within seed noise"] and set(u["B won"]) == {"unpaired"}
    with pytest.raises(ValueError, match="no column 'nonsense'"):
        seed_verdict(table, "dense", "switch", {"nonsense": True})
    with pytest.raises(ValueError, match="no rows with label == 'moe'"):
        seed_verdict(table, "dense", "moe", {"recall": True})
