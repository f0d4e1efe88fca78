"""Keeping the clinic running: measure how the GP spreads patients over the doctors.

Shape legend (used across the package): B batch, T time, D model width,
F hidden width, E experts, K top-k, C capacity, N = B·T tokens. Here a token
is a patient.

Lesson 05's measurements (the runs that train the models are in
``moe_course.experiments.balance``):

    load_stats          one expert-load vector (E,) → idle doctors, the busiest doctor's share, ...
    max_over_mean_load  one number: the busiest expert's load over the mean load (1.0 = even; lesson 10)
    LoadTracker         a ``train(..., callback=)`` that records the load and the router's logits over training
    evaluate_capacity   held-out accuracy and the share of dropped patients, in batches as in training
    batch_loads         how many patients each expert is sent in every batch, before any is turned away
    overflow_share      the share of assignments beyond C chairs, for loads like those

They work with any model whose output carries the routing: ``ClinicMoE``
(``out.moe`` is an ``MoEOutput``) or ``RoutedMixture`` (``RoutedOutput``);
``_routing`` picks the result that holds ``expert_index``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..data.clinic import Patients
from ..losses import expert_fraction, load_balancing_loss, router_z_loss
from ..training.loop import evaluating, model_logits

__all__ = ["load_stats", "max_over_mean_load", "LoadTracker", "evaluate_capacity", "batch_loads", "overflow_share"]


def _routing(output: Any) -> Any:
    """The result that holds the routing: ``ClinicMoEOutput.moe`` (an ``MoEOutput``), or a ``RoutedOutput`` itself."""
    inner = getattr(output, "moe", output)
    if not hasattr(inner, "expert_index") or not hasattr(inner, "router_logits"):
        raise TypeError(f"{type(output).__name__} carries no routing (expected expert_index and router_logits)")
    return inner


def load_stats(shares: torch.Tensor, *, idle_below: float = 0.25) -> dict[str, float]:
    """Summaries of one load vector: shares (E,) that sum to 1 (e.g. ``losses.expert_fraction``).

    - ``busiest share``: the largest share (1/E when perfectly balanced, 1 when one doctor takes everyone);
    - ``idle doctors``: experts receiving less than ``idle_below`` × their fair share 1/E;
    - ``load CV``: the coefficient of variation (std / mean) of the shares, 0 when balanced.
    """
    if shares.ndim != 1 or shares.numel() == 0:
        raise ValueError(f"shares must be a non-empty vector (E,), got shape {tuple(shares.shape)}")
    s = shares.detach().double().cpu()
    e = s.numel()
    return {
        "busiest share": float(s.max()),
        "idle doctors": int((s < idle_below / e).sum()),
        "load CV": float(s.std(unbiased=False) / s.mean()) if e > 1 else 0.0,
    }


def max_over_mean_load(load: torch.Tensor) -> float:
    """How uneven a load is: the busiest expert's load over the mean load (1.0 = perfectly even, E = one expert takes all).

    load (E,): tokens or assignments per expert, or shares. DeepSeek's "maximal
    violation" is this minus 1 (Wang et al. 2024, arXiv:2408.15664).
    """
    if not isinstance(load, torch.Tensor) or load.ndim != 1 or load.numel() == 0:
        raise ValueError(f"load must be a non-empty (E,) tensor, got {tuple(getattr(load, 'shape', ()))}")
    load = load.float()
    if load.sum() <= 0:
        raise ValueError("load must have a positive total")
    return float(load.max() / load.mean())


@dataclass
class LoadTracker:
    """A ``train(..., callback=tracker)`` callback: the experts' load and the router's logits over training.

    At each call it runs the model on ``x`` (``training.evaluating``: eval mode, no gradients) and appends one
    row: the step, the Switch balance loss (1.0 when even), the router z-loss
    (mean logsumexp² of the logits), the mean largest |logit|, and ``load_stats``.
    Call ``tracker(0, model)`` before training to record the start.
    """

    x: torch.Tensor  # (N, D) patients to watch, e.g. the held-out set
    rows: list[dict[str, float]] = field(default_factory=list)
    shares: list[torch.Tensor] = field(default_factory=list)  # one (E,) load vector per call

    def __call__(self, step: int, model: nn.Module) -> None:
        device = next(model.parameters()).device
        with evaluating(model):
            routing = _routing(model(self.x.to(device)))
        logits = routing.router_logits.detach().float().cpu()  # (N, E)
        expert_index = routing.expert_index.cpu()  # (N, K)
        shares = expert_fraction(expert_index, logits.shape[-1])  # (E,) before dropping
        probs = torch.softmax(logits, dim=-1)
        self.shares.append(shares)
        self.rows.append(
            {
                "step": step,
                "balance loss": float(load_balancing_loss(probs, expert_index)),
                "z-loss": float(router_z_loss(logits)),
                "largest |logit|": float(logits.abs().amax(dim=-1).mean()),
                **load_stats(shares),
            }
        )

    @property
    def history(self) -> pd.DataFrame:
        """One row per call: step, balance loss, z-loss, largest |logit|, busiest share, idle doctors, load CV."""
        return pd.DataFrame(self.rows)


def evaluate_capacity(model: nn.Module, patients: Patients, batch_size: int) -> dict[str, float]:
    """Held-out accuracy and the share of dropped patients, in batches of ``batch_size``.

    Capacity is counted per call (C = ceil(N/E · factor) for N patients in the
    call), so evaluating in batches of the training batch size sees the same
    waiting rooms as training did. A patient is dropped when none of its
    choices fit (it then skips the experts; in ``ClinicMoE`` its embedding
    goes straight to the head through the residual connection).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if len(patients) == 0:
        raise ValueError("no patients to evaluate")
    device = next(model.parameters()).device
    model.eval()
    correct = dropped = 0
    with torch.no_grad():
        for start in range(0, len(patients), batch_size):
            x = patients.x[start : start + batch_size].to(device)
            out = model(x)
            logits, _ = model_logits(out)
            correct += int((logits.argmax(-1).cpu() == patients.diagnosis[start : start + batch_size]).sum())
            dropped += int(getattr(_routing(out), "num_dropped", 0))  # a RoutedOutput drops no one
    n = len(patients)
    return {"held-out accuracy": correct / n, "dropped share": dropped / n}


def batch_loads(model: nn.Module, patients: Patients, batch_size: int) -> torch.Tensor:
    """How many assignments each expert gets in every batch, before anyone is turned away → (batches, E).

    The patients are cut into consecutive batches of ``batch_size`` (a last,
    shorter batch is left out, so every row counts the same number of
    patients). A row sums to batch_size · k.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if len(patients) < batch_size:
        raise ValueError(f"need at least one full batch: {len(patients)} patients, batch_size {batch_size}")
    device = next(model.parameters()).device
    rows = []
    with evaluating(model):
        for start in range(0, len(patients) - batch_size + 1, batch_size):
            routing = _routing(model(patients.x[start : start + batch_size].to(device)))
            num_experts = routing.router_logits.shape[-1]
            rows.append(torch.bincount(routing.expert_index.reshape(-1).cpu(), minlength=num_experts))
    return torch.stack(rows)  # (batches, E)


def overflow_share(loads: torch.Tensor, capacity: int | float) -> float:
    """The share of all assignments beyond ``capacity`` chairs per expert: loads (batches, E) or (E,).

    With top-1 routing and first come, first served, these are exactly the
    patients a capacity of ``capacity`` turns away: Σ max(0, load − C) / Σ load.
    ``capacity`` may be fractional (e.g. a mean load), then it is rounded up as a capacity would be.
    """
    if loads.ndim not in (1, 2) or loads.numel() == 0:
        raise ValueError(f"loads must be (E,) or (batches, E), got shape {tuple(loads.shape)}")
    if not capacity >= 0:
        raise ValueError(f"capacity must be >= 0, got {capacity!r}")
    loads = loads.double()
    total = float(loads.sum())
    if total == 0:
        return 0.0
    return float((loads - math.ceil(capacity)).clamp_min(0).sum()) / total
