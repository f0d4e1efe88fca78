"""Figures for the language-model lessons: loss curves over seeds, per-domain results, routing inside a Switch LM.

Every function returns the matplotlib Axes (or Figure) it drew on. Inputs
are the tables of ``moe_course.experiments.lm_runs`` (histories, ``results_table``) and
the routing records of ``moe_course.analysis.lm_routing`` (``LayerRouting``,
``RoutingTracker.history`` / ``summary``).
"""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ..analysis.lm_routing import LayerRouting

__all__ = ["loss_curves", "domain_bars", "experts_scaling", "routing_heatmaps", "expert_share_over_training", "routing_over_training"]


def _long_histories(results, metric: str) -> pd.DataFrame:
    frames = []
    for res in results:
        if metric not in res.history.columns:
            raise ValueError(f"the history of {res.run.label!r} has no column {metric!r}; it has {list(res.history.columns)}")
        frames.append(pd.DataFrame({"step": res.history["step"], "value": res.history[metric], "model": res.run.label, "seed": res.run.seed}))
    return pd.concat(frames, ignore_index=True)


def loss_curves(results, metric: str = "val_loss", *, title: str, ylabel: str = "held-out loss (nats per character)",
                ax: plt.Axes | None = None) -> plt.Axes:
    """``metric`` against step, one colour per label: the mean over seeds, the band from the best to the worst seed."""
    frame = _long_histories(results, metric)
    ax = ax or plt.figure().gca()
    sns.lineplot(frame, x="step", y="value", hue="model", errorbar=("pi", 100), marker="o", markersize=4, ax=ax)
    seeds = frame.groupby("model")["seed"].nunique()
    ax.set(title=title, xlabel="training step", ylabel=ylabel)
    ax.legend(title=f"mean of {seeds.min()}–{seeds.max()} seeds; band: best to worst" if seeds.min() != seeds.max()
              else f"mean of {seeds.min()} seeds; band: best to worst seed", fontsize=9, title_fontsize=9)
    return ax


def domain_bars(table: pd.DataFrame, domains: Sequence[str], *, title: str, metric: str = "val_loss_{}",
                ylabel: str = "held-out loss (nats per character)", ax: plt.Axes | None = None) -> plt.Axes:
    """One group of bars per domain, one colour per label: the mean over seeds, error bars ± one standard deviation."""
    rows = []
    for _, r in table.iterrows():
        for d in domains:
            col = metric.format(d)
            if col not in table.columns:
                raise ValueError(f"domain_bars: the table has no column {col!r}")
            rows.append({"domain": d, "model": r["label"], "value": r[col]})
    frame = pd.DataFrame(rows)
    ax = ax or plt.figure(figsize=(8.5, 4.0)).gca()
    sns.barplot(frame, x="domain", y="value", hue="model", errorbar="sd", capsize=0.1, err_kws={"linewidth": 1}, ax=ax)
    for container in ax.containers:
        if hasattr(container, "datavalues"):
            ax.bar_label(container, fmt="%.2f", fontsize=7, padding=2)
    ax.set(title=title, xlabel="", ylabel=ylabel)
    ax.legend(title="mean ± sd over seeds", fontsize=9, title_fontsize=9, loc="upper left")
    return ax


def experts_scaling(table: pd.DataFrame, metric: str, *, title: str, reference: pd.DataFrame | None = None,
                    ylabel: str = "held-out loss (nats per character)", ax: plt.Axes | None = None) -> plt.Axes:
    """A held-out ``metric`` against the number of experts (log-2 axis; the mean over the runs of each E).

    reference: runs of the dense model over several seeds; their range is
    drawn as a grey band, to compare differences with the seeds' own scatter.
    """
    if metric not in table.columns:
        raise ValueError(f"experts_scaling: the table has no column {metric!r}")
    ax = ax or plt.figure().gca()
    if reference is not None and len(reference) > 1:
        ax.axhspan(reference[metric].min(), reference[metric].max(), color="gray", alpha=0.2, lw=0,
                   label=f"dense, range over {len(reference)} seeds")
    means = table.groupby("experts")[metric].mean()
    ax.plot(means.index, means.values, marker="o", color="C0", label="mean over runs" if table.groupby("experts").size().max() > 1 else "one run each")
    for e, v in means.items():
        ax.annotate(f"{v:.3f}", (e, v), xytext=(0, 6), textcoords="offset points", ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    experts = sorted(table["experts"].unique())
    ax.set_xticks(experts, [str(e) for e in experts])
    ax.minorticks_off()
    ax.set(title=title, xlabel="experts per Switch layer, E (1 = dense)", ylabel=ylabel)
    ax.legend(fontsize=9)
    return ax


def routing_heatmaps(layers: Sequence[LayerRouting], *, title: str) -> plt.Figure:
    """Per Switch layer, the share of each domain's characters sent to each expert (rows sum to 1)."""
    if not layers:
        raise ValueError("routing_heatmaps needs at least one LayerRouting (does the model have Switch layers?)")
    fig, axes = plt.subplots(1, len(layers), figsize=(5.2 * len(layers), 0.45 * len(layers[0].domains) + 2.2), squeeze=False)
    for ax, lr in zip(axes[0], layers):
        table = lr.domain_table()
        sns.heatmap(table.values, annot=True, fmt=".0%", cmap="viridis", vmin=0, vmax=1, cbar=False, ax=ax,
                    xticklabels=[str(e) for e in range(table.shape[1])], yticklabels=list(table.index), annot_kws={"fontsize": 7})
        ax.set(title=f"layer {lr.layer}: specialisation (NMI) {lr.specialisation:.2f}", xlabel="expert", ylabel="domain")
    fig.suptitle(title, fontweight="bold")
    fig.tight_layout()
    return fig


def expert_share_over_training(history: pd.DataFrame, *, title: str) -> plt.Figure:
    """Per Switch layer, the share of tokens each expert got at every evaluation (stacked), from ``RoutingTracker.history``."""
    layers = sorted(history["layer"].unique())
    if not layers:
        raise ValueError("expert_share_over_training: the history is empty (was the tracker called?)")
    fig, axes = plt.subplots(1, len(layers), figsize=(5.2 * len(layers), 3.8), squeeze=False, sharey=True)
    palette = sns.color_palette("colorblind", n_colors=int(history["expert"].max()) + 1)
    for ax, layer in zip(axes[0], layers):
        wide = history[history["layer"] == layer].pivot(index="step", columns="expert", values="share").sort_index()
        ax.stackplot(wide.index, wide.values.T, labels=[f"expert {e}" for e in wide.columns], colors=palette, alpha=0.9)
        ax.set(title=f"layer {layer}", xlabel="training step", ylabel="share of tokens", ylim=(0, 1), xlim=(wide.index.min(), wide.index.max()))
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    fig.suptitle(title, fontweight="bold")
    fig.tight_layout()
    return fig


def routing_over_training(summary: pd.DataFrame, *, title: str) -> plt.Figure:
    """Dropped-token rate and specialisation score per Switch layer against step (``RoutingTracker.summary``)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for layer, part in summary.groupby("layer"):
        left.plot(part["step"], 100 * part["dropped_rate"], marker="o", ms=3, label=f"layer {layer}")
        right.plot(part["step"], part["specialisation"], marker="o", ms=3, label=f"layer {layer}")
    left.set(title="tokens dropped for lack of capacity", xlabel="training step", ylabel="dropped (% of tokens)")
    right.set(title="how much the expert says about the domain", xlabel="training step", ylabel="specialisation (NMI, 0 to 1)",
              ylim=(0, max(0.05, float(np.nanmax(summary["specialisation"])) * 1.2)))
    left.legend(), right.legend()
    fig.suptitle(title, fontweight="bold")
    fig.tight_layout()
    return fig
