"""The kept assignments sorted by expert, and the way back from sorted rows to tokens, with the fewest copies.

Legend: N tokens, K choices per token, M kept assignments, D model width.
"""

from __future__ import annotations

import torch


def sorted_assignments(expert_index: torch.Tensor, gates: torch.Tensor, keep: torch.Tensor | None, *, with_inverse: bool = True):
    """The kept assignments sorted by expert (stable): token, expert, gate (M,) each, and ``inverse``.

    When nothing is dropped, assignment (n, j) sits at sorted row inverse[n·K + j]
    (so ``rows[inverse]`` undoes the sort); with drops, or ``with_inverse=False``,
    ``inverse`` is None.
    """
    num_tokens, k = expert_index.shape
    expert, gate = expert_index.reshape(-1), gates.reshape(-1)  # (N·K,)
    if keep is None or bool(keep.all()):
        order = torch.argsort(expert, stable=True)  # (N·K,) sorted row -> assignment n·K + j
        inverse = None
        if with_inverse:
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel(), device=order.device)
        token = order // k if k > 1 else order
        return token, expert[order], gate[order], inverse
    token = torch.arange(num_tokens, device=expert_index.device).repeat_interleave(k)  # (N·K,)
    kept = keep.reshape(-1)
    token, expert, gate = token[kept], expert[kept], gate[kept]
    order = torch.argsort(expert, stable=True)
    return token[order], expert[order], gate[order], None


def unsort(rows: torch.Tensor, token: torch.Tensor, inverse: torch.Tensor | None, num_tokens: int, k: int) -> torch.Tensor:
    """Add each sorted row back to its token: rows (M, D) → (N, D), y_n = Σ_{i: token[i] = n} rows_i.

    Without drops, a gather by the inverse permutation (and, for top-k, a sum
    over each token's K rows) does it with no zero-filled buffer and no scatter.
    """
    if inverse is not None:
        out = rows.index_select(0, inverse)  # (N·K, D) in assignment order
        return out if k == 1 else out.view(num_tokens, k, -1).sum(1)
    return rows.new_zeros(num_tokens, rows.shape[1]).index_add_(0, token, rows)
