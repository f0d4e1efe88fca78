from __future__ import annotations

import math

import pytest
import torch

from moe_course.analysis.metrics import AgreementTracker, accuracy_by_group, gradient_agreement, gradient_cosines
from moe_course.experts import FeedForward


def test_accuracy_by_group_counts_within_each_group():
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([0, 0, 0, 1])
    groups = torch.tensor([0, 0, 1, 1])
    acc = accuracy_by_group(logits, targets, groups, 3)
    assert acc[:2].tolist() == [0.5, 1.0] and math.isnan(acc[2])


def test_accuracy_by_group_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="expected logits"):
        accuracy_by_group(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long), torch.zeros(3, dtype=torch.long), 2)


def test_gradient_cosines_detect_contradicting_tasks():
    torch.manual_seed(0)
    model = FeedForward(4, 8, d_out=2)
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()
    cos = gradient_cosines(model, [(x, y), (x, 1 - y), (x, y)])
    assert cos.shape == (3, 3)
    torch.testing.assert_close(cos.diagonal(), torch.ones(3))
    assert cos[0, 1] < -0.5 and cos[0, 2] > 0.999


def _contradicting_batches(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 4, generator=g)
    y = (x[:, 0] > 0).long()
    return [(x[:128], y[:128]), (x[:128], 1 - y[:128])], [(x[128:], y[128:]), (x[128:], 1 - y[128:])]


def test_gradient_agreement_has_the_control_on_its_diagonal():
    torch.manual_seed(0)
    model = FeedForward(4, 8, d_out=2)
    a, b = _contradicting_batches(0)
    agree = gradient_agreement(model, a, b)
    assert agree.shape == (2, 2)
    torch.testing.assert_close(agree, agree.T)
    # two different samples of one task agree, but not perfectly (the diagonal is a measurement, not 1)
    assert 0.5 < agree[0, 0] < 0.9999 and 0.5 < agree[1, 1] < 0.9999
    assert agree[0, 1] < -0.2  # the contradicting task pulls the other way


def test_gradient_agreement_rejects_unpaired_batches():
    model = FeedForward(4, 8, d_out=2)
    a, b = _contradicting_batches(0)
    with pytest.raises(ValueError, match="same number"):
        gradient_agreement(model, a, b[:1])


def test_agreement_tracker_records_every_call():
    torch.manual_seed(0)
    model = FeedForward(4, 8, d_out=2)
    tracker = AgreementTracker(*_contradicting_batches(1))
    tracker(0, model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    tracker(10, model)
    assert tracker.steps == [0, 10]
    assert tracker.stacked().shape == (2, 2, 2)
    assert not torch.equal(tracker.matrices[0], tracker.matrices[1])  # it measured the changed model
