from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_course.analysis.specialisation import (
    SpecialisationTracker,
    context_share,
    effective_experts,
    expert_accuracy_by_specialty,
    gate_mass_by_specialty,
    normalized_mutual_information,
    seen_by_specialty,
    specialisation_score,
    top_expert_counts,
)
from moe_course.data.clinic import make_clinic
from moe_course.experts import FeedForward
from moe_course.mixture import DenseMixture, DenseMixtureConfig
from moe_course.training import ClassificationTask, TrainConfig, train


def test_gate_mass_is_the_mean_weight_per_specialty_with_nan_for_an_empty_one():
    weights = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8]])
    mass = gate_mass_by_specialty(weights, torch.tensor([0, 0, 1]), 3)
    torch.testing.assert_close(mass[:2], torch.tensor([[0.8, 0.2], [0.2, 0.8]]))
    assert torch.isnan(mass[2]).all()


def test_top_expert_counts_tabulates_specialty_against_the_argmax():
    weights = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
    counts = top_expert_counts(weights, torch.tensor([0, 1, 1, 1]), 2)
    assert counts.tolist() == [[1, 0, 0], [1, 1, 1]] and counts.dtype == torch.int64


def test_nmi_extremes_and_a_hand_computed_split():
    assert normalized_mutual_information(torch.eye(4)[[2, 0, 3, 1]] * 25) == pytest.approx(1.0)  # one-to-one
    assert normalized_mutual_information(torch.tensor([[5, 0], [7, 0], [3, 0]])) == pytest.approx(0.0)  # one expert
    assert normalized_mutual_information(torch.outer(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 1.0, 1.0]))) == pytest.approx(
        0.0, abs=1e-12
    )  # independent
    # specialty 0 → expert 0; specialty 1 split evenly over experts 1 and 2:
    # I = H(S) = ln 2, H(X) = 1.5 ln 2, so 2 I / (H(S) + H(X)) = 2 / 2.5
    assert normalized_mutual_information(torch.tensor([[10, 0, 0], [0, 5, 5]])) == pytest.approx(0.8)
    # two specialties sharing one expert is penalised the same way (the transpose)
    assert normalized_mutual_information(torch.tensor([[10, 0], [0, 5], [0, 5]])) == pytest.approx(0.8)


def test_nmi_conventions_and_validation():
    assert normalized_mutual_information(torch.tensor([[7]])) == 1.0
    assert math.isnan(normalized_mutual_information(torch.zeros(2, 3)))
    with pytest.raises(ValueError):
        normalized_mutual_information(torch.tensor([[1, -1]]))
    with pytest.raises(ValueError):
        normalized_mutual_information(torch.ones(3))


def test_specialisation_score_ignores_expert_names_and_handles_idle_experts():
    g = torch.Generator().manual_seed(0)
    specialty = torch.randint(0, 3, (120,), generator=g)
    top = torch.where(torch.rand(120, generator=g) < 0.8, specialty, torch.randint(0, 3, (120,), generator=g))
    weights = F.one_hot(top, 5).float() * 0.6 + 0.08  # experts 3 and 4: never the top expert
    score = specialisation_score(weights, specialty, 3)
    assert 0.0 < score < 1.0
    assert specialisation_score(weights[:, [4, 2, 0, 3, 1]], specialty, 3) == pytest.approx(score)


@pytest.mark.parametrize(
    "weights,specialty,s",
    [
        (torch.rand(4, 3), torch.tensor([0, 1, 2, 3]), 3),  # a specialty id out of range
        (torch.rand(4, 0), torch.tensor([0, 1, 0, 1]), 2),  # no experts
        (torch.rand(4, 3), torch.tensor([0, 1, 0]), 2),  # mismatched N
        (torch.rand(4, 3), torch.tensor([0, 1, 0, 1]), 0),  # no specialties
    ],
)
def test_specialisation_functions_reject_bad_input(weights, specialty, s):
    with pytest.raises(ValueError):
        specialisation_score(weights, specialty, s)
    with pytest.raises(ValueError):
        gate_mass_by_specialty(weights, specialty, s)


def test_expert_accuracy_by_specialty_scores_each_expert_alone():
    logits = torch.zeros(3, 2, 2)
    logits[:, 0, 0] = 1.0  # expert 0 always says diagnosis 0
    logits[:, 1, 1] = 1.0  # expert 1 always says diagnosis 1
    acc = expert_accuracy_by_specialty(logits, torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1]), 2)
    torch.testing.assert_close(acc, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_tracker_records_the_score_at_every_evaluation():
    clinic = make_clinic(num_specialties=2, n_train=300, n_val=100, seed=0)
    torch.manual_seed(0)
    model = DenseMixture(DenseMixtureConfig(clinic.d_in, 8, clinic.num_diagnoses, 3))
    tracker = SpecialisationTracker(clinic.val.x, clinic.val.specialty, 2)
    train(
        model,
        ClassificationTask.from_clinic(clinic),
        TrainConfig(steps=40, eval_every=20),
        device="cpu",
        progress=False,
        callback=tracker,
    )
    assert tracker.history["step"].tolist() == [20, 40]
    assert len(tracker.gate_mass) == 2 and tracker.gate_mass[0].shape == (2, 3)
    with torch.no_grad():
        final = specialisation_score(model(clinic.val.x).router_probs, clinic.val.specialty, 2)
    assert tracker.history["score"].iloc[-1] == pytest.approx(final)
    with pytest.raises(TypeError, match="router_probs"):
        tracker(0, FeedForward(clinic.d_in, 4, d_out=2))


def test_context_share_is_zero_or_one_when_the_gate_reads_one_part_only():
    torch.manual_seed(0)
    x = torch.randn(200, 6)  # 4 measurements, 2 context features
    w = torch.randn(3, 6)
    reads_measurements, reads_context = w.clone(), w.clone()
    reads_measurements[:, 4:] = 0
    reads_context[:, :4] = 0
    assert context_share(reads_measurements, x, 2) == 0.0
    assert context_share(reads_context, x, 2) == 1.0
    assert 0.0 < context_share(w, x, 2) < 1.0


def test_context_share_ignores_what_every_expert_or_every_patient_shares():
    torch.manual_seed(1)
    x = torch.randn(300, 5)
    w = torch.randn(4, 5)
    same_for_every_expert = w.clone()
    same_for_every_expert[:, 3:] = torch.randn(1, 2)  # the context adds one score to every expert alike
    assert context_share(same_for_every_expert, x, 2) == pytest.approx(0.0, abs=1e-12)
    x_shifted = x.clone()
    x_shifted[:, 3:] += 7.0  # a constant context: every patient shifted alike, no routing information
    assert context_share(w, x_shifted, 2) == pytest.approx(context_share(w, x, 2))
    assert math.isnan(context_share(torch.zeros(4, 5), x, 2))


@pytest.mark.parametrize(
    "w, x, d_context",
    [
        (torch.zeros(3, 6), torch.zeros(10, 5), 2),  # widths disagree
        (torch.zeros(3, 6), torch.zeros(10, 6), 0),
        (torch.zeros(3, 6), torch.zeros(10, 6), 6),
        (torch.zeros(6), torch.zeros(10, 6), 2),
    ],
)
def test_context_share_rejects_bad_input(w, x, d_context):
    with pytest.raises(ValueError):
        context_share(w, x, d_context)


def test_tracker_records_counts_and_the_context_share_when_asked():
    clinic = make_clinic(num_specialties=2, n_train=300, n_val=100, seed=0)
    torch.manual_seed(0)
    model = DenseMixture(DenseMixtureConfig(clinic.d_in, 8, clinic.num_diagnoses, 3))
    tracker = SpecialisationTracker(clinic.val.x, clinic.val.specialty, 2, d_context=clinic.d_context)
    train(
        model,
        ClassificationTask.from_clinic(clinic),
        TrainConfig(steps=40, eval_every=20),
        device="cpu",
        progress=False,
        callback=tracker,
    )
    assert list(tracker.history.columns) == ["step", "score", "context_share"]
    assert tracker.history["context_share"].iloc[-1] == pytest.approx(
        context_share(model.gate.proj.weight, clinic.val.x, clinic.d_context)
    )
    assert [c.sum().item() for c in tracker.counts] == [100, 100]
    with torch.no_grad():
        assert torch.equal(tracker.counts[-1], top_expert_counts(model(clinic.val.x).router_probs, clinic.val.specialty, 2))


def test_effective_experts_counts_the_doctors_in_use():
    assert effective_experts(torch.tensor([5, 5, 5, 5])).item() == pytest.approx(4.0)
    assert effective_experts(torch.tensor([0, 9, 0, 0])).item() == pytest.approx(1.0)
    assert effective_experts(torch.tensor([3.0, 3.0, 0.0])).item() == pytest.approx(2.0)
    rows = effective_experts(torch.tensor([[1, 1], [2, 0]]))  # one answer per row
    assert rows.tolist() == pytest.approx([2.0, 1.0])
    skewed = effective_experts(torch.tensor([8, 1, 1])).item()
    assert 1.0 < skewed < 2.0
    for bad in (torch.tensor([-1, 2]), torch.tensor([0, 0]), torch.zeros(0)):
        with pytest.raises(ValueError):
            effective_experts(bad)


def test_seen_by_specialty_counts_every_choice_of_a_patient():
    expert_index = torch.tensor([[0, 1], [0, 2], [1, 2], [2, 0]])  # (N, K): four patients, two doctors each
    specialty = torch.tensor([0, 0, 1, 1])
    seen = seen_by_specialty(expert_index, specialty, 3, 3)
    assert seen[:2].tolist() == [[1.0, 0.5, 0.5], [0.5, 0.5, 1.0]]
    assert seen[:2].sum(1).tolist() == [2.0, 2.0]  # each patient sees K = 2 doctors
    assert torch.isnan(seen[2]).all()  # a specialty without patients
    with pytest.raises(ValueError, match="expert ids"):
        seen_by_specialty(expert_index, specialty, 2, 2)
    with pytest.raises(ValueError, match="expected expert_index"):
        seen_by_specialty(expert_index[:, 0], specialty, 2, 3)
