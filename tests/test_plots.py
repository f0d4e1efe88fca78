from __future__ import annotations

import pandas as pd
import pytest
import torch

from moe_course.data.clinic import make_clinic
from moe_course.figures.plots import grouped_bars, heatmap, learning_curves, plot_clinic, save

pytestmark = pytest.mark.usefixtures("course_style")  # the course's style; every figure closed after each test


def test_grouped_bars_draws_one_bar_per_group_and_series():
    ax = grouped_bars(
        {"a": [0.5, 0.7, 0.9], "b": torch.tensor([0.2, 0.3, float("nan")])},
        ["x", "y", "z"],
        title="T",
        ylabel="accuracy",
        chance=0.25,
    )
    assert ax.get_title() == "T" and ax.get_ylabel() == "accuracy"
    assert [len(c) for c in ax.containers] == [3, 2]  # a NaN value draws no bar
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]


def test_grouped_bars_rejects_a_length_mismatch():
    with pytest.raises(ValueError):
        grouped_bars({"a": [1, 2]}, ["x", "y", "z"], title="T", ylabel="y")


def test_learning_curves_and_heatmap_are_labelled(tmp_path):
    h = pd.DataFrame({"step": [1, 2], "val_acc": [0.1, 0.2]})
    ax = learning_curves({"run": h}, "val_acc", title="curves", ylabel="acc")
    assert ax.get_xlabel() == "training step" and len(ax.lines) == 1
    ax = heatmap(torch.eye(2), rows=["r1", "r2"], cols=["c1", "c2"], title="H", xlabel="expert", ylabel="specialty")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["c1", "c2"] and ax.get_xlabel() == "expert"
    save(ax, str(tmp_path / "h.png"))
    assert (tmp_path / "h.png").stat().st_size > 1000


def test_plot_clinic_has_a_panel_per_view():
    fig = plot_clinic(make_clinic(num_specialties=3, n_train=300, n_val=50, seed=1))
    assert len(fig.axes) == 3 and all(ax.get_title() for ax in fig.axes)
