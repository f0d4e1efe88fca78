"""The "grouped" arrangement of ``sorted_experts``: every expert's matmul in one grouped-matmul call.

Legend: M kept rows sorted by expert, D model width, F hidden width, E experts.

``torch.nn.functional.grouped_mm(a, b, offs=...)`` multiplies the row block g
of a (rows offs[g-1]:offs[g]) by b[g] for all E experts in one call; with a
transposed first operand, (D, M) by (M, F), it gives the E weight gradients
(E, D, F) in one call too (an expert without rows gets zeros). It computes
what the "batched" arrangement's loops over experts compute, with one Python
call where those make E, and no per-expert views: at lesson 08's sizes those
per-call costs are a good part of the layer's time (``python -m moe_course.bench
--lm`` times the training step). ``sorted_experts.arrangement`` picks it for
every layer small enough to run batched, except on a busy machine, where the
experts' one-thread workers won.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

HAS_GROUPED_MM = hasattr(F, "grouped_mm")


def grouped_ok(xs: torch.Tensor, hidden: int) -> bool:
    """Whether grouped_mm can run on rows xs (M, D) with hidden width F: it exists, and D and F are multiples of 16 bytes."""
    row = 16 // xs.element_size()
    return HAS_GROUPED_MM and xs.shape[1] % row == 0 and hidden % row == 0


def worth_grouping(xs: torch.Tensor, hidden: int) -> bool:
    """``grouped_ok``, and no ``TorchDispatchMode`` active: torch's FLOP counter has no formula for grouped_mm
    (``moe_course.flops`` counts a layer under one) but counts the loops' matmuls. (The private helper is the
    one ``threads`` uses for the same question.)"""
    return grouped_ok(xs, hidden) and _get_current_dispatch_mode() is None


def _row_bias(b: torch.Tensor | None, sizes: torch.Tensor, rows: int) -> torch.Tensor | None:
    """Each expert's bias (E, ·) repeated over its block of rows → (M, ·); None without biases."""
    return None if b is None else b.repeat_interleave(sizes, dim=0, output_size=rows)


def grouped_forward(xs, gate, w_in, b_in, w_out, b_out, counts, act):
    """xs (M, D) sorted by expert, gate (M,), counts[e] rows for expert e → ys (M, D) and (pre, h, out) for the backward."""
    sizes = torch.tensor(counts, device=xs.device)  # (E,)
    offs = sizes.cumsum(0, dtype=torch.int32)  # (E,) where each expert's block ends
    rows = xs.shape[0]
    pre = F.grouped_mm(xs, w_in, offs=offs)  # (M, F)
    if b_in is not None:
        pre += _row_bias(b_in, sizes, rows)
    h = act(pre)  # (M, F)
    out = F.grouped_mm(h, w_out, offs=offs)  # (M, D)
    if b_out is not None:
        out += _row_bias(b_out, sizes, rows)
    return out * gate[:, None], [pre, h, out]


def grouped_backward(ctx, xs, dys, gate, expert, w_in, w_out, saved, need, act_backward):
    """The gradients with one grouped call per product: dxs, dgate, dw_in, db_in, dw_out, db_out (None where not needed).

    need: which of (xs, gate, w_in, b_in, w_out, b_out) want a gradient;
    expert (M,): the expert of every sorted row (for the bias gradients).
    """
    pre, h, out = saved  # (M, F), (M, F), (M, D)
    num_experts = w_in.shape[0]
    offs = torch.tensor(ctx.counts, device=xs.device).cumsum(0, dtype=torch.int32)  # (E,)
    dgate = (dys * out).sum(1) if need[1] else None  # (M,) d gate_i = dy_i · out_i
    g = dys * gate[:, None]  # (M, D) the gradient at out
    dw_out = F.grouped_mm(h.t(), g, offs=offs) if need[4] else None  # (E, F, D)
    dpre = act_backward(F.grouped_mm(g, w_out.transpose(1, 2), offs=offs), pre)  # (M, F)
    dw_in = F.grouped_mm(xs.t(), dpre, offs=offs) if need[2] else None  # (E, D, F)
    dxs = F.grouped_mm(dpre, w_in.transpose(1, 2), offs=offs) if need[0] else None  # (M, D)
    db_in = xs.new_zeros(num_experts, dpre.shape[1]).index_add_(0, expert, dpre) if need[3] else None  # (E, F)
    db_out = xs.new_zeros(num_experts, g.shape[1]).index_add_(0, expert, g) if need[5] else None  # (E, D)
    return dxs, dgate, dw_in, db_in, dw_out, db_out
