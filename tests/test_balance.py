from __future__ import annotations

import pytest
import torch

from moe_course.analysis.load import LoadTracker, batch_loads, evaluate_capacity, load_stats, overflow_share
from moe_course.data.clinic import make_clinic
from moe_course.experiments.balance import ClinicRun, capacity_sweep, run_clinic_moes
from moe_course.mixture import RoutedMixture, RoutedMixtureConfig
from moe_course.models import ClinicMoE
from moe_course.moe import MoEConfig
from moe_course.training import ClassificationTask, TrainConfig, train


@pytest.fixture(scope="module")
def clinic():
    return make_clinic(2, n_train=256, n_val=96, seed=0)


def test_load_stats_of_even_and_collapsed_loads():
    even = load_stats(torch.full((4,), 0.25))
    assert even == {"busiest share": 0.25, "idle doctors": 0, "load CV": 0.0}
    collapsed = load_stats(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert collapsed["busiest share"] == 1.0 and collapsed["idle doctors"] == 3
    assert collapsed["load CV"] == pytest.approx(3**0.5)
    assert load_stats(torch.tensor([0.5, 0.45, 0.05]))["idle doctors"] == 1  # below a quarter of 1/3
    with pytest.raises(ValueError, match="non-empty vector"):
        load_stats(torch.zeros(2, 2))


def test_load_tracker_and_evaluate_capacity_read_clinicmoe_and_routed_mixture(clinic):
    torch.manual_seed(0)
    moe = ClinicMoE(clinic.d_in, 4, MoEConfig(d_model=8, d_ff=8, num_experts=3, capacity_factor=0.5))
    assert evaluate_capacity(moe, clinic.val, 96)["dropped share"] > 0  # capacity 0.5 must drop someone
    routed = RoutedMixture(RoutedMixtureConfig(clinic.d_in, 8, 4, 3))
    assert evaluate_capacity(routed, clinic.val, 96)["dropped share"] == 0.0
    for model in (moe, routed):
        tracker = LoadTracker(clinic.val.x)
        tracker(0, model)
        torch.testing.assert_close(tracker.shares[0].sum(), torch.tensor(1.0))
        assert tracker.shares[0].shape == (3,)
    with pytest.raises(TypeError, match="carries no routing"):
        LoadTracker(clinic.val.x)(0, torch.nn.Linear(clinic.d_in, 4))


def test_load_tracker_records_every_evaluation(clinic):
    torch.manual_seed(0)
    model = ClinicMoE(clinic.d_in, 4, MoEConfig(d_model=8, d_ff=8, num_experts=3))
    tracker = LoadTracker(clinic.val.x)
    tracker(0, model)
    train(
        model,
        ClassificationTask.from_clinic(clinic),
        TrainConfig(steps=20, batch_size=32, eval_every=10),
        device="cpu",
        progress=False,
        callback=tracker,
    )
    history = tracker.history
    assert list(history["step"]) == [0, 10, 20]
    assert {"balance loss", "z-loss", "largest |logit|", "busiest share", "idle doctors", "load CV"} <= set(history.columns)
    assert len(tracker.shares) == 3 and tracker.shares[0].shape == (3,)
    assert history["balance loss"].between(0.0, 3.0).all()  # E·Σ f·P lies in [0, E]


def test_evaluate_capacity_counts_dropped_patients_per_batch(clinic):
    torch.manual_seed(0)
    dropless = ClinicMoE(clinic.d_in, 4, MoEConfig(d_model=8, d_ff=8, num_experts=4))
    assert evaluate_capacity(dropless, clinic.val, 32)["dropped share"] == 0.0
    tight = ClinicMoE(clinic.d_in, 4, MoEConfig(d_model=8, d_ff=8, num_experts=4, capacity_factor=0.25))
    tight.load_state_dict(dropless.state_dict())
    result = evaluate_capacity(tight, clinic.val, 32)
    assert result["dropped share"] >= 0.75 - 1e-9  # at most 4 experts × 2 chairs of every 32 patients get in
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        evaluate_capacity(tight, clinic.val, 0)


def test_capacity_sweep_trains_one_model_per_factor(clinic):
    base = MoEConfig(d_model=8, d_ff=8, num_experts=4)
    table, models = capacity_sweep(
        clinic, base, TrainConfig(steps=10, batch_size=32, eval_every=10), [0.5, 2.0, None], progress=False
    )
    assert list(table["slots per expert"].fillna(-1)) == [4, 16, -1]
    assert table["dropped share"].iloc[0] > table["dropped share"].iloc[1] >= table["dropped share"].iloc[2] == 0.0
    assert set(models) == {0.5, 2.0, None} and models[0.5].moe.config.capacity_factor == 0.5


@pytest.mark.slow  # spawns worker processes
def test_run_clinic_moes_gives_the_same_models_in_workers_as_in_process(clinic):
    runs = [ClinicRun("plain", MoEConfig(d_model=8, d_ff=8, num_experts=3), seed=s) for s in (0, 1)]
    config = TrainConfig(steps=12, batch_size=32, eval_every=6)
    here = run_clinic_moes(clinic, runs, config, workers=1, progress=False)
    there = run_clinic_moes(clinic, runs, config, workers=2, progress=False)
    for a, b in zip(here, there):
        assert a.run == b.run and a.accuracy == b.accuracy
        for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
            assert torch.equal(p, q), f"{name} differs between a worker process and this process"
        assert [row["step"] for row in a.tracker.rows] == [0, 6, 12]
    assert not torch.equal(here[0].model.embed.weight, here[1].model.embed.weight)  # the seed matters


def test_run_clinic_moes_rejects_bad_input(clinic):
    with pytest.raises(ValueError, match="at least one"):
        run_clinic_moes(clinic, [], TrainConfig())
    with pytest.raises(TypeError, match="ClinicRun"):
        run_clinic_moes(clinic, [MoEConfig(d_model=8, d_ff=8, num_experts=3)], TrainConfig())
    with pytest.raises(ValueError, match="seed"):
        ClinicRun("x", MoEConfig(d_model=8, d_ff=8, num_experts=3), seed=-1)


def test_overflow_share_counts_the_assignments_beyond_capacity():
    loads = torch.tensor([[6, 2, 0], [3, 3, 2]])  # two batches of 8, three experts
    assert overflow_share(loads, 3) == pytest.approx((3 + 0) / 16)
    assert overflow_share(loads, 6) == 0.0
    assert overflow_share(torch.tensor([4.5, 3.5, 0.0]), 2.5) == pytest.approx((1.5 + 0.5) / 8)  # capacity rounds up to 3
    with pytest.raises(ValueError, match="loads must be"):
        overflow_share(torch.zeros(2, 2, 2), 1)


def test_batch_loads_explain_the_dropped_share_exactly():
    clinic = make_clinic(2, n_train=256, n_val=128, seed=0)
    torch.manual_seed(0)
    moe = ClinicMoE(clinic.d_in, 4, MoEConfig(d_model=8, d_ff=8, num_experts=4, capacity_factor=1.0))
    loads = batch_loads(moe, clinic.val, 32)
    assert loads.shape == (4, 4) and (loads.sum(-1) == 32).all()
    dropped = evaluate_capacity(moe, clinic.val, 32)["dropped share"]
    assert dropped > 0  # an untrained router is uneven: the test needs someone turned away
    assert overflow_share(loads, 8) == pytest.approx(dropped)  # C = 32 / 4 · 1.0
    with pytest.raises(ValueError, match="full batch"):
        batch_loads(moe, clinic.val, 1000)
