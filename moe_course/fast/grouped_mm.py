"""Dispatch method "grouped_mm": sort by expert, then one grouped matmul per layer.

Legend: N tokens, M kept assignments, D model width, F hidden width, E experts.

``torch.nn.functional.grouped_mm(a, b, offs=...)`` multiplies row block g of a
(rows offs[g-1]:offs[g]) by b[g], for all experts in one call, with the stacked
weights as they are. Where grouped_mm is missing (older torch) or the widths are
not 16-byte aligned, it runs "sort_split" instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .activations import ACTIVATION_GRADS
from .grouped_blocks import grouped_ok
from .registry import method
from .sorted_experts import sort_split
from .sorting import sorted_assignments, unsort


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped_mm's CPU backward rejects stride-0 gradients (e.g. from y.sum())."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_mm_ok(x: torch.Tensor, experts) -> bool:
    """Whether grouped_mm can run: it exists, and the widths are multiples of 16 bytes (its alignment rule)."""
    return grouped_ok(x, experts.d_ff) and x.dtype == experts.w_in.dtype


@method("grouped_mm")
def grouped_mm(x, experts, expert_index, gates, keep=None) -> torch.Tensor:
    """x (N, D), stacked ``Experts``, expert_index and gates (N, K), keep (N, K) or None → y (N, D), like ``sort_dispatch``."""
    if not grouped_mm_ok(x, experts):
        return sort_split(x, experts, expert_index, gates, keep)
    token, expert, gate, _ = sorted_assignments(expert_index, gates, keep, with_inverse=False)  # (M,) each
    if token.numel() == 0:
        return torch.zeros_like(x)
    act = ACTIVATION_GRADS[experts.activation][0]
    counts = torch.bincount(expert, minlength=experts.num_experts)  # (E,)
    offs = torch.cumsum(counts, 0).to(torch.int32)  # (E,) row ends
    rows = token.numel()
    h = F.grouped_mm(x.index_select(0, token), experts.w_in, offs=offs)  # (M, F)
    if experts.b_in is not None:  # rows are sorted by expert: repeat each bias over its block
        h = h + experts.b_in.repeat_interleave(counts, dim=0, output_size=rows)
    h = _ContiguousGrad.apply(act(h))
    out = F.grouped_mm(h, experts.w_out, offs=offs)  # (M, D)
    if experts.b_out is not None:
        out = out + experts.b_out.repeat_interleave(counts, dim=0, output_size=rows)
    out = _ContiguousGrad.apply(out) * gate.to(out.dtype)[:, None]  # (M, D)
    return unsort(out, token, None, x.shape[0], expert_index.shape[1])
