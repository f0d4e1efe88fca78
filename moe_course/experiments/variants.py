"""Lesson 09's runs: the clinic's Switch layer against Soft MoE and adaptive routers, over seeds.

Shape legend (used across the package): B batch, T time, D model width,
F hidden width, E experts, K top-k, C capacity, N = B·T tokens. Here a token
is a patient.

    VariantRun, run_variants   train ClinicMoE, ClinicSoftMoE or ClinicAdaptiveMoE runs, two at a time in worker processes
    waiting_room_effect        how often a patient's diagnosis changes with the other patients of its group (Soft MoE)
    compute_profile            which patients an adaptive router gives more experts: by specialty, by how
                               ambiguous the referral letter is, and the accuracy by experts used

The models are in ``moe_course.variants`` (Soft MoE, adaptive routers) and
``moe_course.models`` (the Switch baseline).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from ..data.clinic import Clinic, Patients
from ..device import seed_everything
from ..models import ClinicMoE
from ..moe import MoEConfig
from ..training.loop import ClassificationTask, TrainConfig, model_logits, train
from ..variants.adaptive import AdaptiveMoEConfig, ClinicAdaptiveMoE, blur_referrals, compute_by_group
from ..variants.soft_moe import ClinicSoftMoE, SoftMoEConfig
from .workers import one_thread, run_in_workers

__all__ = ["VariantRun", "VariantResult", "build_model", "run_variants", "waiting_room_effect", "compute_profile"]


@dataclass(frozen=True)
class VariantRun:
    """One clinic model to train: ``label`` names the recipe (runs of one label differ only in ``seed``)."""

    label: str  # e.g. "Soft MoE"
    model: MoEConfig | SoftMoEConfig | AdaptiveMoEConfig  # ClinicMoE, ClinicSoftMoE or ClinicAdaptiveMoE
    seed: int = 0  # seeds the initialisation and the batch sampler (overrides the TrainConfig's seed)
    group_size: int = 32  # Soft MoE only: patients per group; a slot blends the patients of one group

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not self.label:
            raise ValueError(f"VariantRun.label must be a non-empty string, got {self.label!r}")
        if not isinstance(self.model, (MoEConfig, SoftMoEConfig, AdaptiveMoEConfig)):
            raise TypeError(
                f"VariantRun.model must be an MoEConfig, SoftMoEConfig or AdaptiveMoEConfig, got {type(self.model).__name__}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"VariantRun.seed must be an int >= 0, got {self.seed!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0:
            raise ValueError(f"VariantRun.group_size must be a positive int, got {self.group_size!r}")


@dataclass
class VariantResult:
    """A trained model, its history and its final held-out accuracy."""

    run: VariantRun
    model: nn.Module  # in eval mode, on the CPU
    history: pd.DataFrame  # train's history: one row per evaluation
    accuracy: float  # held-out accuracy at the end (Soft MoE: the held-out patients in their own order, 32 at a time)
    seconds: float  # wall-clock time of the training


def build_model(clinic: Clinic, run: VariantRun) -> nn.Module:
    """The untrained model of ``run`` for ``clinic`` (seed it first)."""
    d_in, classes = clinic.d_in, clinic.num_diagnoses
    if isinstance(run.model, SoftMoEConfig):
        return ClinicSoftMoE(d_in, classes, run.model, group_size=run.group_size)
    if isinstance(run.model, AdaptiveMoEConfig):
        return ClinicAdaptiveMoE(d_in, classes, run.model)
    return ClinicMoE(d_in, classes, run.model)


def _train_one(clinic: Clinic, run: VariantRun, *, config: TrainConfig) -> tuple[dict, pd.DataFrame, float, float]:
    seed_everything(run.seed)
    model = build_model(clinic, run)
    start = time.perf_counter()
    result = train(
        model, ClassificationTask.from_clinic(clinic), dataclasses.replace(config, seed=run.seed), device="cpu", progress=False
    )
    return model.state_dict(), result.history, float(result.final["val_acc"]), time.perf_counter() - start


def run_variants(
    clinic: Clinic, runs: Sequence[VariantRun], config: TrainConfig, *, workers: int = 2, progress: bool = True
) -> list[VariantResult]:
    """Train every run on ``clinic`` with the recipe ``config`` → results in the order of ``runs``.

    ``workers`` runs train at once, each in its own one-thread process; a
    result does not depend on where it ran (see ``experiments.workers``).
    ``config.batch_size`` must be a multiple of every Soft MoE run's group size.
    """
    runs = list(runs)
    if not runs:
        raise ValueError("run_variants needs at least one VariantRun")
    for r in runs:
        if not isinstance(r, VariantRun):
            raise TypeError(f"run_variants expects VariantRun objects, got {type(r).__name__}")
        if isinstance(r.model, SoftMoEConfig) and (config.batch_size % r.group_size or len(clinic.val) % r.group_size):
            raise ValueError(
                f"run {r.label!r}: Soft MoE groups patients {r.group_size} at a time, so the batch size "
                f"({config.batch_size}) and the held-out patients ({len(clinic.val)}) must be multiples of it"
            )
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
    for r, (state, history, accuracy, seconds) in zip(runs, raw):
        model = build_model(clinic, r)
        model.load_state_dict(state)
        results.append(VariantResult(r, model.eval(), history, accuracy, seconds))
    return results


@torch.no_grad()
def _diagnoses(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    logits, _ = model_logits(model(x))
    return logits.argmax(-1)  # (N,)


@torch.no_grad()
def waiting_room_effect(model: nn.Module, patients: Patients, *, arrangements: int = 4, seed: int = 0) -> dict[str, float]:
    """Does a patient's diagnosis depend on who else is in the waiting room? Measured on ``patients``.

    The patients are seated in ``arrangements`` random orders; a model that
    works on groups of consecutive patients (Soft MoE) then sees each patient
    with other company each time. Returns the share of (patient, pair of
    arrangements) whose diagnosis differs between the two (0 for a model that
    looks at each patient alone), the share of patients whose diagnosis
    changes in at least one arrangement, and the mean accuracy over the
    arrangements.
    """
    if isinstance(arrangements, bool) or not isinstance(arrangements, int) or arrangements < 2:
        raise ValueError(f"arrangements must be an int >= 2, got {arrangements!r}")
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    n = len(patients)
    said = torch.empty(arrangements, n, dtype=torch.int64)  # (A, N) diagnosis of patient i in arrangement a
    for a in range(arrangements):
        order = torch.randperm(n, generator=g)
        said[a, order] = _diagnoses(model, patients.x[order])
    model.train(was_training)
    pairs = [(a, b) for a in range(arrangements) for b in range(a + 1, arrangements)]
    differ = torch.stack([said[a] != said[b] for a, b in pairs]).float()  # (pairs, N)
    return {
        "changed between two waiting rooms": differ.mean().item(),
        "changed in some waiting room": (said != said[0]).any(0).float().mean().item(),
        "accuracy": (said == patients.diagnosis).float().mean().item(),
    }


@torch.no_grad()
def compute_profile(
    model: ClinicAdaptiveMoE, clinic: Clinic, patients: Patients, blur: Sequence[float] = (0.0, 0.25, 0.5)
) -> dict:
    """Who gets more doctors from an adaptive router, and how they fare.

    Returns a dict of pandas Series:
    ``by_specialty`` mean experts per patient for each specialty (index: names);
    ``by_blur`` mean experts per patient when every referral letter is blurred
    toward another department by each amount (``blur_referrals``; index: the amounts);
    ``accuracy_by_blur`` held-out accuracy at each amount;
    ``share_by_experts`` and ``accuracy_by_experts`` (index: experts used, 0..E):
    which share of the patients uses k experts, and their accuracy (NaN if none).
    """
    if not isinstance(model, ClinicAdaptiveMoE):
        raise TypeError(f"compute_profile expects a ClinicAdaptiveMoE, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    out = model(patients.x)
    k = out.moe.experts_per_token  # (N,)
    E = model.moe.config.num_experts
    correct = out.logits.argmax(-1) == patients.diagnosis  # (N,)
    by_blur, acc_blur = {}, {}
    for amount in blur:
        blurred = model(blur_referrals(clinic, patients, amount))
        by_blur[amount] = blurred.moe.experts_per_token.float().mean().item()
        acc_blur[amount] = (blurred.logits.argmax(-1) == patients.diagnosis).float().mean().item()
    model.train(was_training)
    counts = torch.bincount(k, minlength=E + 1).float()
    return {
        "by_specialty": pd.Series(
            compute_by_group(k, patients.specialty, clinic.num_specialties).numpy(), index=list(clinic.specialties)
        ),
        "by_blur": pd.Series(by_blur),
        "accuracy_by_blur": pd.Series(acc_blur),
        "share_by_experts": pd.Series((counts / counts.sum()).numpy(), index=range(E + 1)),
        "accuracy_by_experts": pd.Series(compute_by_group(correct.float(), k, E + 1).numpy(), index=range(E + 1)),
    }
