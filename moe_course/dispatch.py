"""Dispatch and combine: send each token to its experts, weigh and add up what comes back.

Legend: N tokens, D model width, E experts, K choices per token, C capacity.

``experts`` is anything with ``num_experts`` and ``expert_output(e, x)``
(x (M, D) → (M, D)), such as ``moe_course.experts.Experts`` (see ``ExpertBank``).

    sort_dispatch           token choice: sort assignments by expert, one block per expert
                            (any ExpertBank; the readable reference)
    expert_choice_dispatch  expert choice: each expert runs on the C tokens it picked

Competing implementations of the same token-choice computation on stacked
``Experts`` (lesson 06 compares them; ``python -m moe_course.bench`` times them):

    masks_loop      a Python loop over experts, a boolean mask picks each one's tokens (the common style)
    onehot_einsum   GShard: one-hot dispatch and combine tensors (N, E, C) and einsums
    padded_bmm      tokens copied into a padded (E, C, D) buffer, one batched matmul per layer
    sort_split      sort by expert, split into blocks, one matmul pair per expert (moe_course.fast)
    grouped_mm      sort by expert, one grouped matmul per layer (moe_course.fast)

The last two live in ``moe_course.fast``: the readable ``sort_dispatch`` is what
they compute, arranged for speed (a hand-written backward, threads, grouped matmuls).

All return the same y (N, D) and the same gradients; ``dispatch(..., method=)``
picks one, and ``DEFAULT_METHOD`` is the fastest available.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

from . import fast
from .experts import Experts, hidden_activation

__all__ = [
    "ExpertBank",
    "sort_dispatch",
    "expert_choice_dispatch",
    "masks_loop",
    "onehot_einsum",
    "padded_bmm",
    "sort_split",
    "grouped_mm",
    "dispatch",
    "METHODS",
    "DEFAULT_METHOD",
    "sort_by_expert",
    "combine_rows",
    "slot_positions",
]


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
    expert_index, gates, keep = _routing_shapes(x, expert_index, gates, keep)
    token, expert, gate = _kept_assignments(expert_index, gates, keep)  # (M,) each, sorted by expert
    counts = torch.bincount(expert, minlength=experts.num_experts).tolist()  # rows per expert
    blocks = torch.split(x.index_select(0, token), counts)  # E blocks of (count_e, D)
    # Empty blocks run too (cheaply): that keeps the output dtype the experts' (e.g. bf16 under autocast).
    outputs = [experts.expert_output(e, block) for e, block in enumerate(blocks)]
    return combine_rows(torch.cat(outputs), token, gate, x.shape[0])  # (M, D) → (N, D)


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
        raise ValueError(
            f"token_index and gates must both be (E, C) with E={experts.num_experts}, got {tuple(token_index.shape)} and {tuple(gates.shape)}"
        )
    outputs = [experts.expert_output(e, x[token_index[e]]) for e in range(experts.num_experts)]  # E × (C, D)
    y_sorted = torch.cat(outputs) * gates.reshape(-1, 1).to(outputs[0].dtype)  # (E·C, D)
    return torch.zeros(x.shape, dtype=y_sorted.dtype, device=x.device).index_add(0, token_index.reshape(-1), y_sorted)


# ---------------------------------------------------------------------------
# The three small steps every sort-based dispatch is made of (lesson 06's exercises).
# ---------------------------------------------------------------------------


def sort_by_expert(expert_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order the tokens so each expert's tokens are contiguous: expert_index (N,) → order (N,), counts (E,).

    ``x[order]`` lists expert 0's tokens first, then expert 1's, ...; the sort
    is stable, so within an expert the tokens keep their original order.
    ``counts[e]`` is expert e's number of tokens (0 for an idle expert).
    """
    if expert_index.ndim != 1:
        raise ValueError(f"expert_index must have shape (N,), got {tuple(expert_index.shape)}")
    order = torch.argsort(expert_index, stable=True)  # (N,)
    return order, torch.bincount(expert_index, minlength=num_experts)  # (N,), (E,)


def combine_rows(y_sorted: torch.Tensor, token: torch.Tensor, gates: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The inverse of dispatch: y_n = Σ_{i: token[i] = n} gates[i] · y_sorted[i] → (N, D).

    y_sorted (M, D) are expert outputs in sorted order, token (M,) the token each
    row belongs to and gates (M,) its gate. A token that appears twice (top-2)
    gets the sum of both; a token that never appears (dropped) gets 0.
    """
    weighted = y_sorted * gates.to(y_sorted.dtype)[:, None]  # (M, D)
    out = torch.zeros(num_tokens, y_sorted.shape[1], dtype=y_sorted.dtype, device=y_sorted.device)
    return out.index_add(0, token, weighted)  # (N, D)


def slot_positions(expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Each token's place in its expert's queue: expert_index (N,) → position (N,) int64.

    position[n] = the number of earlier tokens sent to the same expert, so the
    first token of each expert gets slot 0. With capacity C, exactly the tokens
    with position >= C are dropped (first come, first served).
    """
    one_hot = torch.nn.functional.one_hot(expert_index, num_experts)  # (N, E)
    earlier = torch.cumsum(one_hot, dim=0) - one_hot  # (N, E) tokens before n, per expert
    return earlier.gather(1, expert_index[:, None]).squeeze(1)  # (N,)


# ---------------------------------------------------------------------------
# Competing implementations on stacked Experts.
#
# Every function: x (N, D), experts (Experts with w_in (E, D, F), w_out (E, F, D)),
# expert_index (N, K) int64, gates (N, K), keep (N, K) bool or None → y (N, D),
#     y_n = Σ_j keep[n, j] · gates[n, j] · expert_{expert_index[n, j]}(x_n).
# ---------------------------------------------------------------------------


def _routing_shapes(x: torch.Tensor, expert_index: torch.Tensor, gates: torch.Tensor, keep: torch.Tensor | None):
    """Check (and lift (N,) to (N, 1)) expert_index, gates and keep against x (N, D)."""
    if expert_index.ndim == 1:
        expert_index = expert_index[:, None]
    if gates.ndim == 1:
        gates = gates[:, None]
    if expert_index.shape != gates.shape or expert_index.shape[0] != x.shape[0]:
        raise ValueError(
            f"expert_index {tuple(expert_index.shape)} and gates {tuple(gates.shape)} must both be (N, K) with N={x.shape[0]}"
        )
    if keep is not None:
        if keep.ndim == 1:
            keep = keep[:, None]
        if keep.shape != expert_index.shape or keep.dtype != torch.bool:
            raise ValueError(
                f"keep must be a bool tensor of shape {tuple(expert_index.shape)}, got {keep.dtype} {tuple(keep.shape)}"
            )
    return expert_index, gates, keep


def _validate(x: torch.Tensor, experts: Experts, expert_index: torch.Tensor, gates: torch.Tensor, keep: torch.Tensor | None):
    if not isinstance(experts, Experts):
        raise TypeError(f"these dispatch implementations need stacked moe_course.experts.Experts, got {type(experts).__name__}")
    if x.ndim != 2 or x.shape[1] != experts.d_model:
        raise ValueError(f"x must have shape (N, {experts.d_model}), got {tuple(x.shape)}")
    return _routing_shapes(x, expert_index, gates, keep)


def _rows(bias: torch.Tensor | None) -> torch.Tensor | None:
    """A stacked bias (E, F) as (E, 1, F), to broadcast over each expert's rows; None stays None."""
    return None if bias is None else bias[:, None, :]


def _hidden(experts: Experts, x: torch.Tensor, matmul: Callable, w_in, b_in, w_gate=None, b_gate=None) -> torch.Tensor:
    """The experts' hidden layer from inputs x: act(x W_in + b_in), or SiLU(x W_gate + b_gate) ⊙ (x W_in + b_in) (SwiGLU).

    ``matmul(x, w)`` is the method's product (a plain @, a bmm, an einsum); biases are added as given (broadcast).
    """
    pre = matmul(x, w_in)
    if b_in is not None:
        pre = pre + b_in
    gate_pre = None
    if w_gate is not None:
        gate_pre = matmul(x, w_gate)
        if b_gate is not None:
            gate_pre = gate_pre + b_gate
    return hidden_activation(experts.activation, pre, gate_pre)


def _kept_assignments(expert_index: torch.Tensor, gates: torch.Tensor, keep: torch.Tensor | None):
    """The kept (token, expert, gate) assignments, sorted by expert (stable): three (M,) tensors."""
    num_tokens, k = expert_index.shape
    token = torch.arange(num_tokens, device=expert_index.device).repeat_interleave(k)  # (N·K,) token of assignment n·K + j
    expert, gate = expert_index.reshape(-1), gates.reshape(-1)  # (N·K,)
    if keep is not None:
        kept = keep.reshape(-1)
        token, expert, gate = token[kept], expert[kept], gate[kept]
    order = torch.argsort(expert, stable=True)
    return token[order], expert[order], gate[order]


def masks_loop(x, experts: Experts, expert_index, gates, keep=None) -> torch.Tensor:
    """The common style: for each expert, a boolean mask finds its tokens, then a matmul pair.

    Weights are ``unbind``-ed once (not indexed w_in[e] per expert), so the
    backward writes one stacked gradient instead of E full-size ones.
    """
    expert_index, gates, keep = _validate(x, experts, expert_index, gates, keep)
    n = experts.num_experts
    w_in, w_out = experts.w_in.unbind(0), experts.w_out.unbind(0)
    b_in = experts.b_in.unbind(0) if experts.b_in is not None else [None] * n
    b_out = experts.b_out.unbind(0) if experts.b_out is not None else [None] * n
    w_gate = experts.w_gate.unbind(0) if experts.w_gate is not None else [None] * n
    b_gate = experts.b_gate.unbind(0) if experts.b_gate is not None else [None] * n
    chosen = expert_index if keep is None else torch.where(keep, expert_index, -1)  # (N, K), -1: dropped
    y = torch.zeros_like(x)
    for e in range(experts.num_experts):
        token, choice = torch.where(chosen == e)  # (M_e,), (M_e,)
        if token.numel() == 0:
            continue
        h = _hidden(experts, x[token], torch.matmul, w_in[e], b_in[e], w_gate[e], b_gate[e])  # (M_e, F)
        out = h @ w_out[e]  # (M_e, D)
        if b_out[e] is not None:
            out = out + b_out[e]
        y = y.index_add(0, token, out * gates[token, choice, None].to(out.dtype))
    return y


def onehot_einsum(x, experts: Experts, expert_index, gates, keep=None, capacity: int | None = None) -> torch.Tensor:
    """GShard's formulation (Lepikhin et al. 2020, arXiv:2006.16668): one-hot tensors and einsums.

    dispatch (N, E, C) ∈ {0, 1} puts token n in slot c of expert e; combine
    (N, E, C) holds its gate there. Then (letters as everywhere: n tokens)
        xe = einsum("nec,nd->ecd", dispatch, x);  experts on (E, C, D);
        y  = einsum("nec,ecd->nd", combine, out).
    Slots are filled first choices first, earlier tokens first (as capacity_mask
    drops). C = ``capacity`` or, if None, the fullest expert's load. Simple to
    read, but memory and time grow with N·E·C.
    """
    expert_index, gates, keep = _validate(x, experts, expert_index, gates, keep)
    num_tokens, k = expert_index.shape
    num_experts = experts.num_experts
    mask = F.one_hot(expert_index, num_experts).to(x.dtype)  # (N, K, E)
    if keep is not None:
        mask = mask * keep[..., None].to(x.dtype)
    by_priority = mask.transpose(0, 1).reshape(k * num_tokens, num_experts)  # (K·N, E): first choices first
    position = (torch.cumsum(by_priority, dim=0) - 1) * by_priority  # (K·N, E) slot of each assignment
    slots = capacity if capacity is not None else max(1, int(by_priority.sum(0).max()))
    by_priority = by_priority * (position < slots)  # over capacity: dropped here too
    slot = F.one_hot(position.long().clamp(0, slots - 1), slots).to(x.dtype) * by_priority[..., None]  # (K·N, E, C)
    slot = slot.reshape(k, num_tokens, num_experts, slots)  # (K, N, E, C)
    dispatch_mask = slot.sum(0)  # (N, E, C)
    combine = torch.einsum("knec,kn->nec", slot, gates.transpose(0, 1).to(x.dtype))  # (N, E, C)
    xe = torch.einsum("nec,nd->ecd", dispatch_mask, x)  # (E, C, D)
    h = _hidden(
        experts,
        xe,
        lambda a, w: torch.einsum("ecd,edf->ecf", a, w),
        experts.w_in,
        _rows(experts.b_in),
        experts.w_gate,
        _rows(experts.b_gate),
    )  # (E, C, F)
    out = torch.einsum("ecf,efd->ecd", h, experts.w_out)  # (E, C, D)
    if experts.b_out is not None:
        out = out + experts.b_out[:, None, :]
    return torch.einsum("nec,ecd->nd", combine, out)  # (N, D)


def padded_bmm(x, experts: Experts, expert_index, gates, keep=None) -> torch.Tensor:
    """Copy each expert's tokens into a padded (E, C, D) buffer, then batched matmuls.

    C is the fullest expert's load, so padding costs (E·C − M) wasted rows: cheap
    when the load is balanced, up to E× the work when one expert gets everything.
    """
    expert_index, gates, keep = _validate(x, experts, expert_index, gates, keep)
    token, expert, gate = _kept_assignments(expert_index, gates, keep)  # (M,) each
    num_experts = experts.num_experts
    counts = torch.bincount(expert, minlength=num_experts)  # (E,)
    slots = max(1, int(counts.max())) if token.numel() else 1
    starts = torch.cumsum(counts, 0) - counts  # (E,) first sorted row of each expert
    row = expert * slots + (torch.arange(token.numel(), device=x.device) - starts[expert])  # (M,) row in the (E·C) buffer
    buffer = x.new_zeros(num_experts * slots, x.shape[1]).index_copy(0, row, x[token])  # (E·C, D)
    buffer = buffer.view(num_experts, slots, -1)  # (E, C, D)
    h = _hidden(experts, buffer, torch.bmm, experts.w_in, _rows(experts.b_in), experts.w_gate, _rows(experts.b_gate))  # (E, C, F)
    if experts.b_out is not None:
        out = torch.baddbmm(experts.b_out[:, None, :], h, experts.w_out)  # (E, C, D)
    else:
        out = torch.bmm(h, experts.w_out)
    return combine_rows(out.reshape(num_experts * slots, -1)[row], token, gate, x.shape[0])


def _fast_method(name: str) -> Callable[..., torch.Tensor]:
    """The fast method ``name`` of ``moe_course.fast``, with the readable methods' checks; where it
    cannot run (``fast.applies``: the fast path switched off, autocast, mixed dtypes, an activation
    without a hand-written derivative; gated experts such as SwiGLU, whose third matrix the fast ops
    do not know), ``sort_dispatch`` computes the same y."""
    fast_method = fast.METHODS[name]

    @functools.wraps(fast_method)
    def run(x, experts: Experts, expert_index, gates, keep=None) -> torch.Tensor:
        expert_index, gates, keep = _validate(x, experts, expert_index, gates, keep)
        if not experts.gated and fast.applies(x, experts.w_in, gates, activation=experts.activation):
            return fast_method(x, experts, expert_index, gates, keep)
        return sort_dispatch(x, experts, expert_index, gates, keep)

    return run


sort_split = _fast_method("sort_split")
grouped_mm = _fast_method("grouped_mm")

METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "masks_loop": masks_loop,
    "onehot_einsum": onehot_einsum,
    "padded_bmm": padded_bmm,
    "sort_split": sort_split,
    "grouped_mm": grouped_mm,
}
# The fastest on this course's 2-core CPU machines (``python -m moe_course.bench`` measures all of them).
DEFAULT_METHOD = "sort_split"


def dispatch(x, experts: Experts, expert_index, gates, keep=None, *, method: str | None = None) -> torch.Tensor:
    """Run the experts on their tokens with the chosen implementation (default: the fastest).

    Experts that are not stacked ``Experts`` (any ``ExpertBank``, e.g. another
    library's experts behind an adapter) go through ``sort_dispatch``.
    """
    name = method or DEFAULT_METHOD
    if name not in METHODS:
        raise ValueError(f"unknown dispatch method {name!r}; choose from {sorted(METHODS)}")
    if not isinstance(experts, Experts):
        return sort_dispatch(x, experts, expert_index, gates, keep)
    return METHODS[name](x, experts, expert_index, gates, keep)
