from __future__ import annotations

import pandas as pd
import pytest
import torch

from moe_course.figures.plots import bias_variance_bars, expert_bars, gate_mass_heatmap

pytestmark = pytest.mark.usefixtures("course_style")  # the course's style; every figure closed after each test


def test_bias_variance_bars_stack_variance_on_bias_and_label_the_total():
    frame = pd.DataFrame({"size": [1, 2, 4], "bias": [0.2, 0.2, 0.2], "variance": [0.04, 0.02, 0.01]})
    ax = bias_variance_bars(frame, title="T")
    bias_bars, variance_bars = ax.containers[:2]
    assert [b.get_height() for b in bias_bars] == pytest.approx([0.2, 0.2, 0.2])
    assert [b.get_y() for b in variance_bars] == pytest.approx([0.2, 0.2, 0.2])  # stacked on the bias
    assert [t.get_text() for t in ax.texts] == ["0.240", "0.220", "0.210"]
    assert ax.get_title() == "T" and ax.get_xlabel() and ax.get_ylabel()
    assert len(ax.get_legend().get_texts()) == 2
    with pytest.raises(ValueError, match="variance"):
        bias_variance_bars(frame.drop(columns="variance"), title="T")


def test_expert_bars_draw_one_bar_per_expert_and_highlight_one():
    ax = expert_bars(torch.tensor([0.1, 0.7, 0.2]), title="gate", ylabel="weight", highlight=1)
    bars = ax.containers[0]
    assert len(bars) == 3 and [t.get_text() for t in ax.get_xticklabels()] == ["expert 0", "expert 1", "expert 2"]
    colours = [tuple(b.get_facecolor()) for b in bars]
    assert colours[1] != colours[0] == colours[2]
    with pytest.raises(ValueError, match="labels"):
        expert_bars([0.5, 0.5], labels=["only one"], title="t", ylabel="y")


def test_gate_mass_heatmap_labels_specialties_experts_and_colour_bar():
    ax = gate_mass_heatmap(torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.5, 0.5]]), ["a", "b", "c"], title="H")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1"] and ax.get_xlabel() == "expert"
    assert ax.collections[0].colorbar.ax.get_ylabel() == "mean gate weight"
    with pytest.raises(ValueError, match="specialties"):
        gate_mass_heatmap(torch.ones(2, 2), ["a", "b", "c"], title="H")
