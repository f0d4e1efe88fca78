"""Lesson 09's figures: memory against experts, the exchanges between processes, imbalance, Soft MoE, adaptive compute.

Every function returns the matplotlib Figure or Axes it drew on; titles,
labelled axes with units, legends, seaborn's colour-blind-safe palette.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch

__all__ = [
    "memory_vs_experts",
    "exchange_heatmaps",
    "exchange_over_steps",
    "bytes_per_token_lines",
    "imbalance_bars",
    "influence_maps",
    "soft_moe_weight_maps",
    "compute_vs_ambiguity",
    "accuracy_by_experts",
]


def memory_vs_experts(table: pd.DataFrame, devices: Mapping[str, float], *, title: str, ax: plt.Axes | None = None) -> plt.Axes:
    """Training memory (GB) against experts, one line per model; a dashed line per device's memory.

    table: columns "model", "experts", "GB" (one row per model and E).
    """
    ax = ax or plt.figure(figsize=(7.5, 4.2)).gca()
    for model, part in table.groupby("model", sort=False):
        ax.plot(part["experts"], part["GB"], marker="o", label=model)
    colours = ["dimgray", "black", "darkgray"]
    for (name, gb), colour in zip(devices.items(), colours):
        ax.axhline(gb, ls="--", lw=1.2, color=colour)
        ax.annotate(name, (table["experts"].min(), gb), xytext=(2, 3), textcoords="offset points", color=colour, fontsize=9)
    ax.set(
        xscale="log",
        yscale="log",
        title=title,
        xlabel="experts per Switch layer E (log scale)",
        ylabel="memory to train (GB, log scale)",
    )
    ax.legend(loc="lower right", fontsize=9)
    return ax


def exchange_heatmaps(mats: torch.Tensor, titles: Sequence[str], *, suptitle: str, cbar_label: str = "rows sent") -> plt.Figure:
    """Small multiples of (W, W) matrices: entry [s, q] = rows rank s sends to rank q (mats: (n, W, W))."""
    n, W, _ = mats.shape
    fig, axes = plt.subplots(1, n, figsize=(3.3 * n + 1.2, 3.3), squeeze=False)
    vmax = float(mats.max())
    ranks = [f"rank {r}" for r in range(W)]
    for i, ax in enumerate(axes[0]):
        sns.heatmap(
            mats[i].numpy(),
            annot=True,
            fmt="d",
            cmap="viridis",
            vmin=0,
            vmax=vmax,
            xticklabels=ranks,
            yticklabels=ranks,
            ax=ax,
            cbar=i == n - 1,
            cbar_kws={"label": cbar_label} if i == n - 1 else None,
            square=True,
        )
        ax.set(title=titles[i], xlabel="to (the doctor's hospital)", ylabel="from (the patient's hospital)" if i == 0 else "")
    fig.suptitle(suptitle, fontweight="bold")
    fig.tight_layout()
    return fig


def exchange_over_steps(tables: Mapping[str, pd.DataFrame], *, title: str) -> plt.Figure:
    """Rows each rank sends to the other ranks at every step, one panel per variant; dotted: the patients among them.

    tables: label → a traffic table (``traffic_table``) of one run; the first expert layer is drawn.
    """
    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 4), sharey=True, squeeze=False)
    colours = sns.color_palette("colorblind", 4)
    for ax, (label, table) in zip(axes[0], tables.items()):
        t = table[(table["layer"] == table["layer"].min()) & (table["src"] != table["dst"])]
        per = t.groupby(["step", "src"])[["rows", "tokens"]].sum().reset_index()
        for i, (src, part) in enumerate(per.groupby("src")):
            ax.plot(
                part["step"],
                part["rows"],
                color=colours[i],
                marker="o",
                ms=3,
                ls="-" if i == 0 else "--",
                label=f"rank {src}: rows sent",
            )
            if not (part["tokens"] == part["rows"]).all():
                ax.plot(part["step"], part["tokens"], color=colours[i], ls=":", lw=2, label=f"rank {src}: of which patients")
        ax.set(title=label, xlabel="training step", ylabel="rows sent to the other rank" if ax is axes[0][0] else "")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(title, fontweight="bold")
    fig.tight_layout()
    return fig


def bytes_per_token_lines(
    widths: Sequence[int],
    curves: Mapping[str, Sequence[float]],
    measured: Sequence[tuple[int, float, str]],
    *,
    title: str,
    ylabel: str,
    ax: plt.Axes | None = None,
) -> plt.Axes:
    """Bytes per token against the model width D (log-log), one line per (k, capacity) setting, measured points on top."""
    ax = ax or plt.figure(figsize=(7.5, 4.2)).gca()
    for label, values in curves.items():
        ax.plot(widths, values, label=label)
    markers = ["o", "s", "^", "D"]
    for i, (d, b, label) in enumerate(measured):
        ax.scatter(
            [d],
            [b],
            s=70,
            marker=markers[i % len(markers)],
            color="black",
            zorder=5,
            label=label,
            facecolors="none" if i % 2 else "black",
        )
    ax.set(xscale="log", yscale="log", title=title, xlabel="model width D (log scale)", ylabel=ylabel)
    ax.legend(fontsize=8)
    return ax


def imbalance_bars(summary: pd.DataFrame, *, title: str) -> plt.Figure:
    """Per share of tokens sent to rank 0: each rank's work (CPU time of forward + backward) as bars; on the right,
    the step's wall-clock time on this machine against the busiest rank's work.

    summary: one row per (share, rank) with columns "work (CPU ms)" and "step (ms)".
    """
    shares = sorted(summary["share"].unique())
    ranks = sorted(summary["rank"].unique())
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    colours = sns.color_palette("colorblind", len(ranks) + 1)
    width = 0.8 / len(ranks)
    x = np.arange(len(shares))
    labels = [f"{s:.0%}" for s in shares]
    for i, rank in enumerate(ranks):
        part = summary[summary["rank"] == rank].set_index("share").loc[shares]
        left.bar(x + (i - (len(ranks) - 1) / 2) * width, part["work (CPU ms)"], width, color=colours[i], label=f"rank {rank}")
    left.set_xticks(x, labels)
    left.set(
        title="each rank's work: CPU time of forward + backward (median)",
        xlabel="share of every rank's tokens sent to rank 0's experts",
        ylabel="CPU time (ms)",
    )
    left.legend(fontsize=9)
    by_share = summary.groupby("share")
    right.plot(
        labels,
        by_share["step (ms)"].max().loc[shares].values,
        marker="o",
        color="black",
        label="the step on this machine (wall clock)",
    )
    right.plot(
        labels,
        by_share["work (CPU ms)"].max().loc[shares].values,
        marker="s",
        ls="--",
        color=colours[0],
        label="the busiest rank's work (CPU time)",
    )
    right.set(title="time per step (median)", xlabel="share of every rank's tokens sent to rank 0's experts", ylabel="time (ms)")
    right.set_ylim(bottom=0)
    right.legend(fontsize=9, loc="lower right")
    fig.suptitle(title, fontweight="bold")
    fig.tight_layout()
    return fig


def influence_maps(maps: Mapping[str, torch.Tensor], *, title: str) -> plt.Figure:
    """Side-by-side (T, T) influence matrices: entry [i, j] = how far output i moves when token j changes."""
    fig, axes = plt.subplots(1, len(maps), figsize=(4.2 * len(maps), 4.0))
    for ax, (name, m) in zip(np.atleast_1d(axes), maps.items()):
        moved = (m > 1e-6).float().numpy()
        sns.heatmap(
            moved,
            cmap=sns.color_palette(["#f0f0f0", sns.color_palette("colorblind")[0]], as_cmap=True),
            vmin=0,
            vmax=1,
            cbar=False,
            square=True,
            ax=ax,
            linewidths=0.3,
            linecolor="white",
        )
        ax.plot([0, m.shape[0]], [0, m.shape[0]], color="gray", lw=0.8)
        ax.set(title=name, xlabel="token changed (j)", ylabel="output that moved (i)")
    fig.suptitle(title, fontweight="bold")
    fig.tight_layout()
    return fig


def soft_moe_weight_maps(
    dispatch: torch.Tensor, combine: torch.Tensor, labels: Sequence[str], *, slots_per_expert: int, title: str
) -> plt.Figure:
    """One group's dispatch and combine weights (T, S), patients as rows (grouped by ``labels``, e.g. specialty), slots as columns."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    labels = list(labels)
    starts = [i for i in range(len(labels)) if i == 0 or labels[i] != labels[i - 1]]
    ends = starts[1:] + [len(labels)]
    for ax, (name, w, what) in zip(
        axes,
        (
            ("dispatch: each column (a slot) sums to 1 over the patients", dispatch, "dispatch weight"),
            ("combine: each row (a patient) sums to 1 over the slots", combine, "combine weight"),
        ),
    ):
        sns.heatmap(w.numpy(), cmap="mako_r", ax=ax, cbar_kws={"label": what}, xticklabels=False, yticklabels=False)
        for s in range(slots_per_expert, w.shape[1], slots_per_expert):
            ax.axvline(s, color="gray", lw=1.2)
        for start in starts[1:]:
            ax.axhline(start, color="gray", lw=1.2, ls="--")
        ax.set_yticks([(a + b) / 2 for a, b in zip(starts, ends)], [labels[a] for a in starts], rotation=0)
        ax.set_xticks(
            [e * slots_per_expert + slots_per_expert / 2 for e in range(w.shape[1] // slots_per_expert)],
            [f"expert {e}" for e in range(w.shape[1] // slots_per_expert)],
        )
        ax.set(title=name, xlabel=f"slots, {slots_per_expert} per expert", ylabel="patients of the waiting room, by specialty")
    fig.suptitle(title, fontweight="bold")
    fig.tight_layout()
    return fig


def compute_vs_ambiguity(table: pd.DataFrame, *, title: str, ax: plt.Axes | None = None) -> plt.Axes:
    """Experts per patient against how blurred the referral letters are: one thin line per seed, the mean thick, per router.

    table: columns "router", "seed", "blur", "experts per patient".
    """
    ax = ax or plt.figure(figsize=(7.5, 4.2)).gca()
    colours = sns.color_palette("colorblind", table["router"].nunique())
    for colour, (router, part) in zip(colours, table.groupby("router", sort=False)):
        for _, seed in part.groupby("seed"):
            ax.plot(seed["blur"], seed["experts per patient"], color=colour, lw=0.8, alpha=0.5)
        mean = part.groupby("blur")["experts per patient"].mean()
        ax.plot(mean.index, mean.values, color=colour, lw=2.5, marker="o", label=f"{router}: mean over seeds (thin: each seed)")
    ax.set(
        title=title,
        xlabel="how far each referral letter is blurred toward another department (0 = clear, 0.5 = halfway)",
        ylabel="experts per patient (mean)",
    )
    ax.legend(fontsize=9)
    return ax


def accuracy_by_experts(table: pd.DataFrame, *, title: str, ax: plt.Axes | None = None) -> plt.Axes:
    """Held-out accuracy of the patients who used k experts, one dot per seed, bars the mean; the share of patients in the labels.

    table: columns "seed", "experts used", "accuracy", "share of patients".
    """
    ax = ax or plt.figure(figsize=(7.5, 4.2)).gca()
    table = table.dropna(subset=["accuracy"])
    mean = table.groupby("experts used")[["accuracy", "share of patients"]].mean()
    colour = sns.color_palette("colorblind", 1)[0]
    ax.bar(mean.index.astype(str), mean["accuracy"], color=colour, alpha=0.6, label="mean over seeds")
    for k, part in table.groupby("experts used"):
        ax.scatter([str(k)] * len(part), part["accuracy"], color="black", s=14, zorder=3)
    ax.set_xticks(range(len(mean)), [f"{k}\n({row['share of patients']:.0%} of patients)" for k, row in mean.iterrows()])
    ax.scatter([], [], color="black", s=14, label="one seed")
    ax.set(
        title=title,
        xlabel="experts the patient was sent to (mean share of the patients)",
        ylabel="held-out accuracy",
        ylim=(0, 1.05),
    )
    ax.legend(fontsize=9, loc="lower left")
    return ax
