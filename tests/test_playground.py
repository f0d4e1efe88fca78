from __future__ import annotations

import matplotlib.pyplot as plt
import pytest
import torch

from moe_course.data.clinic import make_clinic
from moe_course.experiments.playground import clinic_day, routed_forward, train_clinic_moe
from moe_course.figures.plots import accuracy_vs_flops, clinic_day_picture, load_snapshots
from moe_course.models import ClinicMoE
from moe_course.moe import MoEConfig


@pytest.fixture(scope="module")
def clinic():
    return make_clinic(2, n_train=256, n_val=128, seed=0)


@pytest.fixture(scope="module")
def model(clinic):
    return train_clinic_moe(clinic, num_experts=4, top_k=1, steps=20)


@pytest.mark.parametrize("factor", [None, 0.5])
def test_routed_forward_without_noise_is_the_models_forward(clinic, factor):
    torch.manual_seed(1)
    m = ClinicMoE(clinic.d_in, 4, MoEConfig(d_model=8, d_ff=8, num_experts=3, top_k=2, router="top_k", capacity_factor=factor))
    m.eval()
    x = clinic.val.x[:40]
    day = routed_forward(m, x, capacity_factor=factor)
    out = m(x)
    torch.testing.assert_close(day.logits, out.logits)
    assert torch.equal(day.expert_index, out.moe.expert_index) and torch.equal(day.keep, out.moe.keep)


def test_routed_forward_noise_changes_the_choice_and_is_repeatable(model, clinic):
    x = clinic.val.x[:64]
    clean = routed_forward(model, x, capacity_factor=None)
    a = routed_forward(model, x, capacity_factor=None, noise=3.0, generator=torch.Generator().manual_seed(0))
    b = routed_forward(model, x, capacity_factor=None, noise=3.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.expert_index, b.expert_index)
    assert not torch.equal(a.expert_index, clean.expert_index)
    with pytest.raises(ValueError, match="noise must be a number >= 0"):
        routed_forward(model, x, capacity_factor=None, noise=-1.0)


def test_clinic_day_respects_the_capacity(model, clinic):
    day = clinic_day(model, clinic, capacity_factor=0.5, batch_size=32)
    assert day.capacity == 4  # ceil(32 / 4 · 0.5)
    assert (day.seen <= day.capacity).all()
    assert day.assigned.sum() == 32 and day.seen.sum() == 32 - day.dropped
    assert 0 < day.dropped_share < 1 and 0 <= day.accuracy <= 1
    roomy = clinic_day(model, clinic, capacity_factor=None, batch_size=32)
    assert roomy.capacity is None and roomy.dropped == 0 and roomy.dropped_share == 0


def test_playground_pictures_draw(model, clinic):
    day = clinic_day(model, clinic, capacity_factor=1.0, noise=1.0, batch_size=32)
    fig = clinic_day_picture(day, clinic.specialties)
    assert len(fig.axes) >= 2
    plt.close(fig)
    fig = load_snapshots(
        {"a": [torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])], "b": [torch.tensor([0.2, 0.8])] * 2},
        steps=[0, 10],
        picks=[0, 1],
        title="loads",
    )
    assert len(fig.axes) == 4
    plt.close(fig)


def test_accuracy_vs_flops_needs_its_columns():
    import pandas as pd

    table = pd.DataFrame(
        {
            "approach": ["a", "a", "b"],
            "seed": [0, 1, 0],
            "parameters": [10, 10, 12],
            "FLOPs per patient": [100.0, 100.0, 30.0],
            "held-out accuracy": [0.5, 0.6, 0.7],
        }
    )
    ax = accuracy_vs_flops(table, title="t", reference="b", chance=0.25)
    assert len(ax.get_legend().get_texts()) == 2
    plt.close(ax.figure)
    with pytest.raises(ValueError, match="needs a column"):
        accuracy_vs_flops(table.drop(columns="parameters"), title="t")


def test_waiting_room_playground_updates_when_a_slider_moves(clinic):
    from moe_course.figures.widgets import waiting_room_playground

    widget = waiting_room_playground(clinic, steps=10, batch_size=32)
    sliders, summary, chart = widget.children[1], widget.children[2], widget.children[3]
    before = summary.value
    assert "capacity factor 1.00" in before and len(chart.value) > 1000
    sliders.children[0].value = 0.5  # capacity factor
    assert "capacity factor 0.50" in summary.value and summary.value != before
    widget.children[0].children[0].value = 3  # experts: trains a new clinic
    assert summary.value.startswith("<b>3 experts")
