"""Lesson 05's runs: ClinicMoEs trained over recipes and seeds, and over capacity factors.

Shape legend (used across the package): B batch, T time, D model width,
F hidden width, E experts, K top-k, C capacity, N = B·T tokens. Here a token
is a patient.

    ClinicRun, run_clinic_moes
                        train many ClinicMoEs (recipes × seeds), two at a time in worker processes
    capacity_sweep      train one ClinicMoE per capacity factor and measure both (Switch Transformer, Table 1, in small)

What they measure (the load, the dropped share) is in ``moe_course.analysis.load``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from ..analysis.load import LoadTracker, evaluate_capacity
from ..data.clinic import Clinic
from ..device import seed_everything
from ..models import ClinicMoE
from ..moe import MoEConfig
from ..routing import expert_capacity
from ..training.loop import ClassificationTask, TrainConfig, train
from .workers import one_thread, run_in_workers

__all__ = ["ClinicRun", "ClinicRunResult", "run_clinic_moes", "capacity_sweep"]


@dataclass(frozen=True)
class ClinicRun:
    """One ``ClinicMoE`` to train: ``label`` names the recipe (runs of one label differ only in ``seed``)."""

    label: str  # e.g. "no balance loss"
    moe: MoEConfig
    seed: int = 0  # seeds the initialisation and the batch sampler (overrides the TrainConfig's seed)

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not self.label:
            raise ValueError(f"ClinicRun.label must be a non-empty string, got {self.label!r}")
        if not isinstance(self.moe, MoEConfig):
            raise TypeError(f"ClinicRun.moe must be an MoEConfig, got {type(self.moe).__name__}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"ClinicRun.seed must be an int >= 0, got {self.seed!r}")


@dataclass
class ClinicRunResult:
    """A trained ``ClinicMoE``, its load over training and its final held-out accuracy."""

    run: ClinicRun
    model: ClinicMoE
    tracker: LoadTracker  # the load every ``eval_every`` steps, from step 0
    accuracy: float  # held-out accuracy at the end
    seconds: float  # wall-clock time of the training


def _train_one(clinic: Clinic, run: ClinicRun, *, config: TrainConfig) -> tuple[dict, LoadTracker, float, float]:
    seed_everything(run.seed)
    model = ClinicMoE(clinic.d_in, clinic.num_diagnoses, run.moe)
    tracker = LoadTracker(clinic.val.x)
    tracker(0, model)  # the load at initialisation
    start = time.perf_counter()
    result = train(
        model,
        ClassificationTask.from_clinic(clinic),
        dataclasses.replace(config, seed=run.seed),
        device="cpu",
        progress=False,
        callback=tracker,
    )
    return model.state_dict(), tracker, float(result.final["val_acc"]), time.perf_counter() - start


def run_clinic_moes(
    clinic: Clinic, runs: Sequence[ClinicRun], config: TrainConfig, *, workers: int = 2, progress: bool = True
) -> list[ClinicRunResult]:
    """Train every run on ``clinic`` with the recipe ``config`` → results in the order of ``runs``.

    ``workers`` runs train at once, each in its own one-thread process
    (``moe_course.experiments.workers``; ``workers=1``: one after another in this process,
    also on one thread). A result does not depend on where it ran: the model is
    built after ``seed_everything(run.seed)``, the batches come from a generator
    seeded by the run's seed, and every run trains on one thread. Models train
    on the CPU (they are tiny).
    """
    runs = list(runs)
    if not runs:
        raise ValueError("run_clinic_moes needs at least one ClinicRun")
    for r in runs:
        if not isinstance(r, ClinicRun):
            raise TypeError(f"run_clinic_moes expects ClinicRun objects, got {type(r).__name__}")
    with one_thread():  # in this process too, so that workers=1 gives the workers' numbers
        raw = run_in_workers(
            functools.partial(_train_one, clinic, config=config),
            runs,
            workers=workers,
            progress=progress,
            desc="training runs",
            name=lambda r: f"{r.label}, seed {r.seed}",
        )
    results = []
    for r, (state, tracker, accuracy, seconds) in zip(runs, raw):
        model = ClinicMoE(clinic.d_in, clinic.num_diagnoses, r.moe)
        model.load_state_dict(state)
        results.append(ClinicRunResult(r, model.eval(), tracker, accuracy, seconds))
    return results


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
        slots = (
            None
            if factor is None
            else expert_capacity(config.batch_size, base.num_experts, factor, top_k=base.top_k, min_capacity=base.min_capacity)
        )
        rows.append(
            {"capacity factor": factor, "slots per expert": slots, **evaluate_capacity(model, clinic.val, config.batch_size)}
        )
        models[factor] = model.cpu()
    return pd.DataFrame(rows), models
