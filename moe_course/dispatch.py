"""Dispatch and combine: send each token to its experts, weigh and add up what comes back.

Legend: N tokens, D model width, E experts, K choices per token, C capacity.

``experts`` is anything with ``num_experts`` and ``expert_output(e, x)``
(x (M, D) → (M, D)), such as ``moe_course.experts.Experts`` (see ``ExpertBank``).

    sort_dispatch           token choice: sort assignments by expert, one block per expert
    expert_choice_dispatch  expert choice: each expert runs on the C tokens it picked
"""

from __future__ import annotations

from typing import Protocol

import torch

__all__ = ["ExpertBank", "sort_dispatch", "expert_choice_dispatch"]


class ExpertBank(Protocol):
    """What dispatch needs from the experts: how many, and each one alone."""

    num_experts: int

    def expert_output(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on tokens x (M, D) → (M, D)."""


def sort_dispatch(
    x: torch.Tensor,
    experts: ExpertBank,
    expert_index: torch.Tensor,
    gates: torch.Tensor,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """y_n = Σ_j keep[n, j] · gates[n, j] · expert_{expert_index[n, j]}(x_n): x (N, D) → y (N, D).

    expert_index, gates, keep: (N, K). The N·K (token, choice) assignments are
    sorted by expert (stable, so tokens stay in order within an expert), so
    each expert sees one contiguous block of rows; its outputs are scaled by
    their gates and added back to their tokens with ``index_add`` (a token's K
    contributions sum). Dropped assignments (keep False) contribute nothing,
    so a token with no kept assignment gets y_n = 0: in a residual block
    x + y = x, the token passes through unchanged.

    Cost note: the Python loop runs one matmul pair per expert. With stacked
    weights (``Experts``), each ``w_in[e]`` in the loop gives the backward a
    full-size (E, D, F) gradient per expert; grouped matmuls avoid that.
    """
    if x.ndim != 2:
        raise ValueError(f"x must have shape (N, D), got {tuple(x.shape)}")
    if expert_index.ndim == 1:
        expert_index = expert_index[:, None]
    if gates.ndim == 1:
        gates = gates[:, None]
    if expert_index.shape != gates.shape or expert_index.shape[0] != x.shape[0]:
        raise ValueError(f"expert_index {tuple(expert_index.shape)} and gates {tuple(gates.shape)} must both be (N, K) with N={x.shape[0]}")
    if keep is not None:
        if keep.ndim == 1:
            keep = keep[:, None]
        if keep.shape != expert_index.shape or keep.dtype != torch.bool:
            raise ValueError(f"keep must be a bool tensor of shape {tuple(expert_index.shape)}, got {keep.dtype} {tuple(keep.shape)}")
    num_tokens, k = expert_index.shape
    token = torch.arange(num_tokens, device=x.device).repeat_interleave(k)  # (N·K,) token of each assignment
    expert = expert_index.reshape(-1)  # (N·K,)
    gate = gates.reshape(-1)  # (N·K,)
    if keep is not None:
        kept = keep.reshape(-1)
        token, expert, gate = token[kept], expert[kept], gate[kept]
    order = torch.argsort(expert, stable=True)
    token, expert, gate = token[order], expert[order], gate[order]
    counts = torch.bincount(expert, minlength=experts.num_experts).tolist()  # rows per expert
    blocks = torch.split(x[token], counts)  # E blocks of (count_e, D)
    # Empty blocks run too (cheaply): that keeps the output dtype the experts' (e.g. bf16 under autocast).
    outputs = [experts.expert_output(e, block) for e, block in enumerate(blocks)]
    y_sorted = torch.cat(outputs)  # (M, D), M = kept assignments
    y_sorted = y_sorted * gate.to(y_sorted.dtype)[:, None]
    return torch.zeros(x.shape, dtype=y_sorted.dtype, device=x.device).index_add(0, token, y_sorted)  # (N, D)


def expert_choice_dispatch(
    x: torch.Tensor,
    experts: ExpertBank,
    token_index: torch.Tensor,
    gates: torch.Tensor,
) -> torch.Tensor:
    """Expert-choice combine (Zhou et al. 2022): y_n = Σ_{e, c: I[e,c]=n} G[e, c] · expert_e(x_n).

    x (N, D); token_index, gates (E, C) from ``expert_choice_routing``. A token
    no expert picked gets y_n = 0 (it passes through the residual unchanged).
    """
    if x.ndim != 2:
        raise ValueError(f"x must have shape (N, D), got {tuple(x.shape)}")
    if token_index.shape != gates.shape or token_index.ndim != 2 or token_index.shape[0] != experts.num_experts:
        raise ValueError(f"token_index and gates must both be (E, C) with E={experts.num_experts}, got {tuple(token_index.shape)} and {tuple(gates.shape)}")
    outputs = [experts.expert_output(e, x[token_index[e]]) for e in range(experts.num_experts)]  # E × (C, D)
    y_sorted = torch.cat(outputs) * gates.reshape(-1, 1).to(outputs[0].dtype)  # (E·C, D)
    return torch.zeros(x.shape, dtype=y_sorted.dtype, device=x.device).index_add(0, token_index.reshape(-1), y_sorted)
