"""Figures for lesson 08: the phone book, loss curves over seeds, per-domain results, routing inside a Switch LM.

Every function returns the matplotlib Axes (or Figure) it drew on. Inputs
are the tables of ``moe_course.experiments.phonebook`` (``phone_book_table``) and
``moe_course.experiments.lm_runs`` (histories, ``results_table``) and the routing records
of ``moe_course.analysis.lm_routing`` (``LayerRouting``, ``RoutingTracker.history`` /
``summary``). Layers are named as lesson 07 names them, counting from 1:
block index 0 is "layer 1". Axes that show a share run from 0 to 1, so that
a small difference is not blown up by the scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ..analysis.lm_routing import LayerRouting

__all__ = [
    "layer_name",
    "phone_book_bars",
    "knowledge_vs_parameters",
    "loss_curves",
    "domain_bars",
    "experts_scaling",
    "routing_heatmaps",
    "expert_share_over_training",
    "routing_over_training",
]


def layer_name(layer: int) -> str:
    """Block index (0-based) → its name in the lessons, counting from 1: 0 → "layer 1"."""
    return f"layer {layer + 1}"


def _seed_dots(ax: plt.Axes, frame: pd.DataFrame, x: str, y: str, order: list) -> None:
    for i, key in enumerate(order):
        values = frame.loc[frame[x] == key, y].to_numpy()
        jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(1)
        ax.scatter(i + jitter, values, s=14, color="black", zorder=3, label="one seed" if i == 0 else None)


def phone_book_bars(
    table: pd.DataFrame, labels: Sequence[str], *, title: str, ylabel: str, metric: str = "accuracy", ax: plt.Axes | None = None
) -> plt.Axes:
    """One bar per label (the mean over seeds of ``metric``, a share from 0 to 1), each seed a dot.

    table: ``phone_book_table`` rows (label, seed, parameters, flops_per_patient, metric).
    The tick labels give each model's parameters and FLOPs per patient.
    """
    missing = [lab for lab in labels if lab not in set(table["label"])]
    if missing:
        raise ValueError(f"phone_book_bars: no runs labelled {missing}; the table has {sorted(table['label'].unique())}")
    if metric not in table.columns:
        raise ValueError(f"phone_book_bars: the table has no column {metric!r}")
    ax = ax or plt.figure(figsize=(5.5, 4)).gca()
    frame = table[table["label"].isin(labels)]
    stats = frame.groupby("label")[metric].agg(["mean", "max"])
    colours = sns.color_palette("colorblind", n_colors=len(labels))
    ax.bar(range(len(labels)), [stats.loc[lab, "mean"] for lab in labels], color=colours, alpha=0.85)
    for i, lab in enumerate(labels):  # the mean, written above the highest seed
        ax.annotate(
            f"{stats.loc[lab, 'mean']:.1%}",
            (i, max(stats.loc[lab, "mean"], stats.loc[lab, "max"])),
            xytext=(0, 5),
            textcoords="offset points",
            ha="center",
            fontsize=9,
        )
    _seed_dots(ax, frame, "label", metric, list(labels))
    first = frame.drop_duplicates("label").set_index("label")
    ax.set_xticks(
        range(len(labels)),
        [f"{lab}\n{first.loc[lab, 'parameters']:,} params\n{first.loc[lab, 'flops_per_patient']:,} FLOPs" for lab in labels],
        fontsize=8,
    )
    ax.set(title=title, ylabel=ylabel, ylim=(0, 1.22))
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.yaxis.set_major_formatter(plt.matplotlib.ticker.PercentFormatter(1.0))
    seeds = frame.groupby("label")["seed"].nunique()
    n = f"{seeds.min()}–{seeds.max()}" if seeds.min() != seeds.max() else f"{seeds.min()}"
    ax.legend(title=f"bar: mean of {n} seeds", fontsize=8, title_fontsize=8, loc="upper center", ncol=2, frameon=False)
    return ax


def knowledge_vs_parameters(
    table: pd.DataFrame, *, title: str, metric: str = "accuracy", ylabel: str = "records recalled", ax: plt.Axes | None = None
) -> plt.Axes:
    """``metric`` against the layer's parameters (log-2 axis): one line for dense layers of growing width, one for
    Switch layers of growing E (at the FLOPs of one expert); each point the mean over seeds, the bar its range.

    table: ``phone_book_table`` rows; dense runs have experts == 1, Switch runs experts > 1 (the
    dense run of the experts' width is the Switch line's E = 1 point).
    """
    for col in ("experts", "d_ff", "parameters", "flops_per_patient", metric):
        if col not in table.columns:
            raise ValueError(f"knowledge_vs_parameters: the table has no column {col!r}")
    ax = ax or plt.figure(figsize=(6.5, 4.2)).gca()
    dense = table[table["experts"] == 1]
    switch = table[table["experts"] > 1]
    if switch.empty:
        raise ValueError("knowledge_vs_parameters needs Switch runs (experts > 1)")
    width = int(switch["d_ff"].iloc[0])
    switch = pd.concat([dense[dense["d_ff"] == width], switch])  # E = 1: the dense layer of one expert's width
    colours = sns.color_palette("colorblind", n_colors=2)
    for frame, key, colour, name in (
        (dense, "d_ff", colours[0], "dense layer, width F (FLOPs grow with F)"),
        (switch, "experts", colours[1], f"Switch layer, E experts of width {width} (FLOPs of one)"),
    ):
        stats = (
            frame.groupby(key)
            .agg(
                params=("parameters", "first"),
                flops=("flops_per_patient", "first"),
                mean=(metric, "mean"),
                lo=(metric, "min"),
                hi=(metric, "max"),
            )
            .sort_values("params")
        )
        ax.errorbar(
            stats["params"],
            stats["mean"],
            yerr=[stats["mean"] - stats["lo"], stats["hi"] - stats["mean"]],
            marker="o",
            color=colour,
            capsize=3,
            label=name,
        )
        for k, row in stats.iterrows():
            text = f"F={k}" if key == "d_ff" else f"E={k}"
            ax.annotate(
                text,
                (row["params"], row["mean"]),
                xytext=(5, -12 if key == "d_ff" else 6),
                textcoords="offset points",
                fontsize=8,
                color=colour,
            )
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(plt.matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.margins(x=0.1)  # room for the labels of the outer points
    ax.set(title=title, xlabel="parameters of the layer and its read-out (log scale)", ylabel=ylabel, ylim=(0, 1.12))
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.yaxis.set_major_formatter(plt.matplotlib.ticker.PercentFormatter(1.0))
    ax.legend(fontsize=8, title="point: mean over seeds; bar: their range", title_fontsize=8, loc="lower right")
    return ax


def _long_histories(results, metric: str) -> pd.DataFrame:
    frames = []
    for res in results:
        if metric not in res.history.columns:
            raise ValueError(f"the history of {res.run.label!r} has no column {metric!r}; it has {list(res.history.columns)}")
        frames.append(
            pd.DataFrame(
                {"step": res.history["step"], "value": res.history[metric], "model": res.run.label, "seed": res.run.seed}
            )
        )
    return pd.concat(frames, ignore_index=True)


def loss_curves(
    results,
    metric: str = "val_loss",
    *,
    title: str,
    ylabel: str = "held-out loss (nats per character)",
    ax: plt.Axes | None = None,
) -> plt.Axes:
    """``metric`` against step, one colour per label: the mean over seeds, the band from the best to the worst seed."""
    frame = _long_histories(results, metric)
    ax = ax or plt.figure().gca()
    sns.lineplot(frame, x="step", y="value", hue="model", errorbar=("pi", 100), marker="o", markersize=4, ax=ax)
    seeds = frame.groupby("model")["seed"].nunique()
    ax.set(title=title, xlabel="training step", ylabel=ylabel)
    ax.legend(
        title=f"mean of {seeds.min()}–{seeds.max()} seeds; band: best to worst"
        if seeds.min() != seeds.max()
        else f"mean of {seeds.min()} seeds; band: best to worst seed",
        fontsize=9,
        title_fontsize=9,
    )
    return ax


def domain_bars(
    table: pd.DataFrame,
    domains: Sequence[str],
    *,
    title: str,
    metric: str = "val_loss_{}",
    ylabel: str = "held-out loss (nats per character)",
    ax: plt.Axes | None = None,
) -> plt.Axes:
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


def experts_scaling(
    table: pd.DataFrame,
    metric: str,
    *,
    title: str,
    reference: pd.DataFrame | None = None,
    ylabel: str = "held-out loss (nats per character)",
    ax: plt.Axes | None = None,
) -> plt.Axes:
    """A held-out ``metric`` against the number of experts (log-2 axis; the mean over the runs of each E).

    reference: runs of the dense model over several seeds; their range is
    drawn as a grey band, to compare differences with the seeds' own scatter.
    """
    if metric not in table.columns:
        raise ValueError(f"experts_scaling: the table has no column {metric!r}")
    ax = ax or plt.figure().gca()
    if reference is not None and len(reference) > 1:
        ax.axhspan(
            reference[metric].min(),
            reference[metric].max(),
            color="gray",
            alpha=0.2,
            lw=0,
            label=f"dense, range over {len(reference)} seeds",
        )
    means = table.groupby("experts")[metric].mean()
    ax.plot(
        means.index,
        means.values,
        marker="o",
        color="C0",
        label="mean over runs" if table.groupby("experts").size().max() > 1 else "one run each",
    )
    for e, v in means.items():
        ax.annotate(f"{v:.3f}", (e, v), xytext=(0, 6), textcoords="offset points", ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    experts = sorted(table["experts"].unique())
    ax.set_xticks(experts, [str(e) for e in experts])
    ax.minorticks_off()
    ax.set(title=title, xlabel="experts per Switch layer, E (1 = dense)", ylabel=ylabel)
    ax.set_ylim(bottom=0)  # from zero: a difference is shown at its true size
    ax.legend(fontsize=9)
    return ax


def routing_heatmaps(layers: Sequence[LayerRouting], *, title: str) -> plt.Figure:
    """Per Switch layer, the share of each domain's characters sent to each expert (rows sum to 1)."""
    if not layers:
        raise ValueError("routing_heatmaps needs at least one LayerRouting (does the model have Switch layers?)")
    fig, axes = plt.subplots(1, len(layers), figsize=(6.0 * len(layers), 0.45 * len(layers[0].domains) + 2.2), squeeze=False)
    for ax, lr in zip(axes[0], layers):
        table = lr.domain_table()
        sns.heatmap(
            table.values,
            annot=True,
            fmt=".0%",
            cmap="viridis",
            vmin=0,
            vmax=1,
            ax=ax,
            cbar_kws={"label": "share of the domain's characters", "format": plt.matplotlib.ticker.PercentFormatter(1.0)},
            xticklabels=[str(e) for e in range(table.shape[1])],
            yticklabels=list(table.index),
            annot_kws={"fontsize": 7},
        )
        ax.set(title=f"{layer_name(lr.layer)}: specialisation (NMI) {lr.specialisation:.2f}", xlabel="expert", ylabel="domain")
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
        ax.set(
            title=layer_name(layer),
            xlabel="training step",
            ylabel="share of tokens",
            ylim=(0, 1),
            xlim=(wide.index.min(), wide.index.max()),
        )
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    fig.suptitle(title, fontweight="bold")
    fig.tight_layout()
    return fig


def routing_over_training(summary: pd.DataFrame, *, title: str) -> plt.Figure:
    """Dropped-token rate and specialisation score per Switch layer against step (``RoutingTracker.summary``)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for layer, part in summary.groupby("layer"):
        left.plot(part["step"], 100 * part["dropped_rate"], marker="o", ms=3, label=layer_name(layer))
        right.plot(part["step"], part["specialisation"], marker="o", ms=3, label=layer_name(layer))
    left.set(
        title="tokens dropped for lack of capacity",
        xlabel="training step",
        ylabel="dropped (% of tokens)",
        ylim=(0, max(10.0, 100 * float(np.nanmax(summary["dropped_rate"])) * 1.1)),
    )
    right.set(
        title="how much the expert says about the domain",
        xlabel="training step",
        ylabel="specialisation (NMI, 0 to 1)",
        ylim=(0, 1),
    )
    left.legend(), right.legend()
    fig.suptitle(title, fontweight="bold")
    fig.tight_layout()
    return fig
