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

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.clinic import Clinic
from ..losses import load_balancing_loss
from ..models import ClinicMoE
from ..moe import MoEConfig, MoELayer
from ..training.loop import CLINIC_LR, ClassificationTask, TrainConfig, train

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
    lr: float = CLINIC_LR,
    batch_size: int = 128,
    seed: int = 0,
) -> ClinicMoE:
    """A small ClinicMoE trained on ``clinic`` without a capacity limit; Switch router for k = 1, top-k otherwise."""
    config = MoEConfig(
        d_model=d_model,
        d_ff=d_ff,
        num_experts=num_experts,
        top_k=top_k,
        router="switch" if top_k == 1 else "top_k",
        aux_loss_coef=balance_weight,
        z_loss_coef=0.0,
    )
    torch.manual_seed(seed)
    model = ClinicMoE(clinic.d_in, clinic.num_diagnoses, config)
    train(
        model,
        ClassificationTask.from_clinic(clinic),
        TrainConfig(steps=steps, batch_size=batch_size, lr=lr, eval_every=steps, seed=seed),
        device="cpu",
        progress=False,
    )
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


@contextmanager
def _routed_as(layer: MoELayer, logits: torch.Tensor, capacity_factor: float | None) -> Iterator[None]:
    """Inside the block the layer routes on ``logits`` (N, E) and has ``capacity_factor``; both are restored after."""
    config = layer.config
    layer.config = dataclasses.replace(config, capacity_factor=capacity_factor)
    layer.router = lambda tokens: logits  # an instance attribute hides MoELayer.router for this call only
    try:
        yield
    finally:
        del layer.router
        layer.config = config


def routed_forward(
    model: ClinicMoE,
    x: torch.Tensor,
    *,
    capacity_factor: float | None,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> RoutedDay:
    """``model(x)`` with a capacity factor and router noise chosen now, not at training.

    The model's own forward pass (embed, MoE layer, residual, head), with noise
    σ·ε (ε ~ N(0, 1) from ``generator``) added to the router logits before the
    choice, and capacity C = ceil(K·N/E · capacity_factor) for the N patients of x.
    With noise 0 and the model's own capacity factor it is ``model(x)``.
    """
    if not isinstance(model, ClinicMoE):
        raise TypeError(f"routed_forward expects a ClinicMoE, got {type(model).__name__}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a number >= 0, got {noise!r}")
    layer = model.moe
    with torch.no_grad():
        clean = layer.router(model.embed(x))  # (N, E)
        logits = clean + noise * torch.randn(clean.shape, generator=generator) if noise > 0 else clean
        with _routed_as(layer, logits, capacity_factor):
            out = model(x)
    moe = out.moe
    return RoutedDay(out.logits, clean, moe.expert_index, moe.gates, moe.keep, moe.capacity)


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
