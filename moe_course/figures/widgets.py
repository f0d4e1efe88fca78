"""Interactive playgrounds for the lessons (ipywidgets).

Each function builds and returns a widget; the lesson displays it. The
numbers behind every widget come from the package's tested functions.
"""

from __future__ import annotations

import io

import ipywidgets as W
import matplotlib.pyplot as plt

from ..flops import ffn_flops, ffn_param_count, moe_layer_flops, moe_layer_param_count

__all__ = ["hospital_numbers", "hospital_explorer", "mixture_playground"]


def figure_png(fig: plt.Figure, dpi: int = 100) -> bytes:
    """Render a matplotlib figure to PNG bytes (for an ipywidgets Image) and close it.

    Widgets show figures this way rather than through an Output widget, so they
    look the same whatever matplotlib backend the kernel runs.
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def hospital_numbers(num_experts: int, top_k: int, d_model: int, d_ff: int) -> dict[str, int]:
    """Parameters and FLOPs per token of an MoE layer (E experts of width F, top-k) and of one dense FFN.

    The router is a (D, E) matrix: D·E parameters, 2·D·E FLOPs per token.
    """
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be between 1 and num_experts={num_experts}, got {top_k}")
    return {
        "dense parameters": ffn_param_count(d_model, d_ff),
        "dense FLOPs per token": ffn_flops(1, d_model, d_ff),
        "MoE parameters": moe_layer_param_count(d_model, d_ff, num_experts),
        "MoE FLOPs per token": moe_layer_flops(1, d_model, d_ff, num_experts, top_k),
    }


def hospital_explorer(d_model: int = 512, d_ff: int = 2048) -> W.Widget:
    """Sliders for the number of specialists (experts) and how many each patient sees (k).

    Shows what the hospital *knows* (parameters) and what one visit *costs*
    (FLOPs per token), relative to a single doctor (one dense FFN).
    """
    experts = W.IntSlider(
        value=8, min=1, max=64, description="specialists E", continuous_update=False, style={"description_width": "initial"}
    )
    top_k = W.IntSlider(
        value=1, min=1, max=8, description="seen per patient k", continuous_update=False, style={"description_width": "initial"}
    )
    summary = W.HTML()
    chart = W.Image(format="png", layout=W.Layout(width="560px"))

    def update(*_):
        top_k.max = experts.value
        n = hospital_numbers(experts.value, min(top_k.value, experts.value), d_model, d_ff)
        knows = n["MoE parameters"] / n["dense parameters"]
        costs = n["MoE FLOPs per token"] / n["dense FLOPs per token"]
        summary.value = (
            f"<b>{experts.value} specialists, each patient sees {top_k.value}</b>: "
            f"the hospital knows <b>{knows:.1f}×</b> as much as one doctor "
            f"({n['MoE parameters']:,} parameters) and a visit costs <b>{costs:.2f}×</b> "
            f"({n['MoE FLOPs per token']:,} FLOPs per patient)."
        )
        fig, ax = plt.subplots(figsize=(6, 2.6))
        ax.barh(
            ["effort per patient\n(FLOPs per token)", "knowledge\n(parameters)"], [costs, knows], color=["#DE8F05", "#0173B2"]
        )
        ax.axvline(1.0, color="gray", ls="--", lw=1)
        ax.set(
            xlabel="relative to one doctor (one dense FFN of the same width)",
            xlim=(0, max(8.0, knows * 1.1)),
            title="An MoE layer: knowledge grows with E, effort with k",
        )
        for y, v in enumerate([costs, knows]):
            ax.text(v, y, f" {v:.2f}×", va="center")
        fig.tight_layout()
        chart.value = figure_png(fig)

    experts.observe(update, names="value")
    top_k.observe(update, names="value")
    update()
    return W.VBox([W.HBox([experts, top_k]), summary, chart])


def mixture_playground(model, patients, specialties, *, max_patients: int = 512) -> W.Widget:
    """Look inside a trained dense mixture: the GP's weight on every doctor, and every doctor's answer.

    model: a ``moe_course.mixture.DenseMixture`` (anything returning ``router_probs``
    (N, E) and ``expert_logits`` (N, E, classes)); patients: ``clinic.Patients``
    (the slider offers the first ``max_patients``; the specialty view uses them
    all); specialties: their names.

    "one patient": left, the gate weight of each expert for that patient; right,
    each expert's probabilities for every diagnosis, and the mixture's, with the
    true diagnosis framed. "one specialty": the mean gate weight of each expert
    over the specialty's patients, and how often each expert alone (and the
    mixture) gets those patients right.
    """
    import numpy as np
    import torch

    from ..analysis.specialisation import expert_accuracy_by_specialty, gate_mass_by_specialty
    from .plots import expert_bars

    if len(patients) == 0:
        raise ValueError("mixture_playground needs at least one patient")
    n = min(len(patients), max_patients)  # patients the slider offers
    x, diagnosis, specialty = patients.x, patients.diagnosis, patients.specialty
    num_specialties = len(specialties)
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        out = model(x.to(device))
    gate = out.router_probs.cpu()  # (N, E)
    expert_probs = torch.softmax(out.expert_logits.cpu(), dim=-1)  # (N, E, classes)
    mixture = torch.softmax(out.logits.cpu(), dim=-1)  # (N, classes)
    num_experts, num_classes = expert_probs.shape[1:]
    mass = gate_mass_by_specialty(gate, specialty, num_specialties)  # (S, E)
    expert_acc = expert_accuracy_by_specialty(out.expert_logits.cpu(), diagnosis, specialty, num_specialties)  # (S, E)
    mixture_correct = (mixture.argmax(-1) == diagnosis).float()  # (N,)

    mode = W.ToggleButtons(options=["one patient", "one specialty"], value="one patient", description="look at")
    patient = W.IntSlider(value=0, min=0, max=n - 1, description="patient", continuous_update=False)
    chosen = W.Dropdown(options=[(name, s) for s, name in enumerate(specialties)], value=0, description="specialty")
    summary = W.HTML()
    chart = W.Image(format="png", layout=W.Layout(width="900px"))

    def draw_patient(i: int) -> None:
        g, probs, mix = gate[i], expert_probs[i], mixture[i]  # (E,), (E, classes), (classes,)
        top, truth = int(g.argmax()), int(diagnosis[i])
        summary.value = (
            f"<b>Patient {i}</b> ({specialties[int(specialty[i])]}), true diagnosis <b>{truth}</b>. "
            f"The GP trusts <b>expert {top}</b> most (weight {g[top]:.2f}); that expert says diagnosis "
            f"{int(probs[top].argmax())} ({probs[top].max():.0%} sure). The mixture says diagnosis "
            f"<b>{int(mix.argmax())}</b> ({mix.max():.0%})."
        )
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [1, 1.3]})
        expert_bars(g, title="the GP's weight on each doctor", ylabel="gate weight", ax=axes[0], highlight=top, ylim=(0, 1.1))
        table = torch.cat([probs, mix[None]]).numpy()  # (E + 1, classes)
        axes[1].imshow(table, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        for r in range(table.shape[0]):
            for c in range(num_classes):
                axes[1].text(
                    c,
                    r,
                    f"{table[r, c]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="black" if table[r, c] > 0.6 else "white",
                )
        axes[1].add_patch(plt.Rectangle((truth - 0.5, -0.5), 1, table.shape[0], fill=False, lw=2.5, ec="#DE8F05"))
        axes[1].set_yticks(range(table.shape[0]), [f"expert {e} (w={g[e]:.2f})" for e in range(num_experts)] + ["mixture"])
        axes[1].set_xticks(range(num_classes), [f"{c}" for c in range(num_classes)])
        axes[1].grid(False)
        axes[1].set(title="each doctor's answer (probability per diagnosis)", xlabel=f"diagnosis (true: {truth}, framed)")
        fig.tight_layout()
        chart.value = figure_png(fig)

    def draw_specialty(s: int) -> None:
        keep = specialty == s
        acc = expert_acc[s]  # (E,)
        mix_acc = float(mixture_correct[keep].mean()) if keep.any() else float("nan")
        top = int(mass[s].argmax())
        summary.value = (
            f"<b>{specialties[s]}</b>: {int(keep.sum())} patients. The GP sends them mostly to "
            f"<b>expert {top}</b> (mean weight {mass[s, top]:.2f}), who alone gets {acc[top]:.0%} of them right; "
            f"the mixture gets {mix_acc:.0%}."
        )
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
        expert_bars(
            mass[s],
            title=f"the GP's mean weight, {specialties[s]}",
            ylabel="mean gate weight",
            ax=axes[0],
            highlight=top,
            ylim=(0, 1.1),
        )
        values = np.append(acc.numpy(), mix_acc)
        expert_bars(
            values,
            labels=[f"expert {e}" for e in range(num_experts)] + ["mixture"],
            xlabel="",
            title=f"accuracy on {specialties[s]} patients",
            ylabel="held-out accuracy",
            ax=axes[1],
            highlight=top,
            ylim=(0, 1.1),
            fmt="{:.0%}",
        )
        axes[1].axhline(1 / num_classes, ls="--", color="gray", lw=1)
        fig.tight_layout()
        chart.value = figure_png(fig)

    def update(*_):
        patient.layout.display = None if mode.value == "one patient" else "none"
        chosen.layout.display = None if mode.value == "one specialty" else "none"
        if mode.value == "one patient":
            draw_patient(patient.value)
        else:
            draw_specialty(chosen.value)

    for control in (mode, patient, chosen):
        control.observe(update, names="value")
    update()
    return W.VBox([mode, W.HBox([patient, chosen]), summary, chart])


# == lesson 05: the waiting-room playground ========================================
def waiting_room_playground(clinic, *, steps: int = 200, batch_size: int = 64, seed: int = 0) -> W.Widget:
    """Sliders for the number of experts E, k, the capacity factor, router noise and the balance-loss weight α.

    Changing E, k or α trains a small ClinicMoE on ``clinic`` (about a second;
    each trained model is kept, so going back is instant). Changing the
    capacity factor or the noise re-routes the held-out patients with the
    trained router (``moe_course.experiments.playground.clinic_day``). Shows who saw whom,
    every waiting room's load against its capacity, who was turned away, and
    the held-out accuracy under the same settings.
    """
    from ..experiments.playground import clinic_day, train_clinic_moe
    from .plots import clinic_day_picture

    style = {"description_width": "initial"}
    experts = W.IntSlider(value=8, min=2, max=16, description="experts E", continuous_update=False, style=style)
    top_k = W.IntSlider(value=1, min=1, max=4, description="doctors per patient k", continuous_update=False, style=style)
    capacity = W.FloatSlider(
        value=1.0,
        min=0.25,
        max=3.0,
        step=0.25,
        description="capacity factor",
        continuous_update=False,
        readout_format=".2f",
        style=style,
    )
    noise = W.FloatSlider(
        value=0.0,
        min=0.0,
        max=3.0,
        step=0.25,
        description="router noise σ",
        continuous_update=False,
        readout_format=".2f",
        style=style,
    )
    balance = W.SelectionSlider(
        options=[0.0, 0.001, 0.01, 0.1, 1.0],
        value=0.01,
        description="balance-loss weight α",
        continuous_update=False,
        style=style,
    )
    summary = W.HTML()
    chart = W.Image(format="png", layout=W.Layout(width="980px"))
    models: dict[tuple[int, int, float], object] = {}

    def update(*_):
        top_k.max = min(4, experts.value)
        k = min(top_k.value, experts.value)
        key = (experts.value, k, float(balance.value))
        if key not in models:
            summary.value = f"<i>training a clinic with {experts.value} experts, k = {k}, α = {balance.value:g} …</i>"
            models[key] = train_clinic_moe(
                clinic, num_experts=experts.value, top_k=k, balance_weight=float(balance.value), steps=steps, seed=seed
            )
        day = clinic_day(models[key], clinic, capacity_factor=capacity.value, noise=noise.value, batch_size=batch_size, seed=seed)
        busiest = int(day.assigned.max())
        summary.value = (
            f"<b>{experts.value} experts, k = {k}, capacity factor {capacity.value:.2f}, noise σ = {noise.value:.2f}, α = {balance.value:g}</b>: "
            f"each waiting room has <b>C = {day.capacity}</b> chairs for {batch_size} patients; the busiest doctor was sent {busiest}. "
            f"Turned away in this batch: <b>{day.dropped} of {batch_size}</b>. Balance loss {day.aux_loss:.2f} (1.00 = even). "
            f"All held-out patients: <b>{day.dropped_share:.1%}</b> turned away, accuracy <b>{day.accuracy:.1%}</b>."
        )
        fig = clinic_day_picture(day, clinic.specialties)
        fig.tight_layout()
        chart.value = figure_png(fig)

    for control in (experts, top_k, capacity, noise, balance):
        control.observe(update, names="value")
    update()
    return W.VBox([W.HBox([experts, top_k, balance]), W.HBox([capacity, noise]), summary, chart])


__all__ += ["waiting_room_playground"]
