"""One training loop for every lesson.

``train(model, task, config)`` runs AdamW on batches the task samples, shows a
tqdm progress bar, evaluates on held-out data every ``eval_every`` steps and
returns the metrics history as a pandas table. It can save a checkpoint and
resume from it; a resumed run ends with exactly the weights of an
uninterrupted one, because the checkpoint carries the model, the optimiser and
the batch sampler's random state.

A *task* says what a batch is and what the loss is; see ``Task``.
``ClassificationTask`` covers the clinic lessons.
"""

from __future__ import annotations

import math
import pickle
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..device import get_device

__all__ = [
    "CLINIC_LR",
    "TrainConfig",
    "TrainResult",
    "Task",
    "ClassificationTask",
    "train",
    "train_step",
    "make_optimizer",
    "model_logits",
    "evaluating",
    "load_checkpoint",
    "TrainingInterrupted",
]

# The learning rate of every clinic model in lessons 01-05. One constant, so that the same
# model trained in two lessons gives the same result and the lessons' numbers can be compared.
CLINIC_LR = 1e-2


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300  # optimiser steps in total
    batch_size: int = 128  # examples per step
    lr: float = 3e-3  # peak learning rate of AdamW
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    warmup_steps: int = 0  # linear warm-up, then cosine decay to lr_min_ratio·lr
    lr_min_ratio: float = 1.0  # 1.0 keeps the learning rate constant after warm-up
    grad_clip: float | None = 1.0  # max global gradient norm (None: no clipping)
    eval_every: int = 50  # steps between held-out evaluations (the last step always evaluates)
    seed: int = 0  # seeds the batch sampler (the model is seeded by whoever builds it)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if self.warmup_steps < 0 or self.warmup_steps > self.steps:
            raise ValueError(f"TrainConfig.warmup_steps must be in [0, steps], got {self.warmup_steps!r}")
        if not 0.0 <= self.lr_min_ratio <= 1.0:
            raise ValueError(f"TrainConfig.lr_min_ratio must be in [0, 1], got {self.lr_min_ratio!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be > 0 or None, got {self.grad_clip!r}")

    def lr_at(self, step: int) -> float:
        """Learning rate used for optimiser step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = (step - self.warmup_steps) / span
        floor = self.lr * self.lr_min_ratio
        return floor + 0.5 * (self.lr - floor) * (1 + math.cos(math.pi * progress))


class Task(Protocol):
    """What ``train`` needs to know about a problem."""

    def sample_batch(self, batch_size: int, generator: torch.Generator, device: torch.device) -> Any:
        """A random training batch, drawn with ``generator``."""

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar training loss, and metrics to log for this batch."""

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Held-out metrics, computed under ``torch.no_grad()`` in eval mode."""


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``with evaluating(model):`` eval mode and no gradients inside, the model's own mode restored after.

    The one rule by which every tracker and every held-out measurement looks at a
    model: no dropout, no router jitter or noise, nothing learned.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def model_logits(output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split a model's output into (logits, router_loss or None): what to score, and what to add to the task loss.

    Models may return a tensor, or a typed result with ``logits`` (or ``y``)
    and optionally ``router_loss``: its router losses, already weighted by
    their coefficients (``aux_loss`` and ``z_loss`` are the unweighted ones,
    for watching, never added here).
    """
    if isinstance(output, torch.Tensor):
        return output, None
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = getattr(output, "y", None)
    if logits is None:
        raise TypeError(f"model returned {type(output).__name__}; expected a tensor or a result with .logits")
    return logits, getattr(output, "router_loss", None)


@dataclass
class ClassificationTask:
    """Classify rows of ``x_train`` into ``y_train``; evaluate on the held-out split.

    x (N, d_in) float, y (N,) int64. Batches are drawn with replacement.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor

    def __post_init__(self) -> None:
        for split in ("train", "val"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
                raise ValueError(f"{split} split: expected x (N, d_in) and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
            if len(x) == 0:
                raise ValueError(f"{split} split is empty")

    @classmethod
    def from_clinic(cls, clinic: Any) -> ClassificationTask:
        return cls(clinic.train.x, clinic.train.diagnosis, clinic.val.x, clinic.val.diagnosis)

    def sample_batch(self, batch_size: int, generator: torch.Generator, device: torch.device):
        idx = torch.randint(len(self.x_train), (batch_size,), generator=generator)
        return self.x_train[idx].to(device), self.y_train[idx].to(device)

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = batch
        logits, router_loss = model_logits(model(x))
        ce = F.cross_entropy(logits, y)
        total = ce if router_loss is None else ce + router_loss
        return total, {"train_loss": ce.item()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        logits, _ = model_logits(model(self.x_val.to(device)))
        y = self.y_val.to(device)
        return {
            "val_loss": F.cross_entropy(logits, y).item(),
            "val_acc": (logits.argmax(-1) == y).float().mean().item(),
        }


# What the progress bar shows after an evaluation: a few numbers that fit on one line (the history has them all).
HEADLINE = ("train_loss", "val_loss", "val_acc", "val_recall_facts")


def _headline(row: dict[str, float]) -> dict[str, str]:
    shown = [k for k in HEADLINE if k in row] or [k for k in row if k not in ("step", "lr", "seconds")][:4]
    return {k: f"{row[k]:.3g}" for k in shown}


@dataclass
class TrainResult:
    model: nn.Module
    history: pd.DataFrame  # one row per evaluation: step, lr, train_loss, held-out metrics, seconds
    config: TrainConfig
    seconds: float = 0.0  # wall-clock time of this call

    @property
    def final(self) -> dict[str, float]:
        """The last row of the history, as a dict."""
        return self.history.iloc[-1].to_dict()


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``train``: the step in progress was finished and, with a checkpoint path, saved."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        where = f"; checkpoint saved in {checkpoint}" if checkpoint is not None else ""
        super().__init__(f"training stopped after step {step}{where}")
        self.step, self.checkpoint = step, checkpoint


def _plain(value: Any) -> int | float:
    """A metric as a plain Python number (so that ``load_checkpoint`` may read it back): ints stay ints."""
    return value if isinstance(value, int) and not isinstance(value, bool) else float(value)


def _save_checkpoint(path: Path, model, optimizer, generator, step, rows, config, running) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
            # The global generator drives dropout and router jitter: without it a
            # resumed run would draw different noise than an uninterrupted one.
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "step": step,
            "history": [{k: _plain(v) for k, v in row.items()} for row in rows],
            "running": {k: _plain(v) for k, v in running.items()},  # train metrics summed since the last evaluation
            "config": asdict(config),
        },
        tmp,
    )
    tmp.replace(path)  # never leave a half-written checkpoint behind


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser ``train`` uses: AdamW at ``config.lr`` with ``config.weight_decay``.

    PyTorch's fused kernel where this torch has one for the model's device: the
    same update in one call instead of several per parameter group, which is
    most of the optimiser's time for the course's small models (an MoE model
    holds E times the FFN parameters, so it gains more). Elsewhere (an older
    torch, a device without the kernel) the standard implementation.
    """
    params = list(model.parameters())
    try:
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel here: the same update, more calls
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def train_step(
    model: nn.Module, task: Task, batch: Any, optimizer: torch.optim.Optimizer, config: TrainConfig
) -> dict[str, float]:
    """One optimiser step on ``batch``: loss, backward, gradient clipping, update → the task's metrics for the batch."""
    loss, metrics = task.loss(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    return metrics


def load_checkpoint(path: str | Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a checkpoint of ``train`` or ``moe-train`` safely: tensors and plain Python values only.

    ``torch.load(..., weights_only=True)`` never runs code stored in the file, so a run
    folder someone else shared cannot execute anything when a learner loads it. The
    course's checkpoints hold only state dicts, numbers, strings, lists and dicts, so
    no class of the course needs allow-listing; a file carrying any other object is
    refused with a ``ValueError`` that says so.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"refusing to load {path}: it holds objects other than tensors and plain Python values, and "
            f"unpickling them could run code from the file. moe-course only loads checkpoints it wrote "
            f"itself. ({reason})"
        ) from None


@contextmanager
def _stop_on_ctrl_c() -> Iterator[Callable[[], bool]]:
    """While training: the first Ctrl-C asks the loop to stop after the current step (a second one stops at once).

    Yields a function telling whether a stop was asked for. Outside the main thread
    (where signal handlers cannot be set) Ctrl-C keeps its usual meaning.
    """
    asked = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield asked.is_set
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if asked.is_set():  # pressed twice: the usual KeyboardInterrupt, now
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        asked.set()

    signal.signal(signal.SIGINT, handler)
    try:
        yield asked.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def train(
    model: nn.Module,
    task: Task,
    config: TrainConfig = TrainConfig(),
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
    checkpoint_path: str | Path | None = None,
    checkpoint_every: int | None = None,
    checkpoint_minutes: float | None = None,
    on_checkpoint: Callable[[int, list[dict[str, float]]], None] | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    callback: Any = None,
) -> TrainResult:
    """Train ``model`` on ``task`` and return it with its metrics history.

    checkpoint_path: where to save: every ``checkpoint_every`` steps, every
        ``checkpoint_minutes`` of wall-clock time, at the end, and when Ctrl-C stops
        the run; ``on_checkpoint(step, history_rows)`` is called after each save.
    resume: continue from ``checkpoint_path`` if it exists (``load_checkpoint``).
    stop_after: stop after this many steps in total (to split a run; the
        learning-rate schedule still follows ``config.steps``).
    callback: called as ``callback(step, model)`` after each evaluation, e.g. to
        record routing statistics over training.

    Ctrl-C (or a notebook's interrupt) finishes the step in progress, saves a
    checkpoint when there is a path, and raises ``TrainingInterrupted``.
    """
    from tqdm.auto import tqdm

    device = torch.device(device) if device is not None else get_device()
    model.to(device)
    optimizer = make_optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    rows: list[dict[str, float]] = []
    running: dict[str, float] = {}
    start_step = 0
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    if resume:
        if path is None:
            raise ValueError("resume=True needs a checkpoint_path")
        if path.exists():
            state = load_checkpoint(path, map_location=device)
            if state["config"] != asdict(config):
                raise ValueError(f"checkpoint {path} was made with a different TrainConfig: {state['config']}")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
            if state.get("torch_rng") is not None:
                torch.set_rng_state(state["torch_rng"].cpu())
            if state.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
            start_step, rows, running = state["step"], list(state["history"]), dict(state.get("running", {}))
    last = config.steps if stop_after is None else min(config.steps, stop_after)
    t0 = last_save = time.perf_counter()
    done = start_step

    def save() -> None:
        nonlocal last_save
        _save_checkpoint(path, model, optimizer, generator, done, rows, config, running)
        last_save = time.perf_counter()
        if on_checkpoint is not None:
            on_checkpoint(done, rows)

    bar = tqdm(range(start_step, last), desc="training", disable=not progress, leave=False, initial=start_step, total=last)
    with _stop_on_ctrl_c() as stop_asked:
        for step in bar:
            model.train()
            lr = config.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = task.sample_batch(config.batch_size, generator, device)
            metrics = train_step(model, task, batch, optimizer, config)
            for key, value in metrics.items():  # average train metrics since the last evaluation
                running[key] = running.get(key, 0.0) + value
            running["_n"] = running.get("_n", 0.0) + 1
            done = step + 1
            if done % config.eval_every == 0 or done == config.steps:
                model.eval()
                n = running.pop("_n")
                row = {"step": done, "lr": lr, **{k: v / n for k, v in running.items()}}
                row.update(task.evaluate(model, device))
                row["seconds"] = time.perf_counter() - t0
                rows.append(row)
                running = {}
                if callback is not None:
                    callback(done, model)
                bar.set_postfix(_headline(row))
            if stop_asked():
                break
            due = (checkpoint_every and done % checkpoint_every == 0) or (
                checkpoint_minutes is not None and time.perf_counter() - last_save >= 60 * checkpoint_minutes
            )
            if path is not None and due and done < last:
                save()
    bar.close()
    if path is not None:
        save()
    model.eval()
    if stop_asked() and done < last:
        raise TrainingInterrupted(done, path)
    return TrainResult(model, pd.DataFrame(rows), config, time.perf_counter() - t0)
