"""Lesson 10's phone-book experiments: any MoE layer of ``MoEConfig`` (or a dense FFN) on lesson 08's phone book.

Shape legend (used across the package): B batch, T time, D model width,
F hidden width, E experts, K top-k, C capacity, N = B·T tokens; here a token
is a patient (N patients of width D) and W is the number of wards.

The phone book (``moe_course.experiments.phonebook``, lesson 08): keys x ∈ R^D, wards to
memorise ("records": knowledge) or to work out ("rule": a skill). The model
here is one layer and a read-out, like lesson 08's, but the layer is any
``MoEConfig`` (top-2, fine-grained, shared experts, sigmoid router...) or a
dense FFN::

    x (N, D) → layer (N, D) → head → (N, W) ward scores

Upcycling (``PhoneBookMoERun.dense_steps`` > 0): a dense FFN of the experts'
width trains first, then ``moe.upcycle`` copies it into every expert (fresh
router, the read-out kept) and the MoE layer trains on. A dense run with
``dense_steps`` trains the same FFN on instead, so the two differ only in what
happens after the copy.

Training: full batch (the whole table, or N new patients for the rule),
Adam with a cosine learning rate from ``lr`` to 0 per training phase, the
layer's weighted router losses added, and the bias hook after every step
(``training.bias.update_expert_biases_``, for a sigmoid router with a rate).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..experts import FeedForward, init_linear_
from ..flops import count_parameters, ffn_flops, matmul_flops, moe_layer_flops
from ..moe import MoEConfig, MoELayer, MoEOutput, upcycle
from ..training.bias import update_expert_biases_
from .phonebook import PhoneBook, PhoneBookConfig, make_phone_book
from .workers import run_in_workers

__all__ = [
    "PhoneBookMoE",
    "PhoneBookMoERun",
    "PhoneBookMoEResult",
    "train_phone_book_moe",
    "run_phone_book_moes",
    "phone_book_moe_table",
]


class PhoneBookMoE(nn.Module):
    """One layer (a dense FFN of width ``d_ff`` when ``moe`` is None, else ``MoELayer(moe)``) and a read-out: (N, D) → logits (N, W), router loss, MoEOutput.

    The dense FFN gets the Switch initialisation the experts get (std sqrt(0.1 / fan_in)).
    """

    def __init__(self, d_model: int, num_wards: int, *, moe: MoEConfig | None = None, d_ff: int | None = None) -> None:
        super().__init__()
        if (moe is None) == (d_ff is None):
            raise ValueError("PhoneBookMoE takes either moe (an MoEConfig) or d_ff (the width of a dense FFN), not both")
        if moe is not None:
            if not isinstance(moe, MoEConfig) or moe.d_model != d_model:
                raise ValueError(f"moe must be an MoEConfig with d_model={d_model}, got {moe!r}")
            self.layer: nn.Module = MoELayer(moe)
        else:
            self.layer = dense_ffn(d_model, d_ff)
        self.head = nn.Linear(d_model, num_wards)  # (W, D) weight

    @property
    def is_moe(self) -> bool:
        return isinstance(self.layer, MoELayer)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, MoEOutput | None]:
        if not self.is_moe:
            return self.head(self.layer(x)), x.new_zeros(()), None
        out = self.layer(x)
        return self.head(out.y), out.router_loss, out


def dense_ffn(d_model: int, d_ff: int, activation: str = "gelu") -> FeedForward:
    """A FeedForward with the Switch initialisation (scale 0.1), as the experts have it."""
    ffn = FeedForward(d_model, d_ff, activation=activation)
    for linear in (ffn.fc_in, ffn.fc_out, ffn.fc_gate):
        if linear is not None:
            init_linear_(linear.weight, linear.bias, linear.in_features, 0.1)
    return ffn


@dataclass(frozen=True)
class PhoneBookMoERun:
    """One layer trained on one phone book; runs of one ``label`` differ only in ``seed``."""

    label: str  # e.g. "top-2, 16 experts of width 4"
    book: PhoneBookConfig
    moe: MoEConfig | None = None  # the MoE layer; None: a dense FFN of width d_ff
    d_ff: int | None = None  # the dense FFN's width (moe None); for upcycling, the FFN is moe.d_ff wide
    seed: int = 0  # seeds the phone book and the model
    steps: int = 100  # full-batch Adam steps (after the dense phase, if any)
    lr: float = 3e-2  # peak learning rate of each cosine phase
    dense_steps: int = 0  # > 0: a dense FFN trains this long first, then is upcycled (moe) or trained on (dense)
    eval_every: int = 10

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not self.label:
            raise ValueError(f"PhoneBookMoERun.label must be a non-empty string, got {self.label!r}")
        if not isinstance(self.book, PhoneBookConfig):
            raise TypeError(f"PhoneBookMoERun.book must be a PhoneBookConfig, got {type(self.book).__name__}")
        if (self.moe is None) == (self.d_ff is None):
            raise ValueError(f"PhoneBookMoERun {self.label!r}: give either moe (an MoE layer) or d_ff (a dense FFN), not both")
        if self.moe is not None and (not isinstance(self.moe, MoEConfig) or self.moe.d_model != self.book.d_model):
            raise ValueError(f"PhoneBookMoERun {self.label!r}: moe must be an MoEConfig with d_model={self.book.d_model}")
        if self.moe is not None and self.moe.capacity_factor is not None:
            raise ValueError(
                f"PhoneBookMoERun {self.label!r}: the phone book is judged on every record; use a dropless layer (capacity_factor=None)"
            )
        for name in ("steps", "eval_every") + (("d_ff",) if self.d_ff is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"PhoneBookMoERun.{name} must be a positive int, got {value!r}")
        for name in ("seed", "dense_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"PhoneBookMoERun.{name} must be an int >= 0, got {value!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"PhoneBookMoERun.lr must be a number > 0, got {self.lr!r}")

    @property
    def params(self) -> int:
        """Parameters of the layer and the read-out."""
        return count_parameters(self.model())

    @property
    def flops_per_patient(self) -> int:
        """Forward matmul FLOPs per patient: the layer (the router and the experts a patient visits) and the read-out."""
        D, W = self.book.d_model, self.book.num_wards
        head = matmul_flops(1, D, W)
        if self.moe is None:
            return ffn_flops(1, D, self.d_ff) + head
        m = self.moe
        return (
            moe_layer_flops(
                1,
                D,
                m.d_ff,
                m.num_experts,
                m.top_k,
                activation=m.activation,
                num_shared_experts=m.num_shared_experts,
                shared_expert_gate=m.shared_expert_gate,
            )
            + head
        )

    def model(self) -> PhoneBookMoE:
        return PhoneBookMoE(self.book.d_model, self.book.num_wards, moe=self.moe, d_ff=self.d_ff)


@dataclass(frozen=True)
class PhoneBookMoEResult:
    run: PhoneBookMoERun
    accuracy: float  # records: the share of the table recalled; rule: the share of new patients answered right
    history: pd.DataFrame  # one row per evaluation: step (counted over both phases), accuracy
    dense_accuracy: float  # upcycling: the dense FFN's accuracy when it was copied (NaN otherwise)
    start_accuracy: float  # upcycling: the upcycled layer's accuracy before its first step (NaN otherwise)
    load: tuple[int, ...]  # (E,) the test patients' assignments per expert (empty for dense)
    seconds: float  # wall-clock time of the training


@torch.no_grad()
def _accuracy(model: PhoneBookMoE, book: PhoneBook) -> float:
    was = model.training
    model.eval()
    logits, _, _ = model(book.test_keys)
    model.train(was)
    return (logits.argmax(-1) == book.test_wards).double().mean().item()


def _train(
    model: PhoneBookMoE,
    book: PhoneBook,
    steps: int,
    lr: float,
    generator: torch.Generator,
    every: int,
    offset: int,
    rows: list[dict],
) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / steps))
        keys, wards = book.batch(generator)
        logits, router_loss, out = model(keys)
        loss = F.cross_entropy(logits, wards) + router_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if out is not None:
            update_expert_biases_(model.layer, [out])  # the loss-free balancing hook (a no-op for other routers)
        if (step + 1) % every == 0 or step + 1 == steps:
            rows.append({"step": offset + step + 1, "accuracy": _accuracy(model, book)})


def train_phone_book_moe(run: PhoneBookMoERun, *, threads: int | None = 1) -> PhoneBookMoEResult:
    """Train ``run`` in this process (see the module docstring) and return its result."""
    if not isinstance(run, PhoneBookMoERun):
        raise TypeError(f"train_phone_book_moe expects a PhoneBookMoERun, got {type(run).__name__}")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        book = make_phone_book(run.book, run.seed)
        torch.manual_seed(run.seed)
        generator = torch.Generator().manual_seed(run.seed)  # the rule's new patients
        D, W = run.book.d_model, run.book.num_wards
        rows: list[dict] = []
        dense_accuracy = start_accuracy = float("nan")
        start = time.perf_counter()
        if run.dense_steps:
            width = run.d_ff if run.moe is None else run.moe.d_ff
            activation = "gelu" if run.moe is None else run.moe.activation
            dense = PhoneBookMoE(D, W, d_ff=width)
            dense.layer = dense_ffn(D, width, activation)
            _train(dense, book, run.dense_steps, run.lr, generator, run.eval_every, 0, rows)
            dense_accuracy = _accuracy(dense, book)
            if run.moe is None:
                model = dense  # the dense FFN trains on, in a second phase like the upcycled layer's
            else:
                model = PhoneBookMoE(D, W, moe=run.moe)
                model.layer = upcycle(dense.layer, run.moe)  # every expert a copy, the router fresh
                model.head.load_state_dict(dense.head.state_dict())
            start_accuracy = _accuracy(model, book)
        else:
            model = run.model()
        _train(model, book, run.steps, run.lr, generator, run.eval_every, run.dense_steps, rows)
        seconds = time.perf_counter() - start
        accuracy = _accuracy(model, book)
        load: tuple[int, ...] = ()
        if model.is_moe:
            with torch.no_grad():
                model.eval()
                load = tuple(model.layer(book.test_keys).tokens_per_expert.tolist())
    finally:
        torch.set_num_threads(previous)
    return PhoneBookMoEResult(run, accuracy, pd.DataFrame(rows), dense_accuracy, start_accuracy, load, seconds)


def run_phone_book_moes(runs: Sequence[PhoneBookMoERun], *, workers: int = 2) -> list[PhoneBookMoEResult]:
    """Train every run, ``workers`` at a time in one-thread worker processes → results in the order of ``runs``."""
    runs = list(runs)
    if not runs:
        raise ValueError("run_phone_book_moes needs at least one PhoneBookMoERun")
    for r in runs:
        if not isinstance(r, PhoneBookMoERun):
            raise TypeError(f"run_phone_book_moes expects PhoneBookMoERun objects, got {type(r).__name__}")
    return run_in_workers(train_phone_book_moe, runs, workers=workers)


def phone_book_moe_table(results: Sequence[PhoneBookMoEResult]) -> pd.DataFrame:
    """One row per run: label, task, seed, parameters, FLOPs per patient, accuracy, start and dense accuracy, seconds."""
    return pd.DataFrame(
        [
            {
                "label": r.run.label,
                "task": r.run.book.task,
                "seed": r.run.seed,
                "parameters": r.run.params,
                "flops_per_patient": r.run.flops_per_patient,
                "accuracy": r.accuracy,
                "start_accuracy": r.start_accuracy,
                "dense_accuracy": r.dense_accuracy,
                "seconds": r.seconds,
            }
            for r in results
        ]
    )
