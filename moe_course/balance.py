"""Keeping the clinic running: measure how the GP spreads patients over the doctors.

Shape legend (used across the package): B batch, T time, D model width,
F hidden width, E experts, K top-k, C capacity, N = B·T tokens. Here a token
is a patient.

Lesson 05's experiments, as tested helpers:

    load_stats          one expert-load vector (E,) → idle doctors, the busiest doctor's share, ...
    LoadTracker         a ``train(..., callback=)`` that records the load and the router's logits over training
    evaluate_capacity   held-out accuracy and the share of dropped patients, in batches as in training
    capacity_sweep      train one ClinicMoE per capacity factor and measure both (Switch Transformer, Table 1, in small)

They work with any model whose output carries the routing: ``ClinicMoE``
(``out.moe`` is an ``MoEOutput``) or ``RoutedMixture`` (``RoutedOutput``);
``_routing`` picks the result that holds ``expert_index``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import pandas as pd
import torch
from torch import nn

from .clinic import Clinic, Patients
from .losses import expert_fraction, load_balancing_loss, router_z_loss
from .models import ClinicMoE
from .moe import MoEConfig
from .routing import expert_capacity
from .training import ClassificationTask, TrainConfig, evaluating, model_logits, train

__all__ = ["load_stats", "LoadTracker", "evaluate_capacity", "capacity_sweep"]


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
        self.rows.append({
            "step": step,
            "balance loss": float(load_balancing_loss(probs, expert_index)),
            "z-loss": float(router_z_loss(logits)),
            "largest |logit|": float(logits.abs().amax(dim=-1).mean()),
            **load_stats(shares),
        })

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


def capacity_sweep(
    clinic: Clinic,
    base: MoEConfig,
    config: TrainConfig,
    factors: Sequence[float | None],
    *,
    seed: int = 0,
    device: torch.device | str | None = "cpu",
    progress: bool = True,
) -> tuple[pd.DataFrame, dict[float | None, ClinicMoE]]:
    """Train one ``ClinicMoE`` per capacity factor (``None``: no limit) and measure it.

    Every model has ``base``'s config with ``capacity_factor`` replaced, the
    same seed and the same recipe ``config``; it trains and is evaluated with
    that capacity, in batches of ``config.batch_size``. Returns a table (one
    row per factor: capacity factor, slots per expert C in a batch, dropped
    share and accuracy on the held-out patients) and the trained models.
    """
    if not factors:
        raise ValueError("capacity_sweep needs at least one capacity factor")
    task = ClassificationTask.from_clinic(clinic)
    rows, models = [], {}
    for factor in factors:
        moe_config = dataclasses.replace(base, capacity_factor=factor)
        torch.manual_seed(seed)
        model = ClinicMoE(clinic.d_in, clinic.num_diagnoses, moe_config)
        train(model, task, dataclasses.replace(config, seed=seed), device=device, progress=progress)
        slots = None if factor is None else expert_capacity(config.batch_size, base.num_experts, factor, top_k=base.top_k, min_capacity=base.min_capacity)
        rows.append({"capacity factor": factor, "slots per expert": slots,
                     **evaluate_capacity(model, clinic.val, config.batch_size)})
        models[factor] = model.cpu()
    return pd.DataFrame(rows), models
