"""The phone book: one layer that must memorise a table of records, or learn a rule.

Shape legend (used across the package): B batch, T time, D model width,
F hidden width, E experts, K top-k, C capacity, N = B·T tokens; here a token
is a patient (N patients of width D) and W is the number of wards.

The smallest experiment that separates *knowledge* from *skill*. A patient is
a key, a random vector x ∈ R^D (entries N(0, 1)); the model is one
feed-forward layer, dense or a Switch layer, and a linear read-out::

    x (N, D) → layer (N, D) → head → (N, W) ward scores

* ``task="records"`` (knowledge): every patient of a table of N has a ward
  drawn at random. Nothing about the key predicts it, so the layer has to
  store N·log2(W) bits. Trained on the whole table at every step; judged by
  **recall**: every record of the table queried, the share whose ward scores
  highest.
* ``task="rule"`` (skill): the ward follows one rule for everyone: log2(W)
  yes/no questions about the key, question j being "is |u_j·x| larger than
  its median?" for fixed random directions u_j (answers are the bits of the
  ward number). Every step brings N new patients, so nothing can be
  memorised; judged on patients the model has never seen.

The layer (``PhoneBookModel``):

* E = 1: a dense FFN of width F, D → F → D (one expert that sees everyone);
* E > 1: ``moe_course.moe.MoELayer``, the Switch layer of the language model
  (top-1, raw gate, load-balancing and z-losses), dropless: E experts of width
  F, each patient visits one. Its FLOPs per patient equal the dense layer of
  width F (plus the router's 2·D·E); its parameters equal a dense layer of
  width E·F (plus the router's D·E).

``run_phone_books(runs)`` trains a list of ``PhoneBookRun`` in worker
processes and returns one ``PhoneBookResult`` each, in order;
``phone_book_table`` makes one row per run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..experts import Experts
from ..flops import phone_book_flops, phone_book_params  # counted in the accounting module
from ..moe import MoEConfig, MoELayer
from .workers import run_in_workers

__all__ = [
    "TASKS",
    "PhoneBookConfig",
    "PhoneBook",
    "make_phone_book",
    "rule_wards",
    "PhoneBookOutput",
    "PhoneBookModel",
    "PhoneBookRun",
    "PhoneBookResult",
    "phone_book_params",
    "phone_book_flops",
    "train_phone_book",
    "run_phone_books",
    "phone_book_table",
]

TASKS = ("records", "rule")

# The grouped matmul's C++ loop has the least overhead per call at these tiny sizes
# (it falls back to the default dispatch where it cannot run).
_DISPATCH = "grouped_mm"


def _positive_int(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class PhoneBookConfig:
    task: str = "records"  # "records": random wards to memorise (knowledge); "rule": wards follow a rule (skill)
    num_records: int = 1024  # N: records in the table ("records"), new patients per step ("rule")
    d_model: int = 32  # D, the width of a patient's key
    num_wards: int = 16  # W, wards a patient can be sent to (a power of 2 for the rule: log2(W) questions)
    held_out: int = 4096  # "rule": new patients the model is judged on

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"PhoneBookConfig.task must be one of {list(TASKS)}, got {self.task!r}")
        for name in ("num_records", "d_model", "num_wards", "held_out"):
            _positive_int("PhoneBookConfig", name, getattr(self, name))
        if self.num_wards < 2:
            raise ValueError(f"PhoneBookConfig.num_wards must be at least 2, got {self.num_wards}")
        if self.task == "rule" and self.num_wards & (self.num_wards - 1):
            raise ValueError(
                f"PhoneBookConfig: the rule answers log2(W) yes/no questions, so num_wards must be a power of 2, got {self.num_wards}"
            )

    @property
    def bits(self) -> float:
        """What the table holds: N·log2(W) bits of random wards ("records")."""
        return self.num_records * math.log2(self.num_wards)


@dataclass(frozen=True)
class PhoneBook:
    """One seeded phone book: the table (or the rule) and the patients it is judged on."""

    config: PhoneBookConfig
    keys: (
        torch.Tensor
    )  # (N, D) float32 the table's patients ("records"); a sample of N patients ("rule": training draws new ones)
    wards: torch.Tensor  # (N,) int64 their wards
    directions: torch.Tensor | None  # (D, Q) the rule's directions u_j, Q = log2(W) ("rule" only)
    test_keys: torch.Tensor  # (M, D) the patients the model is judged on: the table itself, or new ones
    test_wards: torch.Tensor  # (M,) int64

    def batch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step's patients: the whole table ("records"), N new patients ("rule")."""
        if self.directions is None:
            return self.keys, self.wards
        keys = torch.randn(self.config.num_records, self.config.d_model, generator=generator)  # (N, D)
        return keys, rule_wards(keys, self.directions)


def rule_wards(keys: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """The rule: bit j of the ward is 1 when |u_j·x| exceeds its median over N(0, 1) keys.

    keys (N, D), directions (D, Q) → wards (N,) int64 in [0, 2^Q). For x ~ N(0, I),
    u_j·x ~ N(0, |u_j|²) and the median of its absolute value is 0.6745·|u_j|,
    so each bit is a fair coin: all 2^Q wards are equally likely.
    """
    if keys.ndim != 2 or directions.ndim != 2 or keys.shape[1] != directions.shape[0]:
        raise ValueError(
            f"rule_wards expects keys (N, D) and directions (D, Q), got {tuple(keys.shape)} and {tuple(directions.shape)}"
        )
    median = 0.6744897501960817 * directions.norm(dim=0)  # (Q,) median of |N(0, |u|²)|
    bits = ((keys @ directions).abs() > median).long()  # (N, Q)
    powers = 2 ** torch.arange(directions.shape[1])  # (Q,)
    return (bits * powers).sum(1)  # (N,)


def make_phone_book(config: PhoneBookConfig, seed: int = 0) -> PhoneBook:
    """The phone book of ``seed``: keys, wards (random, or by the rule) and the test patients."""
    if not isinstance(config, PhoneBookConfig):
        raise TypeError(f"make_phone_book expects a PhoneBookConfig, got {type(config).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    g = torch.Generator().manual_seed(10_007 * seed + 1)
    N, D, W = config.num_records, config.d_model, config.num_wards
    keys = torch.randn(N, D, generator=g)  # (N, D)
    if config.task == "records":
        wards = torch.randint(W, (N,), generator=g)  # (N,) nothing about the key predicts it
        return PhoneBook(config, keys, wards, None, keys, wards)
    directions = torch.randn(D, int(math.log2(W)), generator=g)  # (D, Q)
    test = torch.randn(config.held_out, D, generator=g)  # (M, D) patients never trained on
    return PhoneBook(config, keys, rule_wards(keys, directions), directions, test, rule_wards(test, directions))


@dataclass(frozen=True)
class PhoneBookOutput:
    logits: torch.Tensor  # (N, W) ward scores
    router_loss: torch.Tensor  # () weighted balance + z-loss of the Switch layer (MoEOutput.router_loss); 0 for dense
    expert_index: torch.Tensor | None  # (N,) int64 the expert each patient visited; None for dense


class PhoneBookModel(nn.Module):
    """One FFN layer (dense when num_experts=1, else a dropless Switch layer) and a read-out: (N, D) → PhoneBookOutput.

    Dense and expert FFNs get the same (Switch) initialisation, std sqrt(0.1 / fan_in).
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, num_wards: int) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts), ("num_wards", num_wards)):
            _positive_int("PhoneBookModel", name, value)
        self.num_experts = num_experts
        if num_experts == 1:
            self.ffn: nn.Module = Experts(1, d_model, d_ff, init_scale=0.1)  # one expert that sees everyone: a dense FFN
        else:
            self.ffn = MoELayer(
                MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=num_experts, capacity_factor=None, dispatch=_DISPATCH)
            )
        self.head = nn.Linear(d_model, num_wards)  # (W, D) weight

    def forward(self, x: torch.Tensor) -> PhoneBookOutput:
        if self.num_experts == 1:
            y = self.ffn.expert_output(0, x)  # (N, D)
            return PhoneBookOutput(self.head(y), y.new_zeros(()), None)
        out = self.ffn(x)  # MoEOutput
        return PhoneBookOutput(self.head(out.y), out.router_loss, out.expert_index[:, 0])


@dataclass(frozen=True)
class PhoneBookRun:
    """One model trained on one phone book; runs of one ``label`` differ only in ``seed``."""

    label: str  # e.g. "dense F=8" or "Switch E=8"
    book: PhoneBookConfig
    d_ff: int = 8  # F, width of the dense layer or of each expert
    num_experts: int = 1  # E; 1 is a dense layer
    seed: int = 0  # seeds the phone book (table, rule, patients) and the model's initialisation
    steps: int = 200  # full-batch Adam steps
    lr: float = 3e-2  # peak learning rate (cosine decay to 0)
    eval_every: int = 20  # steps between evaluations in the history

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not self.label:
            raise ValueError(f"PhoneBookRun.label must be a non-empty string, got {self.label!r}")
        if not isinstance(self.book, PhoneBookConfig):
            raise TypeError(f"PhoneBookRun.book must be a PhoneBookConfig, got {type(self.book).__name__}")
        for name in ("d_ff", "num_experts", "steps", "eval_every"):
            _positive_int("PhoneBookRun", name, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"PhoneBookRun.seed must be an int >= 0, got {self.seed!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"PhoneBookRun.lr must be a number > 0, got {self.lr!r}")

    @property
    def params(self) -> int:
        return phone_book_params(self.book.d_model, self.d_ff, self.num_experts, self.book.num_wards)

    @property
    def flops_per_patient(self) -> int:
        return phone_book_flops(self.book.d_model, self.d_ff, self.num_experts, self.book.num_wards)


@dataclass(frozen=True)
class PhoneBookResult:
    run: PhoneBookRun
    accuracy: float  # "records": recall, share of the table's records answered right; "rule": share of new patients
    loss: float  # cross-entropy (nats) on the same patients
    expert_load: tuple[int, ...]  # (E,) test patients sent to each expert (one entry for dense)
    history: pd.DataFrame  # one row per evaluation: step, accuracy, loss
    seconds: float  # wall-clock time of the training


@torch.no_grad()
def _evaluate(model: PhoneBookModel, keys: torch.Tensor, wards: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    out = model(keys)
    accuracy = (out.logits.argmax(-1) == wards).double().mean().item()
    loss = F.cross_entropy(out.logits, wards).item()
    E = model.num_experts
    load = torch.bincount(out.expert_index, minlength=E) if out.expert_index is not None else torch.tensor([len(keys)])
    return accuracy, loss, load


def train_phone_book(run: PhoneBookRun, *, threads: int | None = 1) -> PhoneBookResult:
    """Train ``run`` in this process: Adam, cosine decay to 0, cross-entropy + the Switch layer's weighted aux losses.

    threads: the CPU threads to train on (None: leave the setting as it is).
    """
    if not isinstance(run, PhoneBookRun):
        raise TypeError(f"train_phone_book expects a PhoneBookRun, got {type(run).__name__}")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        book = make_phone_book(run.book, run.seed)
        torch.manual_seed(run.seed)
        model = PhoneBookModel(run.book.d_model, run.d_ff, run.num_experts, run.book.num_wards)
        optimizer = torch.optim.Adam(model.parameters(), lr=run.lr)
        generator = torch.Generator().manual_seed(run.seed)  # the rule's new patients
        rows = []
        start = time.perf_counter()
        for step in range(run.steps):
            for group in optimizer.param_groups:
                group["lr"] = 0.5 * run.lr * (1 + math.cos(math.pi * step / run.steps))
            keys, wards = book.batch(generator)
            out = model(keys)
            loss = F.cross_entropy(out.logits, wards) + out.router_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if (step + 1) % run.eval_every == 0 or step + 1 == run.steps:
                accuracy, test_loss, load = _evaluate(model, book.test_keys, book.test_wards)
                rows.append({"step": step + 1, "accuracy": accuracy, "loss": test_loss})
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)
    return PhoneBookResult(run, accuracy, test_loss, tuple(load.tolist()), pd.DataFrame(rows), seconds)


def run_phone_books(runs: list[PhoneBookRun], *, workers: int = 2, progress: bool = True) -> list[PhoneBookResult]:
    """Train every run, ``workers`` at a time in one-thread worker processes → results in the order of ``runs``.

    A result does not depend on where it ran: each run seeds its own book,
    model and patients, and trains on one thread.
    """
    runs = list(runs)
    for r in runs:
        if not isinstance(r, PhoneBookRun):
            raise TypeError(f"run_phone_books expects PhoneBookRun objects, got {type(r).__name__}")
    return run_in_workers(
        train_phone_book, runs, workers=workers, progress=progress, desc="phone books", name=lambda r: f"{r.label}, seed {r.seed}"
    )


def phone_book_table(results: list[PhoneBookResult]) -> pd.DataFrame:
    """One row per run: label, task, F, E, seed, parameters, FLOPs per patient, accuracy, loss, seconds."""
    return pd.DataFrame(
        [
            {
                "label": r.run.label,
                "task": r.run.book.task,
                "d_ff": r.run.d_ff,
                "experts": r.run.num_experts,
                "seed": r.run.seed,
                "parameters": r.run.params,
                "flops_per_patient": r.run.flops_per_patient,
                "accuracy": r.accuracy,
                "loss": r.loss,
                "seconds": r.seconds,
            }
            for r in results
        ]
    )
