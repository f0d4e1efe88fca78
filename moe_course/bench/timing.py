"""Wall-clock cost, measured fairly: models timed side by side in one run, as paired ratios.

Absolute times depend on the machine and on whatever else it is doing, so
the course reports *ratios* measured in the same run. Every model runs right
next to a fresh run of the first one (``moe_course.bench.paired_times``), so a
busy moment slows both halves of a pair alike and their ratio cancels it; the
median of the paired ratios is reported.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..training.loop import model_logits
from .benchmark import paired_times

__all__ = ["time_per_batch"]


def _step(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, backward: bool) -> None:
    if backward:
        logits, router_loss = model_logits(model(x))
        loss = F.cross_entropy(logits, targets)
        if router_loss is not None:
            loss = loss + router_loss
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
    """Seconds per batch (forward, plus backward if ``backward``) of each model on x (N, D), as ratios to the first.

    Returns one row per model, in the given order: name, seconds (the median
    time) and ratio (the median of its paired ratios to the first model; 1.0 for the first).
    """
    if not models:
        raise ValueError("time_per_batch needs at least one model")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats <= 0:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
    names = list(models)
    steps = {name: (lambda m=models[name]: _step(m, x, targets, backward)) for name in names}
    timed = paired_times(steps, baseline=names[0], repeats=repeats, warmup=warmup)
    return pd.DataFrame([{"name": n, "seconds": statistics.median(timed[n].seconds), "ratio": timed[n].ratio} for n in names])
