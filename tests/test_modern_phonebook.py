"""Tests for moe_course.experiments.modern_phonebook: any MoE layer on lesson 08's phone book, and upcycling there."""

from __future__ import annotations

from dataclasses import replace

import pytest

from moe_course.experiments.modern_phonebook import (
    PhoneBookMoERun,
    phone_book_moe_table,
    run_phone_book_moes,
    train_phone_book_moe,
)
from moe_course.experiments.phonebook import PhoneBookConfig
from moe_course.flops import count_parameters
from moe_course.moe import MoEConfig

BOOK = PhoneBookConfig(task="records", num_records=128, d_model=8, num_wards=4)
SWITCH = MoEConfig(8, 4, 4, capacity_factor=None)


def test_params_and_flops_count_the_layer_and_the_read_out():
    run = PhoneBookMoERun("fine", BOOK, moe=SWITCH.fine_grained(2, 1))
    assert run.params == count_parameters(run.model())
    cfg = run.moe
    assert run.flops_per_patient == 2 * 8 * cfg.num_experts + (cfg.top_k + 1) * 4 * 8 * cfg.d_ff + 2 * 8 * 4
    dense = PhoneBookMoERun("dense", BOOK, d_ff=4)
    assert dense.flops_per_patient == 4 * 8 * 4 + 2 * 8 * 4 and dense.params == 2 * 8 * 4 + 4 + 8 + 8 * 4 + 4


def test_an_upcycled_top_2_layer_starts_exactly_where_the_dense_model_stands():
    run = PhoneBookMoERun("up", BOOK, moe=replace(SWITCH, top_k=2, router="top_k"), dense_steps=20, steps=10, eval_every=5)
    r = train_phone_book_moe(run)
    assert r.start_accuracy == r.dense_accuracy  # renormalised gates: the same function on the first step
    assert list(r.history["step"]) == [5, 10, 15, 20, 25, 30] and len(r.load) == 4
    switch = train_phone_book_moe(replace(run, moe=SWITCH))
    assert switch.dense_accuracy == r.dense_accuracy  # the same dense phase


def test_runs_give_the_same_result_in_workers_and_the_table_has_one_row_each():
    runs = [PhoneBookMoERun("switch", BOOK, moe=SWITCH, steps=10), PhoneBookMoERun("dense", BOOK, d_ff=4, steps=10)]
    here = [train_phone_book_moe(r) for r in runs]
    there = run_phone_book_moes(runs, workers=2)
    assert [a.accuracy for a in here] == [b.accuracy for b in there]
    table = phone_book_moe_table(there)
    assert list(table["label"]) == ["switch", "dense"] and {"parameters", "flops_per_patient", "accuracy"} <= set(table.columns)


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(), "give either moe"),
        (dict(moe=SWITCH, d_ff=4), "give either moe"),
        (dict(moe=replace(SWITCH, capacity_factor=1.0)), "use a dropless layer"),
        (dict(moe=MoEConfig(16, 4, 4, capacity_factor=None)), "d_model=8"),
        (dict(d_ff=4, steps=0), "steps must be a positive int"),
    ],
)
def test_runs_reject_bad_settings(kwargs, words):
    with pytest.raises(ValueError, match=words):
        PhoneBookMoERun("x", BOOK, **kwargs)
