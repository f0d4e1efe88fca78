"""Lesson 10's balance experiments on the clinic: an auxiliary loss or a bias, and where the balance is measured.

Shape legend (used across the package): B batch, T time, D model width,
F hidden width, E experts, K top-k, C capacity, N = B·T tokens. Here a token
is a patient, and S is the number of specialties (the clinic's domains).

One ``ClinicMoE`` (lesson 05's model) trained with an explicit loop, so that
every balancing device is in plain sight::

    out = model(x)                                        # the layer never changes its own state
    loss = cross_entropy + α · balance_loss(out, scope)   # "batch": one f and P for the whole step
                                                          # "micro": one per micro-batch, averaged
    loss.backward(); optimizer.step()
    update_expert_biases_(model, [out.moe])               # the sigmoid router's bias, from the loads

Two kinds of step:

* ``batches="mixed"``: patients drawn at random, every specialty in every batch;
* ``batches="by_specialty"``: the step's batch is ``micro_batches`` micro-batches,
  each from one specialty (drawn without replacement), as when every
  data-parallel worker reads its own document. A balance loss measured per
  micro-batch then asks every expert to take a share of every specialty, which
  works against specialising (Qiu et al. 2025, arXiv:2501.11873). Measured
  over the whole step it is the loss a global batch gives: with gradient
  accumulation over micro-batches, ``losses.load_balancing_loss_from_counts``
  with the counts summed over the micro-batches computes the same thing.

``run_balance(clinic, runs)`` trains a list of ``BalanceRun`` two at a time in
worker processes and returns one ``BalanceResult`` each, in order.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F

from ..analysis.load import max_over_mean_load
from ..analysis.specialisation import normalized_mutual_information
from ..data.clinic import Clinic
from ..device import seed_everything
from ..losses import load_balancing_loss
from ..models import ClinicMoE
from ..moe import MoEConfig
from ..training.bias import update_expert_biases_
from .workers import run_in_workers

__all__ = [
    "SCOPES",
    "BATCHES",
    "BalanceRun",
    "BalanceResult",
    "balance_loss",
    "clinic_step_batch",
    "train_balance",
    "run_balance",
    "balance_table",
]

SCOPES = ("batch", "micro")
BATCHES = ("mixed", "by_specialty")


@dataclass(frozen=True)
class BalanceRun:
    """One ClinicMoE and how it is balanced; runs of one ``label`` differ only in ``seed``."""

    label: str  # e.g. "bias γ=1e-3"
    moe: MoEConfig  # the layer (its own aux_loss_coef and z_loss_coef should be 0: the loop adds the balance loss itself)
    aux: float = 0.0  # α, weight of the load-balancing loss the loop adds
    scope: str = "batch"  # the balance loss's statistics: over the step's whole batch, or per micro-batch ("micro")
    batches: str = "mixed"  # "mixed" patients, or "by_specialty": micro-batches of one specialty each
    micro_batches: int = 4  # micro-batches per step (batch_size must be a multiple)
    seed: int = 0  # seeds the model and the batches
    steps: int = 600
    batch_size: int = 128
    lr: float = 1e-2  # AdamW, constant (the clinic lessons' CLINIC_LR)
    eval_every: int = 25

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not self.label:
            raise ValueError(f"BalanceRun.label must be a non-empty string, got {self.label!r}")
        if not isinstance(self.moe, MoEConfig):
            raise TypeError(f"BalanceRun.moe must be an MoEConfig, got {type(self.moe).__name__}")
        if self.scope not in SCOPES:
            raise ValueError(f"BalanceRun.scope must be one of {list(SCOPES)}, got {self.scope!r}")
        if self.batches not in BATCHES:
            raise ValueError(f"BalanceRun.batches must be one of {list(BATCHES)}, got {self.batches!r}")
        for name in ("micro_batches", "steps", "batch_size", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"BalanceRun.{name} must be a positive int, got {value!r}")
        if self.batch_size % self.micro_batches:
            raise ValueError(f"BalanceRun: batch_size={self.batch_size} is not a multiple of micro_batches={self.micro_batches}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"BalanceRun.seed must be an int >= 0, got {self.seed!r}")
        for name in ("aux", "lr"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
                or (name == "lr" and value == 0)
            ):
                raise ValueError(f"BalanceRun.{name} must be a number {'> 0' if name == 'lr' else '>= 0'}, got {value!r}")


@dataclass
class BalanceResult:
    run: BalanceRun
    accuracy: float  # held-out accuracy at the end
    specialisation: float  # NMI(specialty; top expert) on the held-out patients, in [0, 1]
    max_over_mean: float  # the held-out load of the busiest expert over the mean load (1.0 = even)
    seen: torch.Tensor  # (S, E) held-out patients of each specialty per top expert
    history: pd.DataFrame  # one row per evaluation: step, accuracy, specialisation, max_over_mean, train_max_over_mean
    expert_bias: list[float] | None  # the sigmoid router's final bias (None for other routers)
    seconds: float  # wall-clock time of the training


def balance_loss(router_probs: torch.Tensor, expert_index: torch.Tensor, scope: str, micro_batch: int) -> torch.Tensor:
    """The unweighted load-balancing loss over the step's batch ("batch") or per micro-batch of ``micro_batch`` rows ("micro")."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {list(SCOPES)}, got {scope!r}")
    return load_balancing_loss(router_probs, expert_index, group_size=micro_batch if scope == "micro" else None)


def clinic_step_batch(clinic: Clinic, run: BalanceRun, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's patients x (B, d_in) and diagnoses (B,): mixed, or ``micro_batches`` blocks of one specialty each."""
    patients = clinic.train
    if run.batches == "mixed":
        idx = torch.randint(len(patients.x), (run.batch_size,), generator=generator)
        return patients.x[idx], patients.diagnosis[idx]
    num_specialties = len(clinic.specialties)
    if run.micro_batches > num_specialties:
        raise ValueError(
            f"{run.micro_batches} micro-batches of one specialty each need at least as many specialties; the clinic has {num_specialties}"
        )
    per = run.batch_size // run.micro_batches
    blocks = []
    for s in torch.randperm(num_specialties, generator=generator)[: run.micro_batches].tolist():
        pool = torch.nonzero(patients.specialty == s).squeeze(1)  # this specialty's patients
        blocks.append(pool[torch.randint(len(pool), (per,), generator=generator)])
    idx = torch.cat(blocks)  # (B,) micro-batch after micro-batch
    return patients.x[idx], patients.diagnosis[idx]


@torch.no_grad()
def _evaluate(model: ClinicMoE, clinic: Clinic) -> tuple[float, float, float, torch.Tensor]:
    was = model.training
    model.eval()
    out = model(clinic.val.x)
    model.train(was)
    accuracy = (out.logits.argmax(-1) == clinic.val.diagnosis).float().mean().item()
    index = out.moe.expert_index  # (N, K)
    E, S = model.moe.config.num_experts, len(clinic.specialties)
    seen = torch.bincount(clinic.val.specialty * E + index[:, 0], minlength=S * E).reshape(S, E)  # (S, E) by top expert
    load = torch.bincount(index.reshape(-1), minlength=E)  # (E,) every choice counts
    return accuracy, normalized_mutual_information(seen), max_over_mean_load(load), seen


def train_balance(clinic: Clinic, run: BalanceRun, *, threads: int | None = 1) -> BalanceResult:
    """Train ``run`` in this process with the explicit loop of the module docstring (AdamW, gradient clipping at 1)."""
    if not isinstance(run, BalanceRun):
        raise TypeError(f"train_balance expects a BalanceRun, got {type(run).__name__}")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        seed_everything(run.seed)
        model = ClinicMoE(clinic.d_in, clinic.num_diagnoses, run.moe)
        optimizer = torch.optim.AdamW(model.parameters(), lr=run.lr, weight_decay=0.0)
        generator = torch.Generator().manual_seed(run.seed)
        accuracy, nmi, evenness, _ = _evaluate(model, clinic)
        rows = [
            {
                "step": 0,
                "accuracy": accuracy,
                "specialisation": nmi,
                "max_over_mean": evenness,
                "train_max_over_mean": float("nan"),
            }
        ]
        train_evenness: list[float] = []
        start = time.perf_counter()
        for step in range(run.steps):
            x, y = clinic_step_batch(clinic, run, generator)
            out = model(x)  # the MoE layer reports its routing; it changes nothing of its own
            loss = F.cross_entropy(out.logits, y) + out.router_loss
            if run.aux:
                loss = loss + run.aux * balance_loss(
                    out.moe.router_probs, out.moe.expert_index, run.scope, run.batch_size // run.micro_batches
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            update_expert_biases_(model, [out.moe])  # the training hook: moves the bias of a sigmoid router with a rate
            train_evenness.append(max_over_mean_load(out.moe.tokens_per_expert))
            if (step + 1) % run.eval_every == 0 or step + 1 == run.steps:
                accuracy, nmi, evenness, _ = _evaluate(model, clinic)
                recent = train_evenness[-run.eval_every :]
                rows.append(
                    {
                        "step": step + 1,
                        "accuracy": accuracy,
                        "specialisation": nmi,
                        "max_over_mean": evenness,
                        "train_max_over_mean": sum(recent) / len(recent),
                    }
                )
        seconds = time.perf_counter() - start
        accuracy, nmi, evenness, seen = _evaluate(model, clinic)
    finally:
        torch.set_num_threads(previous)
    bias = model.moe.expert_bias.tolist() if model.moe.expert_bias is not None else None
    return BalanceResult(run, accuracy, nmi, evenness, seen, pd.DataFrame(rows), bias, seconds)


def run_balance(clinic: Clinic, runs: Sequence[BalanceRun], *, workers: int = 2) -> list[BalanceResult]:
    """Train every run, ``workers`` at a time in one-thread worker processes → results in the order of ``runs``.

    A result does not depend on where it ran: each run seeds its model and its batches, and trains on one thread.
    """
    runs = list(runs)
    if not runs:
        raise ValueError("run_balance needs at least one BalanceRun")
    for r in runs:
        if not isinstance(r, BalanceRun):
            raise TypeError(f"run_balance expects BalanceRun objects, got {type(r).__name__}")
    return run_in_workers(functools.partial(train_balance, clinic), runs, workers=workers)


def balance_table(results: Sequence[BalanceResult]) -> pd.DataFrame:
    """One row per run: label, seed, accuracy, specialisation, max_over_mean, seconds."""
    return pd.DataFrame(
        [
            {
                "label": r.run.label,
                "seed": r.run.seed,
                "accuracy": r.accuracy,
                "specialisation": r.specialisation,
                "max_over_mean": r.max_over_mean,
                "seconds": r.seconds,
            }
            for r in results
        ]
    )
