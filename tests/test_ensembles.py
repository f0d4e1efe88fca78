from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_course.data.clinic import make_clinic
from moe_course.experiments.ensembles import (
    Ensemble,
    average_probs,
    bias_variance_by_size,
    brier_decomposition,
    disjoint_ensembles,
    ensemble_log_loss,
    log_loss_gap,
    member_logits,
    train_ensemble,
)
from moe_course.experts import FeedForward
from moe_course.training import ClassificationTask, TrainConfig


def _logits(r=5, n=8, c=4, seed=0, scale=2.0):
    return torch.randn(r, n, c, generator=torch.Generator().manual_seed(seed)) * scale


def test_average_probs_averages_probabilities_not_logits():
    logits = _logits()
    out = average_probs(logits)
    torch.testing.assert_close(out, sum(torch.softmax(z, -1) for z in logits) / 5)
    torch.testing.assert_close(out.sum(-1), torch.ones(8))
    assert not torch.allclose(out, torch.softmax(logits.mean(0), -1), atol=1e-3)
    torch.testing.assert_close(average_probs(logits[:1]), torch.softmax(logits[0], -1))


def test_average_probs_rejects_wrong_shapes_and_empty_ensembles():
    with pytest.raises(ValueError, match="R, N, classes"):
        average_probs(torch.randn(8, 4))
    with pytest.raises(ValueError, match="at least one member"):
        average_probs(torch.randn(0, 8, 4))


def test_ensemble_log_loss_matches_a_float64_reference_and_survives_underflow():
    logits, targets = _logits(seed=1), torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(1))
    reference = -torch.softmax(logits.double(), -1).mean(0)[torch.arange(8), targets].log().mean()
    torch.testing.assert_close(ensemble_log_loss(logits, targets).double(), reference)
    torch.testing.assert_close(ensemble_log_loss(logits[:1], targets), F.cross_entropy(logits[0], targets))
    sure = logits.clone()
    sure[:, torch.arange(8), targets] -= 200.0
    loss = ensemble_log_loss(sure, targets)
    assert math.isfinite(loss.item()) and loss.item() > 150
    with pytest.raises(ValueError, match="targets"):
        ensemble_log_loss(logits, targets[:5])


def test_the_ensemble_loss_is_never_above_the_members_average_loss():
    for seed in range(5):
        logits = _logits(seed=seed)
        targets = torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(seed))
        parts = log_loss_gap(logits, targets)
        assert parts["gap"] >= -1e-6
        assert parts["gap"] == pytest.approx(parts["members"] - parts["ensemble"])
        members = torch.stack([F.cross_entropy(z, targets) for z in logits]).mean().item()
        assert parts["members"] == pytest.approx(members, rel=1e-5)
    same = _logits(r=1).expand(3, -1, -1)
    assert log_loss_gap(same, torch.zeros(8, dtype=torch.long))["gap"] == pytest.approx(0.0, abs=1e-6)


def test_brier_decomposition_sums_exactly_for_every_patient():
    probs = torch.softmax(_logits(r=6, n=30, c=5, seed=2).double(), -1)
    targets = torch.randint(0, 5, (30,), generator=torch.Generator().manual_seed(2))
    parts = brier_decomposition(probs, targets)
    assert parts.error.shape == parts.bias.shape == parts.variance.shape == (30,)
    torch.testing.assert_close(parts.error, parts.bias + parts.variance, rtol=0, atol=1e-12)
    onehot = F.one_hot(targets, 5).double()
    torch.testing.assert_close(parts.error, ((probs - onehot) ** 2).sum(-1).mean(0))
    torch.testing.assert_close(parts.bias, ((probs.mean(0) - onehot) ** 2).sum(-1))
    s = parts.summary()
    assert s["error"] == pytest.approx(s["bias"] + s["variance"], abs=1e-12)


def test_brier_decomposition_edge_cases():
    probs = torch.softmax(_logits(r=1, n=4, c=3), -1).expand(4, -1, -1)  # four identical doctors
    targets = torch.tensor([0, 1, 2, 0])
    assert brier_decomposition(probs, targets).variance.abs().max() < 1e-7
    perfect = F.one_hot(targets, 3).float().expand(3, -1, -1)  # always right, always sure
    parts = brier_decomposition(perfect, targets)
    assert parts.error.abs().max() == parts.bias.abs().max() == 0
    with pytest.raises(ValueError, match="class ids"):
        brier_decomposition(perfect, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match=r"\(N,\)"):
        brier_decomposition(perfect, targets[:3])
    with pytest.raises(ValueError, match="at least one member"):
        brier_decomposition(perfect[:0], targets)


def test_disjoint_ensembles_average_consecutive_members_and_drop_leftovers():
    probs = torch.arange(7.0).reshape(7, 1, 1).expand(7, 2, 3)  # member r predicts r everywhere
    groups = disjoint_ensembles(probs, 3)
    assert groups.shape == (2, 2, 3)
    assert groups[:, 0, 0].tolist() == [1.0, 4.0]  # mean of 0,1,2 and of 3,4,5; member 6 unused
    torch.testing.assert_close(disjoint_ensembles(probs, 1), probs)
    for bad in (0, 8, 2.0, True):
        with pytest.raises(ValueError):
            disjoint_ensembles(probs, bad)


def test_bias_variance_by_size_keeps_the_bias_and_shrinks_the_variance():
    g = torch.Generator().manual_seed(3)
    centre = torch.randn(1, 200, 4, generator=g)
    probs = torch.softmax(centre + 0.7 * torch.randn(16, 200, 4, generator=g), -1)  # 16 independent noisy doctors
    targets = torch.randint(0, 4, (200,), generator=g)
    table = bias_variance_by_size(probs, targets, [1, 2, 4, 8])
    assert list(table.columns) == ["size", "ensembles", "error", "bias", "variance", "accuracy"]
    assert table["ensembles"].tolist() == [16, 8, 4, 2]
    assert table["bias"].max() - table["bias"].min() < 1e-6  # every size averages the same 16 doctors
    assert table["variance"].is_monotonic_decreasing
    torch.testing.assert_close(
        torch.tensor(table["error"].to_numpy()), torch.tensor((table["bias"] + table["variance"]).to_numpy())
    )
    # independent doctors, measured against the average of all 16: (1/M - 1/R) / (1 - 1/R) of one doctor's
    expected = [(1 / m - 1 / 16) / (1 - 1 / 16) for m in (2, 4)]
    measured = (table["variance"] / table["variance"].iloc[0]).tolist()[1:3]
    assert measured == pytest.approx(expected, rel=0.2)


def test_train_ensemble_trains_members_that_differ_only_in_their_seed():
    clinic = make_clinic(num_specialties=2, n_train=300, n_val=100, seed=1)
    task = ClassificationTask.from_clinic(clinic)
    config = TrainConfig(steps=30, eval_every=15)
    make = lambda: FeedForward(clinic.d_in, 8, d_out=clinic.num_diagnoses)  # noqa: E731
    first = train_ensemble(make, task, config, 3, progress=False)
    again = train_ensemble(make, task, config, 2, progress=False)
    assert isinstance(first, Ensemble) and len(first.members) == 3
    assert [h["member"].iloc[0] for h in first.histories] == [0, 1, 2]
    assert not torch.equal(first.members[0].fc_in.weight, first.members[1].fc_in.weight)
    torch.testing.assert_close(again.members[1].fc_in.weight, first.members[1].fc_in.weight)  # reproducible
    logits = first(clinic.val.x)
    assert logits.shape == (3, 100, clinic.num_diagnoses) and not logits.requires_grad
    torch.testing.assert_close(first.probs(clinic.val.x), average_probs(logits))
    with pytest.raises(ValueError):
        train_ensemble(make, task, config, 0, progress=False)
    with pytest.raises(ValueError):
        member_logits([], clinic.val.x)
