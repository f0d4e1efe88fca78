from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_course.clinic import make_clinic
from moe_course.experts import FeedForward
from moe_course.mixture import DenseMixture, DenseMixtureConfig
from moe_course.specialisation import (
    SpecialisationTracker,
    expert_accuracy_by_specialty,
    gate_mass_by_specialty,
    normalized_mutual_information,
    specialisation_score,
    top_expert_counts,
)
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
    assert normalized_mutual_information(torch.outer(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 1.0, 1.0]))) == pytest.approx(0.0, abs=1e-12)  # independent
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


@pytest.mark.parametrize("weights,specialty,s", [
    (torch.rand(4, 3), torch.tensor([0, 1, 2, 3]), 3),   # a specialty id out of range
    (torch.rand(4, 0), torch.tensor([0, 1, 0, 1]), 2),   # no experts
    (torch.rand(4, 3), torch.tensor([0, 1, 0]), 2),      # mismatched N
    (torch.rand(4, 3), torch.tensor([0, 1, 0, 1]), 0),   # no specialties
])
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
    train(model, ClassificationTask.from_clinic(clinic), TrainConfig(steps=40, eval_every=20), device="cpu",
          progress=False, callback=tracker)
    assert tracker.history["step"].tolist() == [20, 40]
    assert len(tracker.gate_mass) == 2 and tracker.gate_mass[0].shape == (2, 3)
    with torch.no_grad():
        final = specialisation_score(model(clinic.val.x).router_probs, clinic.val.specialty, 2)
    assert tracker.history["score"].iloc[-1] == pytest.approx(final)
    with pytest.raises(TypeError, match="router_probs"):
        tracker(0, FeedForward(clinic.d_in, 4, d_out=2))
