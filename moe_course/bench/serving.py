"""Serving an MoE: what it keeps in memory, and how many tokens per second it answers, by batch size.

Shape legend (used across the package): B batch, T time, D model width,
F hidden width, E experts, K top-k, C capacity, N = B·T tokens.

Training cost is FLOPs; serving cost is also memory and how full each expert's
block of tokens is. A dense FFN of width F and a Switch layer of E experts of
width F do the same FLOPs per token, but the Switch layer must hold E times
the weights, and a call with N tokens gives each expert only about N·K/E of
them. With few tokens per call (one user, one token at a time), each expert's
matmul is tiny and the router, the sorting and the reading of many weight
matrices dominate; with many tokens per call every expert gets a full block.

    weight_bytes     the bytes a module's parameters and buffers occupy
    serving_table    tokens per second of each layer at each number of tokens per call, timed side by side
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from .benchmark import paired_times

__all__ = ["weight_bytes", "serving_table"]


def weight_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``module``: what must sit in memory to serve it."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"weight_bytes expects an nn.Module, got {type(module).__name__}")
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _forward(layer: nn.Module, x: torch.Tensor, calls: int):
    def run() -> None:
        for _ in range(calls):
            out = layer(x)
            getattr(out, "y", out)  # an MoEOutput or a tensor: the answer is there either way

    return run


@torch.inference_mode()
def serving_table(
    layers: Mapping[str, nn.Module],
    tokens: Sequence[int],
    *,
    baseline: str | None = None,
    repeats: int = 7,
    tokens_per_round: int = 256,
    seed: int = 0,
) -> pd.DataFrame:
    """Tokens per second of each layer (inference, no gradients) for each number of tokens per call.

    layers: name → module mapping x (N, D) to (N, D) (or to an ``MoEOutput``), all of the same width D.
    tokens: the numbers of tokens per call N to try. Each timing runs enough calls to cover about
    ``tokens_per_round`` tokens, each layer next to a fresh run of ``baseline`` (default: the first
    layer; ``bench.paired_times``), so a busy moment slows both halves of a pair alike.
    Returns one row per (tokens, layer): tokens, layer, tokens_per_second (from the median time)
    and ratio (median over pairs of its time over the baseline's time, per token; 1.0 for the baseline).
    """
    if not layers:
        raise ValueError("serving_table needs at least one layer")
    names = list(layers)
    baseline = names[0] if baseline is None else baseline
    if baseline not in layers:
        raise ValueError(f"baseline {baseline!r} is not among the layers {names}")
    widths = {n: getattr(m, "d_model", None) or getattr(getattr(m, "config", None), "d_model", None) for n, m in layers.items()}
    width = {w for w in widths.values() if w is not None}
    if len(width) != 1:
        raise ValueError(f"every layer must have the same width d_model, got {widths}")
    (d_model,) = width
    for n in tokens:
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"tokens must be positive ints, got {n!r}")
    for m in layers.values():
        m.eval()
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in tokens:
        x = torch.randn(n, d_model, generator=g)
        calls = max(1, tokens_per_round // n)
        timed = paired_times({name: _forward(m, x, calls) for name, m in layers.items()}, baseline, repeats=repeats, warmup=1)
        for name in names:
            seconds = statistics.median(timed[name].seconds)
            rows.append(
                {
                    "tokens": n,
                    "layer": name,
                    "tokens_per_second": n * calls / seconds,
                    "ratio": statistics.median(timed[name].ratios),
                }
            )
    return pd.DataFrame(rows)
