"""Tests for moe_course.figures.beyond_plots: lesson 09's figures draw what their inputs say."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from moe_course.figures.beyond_plots import (  # noqa: E402
    accuracy_by_experts,
    bytes_per_token_lines,
    compute_vs_ambiguity,
    exchange_heatmaps,
    exchange_over_steps,
    imbalance_bars,
    influence_maps,
    memory_vs_experts,
    soft_moe_weight_maps,
)
from moe_course.figures.plots import use_course_style  # noqa: E402


@pytest.fixture(autouse=True)
def _close():
    use_course_style()
    yield
    plt.close("all")


def _traffic(rows_fn, tokens_fn=None) -> pd.DataFrame:
    tokens_fn = tokens_fn or rows_fn
    return pd.DataFrame(
        [
            {"step": t, "layer": 1, "src": s, "dst": q, "rows": rows_fn(t, s, q), "tokens": tokens_fn(t, s, q)}
            for t in (1, 2, 3)
            for s in range(2)
            for q in range(2)
        ]
    )


def test_memory_and_bytes_figures_draw_one_line_per_series():
    table = pd.DataFrame({"model": ["a", "a", "b", "b"], "experts": [8, 64, 8, 64], "GB": [1.0, 8.0, 10.0, 80.0]})
    ax = memory_vs_experts(table, {"GPU (80 GB)": 80}, title="t")
    assert len(ax.lines) == 3 and ax.get_xscale() == "log" and ax.get_title() == "t"
    ax = bytes_per_token_lines(
        [16, 32], {"k=1": [1.0, 2.0], "k=2": [2.0, 4.0]}, [(16, 1.0, "measured")], title="b", ylabel="bytes"
    )
    assert len(ax.lines) == 2 and len(ax.collections) == 1 and ax.get_ylabel() == "bytes"


def test_exchange_figures_show_the_matrices_and_the_rows_per_step():
    fig = exchange_heatmaps(torch.tensor([[[3, 1], [2, 2]], [[4, 0], [0, 4]]]), ["step 1", "step 2"], suptitle="s")
    assert [ax.get_title() for ax in fig.axes[:2]] == ["step 1", "step 2"]
    assert "3" in [t.get_text() for t in fig.axes[0].texts]
    fig = exchange_over_steps(
        {"dropless": _traffic(lambda t, s, q: t + s), "padded": _traffic(lambda t, s, q: 5, lambda t, s, q: 3)}, title="x"
    )
    dropless, padded = fig.axes[:2]
    assert len(dropless.lines) == 2  # rows sent by each rank; tokens equal rows: no dotted line
    assert len(padded.lines) == 4  # and the patients among the padded rows
    assert list(dropless.lines[0].get_ydata()) == [1, 2, 3]  # rank 0 sends t rows to rank 1 at step t


def test_imbalance_bars_show_each_ranks_work_and_the_busiest():
    summary = pd.DataFrame(
        {
            "share": [0.5, 0.5, 1.0, 1.0],
            "rank": [0, 1, 0, 1],
            "work (CPU ms)": [10.0, 11.0, 20.0, 1.0],
            "step (ms)": [30.0, 30.0, 31.0, 31.0],
        }
    )
    fig = imbalance_bars(summary, title="i")
    left, right = fig.axes[:2]
    assert sorted(p.get_height() for p in left.patches) == [1.0, 10.0, 11.0, 20.0]
    assert list(right.lines[1].get_ydata()) == [11.0, 20.0]  # the busiest rank's work per share


def test_soft_moe_and_adaptive_figures():
    fig = influence_maps({"a": torch.eye(4), "b": torch.ones(4, 4).tril()}, title="m")
    assert [ax.get_title() for ax in fig.axes[:2]] == ["a", "b"]
    w = torch.softmax(torch.randn(6, 4), 0)
    fig = soft_moe_weight_maps(
        w, torch.softmax(torch.randn(6, 4), 1), ["x", "x", "y", "y", "y", "z"], slots_per_expert=2, title="w"
    )
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["x", "y", "z"]
    table = pd.DataFrame(
        {"router": ["p"] * 4, "seed": [0, 0, 1, 1], "blur": [0.0, 0.5] * 2, "experts per patient": [1.0, 2.0, 1.2, 1.8]}
    )
    ax = compute_vs_ambiguity(table, title="c")
    assert list(ax.lines[-1].get_ydata()) == pytest.approx([1.1, 1.9])  # the mean line comes last
    by_k = pd.DataFrame(
        {
            "seed": [0, 0, 1, 1],
            "experts used": [1, 2, 1, 2],
            "accuracy": [0.9, 0.8, 0.7, 0.6],
            "share of patients": [0.6, 0.4, 0.5, 0.5],
        }
    )
    ax = accuracy_by_experts(by_k, title="a")
    assert [p.get_height() for p in ax.patches] == pytest.approx([0.8, 0.7])
    assert "55% of patients" in ax.get_xticklabels()[0].get_text()
