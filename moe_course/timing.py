"""Wall-clock cost, measured fairly: several models timed side by side in one run.

Absolute times depend on the machine and on whatever else it is doing, so
the course reports *ratios* measured in the same run: the repetitions of all
models are interleaved (model A, B, C, A, B, C, ...) so that a busy moment
slows them all alike, and the median of the repetitions is kept.
"""

from __future__ import annotations

import time
from typing import Mapping

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .training import model_logits

__all__ = ["time_per_batch"]


def _step(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, backward: bool) -> None:
    if backward:
        logits, aux = model_logits(model(x))
        loss = F.cross_entropy(logits, targets)
        if aux is not None:
            loss = loss + aux
        model.zero_grad(set_to_none=True)
        loss.backward()
    else:
        with torch.no_grad():
            model(x)


def time_per_batch(
    models: Mapping[str, nn.Module],
    x: torch.Tensor,
    targets: torch.Tensor,
    *,
    repeats: int = 15,
    warmup: int = 2,
    backward: bool = True,
) -> pd.DataFrame:
    """Median seconds per batch (forward, plus backward if ``backward``) of each model on x (N, D).

    Returns one row per model, in the given order: name, seconds (median over
    ``repeats``), and ratio (seconds divided by the first model's seconds).
    """
    if not models:
        raise ValueError("time_per_batch needs at least one model")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats <= 0:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
    names = list(models)
    for _ in range(warmup):  # first calls allocate memory and pick kernels
        for name in names:
            _step(models[name], x, targets, backward)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            start = time.perf_counter()
            _step(models[name], x, targets, backward)
            times[name].append(time.perf_counter() - start)
    medians = {name: float(torch.tensor(t).median()) for name, t in times.items()}
    first = medians[names[0]]
    return pd.DataFrame([{"name": n, "seconds": s, "ratio": s / first} for n, s in medians.items()])
