"""Lesson 05's playground: one day at the clinic under settings you choose.

Shape legend (used across the package): B batch, T time, D model width,
F hidden width, E experts, K top-k, C capacity, N = B·T tokens. Here a token
is a patient.

Two steps, so that the widget stays quick:

1. ``train_clinic_moe``: a small ``ClinicMoE`` trained (dropless, as
   lesson 05 does) with E experts, top-k routing and a load-balancing weight α.
   This takes about a second; the widget caches one model per (E, k, α).
2. ``clinic_day``: route a batch of held-out patients through the trained
   model under a capacity factor and router noise, and measure what happens:
   who sees whom, how full every waiting room is, who is turned away, and the
   held-out accuracy under the same settings.

Router noise σ: Gaussian noise N(0, σ²) added to the router's logits before
the choice, at the same scale for every patient and expert (noisy top-k with
a fixed, not learned, scale). It is drawn from a fixed seed, so moving another
slider does not reshuffle it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .clinic import Clinic
from .dispatch import dispatch
from .losses import load_balancing_loss
from .models import ClinicMoE
from .moe import MoEConfig
from .routing import capacity_mask, expert_capacity, switch_routing, top_k_routing
from .training import ClassificationTask, TrainConfig, train

__all__ = ["train_clinic_moe", "routed_forward", "RoutedDay", "ClinicDay", "clinic_day"]


def train_clinic_moe(
    clinic: Clinic,
    *,
    num_experts: int,
    top_k: int = 1,
    balance_weight: float = 1e-2,
    steps: int = 200,
    d_model: int = 16,
    d_ff: int = 16,
    lr: float = 1e-2,
    batch_size: int = 128,
    seed: int = 0,
) -> ClinicMoE:
    """A small ClinicMoE trained on ``clinic`` without a capacity limit; Switch router for k = 1, top-k otherwise."""
    config = MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=num_experts, top_k=top_k,
                       router="switch" if top_k == 1 else "top_k", aux_loss_coef=balance_weight, z_loss_coef=0.0)
    torch.manual_seed(seed)
    model = ClinicMoE(clinic.d_in, clinic.num_diagnoses, config)
    train(model, ClassificationTask.from_clinic(clinic), TrainConfig(steps=steps, batch_size=batch_size, lr=lr, eval_every=steps, seed=seed),
          device="cpu", progress=False)
    return model.eval()


@dataclass(frozen=True)
class RoutedDay:
    """What ``routed_forward`` computed for N patients."""

    logits: torch.Tensor  # (N, classes) the diagnosis scores
    router_logits: torch.Tensor  # (N, E) the clean router logits
    expert_index: torch.Tensor  # (N, K) chosen experts, after noise
    gates: torch.Tensor  # (N, K)
    keep: torch.Tensor  # (N, K) bool, False where the waiting room was full
    capacity: int | None  # C, chairs per expert in this batch (None: no limit)


def routed_forward(
    model: ClinicMoE,
    x: torch.Tensor,
    *,
    capacity_factor: float | None,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> RoutedDay:
    """``model``'s forward pass with a capacity factor and router noise chosen now, not at training.

    The same computation as ``ClinicMoE.forward`` (embed, router, routing,
    capacity, experts, residual, head), with noise σ·ε (ε ~ N(0, 1) from
    ``generator``) added to the router logits before the choice, and
    capacity C = ceil(K·N/E · capacity_factor) for the N patients of x.
    With noise 0 and the model's own capacity factor it equals ``model(x)``.
    """
    if not isinstance(model, ClinicMoE):
        raise TypeError(f"routed_forward expects a ClinicMoE, got {type(model).__name__}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a number >= 0, got {noise!r}")
    layer, cfg = model.moe, model.moe.config
    with torch.no_grad():
        h = model.embed(x)  # (N, D)
        clean = layer.router(h)  # (N, E)
        logits = clean + noise * torch.randn(clean.shape, generator=generator) if noise > 0 else clean
        routing = switch_routing(logits) if cfg.router == "switch" else top_k_routing(logits, cfg.top_k)
        if capacity_factor is None:
            capacity = None
            keep = torch.ones_like(routing.expert_index, dtype=torch.bool)
        else:
            capacity = expert_capacity(len(x), cfg.num_experts, capacity_factor, top_k=cfg.top_k, min_capacity=cfg.min_capacity)
            keep = capacity_mask(routing.expert_index, cfg.num_experts, capacity).keep  # (N, K)
        y = dispatch(h, layer.experts, routing.expert_index, routing.gates, keep)  # (N, D)
        out = model.head(h + y if model.residual else y)  # (N, classes)
    return RoutedDay(out, clean, routing.expert_index, routing.gates, keep, capacity)


@dataclass(frozen=True)
class ClinicDay:
    """One batch of patients routed under the chosen settings, and held-out numbers under the same settings."""

    specialty: torch.Tensor  # (B,) the specialty of each patient of the batch, in arrival order
    expert_index: torch.Tensor  # (B, K)
    gates: torch.Tensor  # (B, K)
    keep: torch.Tensor  # (B, K) bool
    capacity: int | None  # C, chairs per expert for this batch (None: no limit)
    num_experts: int
    aux_loss: float  # unweighted Switch balance loss of the batch, 1.0 when even
    accuracy: float  # held-out accuracy, all patients routed in batches of B under the same settings
    dropped_share: float  # share of held-out patients turned away (no expert at all)

    @property
    def assigned(self) -> torch.Tensor:
        """(E,) patients sent to each expert (all K choices counted), before dropping."""
        return torch.bincount(self.expert_index.reshape(-1), minlength=self.num_experts)

    @property
    def seen(self) -> torch.Tensor:
        """(E,) patients each expert actually saw (kept assignments)."""
        return torch.bincount(self.expert_index[self.keep], minlength=self.num_experts)

    @property
    def dropped(self) -> int:
        """Patients of the batch who saw no expert at all."""
        return int((~self.keep.any(dim=-1)).sum())


def clinic_day(
    model: ClinicMoE,
    clinic: Clinic,
    *,
    capacity_factor: float | None,
    noise: float = 0.0,
    batch_size: int = 64,
    seed: int = 0,
) -> ClinicDay:
    """Route the first ``batch_size`` held-out patients, and all of them in batches for the accuracy."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    val = clinic.val
    model.eval()
    shown = None
    correct = dropped = 0
    generator = torch.Generator().manual_seed(seed)  # the same noise for the same settings
    for start in range(0, len(val), batch_size):
        x = val.x[start : start + batch_size]
        day = routed_forward(model, x, capacity_factor=capacity_factor, noise=noise, generator=generator)
        correct += int((day.logits.argmax(-1) == val.diagnosis[start : start + batch_size]).sum())
        dropped += int((~day.keep.any(dim=-1)).sum())
        if shown is None:
            shown = day
    probs = F.softmax(shown.router_logits, dim=-1)
    return ClinicDay(
        specialty=val.specialty[: len(shown.logits)],
        expert_index=shown.expert_index,
        gates=shown.gates,
        keep=shown.keep,
        capacity=shown.capacity,
        num_experts=model.moe.config.num_experts,
        aux_loss=float(load_balancing_loss(probs, shown.expert_index)),
        accuracy=correct / len(val),
        dropped_share=dropped / len(val),
    )
