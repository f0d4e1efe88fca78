"""Interactive playgrounds for the lessons (ipywidgets).

Each function builds and returns a widget; the lesson displays it. The
numbers behind every widget come from the package's tested functions.
"""

from __future__ import annotations

import ipywidgets as W
import matplotlib.pyplot as plt
from IPython.display import display

from .flops import ffn_flops, ffn_param_count, matmul_flops

__all__ = ["hospital_numbers", "hospital_explorer"]


def hospital_numbers(num_experts: int, top_k: int, d_model: int, d_ff: int) -> dict[str, int]:
    """Parameters and FLOPs per token of an MoE layer (E experts of width F, top-k) and of one dense FFN.

    The router is a (D, E) matrix: D·E parameters, 2·D·E FLOPs per token.
    """
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be between 1 and num_experts={num_experts}, got {top_k}")
    expert = ffn_param_count(d_model, d_ff)
    return {
        "dense parameters": expert,
        "dense FLOPs per token": ffn_flops(1, d_model, d_ff),
        "MoE parameters": num_experts * expert + d_model * num_experts,
        "MoE FLOPs per token": top_k * ffn_flops(1, d_model, d_ff) + matmul_flops(1, d_model, num_experts),
    }


def hospital_explorer(d_model: int = 512, d_ff: int = 2048) -> W.Widget:
    """Sliders for the number of specialists (experts) and how many each patient sees (k).

    Shows what the hospital *knows* (parameters) and what one visit *costs*
    (FLOPs per token), relative to a single doctor (one dense FFN).
    """
    experts = W.IntSlider(value=8, min=1, max=64, description="specialists E", continuous_update=False,
                          style={"description_width": "initial"})
    top_k = W.IntSlider(value=1, min=1, max=8, description="seen per patient k", continuous_update=False,
                        style={"description_width": "initial"})
    summary = W.HTML()
    chart = W.Output()

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
        with chart:
            chart.clear_output(wait=True)
            fig, ax = plt.subplots(figsize=(6, 2.6))
            ax.barh(["effort per patient\n(FLOPs per token)", "knowledge\n(parameters)"], [costs, knows],
                    color=["#DE8F05", "#0173B2"])
            ax.axvline(1.0, color="gray", ls="--", lw=1)
            ax.set(xlabel="relative to one doctor (one dense FFN of the same width)", xlim=(0, max(8.0, knows * 1.1)),
                   title="An MoE layer: knowledge grows with E, effort with k")
            for y, v in enumerate([costs, knows]):
                ax.text(v, y, f" {v:.2f}×", va="center")
            fig.tight_layout()
            display(fig)
            plt.close(fig)

    experts.observe(update, names="value")
    top_k.observe(update, names="value")
    update()
    return W.VBox([W.HBox([experts, top_k]), summary, chart])
