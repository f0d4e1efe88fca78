"""Keeping the clinic running: measure how the GP spreads patients over the doctors.

Shape legend (used across the package): B batch, T time, D model width,
F hidden width, E experts, K top-k, C capacity, N = B·T tokens. Here a token
is a patient.

Lesson 05's experiments, as tested helpers:

    load_stats          one expert-load vector (E,) → idle doctors, the busiest doctor's share, ...
    LoadTracker         a ``train(..., callback=)`` that records the load and the router's logits over training
    ClinicRun, run_clinic_moes
                        train many ClinicMoEs (recipes × seeds), two at a time in worker processes
    evaluate_capacity   held-out accuracy and the share of dropped patients, in batches as in training
    batch_loads         how many patients each expert is sent in every batch, before any is turned away
    overflow_share      the share of assignments beyond C chairs, for loads like those
    capacity_sweep      train one ClinicMoE per capacity factor and measure both (Switch Transformer, Table 1, in small)

They work with any model whose output carries the routing: ``ClinicMoE``
(``out.moe`` is an ``MoEOutput``) or ``RoutedMixture`` (``RoutedOutput``);
``_routing`` picks the result that holds ``expert_index``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import pandas as pd
import torch
from torch import nn

from .clinic import Clinic, Patients
from .device import seed_everything
from .losses import expert_fraction, load_balancing_loss, router_z_loss
from .models import ClinicMoE
from .moe import MoEConfig
from .routing import expert_capacity
from .training import ClassificationTask, TrainConfig, evaluating, model_logits, train
from .workers import run_in_workers

__all__ = ["load_stats", "LoadTracker", "ClinicRun", "ClinicRunResult", "run_clinic_moes",
           "evaluate_capacity", "batch_loads", "overflow_share", "capacity_sweep"]


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
    result = train(model, ClassificationTask.from_clinic(clinic), dataclasses.replace(config, seed=run.seed), device="cpu",
                   progress=False, callback=tracker)
    return model.state_dict(), tracker, float(result.final["val_acc"]), time.perf_counter() - start


def run_clinic_moes(clinic: Clinic, runs: Sequence[ClinicRun], config: TrainConfig, *, workers: int = 2,
                    progress: bool = True) -> list[ClinicRunResult]:
    """Train every run on ``clinic`` with the recipe ``config`` → results in the order of ``runs``.

    ``workers`` runs train at once, each in its own one-thread process
    (``moe_course.workers``; ``workers=1``: one after another in this process,
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
    from tqdm.auto import tqdm

    bar = tqdm(total=len(runs), desc="training runs", disable=not progress)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # in this process too, so that workers=1 gives the workers' numbers
    try:
        raw = run_in_workers(functools.partial(_train_one, clinic, config=config), runs, workers=workers,
                             on_done=lambda i, result: bar.update())
    finally:
        torch.set_num_threads(threads)
        bar.close()
    results = []
    for r, (state, tracker, accuracy, seconds) in zip(runs, raw):
        model = ClinicMoE(clinic.d_in, clinic.num_diagnoses, r.moe)
        model.load_state_dict(state)
        results.append(ClinicRunResult(r, model.eval(), tracker, accuracy, seconds))
    return results


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
