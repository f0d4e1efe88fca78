"""The exchange: tokens travel to their expert's process and back (two all-to-alls).

Legend: N tokens on this rank, D model width, E experts, W processes (ranks),
E_l = E / W experts per rank (rank q holds experts q·E_l … (q+1)·E_l − 1),
K choices per token, C capacity.

An all-to-all is W² messages at once: rank s sends block q of its rows to
rank q, and receives rank q's block for s. With rows sorted by expert, the
rows for rank q's experts are one contiguous block, so one call moves every
token to its doctor's hospital (GShard, arXiv:2006.16668; Switch, arXiv:2101.03961).

Uneven splits (dropless) need sizes the receiver does not know yet, so the
ranks first exchange how many rows each expert gets from each rank
(``exchange_counts``, an equal-split all-to-all of E numbers): the sizes a
rank receives are the transpose of the sizes everyone sends.

``all_to_all`` is differentiable: the gradient of a row goes back to where
the row came from, which is the same exchange with the two split lists
swapped. ``torch.distributed.all_to_all_single`` alone is not: used bare, it
cuts the graph without an error and the experts never learn.

``bytes_per_token`` is what the two exchanges cost per token, by formula.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .group import explain_collective_errors, require_process_group

__all__ = ["all_to_all", "exchange_counts", "rows_per_rank", "exchange_matrix", "simulate_all_to_all", "bytes_per_token"]


def _all_to_all_single(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: Any) -> torch.Tensor:
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    with explain_collective_errors("the token exchange (all_to_all)", group):
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """rows (M, D) → rows (R, D): block s of ``input_splits`` goes to rank s; block s of the output came from rank s."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):  # noqa: D102
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        return _all_to_all_single(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        # Every rank runs this backward, in the same order as the forwards: it is a collective too.
        return _all_to_all_single(grad, ctx.input_splits, ctx.output_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: Any = None) -> torch.Tensor:
    """Differentiable all-to-all of rows: x (M, D) → (R, D) with M = Σ input_splits, R = Σ output_splits.

    input_splits[q]: rows of x (in order) for rank q; output_splits[s]: rows to
    receive from rank s. Splits are Python ints (on a GPU that is a host sync).
    The backward sends each row's gradient back with the splits swapped.
    """
    _, world = require_process_group(group, "all_to_all")
    for name, splits in (("output_splits", output_splits), ("input_splits", input_splits)):
        if len(splits) != world or any((not isinstance(s, int)) or s < 0 for s in splits):
            raise ValueError(f"{name} must be {world} ints >= 0 (one per rank), got {splits!r}")
    if x.ndim < 1 or x.shape[0] != sum(input_splits):
        raise ValueError(f"x has {x.shape[0] if x.ndim else 0} rows but input_splits sum to {sum(input_splits)}")
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group)


def exchange_counts(tokens_per_expert: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Tell every rank how many rows to expect: tokens_per_expert (E,) → received (W, E_l) int64.

    tokens_per_expert[e]: rows this rank sends to expert e. received[s, j]: rows
    rank s sends to this rank's j-th expert. An equal-split all-to-all (E_l
    numbers to each rank), so no sizes are needed to make it.
    """
    _, world = require_process_group(group, "exchange_counts")
    if tokens_per_expert.ndim != 1 or tokens_per_expert.numel() % world:
        raise ValueError(
            f"tokens_per_expert must be (E,) with E divisible by the world size {world}, got {tuple(tokens_per_expert.shape)}"
        )
    counts = tokens_per_expert.to(torch.int64).contiguous()
    out = torch.empty_like(counts)
    with explain_collective_errors("the count exchange (all_to_all of tokens per expert)", group):
        dist.all_to_all_single(out, counts, group=group)
    return out.view(world, -1)  # (W, E_l)


def rows_per_rank(tokens_per_expert: torch.Tensor, world_size: int) -> torch.Tensor:
    """Rows this rank sends to each rank: (E,) tokens per expert → (W,), the sum over each rank's E/W experts."""
    if tokens_per_expert.ndim != 1 or tokens_per_expert.numel() % world_size:
        raise ValueError(
            f"tokens_per_expert must be (E,) with E divisible by world_size={world_size}, got {tuple(tokens_per_expert.shape)}"
        )
    return tokens_per_expert.view(world_size, -1).sum(1)  # (W,)


def exchange_matrix(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Who sends how many rows to whom: (W, E) tokens per expert of every rank → (W, W).

    M[s, q] = rows rank s sends to rank q. Row s is rank s's input splits; column
    q is rank q's output splits (what it receives): one is the other's transpose.
    """
    if tokens_per_expert.ndim != 2 or tokens_per_expert.shape[1] % tokens_per_expert.shape[0]:
        raise ValueError(f"expected (W, E) counts with E divisible by W, got {tuple(tokens_per_expert.shape)}")
    world = tokens_per_expert.shape[0]
    return tokens_per_expert.view(world, world, -1).sum(-1)  # (W, W)


def simulate_all_to_all(rows: Sequence[torch.Tensor], splits: torch.Tensor) -> list[torch.Tensor]:
    """The all-to-all of W ranks played in one process: rows[s] (M_s, D) for every rank → received[q] (R_q, D).

    splits (W, W) ints: splits[s, q] rows rank s sends to rank q. Row s is
    rank s's input splits (its rows are in destination order: the first
    splits[s, 0] go to rank 0, the next splits[s, 1] to rank 1, ...); column q
    is rank q's output splits: received[q] holds the block from rank 0, then
    from rank 1, ... So M_s = Σ_q splits[s, q] and R_q = Σ_s splits[s, q].
    What ``all_to_all`` does across processes, with no process group; built
    from ``torch.split`` and ``torch.cat``, so autograd gives its backward.
    """
    rows = list(rows)
    if (
        not isinstance(splits, torch.Tensor)
        or splits.ndim != 2
        or splits.shape[0] != splits.shape[1]
        or splits.is_floating_point()
    ):
        raise ValueError(
            f"splits must be a (W, W) integer tensor, got {getattr(splits, 'dtype', type(splits).__name__)} {tuple(getattr(splits, 'shape', ()))}"
        )
    world = splits.shape[0]
    if len(rows) != world:
        raise ValueError(f"rows must hold one tensor per rank: splits is {world}×{world} but rows has {len(rows)} tensors")
    if bool((splits < 0).any()):
        raise ValueError(f"split sizes cannot be negative, got {splits.tolist()}")
    for s, r in enumerate(rows):
        if not isinstance(r, torch.Tensor) or r.ndim < 1 or r.shape[0] != int(splits[s].sum()):
            raise ValueError(
                f"rank {s} holds {r.shape[0] if isinstance(r, torch.Tensor) and r.ndim else '?'} rows, "
                f"but splits[{s}] sends {int(splits[s].sum())} ({splits[s].tolist()})"
            )
    blocks = [torch.split(r, splits[s].tolist()) for s, r in enumerate(rows)]  # blocks[s][q]: rank s's rows for rank q
    return [torch.cat([blocks[s][q] for s in range(world)]) for q in range(world)]


def bytes_per_token(
    d_model: int,
    top_k: int = 1,
    capacity_factor: float | None = None,
    *,
    bytes_per_value: int = 4,
    world_size: int | None = None,
    backward: bool = True,
) -> float:
    """Bytes one token costs in one MoE layer's exchanges per training step.

        rows = K                  dropless: each of the K assignments travels once
        rows = K · capacity_factor  capacity-padded: every expert's C = K·N/E·cf slots
                                   travel, full or empty (before rounding C up)
        bytes = rows · D · bytes_per_value · 2 (there and back) · 2 (backward: the gradients
                travel the same way in reverse; omitted with backward=False)
                · (W − 1)/W with world_size: only rows for other ranks cross the wire
                  (uniform routing; 1 without world_size)

    Not counted: the dropless count exchange (E integers per rank per layer,
    per step rather than per token). float32: bytes_per_value=4; bf16: 2.
    """
    for name, value in (("d_model", d_model), ("top_k", top_k), ("bytes_per_value", bytes_per_value)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if capacity_factor is not None and (
        isinstance(capacity_factor, bool)
        or not isinstance(capacity_factor, (int, float))
        or not math.isfinite(capacity_factor)
        or capacity_factor <= 0
    ):
        raise ValueError(f"capacity_factor must be > 0 or None (dropless), got {capacity_factor!r}")
    if world_size is not None and (not isinstance(world_size, int) or isinstance(world_size, bool) or world_size <= 0):
        raise ValueError(f"world_size must be a positive int or None, got {world_size!r}")
    rows = top_k * (1.0 if capacity_factor is None else float(capacity_factor))
    directions = 2 * (2 if backward else 1)
    remote = 1.0 if world_size is None else (world_size - 1) / world_size
    return rows * d_model * bytes_per_value * directions * remote
