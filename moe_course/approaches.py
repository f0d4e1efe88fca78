"""The essay's four approaches, measured side by side on the clinic (lesson 04's headline).

Shape legend (used across the package): B batch, T time, D model width,
F hidden width, E experts, K top-k, C capacity, N = B·T tokens. Here a token
is a patient.

    1 · second opinions     an ensemble of E identical MLPs of F hidden units each (lesson 02)
    2 · a generalist        one MLP of E·F hidden units (lessons 01-02)
    3 · every specialist    DenseMixture: a gate and E experts of F units, all of them run (lesson 03)
    4 · the GP              RoutedMixture: the same gate and experts, each patient sees its top-1 (lesson 04)

The budget is matched: every approach has E·F hidden units in all, so the
parameter counts agree to within a few per cent (the gate, and E output
layers instead of one, are the difference). What differs is how many of those
units a patient pays for. FLOPs per patient are *measured*: PyTorch's FLOP
counter (``torch.utils.flop_counter``) records every matmul the trained model
runs on the held-out patients (2 FLOPs per multiply-add, the course's
convention), divided by the number of patients.

Optionally a fifth row, the specialists with a perfect GP (``specialists``,
the oracle that peeks at the specialty), gives the upper bound the GP aims at.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import pandas as pd
import torch
from torch import nn

from .clinic import Clinic
from .ensembles import train_ensemble
from .experts import FeedForward
from .flops import count_parameters, measure_flops_per_example
from .mixture import DenseMixture, DenseMixtureConfig
from .routed import RoutedMixture, RoutedMixtureConfig
from .specialists import train_specialists
from .training import ClassificationTask, TrainConfig, model_logits, train

__all__ = ["APPROACHES", "ORACLE", "measure_flops_per_example", "FourApproaches", "four_approaches"]

APPROACHES = (
    "1 · second opinions (ensemble)",
    "2 · one generalist",
    "3 · every specialist (dense mixture)",
    "4 · the GP (top-1 routing)",
)
ORACLE = "specialists with a perfect GP (oracle)"


def _own_specialist(specialists: Sequence[nn.Module], specialty: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The oracle's visit: each patient of x (N, D) sees only the specialist of its specialty (N,)."""

    def predict(x: torch.Tensor) -> torch.Tensor:
        if len(x) != len(specialty):
            raise ValueError(f"the oracle knows the specialties of {len(specialty)} patients, got {len(x)}")
        out = None
        for s, model in enumerate(specialists):
            rows = (specialty == s).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            logits = model(x[rows])  # (M, classes)
            out = x.new_zeros(len(x), logits.shape[-1]) if out is None else out
            out = out.index_copy(0, rows, logits)
        return out

    return predict


def _eval_mode(model: nn.Module) -> nn.Module:
    model.eval()
    return model


@dataclass
class FourApproaches:
    """The measurements, one row per (approach, seed), and the models of the first seed."""

    table: pd.DataFrame  # columns: approach, seed, parameters, FLOPs per patient, held-out accuracy
    models: dict[str, Any] = field(default_factory=dict)  # approach → trained model (first seed)

    def summary(self) -> pd.DataFrame:
        """One row per approach: parameters, FLOPs per patient, accuracy (mean, min, max over seeds)."""
        grouped = self.table.groupby("approach", sort=False)
        out = grouped.agg(
            parameters=("parameters", "first"),
            flops=("FLOPs per patient", "mean"),
            accuracy=("held-out accuracy", "mean"),
            worst=("held-out accuracy", "min"),
            best=("held-out accuracy", "max"),
            seeds=("seed", "count"),
        )
        return out.rename(columns={"flops": "FLOPs per patient", "accuracy": "accuracy (mean)",
                                   "worst": "accuracy (worst seed)", "best": "accuracy (best seed)"})


def four_approaches(
    clinic: Clinic,
    config: TrainConfig,
    *,
    num_experts: int = 4,
    d_ff: int = 16,
    seeds: Sequence[int] = (0, 1),
    aux_loss_coef: float = 1e-2,
    oracle: bool = True,
    device: torch.device | str | None = "cpu",
    progress: bool = True,
) -> FourApproaches:
    """Train the four approaches (and the oracle) on ``clinic`` for every seed and measure them.

    Every model gets the same recipe ``config`` (its ``seed`` is replaced by
    each seed in turn). E = ``num_experts`` doctors of F = ``d_ff`` hidden units
    each; the generalist has E·F units. The GP is ``RoutedMixture`` with the
    Switch router (top-1, raw gate) and the load-balancing loss weighted by
    ``aux_loss_coef``. Accuracy and FLOPs are measured on ``clinic.val``.
    """
    if not seeds:
        raise ValueError("four_approaches needs at least one seed")
    for name, value in (("num_experts", num_experts), ("d_ff", d_ff)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    task = ClassificationTask.from_clinic(clinic)
    d, c = clinic.d_in, clinic.num_diagnoses
    x, y = clinic.val.x, clinic.val.diagnosis
    rows: list[dict[str, Any]] = []
    models: dict[str, Any] = {}

    def record(name: str, seed: int, params: int, predict: Callable[[torch.Tensor], torch.Tensor], model: Any) -> None:
        with torch.no_grad():
            accuracy = (predict(x).argmax(-1) == y).float().mean().item()
        rows.append({"approach": name, "seed": seed, "parameters": params,
                     "FLOPs per patient": measure_flops_per_example(predict, x), "held-out accuracy": accuracy})
        models.setdefault(name, model)

    def fit(make: Callable[[], nn.Module], seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = make()
        train(model, task, TrainConfig(**{**config.__dict__, "seed": seed}), device=device, progress=progress)
        return _eval_mode(model.cpu())

    for seed in seeds:
        cfg = TrainConfig(**{**config.__dict__, "seed": seed})
        ensemble = train_ensemble(lambda: FeedForward(d, d_ff, d_out=c), task, cfg, num_experts, device=device, progress=progress)
        record(APPROACHES[0], seed, sum(count_parameters(m) for m in ensemble.members), ensemble.probs, ensemble)

        generalist = fit(lambda: FeedForward(d, num_experts * d_ff, d_out=c), seed)
        record(APPROACHES[1], seed, count_parameters(generalist), generalist, generalist)

        dense = fit(lambda: DenseMixture(DenseMixtureConfig(d, d_ff, c, num_experts)), seed)
        record(APPROACHES[2], seed, count_parameters(dense), lambda v: dense(v).logits, dense)

        routed_config = RoutedMixtureConfig(d, d_ff, c, num_experts, top_k=1, router="switch", aux_loss_coef=aux_loss_coef)
        routed = fit(lambda: RoutedMixture(routed_config), seed)
        record(APPROACHES[3], seed, count_parameters(routed), lambda v: routed(v).logits, routed)

        if oracle:
            torch.manual_seed(seed)
            team = train_specialists(clinic, d_ff=d_ff, config=cfg, device=device, progress=progress)
            params = sum(count_parameters(m) for m in team.specialists)
            record(ORACLE, seed, params, _own_specialist(team.specialists, clinic.val.specialty), team)
    return FourApproaches(pd.DataFrame(rows), models)
