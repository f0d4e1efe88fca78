"""Tests for moe_course.experiments.phonebook: the one-layer phone book (records to memorise, a rule to learn)."""

from __future__ import annotations

import math

import pytest
import torch

from moe_course.experiments.phonebook import (
    PhoneBookConfig,
    PhoneBookModel,
    PhoneBookRun,
    make_phone_book,
    phone_book_flops,
    phone_book_params,
    phone_book_table,
    rule_wards,
    run_phone_books,
    train_phone_book,
)
from moe_course.flops import count_parameters

SMALL = PhoneBookConfig(num_records=192, d_model=16)


def test_books_are_seeded_and_records_are_random():
    a, b, c = make_phone_book(SMALL, 0), make_phone_book(SMALL, 0), make_phone_book(SMALL, 1)
    assert torch.equal(a.keys, b.keys) and torch.equal(a.wards, b.wards)
    assert not torch.equal(a.keys, c.keys)
    assert a.keys.shape == (192, 16) and a.wards.shape == (192,) and a.directions is None
    assert torch.equal(a.test_keys, a.keys)  # records are judged on the table itself
    assert int(a.wards.min()) >= 0 and int(a.wards.max()) < 16
    keys, wards = a.batch(torch.Generator().manual_seed(0))
    assert keys is a.keys and wards is a.wards  # every step sees the whole table
    assert SMALL.bits == 192 * 4


def test_the_rule_is_a_fair_function_of_the_key_and_brings_new_patients():
    book = make_phone_book(PhoneBookConfig(task="rule", num_records=64, d_model=16, held_out=4000), 3)
    assert book.directions.shape == (16, 4)
    assert torch.equal(book.test_wards, rule_wards(book.test_keys, book.directions))
    counts = torch.bincount(book.test_wards, minlength=16).double() / 4000
    assert counts.min() > 0.03 and counts.max() < 0.10  # every ward about 1/16: each bit is a fair coin
    g = torch.Generator().manual_seed(0)
    (k1, w1), (k2, _) = book.batch(g), book.batch(g)
    assert k1.shape == (64, 16) and not torch.equal(k1, k2)  # new patients every step
    assert torch.equal(w1, rule_wards(k1, book.directions))
    # the rule by hand: bit j is |u_j·x| > 0.6745·|u_j|
    x = torch.zeros(2, 16)
    u = torch.zeros(16, 2)
    u[0, 0], u[1, 1] = 1.0, 2.0
    x[0, 0], x[1, 1] = -1.0, 1.0  # row 0: |x·u_0| = 1 > 0.67 (bit 0); row 1: |x·u_1| = 2 > 1.35 (bit 1)
    assert rule_wards(x, u).tolist() == [1, 2]
    with pytest.raises(ValueError, match="keys"):
        rule_wards(torch.zeros(3, 5), u)


@pytest.mark.parametrize("E,F", [(1, 8), (4, 8), (8, 4)])
def test_params_and_flops_by_formula(E, F):
    model = PhoneBookModel(16, F, E, 16)
    assert count_parameters(model) == phone_book_params(16, F, E, 16)
    dense = phone_book_flops(16, F, 1, 16)
    assert phone_book_flops(16, F, E, 16) == dense + (2 * 16 * E if E > 1 else 0)  # the same FLOPs but the router's
    assert phone_book_params(16, F * E, 1, 16) == phone_book_params(16, F, E, 16) - (16 * E if E > 1 else 0) - (E - 1) * 16


def test_model_outputs_dense_and_switch():
    torch.manual_seed(0)
    x = torch.randn(10, 16)
    dense = PhoneBookModel(16, 8, 1, 5)(x)
    assert dense.logits.shape == (10, 5) and dense.expert_index is None and float(dense.router_loss) == 0.0
    switch = PhoneBookModel(16, 8, 4, 5)(x)
    assert switch.logits.shape == (10, 5) and switch.expert_index.shape == (10,)
    assert 0 <= int(switch.expert_index.min()) and int(switch.expert_index.max()) < 4
    assert switch.router_loss.requires_grad and float(switch.router_loss.detach()) > 0


def test_switch_layer_recalls_more_records_than_its_flops_matched_dense_layer():
    book = PhoneBookConfig(num_records=512, d_model=16)
    dense = train_phone_book(PhoneBookRun("dense", book, d_ff=4, num_experts=1, steps=150))
    switch = train_phone_book(PhoneBookRun("switch", book, d_ff=4, num_experts=8, steps=150))
    assert dense.accuracy < 0.5 < switch.accuracy - 0.2, (dense.accuracy, switch.accuracy)
    assert switch.loss < dense.loss
    assert sum(switch.expert_load) == 512 and len(switch.expert_load) == 8 and dense.expert_load == (512,)
    assert list(switch.history.columns) == ["step", "accuracy", "loss"] and switch.history["step"].iloc[-1] == 150
    assert switch.history["accuracy"].iloc[-1] == switch.accuracy


def test_a_run_is_reproducible_and_the_same_in_a_worker_process():
    runs = [PhoneBookRun("switch", SMALL, d_ff=4, num_experts=4, steps=20, seed=s) for s in (0, 1)]
    here = [train_phone_book(r) for r in runs]
    again = train_phone_book(runs[0])
    assert again.accuracy == here[0].accuracy and again.loss == here[0].loss
    assert here[0].loss != here[1].loss  # another seed, another book
    workers = run_phone_books(runs, workers=2, progress=False)
    assert [r.run for r in workers] == runs
    assert [(r.accuracy, r.loss, r.expert_load) for r in workers] == [(r.accuracy, r.loss, r.expert_load) for r in here]
    table = phone_book_table(workers)
    assert list(table["seed"]) == [0, 1] and set(table.columns) >= {
        "label",
        "task",
        "experts",
        "parameters",
        "flops_per_patient",
        "accuracy",
        "loss",
    }


def test_train_phone_book_leaves_the_thread_count_as_it_found_it():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train_phone_book(PhoneBookRun("dense", SMALL, steps=2))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"task": "facts"}, "task must be one of"),
        ({"num_records": 0}, "num_records"),
        ({"num_wards": 1}, "at least 2"),
        ({"task": "rule", "num_wards": 12}, "power of 2"),
        ({"d_model": 2.5}, "d_model"),
    ],
)
def test_bad_books_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        PhoneBookConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"label": ""}, "label"),
        ({"d_ff": 0}, "d_ff"),
        ({"num_experts": -1}, "num_experts"),
        ({"seed": -2}, "seed"),
        ({"lr": 0.0}, "lr"),
        ({"lr": math.nan}, "lr"),
        ({"steps": 1.5}, "steps"),
    ],
)
def test_bad_runs_are_refused(kwargs, words):
    base = dict(label="dense", book=SMALL)
    base.update(kwargs)
    with pytest.raises(ValueError, match=words):
        PhoneBookRun(**base)
    with pytest.raises(TypeError, match="PhoneBookConfig"):
        PhoneBookRun("dense", book={"num_records": 10})
    with pytest.raises(TypeError, match="PhoneBookRun"):
        run_phone_books(["dense"])
