"""Tests for moe_course.figures.lm_plots: the language-model figures draw what their inputs say."""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from moe_course.analysis.lm_routing import LayerRouting  # noqa: E402
from moe_course.figures.lm_plots import (  # noqa: E402
    domain_bars,
    expert_share_over_training,
    experts_scaling,
    knowledge_vs_parameters,
    layer_name,
    loss_curves,
    phone_book_bars,
    routing_heatmaps,
    routing_over_training,
)
from moe_course.figures.plots import use_course_style  # noqa: E402


@pytest.fixture(autouse=True)
def _close():
    use_course_style()
    yield
    plt.close("all")


@dataclass
class _Run:
    label: str
    seed: int


@dataclass
class _Result:  # the two attributes loss_curves reads from an LMRunResult
    run: _Run
    history: pd.DataFrame


def _result(label: str, seed: int, losses: list[float]) -> _Result:
    steps = [10 * (i + 1) for i in range(len(losses))]
    return _Result(_Run(label, seed), pd.DataFrame({"step": steps, "val_loss": losses}))


def test_loss_curves_draw_the_mean_over_seeds_with_a_band_per_model():
    results = [
        _result("dense", 0, [2.0, 1.0]),
        _result("dense", 1, [3.0, 2.0]),
        _result("switch", 0, [4.0, 3.0]),
        _result("switch", 1, [4.0, 3.0]),
    ]
    ax = loss_curves(results, title="T")
    lines = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == 2]
    means = {tuple(np.round(ln.get_ydata(), 6)) for ln in lines}
    assert means == {(2.5, 1.5), (4.0, 3.0)}
    assert len(ax.collections) >= 2  # one band per model
    assert ax.get_title() == "T" and ax.get_xlabel() == "training step" and "nats" in ax.get_ylabel()
    assert "2 seeds" in ax.get_legend().get_title().get_text()
    with pytest.raises(ValueError, match="no column 'val_loss_facts'"):
        loss_curves(results, "val_loss_facts", title="T")


def test_domain_bars_show_the_mean_per_domain_and_model():
    table = pd.DataFrame({"label": ["dense", "dense", "switch"], "val_loss_a": [1.0, 3.0, 5.0], "val_loss_b": [0.5, 0.5, 0.25]})
    ax = domain_bars(table, ["a", "b"], title="T")
    heights = sorted(round(b.get_height(), 6) for c in ax.containers if hasattr(c, "datavalues") for b in c)
    assert heights == [0.25, 0.5, 2.0, 5.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]
    with pytest.raises(ValueError, match="val_loss_c"):
        domain_bars(table, ["a", "c"], title="T")


def test_experts_scaling_plots_means_on_a_log2_axis_with_the_dense_band():
    table = pd.DataFrame({"experts": [1, 2, 4, 8], "val_loss": [1.0, 0.9, 0.8, 0.7]})
    reference = pd.DataFrame({"val_loss": [0.95, 1.05, 1.0]})
    ax = experts_scaling(table, "val_loss", reference=reference, title="T")
    line = ax.get_lines()[0]
    assert list(line.get_xdata()) == [1, 2, 4, 8] and list(line.get_ydata()) == pytest.approx([1.0, 0.9, 0.8, 0.7])
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "8"]
    band = ax.patches[0]
    assert band.get_y() == pytest.approx(0.95) and band.get_y() + band.get_height() == pytest.approx(1.05)
    assert "3 seeds" in " ".join(t.get_text() for t in ax.get_legend().get_texts())
    with pytest.raises(ValueError, match="val_loss_facts"):
        experts_scaling(table, "val_loss_facts", title="T")


def _layer(layer: int) -> LayerRouting:
    de = torch.tensor([[9, 1, 0], [0, 5, 5]])  # 2 domains × 3 experts
    return LayerRouting(layer, ("facts", "grammar"), de, torch.ones(4, 3, dtype=torch.int64), dropped=2, tokens=20, gate_sum=10.0)


def test_routing_heatmaps_one_panel_per_layer_with_row_shares():
    fig = routing_heatmaps([_layer(0), _layer(1)], title="T")
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert len(axes) == 2 and axes[1].get_title().startswith("layer 2")  # block index 1, named from 1 as in lesson 07
    assert len(fig.axes) == 4  # each heatmap has its colour bar
    assert [t.get_text() for t in axes[0].texts] == ["90%", "10%", "0%", "0%", "50%", "50%"]
    assert f"{_layer(0).specialisation:.2f}" in axes[0].get_title()
    with pytest.raises(ValueError, match="at least one"):
        routing_heatmaps([], title="T")


def test_expert_share_and_routing_over_training():
    history = pd.DataFrame({"step": [1, 1, 2, 2], "layer": [0, 0, 0, 0], "expert": [0, 1, 0, 1], "share": [0.25, 0.75, 0.5, 0.5]})
    fig = expert_share_over_training(history, title="T")
    ax = fig.axes[0]
    assert len(ax.collections) == 2  # one stacked band per expert
    top = ax.collections[1].get_paths()[0].vertices[:, 1]
    assert top.max() == pytest.approx(1.0)  # the shares are stacked up to 1
    summary = pd.DataFrame(
        {"step": [1, 2], "layer": [0, 0], "dropped_rate": [0.1, 0.02], "specialisation": [0.2, 0.3], "mean_gate": [0.2, 0.3]}
    )
    fig = routing_over_training(summary, title="T")
    left, right = fig.axes
    assert list(left.get_lines()[0].get_ydata()) == pytest.approx([10.0, 2.0])  # in percent
    assert list(right.get_lines()[0].get_ydata()) == pytest.approx([0.2, 0.3])
    with pytest.raises(ValueError, match="empty"):
        expert_share_over_training(history.iloc[:0], title="T")


def _phone_book_table() -> pd.DataFrame:
    rows = []
    for label, F, E, params, flops, acc in [
        ("dense F=8", 8, 1, 1000, 1500, [0.2, 0.3]),
        ("Switch E=8", 8, 8, 8000, 2000, [0.9, 1.0]),
        ("dense F=64", 64, 1, 8000, 9000, [0.95, 1.0]),
        ("Switch E=2", 8, 2, 2000, 1600, [0.4, 0.5]),
    ]:
        rows += [
            {
                "label": label,
                "d_ff": F,
                "experts": E,
                "seed": s,
                "parameters": params,
                "flops_per_patient": flops,
                "accuracy": a,
                "loss": 1 - a,
            }
            for s, a in enumerate(acc)
        ]
    return pd.DataFrame(rows)


def test_phone_book_bars_show_the_mean_with_a_dot_per_seed_and_the_costs():
    table = _phone_book_table()
    ax = phone_book_bars(table, ["dense F=8", "Switch E=8", "dense F=64"], title="T", ylabel="share")
    heights = [round(b.get_height(), 6) for b in ax.patches]
    assert heights == [0.25, 0.95, 0.975]
    dots = np.concatenate([c.get_offsets()[:, 1] for c in ax.collections])
    assert sorted(np.round(dots, 6)) == [0.2, 0.3, 0.9, 0.95, 1.0, 1.0]  # every seed shown
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert "1,000 params" in labels[0] and "1,500 FLOPs" in labels[0]
    assert ax.get_ylim()[0] == 0 and ax.get_yticks()[-1] == pytest.approx(1.0)  # a share, from zero to 100%
    assert [t.get_text() for t in ax.texts] == ["25.0%", "95.0%", "97.5%"]  # the means, written on the figure
    with pytest.raises(ValueError, match="no runs labelled"):
        phone_book_bars(table, ["dense F=2"], title="T", ylabel="share")


def test_knowledge_vs_parameters_draws_a_dense_and_a_switch_line():
    ax = knowledge_vs_parameters(_phone_book_table(), title="T")
    lines = [ln for ln in ax.get_lines() if ln.get_marker() == "o"]  # the two means (error bars are lines too)
    xs = sorted(tuple(ln.get_xdata()) for ln in lines)
    assert xs == [(1000, 2000, 8000), (1000, 8000)]  # Switch E = 1 (the narrow dense layer), 2, 8; dense F = 8, 64
    assert ax.get_xscale() == "log" and ax.get_ylim()[0] == 0
    with pytest.raises(ValueError, match="Switch runs"):
        knowledge_vs_parameters(_phone_book_table().query("experts == 1"), title="T")


def test_layer_names_count_from_one():
    assert layer_name(0) == "layer 1" and layer_name(3) == "layer 4"
