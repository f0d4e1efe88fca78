"""Figures the lessons share. Every function returns the matplotlib Axes it drew on.

One look for the whole course: seaborn's colour-blind-safe palette, titles,
labelled axes with units, legends.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch

__all__ = [
    "use_course_style",
    "grouped_bars",
    "learning_curves",
    "heatmap",
    "plot_clinic",
    "dispatch_picture",
    "save",
    "bias_variance_bars",
    "expert_bars",
    "gate_mass_heatmap",
]


def use_course_style() -> None:
    """The course's figure style (call once at the top of a lesson)."""
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    plt.rcParams.update({"figure.figsize": (7.5, 4.0), "figure.dpi": 100, "axes.titleweight": "bold"})


def _numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=float)


def grouped_bars(
    values: Mapping[str, Sequence[float] | torch.Tensor],
    groups: Sequence[str],
    *,
    title: str,
    ylabel: str,
    xlabel: str = "",
    chance: float | None = None,
    ax: plt.Axes | None = None,
    fmt: str = "{:.0%}",
) -> plt.Axes:
    """One group of bars per entry of ``groups``, one colour per series in ``values``.

    values: series name -> one number per group (e.g. model -> accuracy per specialty).
    chance: draw a dashed reference line at this height (e.g. chance accuracy).
    """
    rows = [
        {"group": g, "series": name, "value": v}
        for name, series in values.items()
        for g, v in zip(groups, _numpy(series), strict=True)
    ]
    frame = pd.DataFrame(rows)
    ax = ax or plt.figure().gca()
    sns.barplot(frame, x="group", y="value", hue="series", ax=ax)
    for container in ax.containers:
        ax.bar_label(
            container, labels=[fmt.format(v) if np.isfinite(v) else "–" for v in container.datavalues], fontsize=8, padding=2
        )
    if chance is not None:
        ax.axhline(chance, ls="--", color="gray", lw=1)
        ax.annotate(
            "chance",
            (1.0, chance),
            xycoords=("axes fraction", "data"),
            xytext=(3, 0),
            textcoords="offset points",
            ha="left",
            va="center",
            color="gray",
            fontsize=8,
        )  # just outside the axes: never behind a bar
    ax.set(title=title, ylabel=ylabel, xlabel=xlabel)
    # below the axes, so it never hides a bar
    ax.legend(
        title=None,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.14 if not xlabel else -0.22),
        ncol=min(3, len(values)),
        frameon=False,
    )
    return ax


def learning_curves(
    histories: Mapping[str, pd.DataFrame],
    metric: str,
    *,
    title: str,
    ylabel: str,
    ax: plt.Axes | None = None,
) -> plt.Axes:
    """``metric`` against training step for several runs (one line each)."""
    ax = ax or plt.figure().gca()
    for name, history in histories.items():
        ax.plot(history["step"], history[metric], marker="o", ms=3, label=name)
    ax.set(title=title, xlabel="training step", ylabel=ylabel)
    ax.legend()
    return ax


def heatmap(
    matrix,
    *,
    rows: Sequence[str],
    cols: Sequence[str],
    title: str,
    xlabel: str,
    ylabel: str,
    ax: plt.Axes | None = None,
    fmt: str = ".2f",
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
) -> plt.Axes:
    """An annotated heatmap, e.g. specialty × expert gate mass."""
    ax = ax or plt.figure().gca()
    sns.heatmap(
        _numpy(matrix),
        annot=True,
        fmt=fmt,
        cmap=cmap,
        xticklabels=list(cols),
        yticklabels=list(rows),
        vmin=vmin,
        vmax=vmax,
        ax=ax,
        cbar=True,
    )
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return ax


def plot_clinic(clinic, *, specialties: Sequence[int] = (0, 1), max_points: int = 300) -> plt.Figure:
    """Left: the mean context vector of each specialty (each department's code).
    Then, for each of ``specialties``: two measurements coloured by diagnosis.
    """
    pts = clinic.train
    codes = torch.stack([clinic.context(pts.of_specialty(s).x).mean(0) for s in range(clinic.num_specialties)])
    fig, axes = plt.subplots(
        1,
        1 + len(specialties),
        figsize=(4.4 * (1 + len(specialties)), 4.0),
        gridspec_kw={"width_ratios": [1.1] + [1] * len(specialties)},
    )
    sns.heatmap(
        codes.numpy(),
        cmap="vlag",
        center=0,
        ax=axes[0],
        yticklabels=list(clinic.specialties),
        annot=True,
        fmt=".1f",
        annot_kws={"fontsize": 7},
        cbar=False,
    )
    axes[0].set(title="context: each department's code", xlabel="context feature (mean over its patients)", ylabel="")
    palette = sns.color_palette("colorblind", clinic.num_diagnoses)
    order = [f"diagnosis {d}" for d in range(clinic.num_diagnoses)]
    for ax, s in zip(axes[1:], specialties):
        own = pts.of_specialty(s)
        k = min(len(own), max_points)
        m = clinic.measurements(own.x[:k])
        sns.scatterplot(
            x=m[:, 0].numpy(),
            y=m[:, 1].numpy(),
            hue=[f"diagnosis {d}" for d in own.diagnosis[:k].tolist()],
            hue_order=order,
            palette=palette,
            s=14,
            ax=ax,
            linewidth=0,
        )
        ax.set(title=f"{clinic.specialties[s]}: diagnoses", xlabel="measurement 1", ylabel="measurement 2")
        ax.legend(fontsize=7, markerscale=1.5, loc="upper right")
    fig.tight_layout()
    return fig


def save(ax_or_fig, path: str) -> None:
    """Save a figure (for instructors reviewing what learners see)."""
    fig = ax_or_fig.figure if hasattr(ax_or_fig, "figure") else ax_or_fig
    fig.savefig(path, bbox_inches="tight", dpi=110)


def bias_variance_bars(
    frame: pd.DataFrame,
    *,
    title: str,
    xlabel: str = "ensemble size M (doctors averaged)",
    ylabel: str = "squared error of the probabilities (Brier)",
    ax: plt.Axes | None = None,
) -> plt.Axes:
    """Stacked bars, one per ensemble size: bias at the bottom, variance on top (their sum is the error).

    frame: columns ``size``, ``bias`` and ``variance``, e.g. from
    ``moe_course.experiments.ensembles.bias_variance_by_size``.
    """
    for column in ("size", "bias", "variance"):
        if column not in frame:
            raise ValueError(f"bias_variance_bars needs a column {column!r}; got {list(frame.columns)}")
    ax = ax or plt.figure().gca()
    colours = sns.color_palette("colorblind", 2)
    labels = [str(int(m)) for m in frame["size"]]
    bias, variance = frame["bias"].to_numpy(float), frame["variance"].to_numpy(float)
    ax.bar(labels, bias, color=colours[0], label="bias² (all doctors wrong the same way)")
    bars = ax.bar(labels, variance, bottom=bias, color=colours[1], label="variance (doctors disagree)")
    ax.bar_label(bars, labels=[f"{b + v:.3f}" for b, v in zip(bias, variance)], fontsize=8, padding=2)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, ylim=(0, 1.15 * float((bias + variance).max())))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    return ax


def expert_bars(
    values,
    *,
    title: str,
    ylabel: str,
    labels: Sequence[str] | None = None,
    xlabel: str = "expert",
    ax: plt.Axes | None = None,
    fmt: str = "{:.2f}",
    highlight: int | None = None,
    ylim: tuple[float, float] | None = None,
) -> plt.Axes:
    """One bar per expert (e.g. its gate weight for a patient); ``highlight`` draws one bar in a second colour."""
    v = _numpy(values).reshape(-1)
    names = list(labels) if labels is not None else [f"expert {e}" for e in range(len(v))]
    if len(names) != len(v):
        raise ValueError(f"{len(v)} values but {len(names)} labels")
    colours = sns.color_palette("colorblind", 2)
    ax = ax or plt.figure().gca()
    bars = ax.bar(names, v, color=[colours[1] if i == highlight else colours[0] for i in range(len(v))])
    ax.bar_label(bars, labels=[fmt.format(x) for x in v], fontsize=8, padding=2)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    return ax


def gate_mass_heatmap(
    mass,
    specialties: Sequence[str],
    *,
    title: str,
    ax: plt.Axes | None = None,
    fmt: str = ".2f",
    label: str = "mean gate weight",
) -> plt.Axes:
    """Specialty × expert table in [0, 1] (e.g. mean gate weight), with a labelled colour bar."""
    m = _numpy(mass)
    if m.ndim != 2 or m.shape[0] != len(specialties):
        raise ValueError(f"mass must be (S, E) with S = {len(specialties)} specialties, got shape {m.shape}")
    ax = ax or plt.figure().gca()
    sns.heatmap(
        m,
        annot=True,
        fmt=fmt,
        cmap="viridis",
        vmin=0.0,
        vmax=1.0,
        ax=ax,
        xticklabels=[str(e) for e in range(m.shape[1])],
        yticklabels=list(specialties),
        cbar_kws={"label": label},
    )
    ax.set(title=title, xlabel="expert", ylabel="specialty of the patients")
    return ax


def dispatch_picture(expert_index: torch.Tensor, num_experts: int) -> plt.Figure:
    """Where tokens go, three ways: arriving, sorted by expert, in a padded (E, C) buffer, and GShard's one-hot tensor.

    expert_index (N,): the top-1 expert of each token.
    """
    from ..dispatch import slot_positions, sort_by_expert

    n = len(expert_index)
    order, counts = sort_by_expert(expert_index, num_experts)
    slots = slot_positions(expert_index, num_experts)
    capacity = int(counts.max())
    colours = sns.color_palette("colorblind", num_experts)
    fig, axes = plt.subplots(1, 4, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1, 1, 1.3, 2.2]})

    def column(ax, items, title):
        for row, (token, expert) in enumerate(items):
            ax.add_patch(plt.Rectangle((0, n - 1 - row), 1, 0.9, color=colours[expert]))
            ax.text(0.5, n - 0.55 - row, f"t{token}", ha="center", va="center", fontsize=8, color="white", weight="bold")
        ax.set(xlim=(0, 1), ylim=(-0.2, n), title=title, xticks=[], yticks=[])

    column(axes[0], [(t, int(expert_index[t])) for t in range(n)], "1. tokens as they arrive")
    column(axes[1], [(int(t), int(expert_index[t])) for t in order], "2. sorted by expert\n(one block per expert)")
    ends = torch.cumsum(counts, 0)
    for end in ends[:-1].tolist():
        axes[1].axhline(n - end - 0.05, color="black", lw=1.5)

    ax = axes[2]
    for e in range(num_experts):
        for c in range(capacity):
            ax.add_patch(plt.Rectangle((c, num_experts - 1 - e), 0.92, 0.9, color="#dddddd", hatch="//", fill=False))
    for t in range(n):
        e, c = int(expert_index[t]), int(slots[t])
        ax.add_patch(plt.Rectangle((c, num_experts - 1 - e), 0.92, 0.9, color=colours[e]))
        ax.text(c + 0.46, num_experts - 0.55 - e, f"t{t}", ha="center", va="center", fontsize=8, color="white", weight="bold")
    ax.set(
        xlim=(0, capacity),
        ylim=(0, num_experts),
        title=f"3. padded buffer (E × C = {num_experts} × {capacity})\nhatched: wasted slots",
        xticks=[c + 0.46 for c in range(capacity)],
        xticklabels=range(capacity),
        yticks=[num_experts - 0.55 - e for e in range(num_experts)],
        yticklabels=[f"expert {e}" for e in range(num_experts)],
        xlabel="slot",
    )

    one_hot = torch.zeros(n, num_experts * capacity)
    one_hot[torch.arange(n), expert_index * capacity + slots] = 1.0
    sns.heatmap(
        one_hot.numpy(),
        cmap="Greys",
        cbar=False,
        ax=axes[3],
        linewidths=0.3,
        linecolor="#eeeeee",
        xticklabels=[f"{e}·{c}" for e in range(num_experts) for c in range(capacity)],
        yticklabels=[f"t{t}" for t in range(n)],
    )
    axes[3].set(
        title=f"4. GShard's one-hot dispatch tensor (N, E·C)\n{n}×{num_experts * capacity} entries for {n} tokens",
        xlabel="expert·slot",
        ylabel="token",
    )
    axes[3].tick_params(axis="x", labelsize=7, rotation=90)
    fig.tight_layout()
    return fig


# == lessons 04-05: the GP and its waiting rooms ===================================
def accuracy_vs_flops(
    table: pd.DataFrame,
    *,
    title: str,
    ax: plt.Axes | None = None,
    reference: str | None = None,
    chance: float | None = None,
) -> plt.Axes:
    """Held-out accuracy against FLOPs per patient, one marker per approach, a bar over its seeds.

    table: one row per (approach, seed) with columns ``approach``, ``FLOPs per
    patient``, ``held-out accuracy`` and ``parameters`` (e.g.
    ``moe_course.experiments.approaches.FourApproaches.table``). The marker sits at the mean
    over seeds, a small dot marks each seed, and the vertical bar spans the
    worst to the best seed.
    ``reference``: an approach drawn as a hollow marker (e.g. the oracle).
    """
    for column in ("approach", "FLOPs per patient", "held-out accuracy", "parameters"):
        if column not in table:
            raise ValueError(f"accuracy_vs_flops needs a column {column!r}; got {list(table.columns)}")
    ax = ax or plt.figure(figsize=(8, 4.6)).gca()
    grouped = table.groupby("approach", sort=False)
    colours = sns.color_palette("colorblind", len(grouped))
    markers = "osD^vP*X"
    for i, (name, rows) in enumerate(grouped):
        x = float(rows["FLOPs per patient"].mean())
        acc = rows["held-out accuracy"].to_numpy(float)
        mean, low, high = acc.mean(), acc.min(), acc.max()
        hollow = name == reference
        ax.scatter(np.full(len(acc), x), acc, s=10, color=colours[i], alpha=0.6, zorder=3, linewidths=0)  # the seeds
        ax.errorbar(
            [x],
            [mean],
            yerr=[[mean - low], [high - mean]],
            fmt=markers[i % len(markers)],
            ms=9,
            capsize=4,
            color=colours[i],
            mfc="white" if hollow else colours[i],
            mew=2,
            label=f"{name}: {int(rows['parameters'].iloc[0]):,} parameters",
        )
        short = name.split(" · ")[0] if " · " in name else name.split(" (")[0]
        ax.annotate(short, (x, mean), xytext=(9, -3), textcoords="offset points", fontsize=9, color=colours[i], weight="bold")
    if chance is not None:
        ax.axhline(chance, ls="--", color="gray", lw=1)
        ax.annotate(
            "chance", (ax.get_xlim()[1], chance), xytext=(-4, 3), textcoords="offset points", ha="right", color="gray", fontsize=8
        )
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.xaxis.set_minor_formatter(plt.FuncFormatter(lambda v, _: f"{v:,.0f}" if f"{v:.0f}"[0] in "25" else ""))
    ax.set(title=title, xlabel="FLOPs per patient (matmuls, counted by PyTorch; log scale)", ylabel="held-out accuracy")
    ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False, fontsize=9)
    return ax


def load_snapshots(
    shares: Mapping[str, Sequence[torch.Tensor]],
    steps: Sequence[int],
    picks: Sequence[int],
    *,
    title: str,
) -> plt.Figure:
    """Per-expert load bars over training: one row of panels per run, one panel per picked snapshot.

    shares: run name → a list of (E,) load vectors (e.g. ``LoadTracker.shares``),
    recorded at ``steps``; ``picks`` are indices into those lists. A dashed
    line marks the fair share 1/E.
    """
    runs = list(shares)
    if not runs or not picks:
        raise ValueError("load_snapshots needs at least one run and one snapshot")
    fig, axes = plt.subplots(len(runs), len(picks), figsize=(3.1 * len(picks), 2.5 * len(runs)), sharey=True, squeeze=False)
    top = max(float(torch.stack(list(shares[r])).max()) for r in runs)
    colour = sns.color_palette("colorblind", 1)[0]
    for row, run in enumerate(runs):
        for col, i in enumerate(picks):
            ax = axes[row, col]
            s = _numpy(shares[run][i])
            ax.bar(range(len(s)), s, color=colour)
            ax.axhline(1 / len(s), ls="--", color="gray", lw=1)
            ax.set(ylim=(0, min(1.0, top * 1.12)), xticks=range(len(s)))
            ax.tick_params(axis="x", labelsize=8)
            ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
            if row == 0:
                ax.set_title(f"after {steps[i]} steps", fontsize=10)
            if row == len(runs) - 1:
                ax.set_xlabel("expert")
            if col == 0:
                ax.set_ylabel(f"{run}\nshare of patients", fontsize=9)
    fig.suptitle(title + "  (dashed: the fair share 1/E)", fontweight="bold")
    fig.tight_layout()
    return fig


def clinic_day_picture(day, specialties: Sequence[str], *, axes: Sequence[plt.Axes] | None = None) -> plt.Figure:
    """Left: who saw whom (patients in arrival order × experts, the gate; × marks a patient turned away).
    Right: each expert's waiting room, patients seen and turned away, with the capacity C.

    day: a ``moe_course.experiments.playground.ClinicDay``.
    """
    e = day.num_experts
    n = len(day.specialty)
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(13, 3.9), gridspec_kw={"width_ratios": [2.6, 1]})
    ax_map, ax_load = axes
    fig = ax_map.figure
    grid = np.full((e, n), np.nan)
    for j in range(day.expert_index.shape[1]):
        for t in range(n):
            if day.keep[t, j]:
                grid[int(day.expert_index[t, j]), t] = float(day.gates[t, j])
    cmap = plt.get_cmap("viridis").with_extremes(bad="#f2f2f2")
    image = ax_map.imshow(
        grid, aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest", extent=(-0.5, n - 0.5, e - 0.5, -0.5)
    )
    for t, j in (~day.keep).nonzero().tolist():
        ax_map.plot(t, int(day.expert_index[t, j]), marker="x", color="black", ms=7, mew=2)
    palette = sns.color_palette("colorblind", len(specialties))
    for t in range(n):  # a strip of specialty colours above the map
        ax_map.add_patch(plt.Rectangle((t - 0.5, -1.3), 1, 0.6, color=palette[int(day.specialty[t])], clip_on=False))
    ax_map.set_ylim(e - 0.5, -1.4)
    ax_map.set_yticks(range(e), [f"expert {i}" for i in range(e)], fontsize=8)
    ax_map.set(xlabel="patient, in order of arrival", title="Who saw whom: the gate of every visit (× = turned away: room full)")
    ax_map.grid(False)
    cbar = fig.colorbar(image, ax=ax_map, pad=0.01)
    cbar.set_label("gate")
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette[s]) for s in range(len(specialties))]
    ax_map.legend(
        handles,
        list(specialties),
        title="specialty (top strip)",
        loc="upper center",
        bbox_to_anchor=(0.5, -0.2),
        ncol=len(specialties),
        frameon=False,
        fontsize=8,
        title_fontsize=8,
    )
    colours = sns.color_palette("colorblind", 4)
    seen = day.seen.numpy()
    turned_away = (day.assigned - day.seen).numpy()
    ax_load.bar(range(e), seen, color=colours[0], label="seen")
    ax_load.bar(range(e), turned_away, bottom=seen, color="#b0b0b0", hatch="xx", edgecolor="black", lw=0.5, label="turned away")
    if day.capacity is not None:
        ax_load.axhline(day.capacity, color="black", ls="--", lw=1.2, label=f"capacity C = {day.capacity}")
    ax_load.set(xlabel="expert", ylabel="patients in this batch", title="Each waiting room", xticks=range(e))
    ax_load.yaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax_load.set_ylim(0, 1.35 * max(int(day.assigned.max()), day.capacity or 0, 1))
    ax_load.legend(fontsize=8, loc="upper right")
    return fig


__all__ += ["accuracy_vs_flops", "load_snapshots", "clinic_day_picture"]
