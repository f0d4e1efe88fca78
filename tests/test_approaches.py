from __future__ import annotations

import pytest
import torch

from moe_course.approaches import APPROACHES, ORACLE, four_approaches, measure_flops_per_example
from moe_course.clinic import make_clinic
from moe_course.experts import FeedForward
from moe_course.flops import matmul_flops
from moe_course.mixture import dense_mixture_flops
from moe_course.routed import routed_mixture_flops
from moe_course.training import TrainConfig


def test_measure_flops_per_example_counts_matmuls_per_row():
    model = FeedForward(6, 10, d_out=3)
    x = torch.randn(7, 6)
    assert measure_flops_per_example(model, x) == matmul_flops(1, 6, 10) + matmul_flops(1, 10, 3)
    with pytest.raises(ValueError, match="non-empty batch"):
        measure_flops_per_example(model, torch.randn(0, 6))


@pytest.fixture(scope="module")
def tiny():
    clinic = make_clinic(2, n_train=256, n_val=128, seed=0)
    config = TrainConfig(steps=20, batch_size=32, lr=1e-2, eval_every=20)
    return clinic, four_approaches(clinic, config, num_experts=2, d_ff=4, seeds=(0, 1), progress=False)


def test_four_approaches_measures_every_approach_for_every_seed(tiny):
    clinic, result = tiny
    table = result.table
    assert list(table["approach"].unique()) == [*APPROACHES, ORACLE]
    assert len(table) == 2 * 5
    assert table["held-out accuracy"].between(0, 1).all()
    assert set(result.models) == {*APPROACHES, ORACLE}


def test_four_approaches_budget_is_matched_and_flops_are_what_each_visit_costs(tiny):
    clinic, result = tiny
    d, c = clinic.d_in, clinic.num_diagnoses
    first = result.table[result.table["seed"] == 0].set_index("approach")
    params = first["parameters"]
    assert params.max() / params.min() < 1.25  # the same hidden units; the gate (a big part at this tiny size) and output layers differ
    flops = first["FLOPs per patient"]
    one = matmul_flops(1, d, 4) + matmul_flops(1, 4, c)
    assert flops[APPROACHES[0]] == flops[APPROACHES[1]] == 2 * one  # ensemble of 2, or one MLP twice as wide
    assert flops[APPROACHES[2]] == dense_mixture_flops(1, d, 4, c, 2)
    assert flops[APPROACHES[3]] == routed_mixture_flops(1, d, 4, c, 2, 1)
    assert flops[ORACLE] == one  # the perfect GP is free: one specialist per patient


def test_four_approaches_summary_has_one_row_per_approach(tiny):
    _, result = tiny
    summary = result.summary()
    assert list(summary.index) == [*APPROACHES, ORACLE]
    assert (summary["seeds"] == 2).all()
    assert (summary["accuracy (worst seed)"] <= summary["accuracy (mean)"] + 1e-12).all()
    assert (summary["accuracy (mean)"] <= summary["accuracy (best seed)"] + 1e-12).all()


def test_four_approaches_rejects_bad_settings():
    clinic = make_clinic(2, n_train=64, n_val=32, seed=0)
    with pytest.raises(ValueError, match="at least one seed"):
        four_approaches(clinic, TrainConfig(steps=1), seeds=())
    with pytest.raises(ValueError, match="num_experts must be a positive int"):
        four_approaches(clinic, TrainConfig(steps=1), num_experts=0)
