from __future__ import annotations

import time

import pytest
import torch

from moe_course.bench.timing import time_per_batch
from moe_course.experts import FeedForward
from moe_course.mixture import DenseMixture, DenseMixtureConfig


def test_time_per_batch_reports_every_model_in_order_relative_to_the_first():
    torch.manual_seed(0)
    models = {"mlp": FeedForward(6, 8, d_out=3), "mixture": DenseMixture(DenseMixtureConfig(6, 8, 3, 2))}
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    table = time_per_batch(models, x, y, repeats=3, warmup=1)
    assert table["name"].tolist() == ["mlp", "mixture"]
    assert (table["seconds"] > 0).all() and table["ratio"].iloc[0] == 1.0
    assert models["mixture"].gate.proj.weight.grad is not None  # the backward pass ran
    forward_only = time_per_batch({"mlp": FeedForward(6, 8, d_out=3)}, x, y, repeats=2, warmup=0, backward=False)
    assert len(forward_only) == 1


def test_time_per_batch_ratios_are_paired_with_the_first_model():
    class Sleeper(torch.nn.Module):
        def __init__(self, seconds):
            super().__init__()
            self.seconds = seconds
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, x):
            time.sleep(self.seconds)
            return self.lin(x)

    table = time_per_batch(
        {"fast": Sleeper(0.005), "slow": Sleeper(0.050)},
        torch.randn(4, 2),
        torch.zeros(4, dtype=torch.long),
        repeats=3,
        warmup=0,
        backward=False,
    )
    assert table["ratio"].tolist()[0] == 1.0 and 3.0 < table["ratio"].iloc[1] < 12.0  # 50 ms / 5 ms, give or take a busy machine


@pytest.mark.parametrize("kwargs", [{"repeats": 0}, {"repeats": 1.5}, {"warmup": -1}])
def test_time_per_batch_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        time_per_batch({"mlp": FeedForward(2, 2)}, torch.randn(3, 2), torch.zeros(3, dtype=torch.long), **kwargs)
    with pytest.raises(ValueError):
        time_per_batch({}, torch.randn(3, 2), torch.zeros(3, dtype=torch.long))
