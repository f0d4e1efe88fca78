from __future__ import annotations

import math

import pytest
import torch

from moe_course.experts import FeedForward
from moe_course.metrics import accuracy_by_group, gradient_cosines


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
