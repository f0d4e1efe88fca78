"""Tests for moe_course.experiments.modern_balance: lesson 10's balance experiments on the clinic."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moe_course.data.clinic import make_clinic
from moe_course.experiments.modern_balance import (
    BalanceRun,
    balance_loss,
    balance_table,
    clinic_step_batch,
    run_balance,
    train_balance,
)
from moe_course.losses import load_balancing_loss, load_balancing_loss_from_counts
from moe_course.moe import MoEConfig

CLINIC = make_clinic(num_specialties=4, n_train=512, n_val=256, seed=0)
MOE = MoEConfig(8, 8, 4, top_k=2, router="sigmoid", aux_loss_coef=0.0, z_loss_coef=0.0, dispatch="grouped_mm")


def test_by_specialty_batches_are_micro_batches_of_one_specialty_each():
    run = BalanceRun("x", MOE, batches="by_specialty", micro_batches=4, batch_size=32)
    g = torch.Generator().manual_seed(0)
    x, y = clinic_step_batch(CLINIC, run, g)
    assert x.shape == (32, CLINIC.d_in) and y.shape == (32,)
    # find each row's specialty by matching it back to the training set
    rows = torch.cdist(x, CLINIC.train.x).argmin(1)
    specialty = CLINIC.train.specialty[rows].view(4, 8)
    assert (specialty == specialty[:, :1]).all()  # one specialty per micro-batch
    assert len(set(specialty[:, 0].tolist())) == 4  # four different ones


def test_micro_batch_balance_is_the_mean_of_the_per_micro_batch_losses_and_batch_balance_the_global_one():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(32, 4, generator=g), -1)
    index = torch.randint(0, 4, (32, 2), generator=g)
    micro = torch.stack([load_balancing_loss(probs[i : i + 8], index[i : i + 8]) for i in range(0, 32, 8)]).mean()
    torch.testing.assert_close(balance_loss(probs, index, "micro", 8), micro)
    # the global loss: f from the counts summed over the micro-batches, P of each micro-batch, averaged
    counts = torch.bincount(index.reshape(-1), minlength=4)
    accumulated = torch.stack([load_balancing_loss_from_counts(probs[i : i + 8], counts) for i in range(0, 32, 8)]).mean()
    torch.testing.assert_close(balance_loss(probs, index, "batch", 8), accumulated)


def test_a_bias_run_moves_the_bias_and_evens_the_load_in_this_process_and_in_workers():
    runs = [
        BalanceRun("none", MOE, steps=60, eval_every=30),
        BalanceRun("bias", replace(MOE, bias_update_rate=1e-2), steps=60, eval_every=30),
    ]
    here = [train_balance(CLINIC, r) for r in runs]
    assert here[0].expert_bias == [0.0] * 4 and any(b != 0 for b in here[1].expert_bias)
    assert list(here[1].history["step"]) == [0, 30, 60]
    assert 0 <= here[1].specialisation <= 1 and here[1].max_over_mean >= 1 and here[1].seen.shape == (4, 4)
    there = run_balance(CLINIC, runs, workers=2)
    for a, b in zip(here, there):
        assert a.accuracy == b.accuracy and a.expert_bias == b.expert_bias
    table = balance_table(there)
    assert list(table.columns) == ["label", "seed", "accuracy", "specialisation", "max_over_mean", "seconds"]


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(scope="global"), "scope must be one of"),
        (dict(batches="sorted"), "batches must be one of"),
        (dict(batch_size=30, micro_batches=4), "not a multiple of micro_batches=4"),
        (dict(aux=-1.0), "aux must be a number >= 0"),
    ],
)
def test_balance_run_rejects_bad_settings(kwargs, words):
    with pytest.raises(ValueError, match=words):
        BalanceRun("x", MOE, **kwargs)


def test_more_micro_batches_than_specialties_is_refused():
    run = BalanceRun("x", MOE, batches="by_specialty", micro_batches=8, batch_size=64)
    with pytest.raises(ValueError, match="need at least as many specialties; the clinic has 4"):
        clinic_step_batch(CLINIC, run, torch.Generator().manual_seed(0))
