"""Baselines for the clinic: one generalist, or a team of specialists with a perfect GP.

The *oracle* team is an upper bound the routed models of later lessons aim
for: each specialist trains only on its own specialty's patients, and every
patient is sent to the right specialist because we peek at the label.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from ..data.clinic import Clinic
from ..experts import FeedForward
from ..training.loop import ClassificationTask, TrainConfig, train

__all__ = ["Team", "train_specialists", "oracle_logits"]


@dataclass
class Team:
    """Specialists trained on their own specialty, and their training histories."""

    specialists: list[nn.Module]  # one per specialty
    histories: list[pd.DataFrame]  # one per specialist

    def __call__(self, x: torch.Tensor, specialty: torch.Tensor) -> torch.Tensor:
        return oracle_logits(self.specialists, x, specialty)


def oracle_logits(specialists: list[nn.Module], x: torch.Tensor, specialty: torch.Tensor) -> torch.Tensor:
    """Logits of each patient's own specialist: x (N, d_in), specialty (N,) → (N, classes)."""
    with torch.no_grad():
        outs = torch.stack([m(x) for m in specialists], dim=1)  # (N, S, classes)
    return outs[torch.arange(len(x)), specialty]  # (N, classes)


def train_specialists(
    clinic: Clinic,
    d_ff: int,
    config: TrainConfig,
    *,
    device: torch.device | str | None = "cpu",
    progress: bool = True,
) -> Team:
    """Train one ``FeedForward(d_in, d_ff, d_out=num_diagnoses)`` per specialty on its own patients.

    Each specialist gets the full ``config`` (same steps and batch size as a
    generalist would), with a different model and sampler seed per specialty.
    """
    specialists, histories = [], []
    for s in range(clinic.num_specialties):
        torch.manual_seed(config.seed * 1000 + s)
        model = FeedForward(clinic.d_in, d_ff, d_out=clinic.num_diagnoses)
        own_train, own_val = clinic.train.of_specialty(s), clinic.val.of_specialty(s)
        task = ClassificationTask(own_train.x, own_train.diagnosis, own_val.x, own_val.diagnosis)
        cfg = TrainConfig(**{**config.__dict__, "seed": config.seed * 1000 + s})
        result = train(model, task, cfg, device=device, progress=progress)
        specialists.append(result.model.cpu())
        histories.append(result.history.assign(specialty=clinic.specialties[s]))
    return Team(specialists, histories)
