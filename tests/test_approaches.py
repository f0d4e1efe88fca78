from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from moe_course.data.clinic import make_clinic
from moe_course.experiments.approaches import (
    APPROACHES,
    CARDIOLOGISTS,
    DENSE,
    GATED,
    GENERALIST,
    ORACLE,
    TOP_1,
    TOP_2,
    four_approaches,
    measure_flops_per_example,
    median_seed,
    paired_difference,
)
from moe_course.experts import FeedForward
from moe_course.flops import matmul_flops
from moe_course.mixture import dense_mixture_flops, routed_mixture_flops
from moe_course.training import TrainConfig


def test_measure_flops_per_example_counts_matmuls_per_row():
    model = FeedForward(6, 10, d_out=3)
    x = torch.randn(7, 6)
    assert measure_flops_per_example(model, x) == matmul_flops(1, 6, 10) + matmul_flops(1, 10, 3)
    with pytest.raises(ValueError, match="non-empty batch"):
        measure_flops_per_example(model, torch.randn(0, 6))


CONFIG = TrainConfig(steps=20, batch_size=32, lr=1e-2, eval_every=20)


@pytest.fixture(scope="module")
def tiny():
    clinic = make_clinic(2, n_train=256, n_val=128, seed=0)
    return clinic, four_approaches(clinic, CONFIG, num_experts=2, d_ff=4, seeds=(0, 1), track_every=10, workers=1, progress=False)


def test_four_approaches_measures_every_approach_for_every_seed(tiny):
    clinic, result = tiny
    table = result.table
    assert list(table["approach"].unique()) == [*APPROACHES, ORACLE]
    assert len(table) == 2 * 6
    assert table["held-out accuracy"].between(0, 1).all()
    assert set(result.models) == {(a, s) for a in [*APPROACHES, ORACLE] for s in (0, 1)}
    gated = table["approach"].isin(GATED)
    assert table.loc[gated, "specialisation"].between(0, 1).all() and table.loc[~gated, "specialisation"].isna().all()
    assert table.loc[gated, "context share"].between(0, 1).all()


def test_accuracy_per_specialty_averages_to_the_overall_accuracy(tiny):
    clinic, result = tiny
    columns = [f"accuracy: {name}" for name in clinic.specialties]
    counts = torch.bincount(clinic.val.specialty, minlength=2).double()
    weighted = (result.table[columns].to_numpy() * (counts / counts.sum()).numpy()).sum(1)
    assert weighted == pytest.approx(result.table["held-out accuracy"].to_numpy(), abs=1e-6)
    assert list(result.by_specialty().columns) == list(clinic.specialties)


def test_the_second_cardiologists_learn_cardiology_only(tiny):
    clinic, result = tiny
    ensemble = result.models[(CARDIOLOGISTS, 0)]
    assert len(ensemble.members) == 2  # E doctors of F units: the budget of the others
    # every member trained on cardiology patients only: its training history is judged on cardiology's held-out patients
    cardiology = clinic.val.of_specialty(0)
    with torch.no_grad():
        member_acc = (ensemble.members[0](cardiology.x).argmax(-1) == cardiology.diagnosis).float().mean().item()
    assert ensemble.histories[0]["val_acc"].iloc[-1] == pytest.approx(member_acc)


def test_four_approaches_budget_is_matched_and_flops_are_what_each_visit_costs(tiny):
    clinic, result = tiny
    d, c = clinic.d_in, clinic.num_diagnoses
    first = result.table[result.table["seed"] == 0].set_index("approach")
    params = first["parameters"]
    assert (
        params.max() / params.min() < 1.25
    )  # the same hidden units; the gate (a big part at this tiny size) and output layers differ
    assert params[CARDIOLOGISTS] == params[ORACLE]  # E doctors of F units, whoever taught them
    flops = first["FLOPs per patient"]
    one = matmul_flops(1, d, 4) + matmul_flops(1, 4, c)
    assert flops[CARDIOLOGISTS] == flops[GENERALIST] == 2 * one  # ensemble of 2, or one MLP twice as wide
    assert flops[DENSE] == dense_mixture_flops(1, d, 4, c, 2)
    assert flops[TOP_1] == routed_mixture_flops(1, d, 4, c, 2, 1)
    assert flops[TOP_2] == routed_mixture_flops(1, d, 4, c, 2, 2)
    assert flops[ORACLE] == one  # the perfect GP is free: one specialist per patient


def test_gated_models_are_watched_while_they_train(tiny):
    _, result = tiny
    hist = result.histories
    assert set(hist["approach"]) == set(GATED)
    for (approach, seed), rows in hist.groupby(["approach", "seed"]):
        assert rows["step"].tolist() == [0, 10, 20]
        final = result.table.set_index(["approach", "seed"]).loc[(approach, seed)]
        assert rows["score"].iloc[-1] == pytest.approx(final["specialisation"])
        assert rows["context_share"].iloc[-1] == pytest.approx(final["context share"])
        assert result.counts[(approach, seed)].shape == (3, 2, 2)  # (evaluations, S, E)


@pytest.mark.slow  # spawns worker processes
def test_the_numbers_do_not_depend_on_the_number_of_workers(tiny):
    clinic, result = tiny
    again = four_approaches(clinic, CONFIG, num_experts=2, d_ff=4, seeds=(1,), track_every=10, workers=2, progress=False)
    mine = result.table[result.table["seed"] == 1].reset_index(drop=True)
    pd.testing.assert_frame_equal(again.table, mine)


def test_four_approaches_summary_gives_mean_and_spread_per_approach(tiny):
    _, result = tiny
    summary = result.summary()
    assert list(summary.index) == [*APPROACHES, ORACLE]
    assert (summary["seeds"] == 2).all()
    assert (summary["accuracy (worst seed)"] <= summary["accuracy (mean)"] + 1e-12).all()
    assert (summary["accuracy (mean)"] <= summary["accuracy (best seed)"] + 1e-12).all()
    acc = result.pivot("held-out accuracy")
    assert summary["accuracy (std)"].to_numpy() == pytest.approx(acc.std().to_numpy())
    assert summary.loc[list(GATED), "specialisation (mean)"].notna().all()
    assert summary.loc[[CARDIOLOGISTS, GENERALIST, ORACLE], "specialisation (mean)"].isna().all()


def test_median_seed_is_the_lower_middle_value_with_ties_to_the_smaller_seed():
    assert median_seed(pd.Series({0: 0.9, 1: 0.1, 2: 0.5})) == 2
    assert median_seed(pd.Series({0: 0.9, 1: 0.1, 2: 0.5, 3: 0.7})) == 2  # the lower of 0.5 and 0.7
    assert median_seed(pd.Series({5: 0.3, 4: 0.3})) == 4
    with pytest.raises(ValueError, match="at least one"):
        median_seed(pd.Series([], dtype=float))
    with pytest.raises(ValueError, match="NaN"):
        median_seed(pd.Series({0: math.nan}))


def test_four_approaches_rejects_bad_settings():
    clinic = make_clinic(2, n_train=64, n_val=32, seed=0)
    with pytest.raises(ValueError, match="at least one seed"):
        four_approaches(clinic, TrainConfig(steps=1), seeds=())
    with pytest.raises(ValueError, match="seeds must differ"):
        four_approaches(clinic, TrainConfig(steps=1), seeds=(1, 1))
    with pytest.raises(ValueError, match="num_experts must be a positive int"):
        four_approaches(clinic, TrainConfig(steps=1), num_experts=0)
    with pytest.raises(ValueError, match="at least 2"):
        four_approaches(clinic, TrainConfig(steps=1), num_experts=1)
    with pytest.raises(ValueError, match="home_specialty"):
        four_approaches(clinic, TrainConfig(steps=1), home_specialty=2)


def test_report_writes_mean_and_spread_as_text(tiny):
    _, result = tiny
    report = result.report()
    summary = result.summary()
    row = report.loc[TOP_1, "held-out accuracy (mean ± std)"]
    assert row == f"{summary.loc[TOP_1, 'accuracy (mean)']:.1%} ± {summary.loc[TOP_1, 'accuracy (std)']:.1%}"
    assert report.loc[GENERALIST, "specialisation (mean ± std)"] == "–"


def test_seed_report_reads_the_histories_of_one_gated_approach(tiny):
    _, result = tiny
    report = result.seed_report(TOP_1, early_step=10)
    assert list(report.index) == [0, 1]
    hist = result.histories[(result.histories["approach"] == TOP_1) & (result.histories["seed"] == 1)].set_index("step")
    assert report.loc[1, "specialisation: end"] == pytest.approx(hist["score"].iloc[-1])
    assert report.loc[1, "change in the second half"] == pytest.approx(hist.loc[20, "score"] - hist.loc[10, "score"])
    assert report.loc[1, "context share: start"] == pytest.approx(hist.loc[0, "context_share"])
    assert report["doctors in use: step 10"].between(1, 2).all()  # two experts: between one and two in use
    with pytest.raises(ValueError, match="gated"):
        result.seed_report(GENERALIST)
    with pytest.raises(ValueError, match="not recorded"):
        result.seed_report(TOP_1, early_step=7)


def test_paired_difference_compares_seed_by_seed():
    table = pd.DataFrame(
        {
            "approach": ["a"] * 4 + ["b"] * 4,
            "seed": [0, 1, 2, 3] * 2,
            "held-out accuracy": [0.80, 0.82, 0.84, 0.86, 0.70, 0.73, 0.73, 0.76],
        }
    )
    c = paired_difference(table, "a", "b")
    assert c.mean == pytest.approx(0.10) and c.ahead == 4 and c.seeds == 4
    assert c.std == pytest.approx(pd.Series([0.10, 0.09, 0.11, 0.10]).std())
    assert c.clear and "beyond the spread" in str(c) and "+10.0 points" in str(c)
    noisy = paired_difference(table.assign(**{"held-out accuracy": [0.8, 0.7, 0.9, 0.6, 0.7, 0.8, 0.6, 0.9]}), "a", "b")
    assert not noisy.clear and "within the spread" in str(noisy) and noisy.ahead == 2
    with pytest.raises(ValueError, match="no approach"):
        paired_difference(table, "a", "c")
