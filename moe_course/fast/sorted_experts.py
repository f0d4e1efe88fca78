"""Dispatch method "sort_split": every expert on its block of sorted rows, as one autograd op with a hand-written backward.

Legend: N tokens, M kept assignments, D model width, F hidden width, E experts, K choices per token.

x (N, D) → xs = x[token] (M, D), sorted by expert; expert e owns the next
counts[e] rows: pre = xs_e W_in[e] + b_in[e], h = act(pre),
out_e = h W_out[e] + b_out[e], ys_e = gate_e · out_e; then y_n sums the rows
of token n. It computes what ``moe_course.dispatch.sort_dispatch`` computes;
the speed comes from three things:

- the per-expert work runs block by block, where the small tensors stay in
  cache, and on several cores at once when there are many small blocks
  (``threads.over_experts``);
- the backward writes each expert's weight gradients straight into the
  stacked (E, D, F) and (E, F, D) gradients: PyTorch's autograd would keep E
  separate gradients and copy them into one stack, and keep some 10·E nodes of
  bookkeeping;
- without drops the rows go back to their tokens by a gather, not a scatter (``sorting.unsort``).
"""

from __future__ import annotations

import torch

from .activations import ACTIVATION_GRADS
from .registry import method
from .sorting import sorted_assignments, unsort
from .threads import over_experts


def _unbind(t: torch.Tensor | None, n: int):
    """t.unbind(0), or n Nones for a missing tensor (e.g. no biases)."""
    return t.unbind(0) if t is not None else [None] * n


def _split(t: torch.Tensor | None, counts: list[int]):
    """t split into blocks of counts rows, or Nones for a missing tensor."""
    return torch.split(t, counts) if t is not None else [None] * len(counts)


def _ffn_block(x_e, w1, b1, w2, b2, act):
    """Expert FFN on one block of rows, keeping what the backward needs: x_e (M_e, D) → pre, h (M_e, F) and out (M_e, D)."""
    pre = torch.addmm(b1, x_e, w1) if b1 is not None else x_e @ w1  # (M_e, F)
    h = act(pre)
    out = torch.addmm(b2, h, w2) if b2 is not None else h @ w2  # (M_e, D)
    return pre, h, out


class _SortedExperts(torch.autograd.Function):
    """Gather, every expert's FFN on its block, gate and unsort in one step (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, gate, w_in, b_in, w_out, b_out, token, inverse, counts: list[int], activation: str, k: int):
        act = ACTIVATION_GRADS[activation][0]
        xs = x.index_select(0, token)  # (M, D)
        ys = torch.empty(xs.shape[0], w_out.shape[2], dtype=x.dtype, device=x.device)  # (M, D)
        kept: list = [None] * len(counts)  # per expert: pre, h, out, for the backward
        # every expert's arguments, cut once (a C call per tensor, not a Python index per expert)
        per_expert = list(
            zip(
                torch.split(xs, counts),
                torch.split(ys, counts),
                torch.split(gate[:, None], counts),
                w_in.unbind(0),
                _unbind(b_in, len(counts)),
                w_out.unbind(0),
                _unbind(b_out, len(counts)),
            )
        )

        def expert_forward(e: int) -> None:
            x_e, y_e, gate_e, w1, b1, w2, b2 = per_expert[e]
            if x_e.shape[0] == 0:
                return
            kept[e] = pre, h, out = _ffn_block(x_e, w1, b1, w2, b2, act)
            torch.mul(out, gate_e, out=y_e)

        over_experts(expert_forward, counts, 2 * w_in.shape[1] * w_in.shape[2])
        busy = [e for e, t in enumerate(kept) if t is not None]
        ctx.save_for_backward(xs, gate, w_in, w_out, token, inverse, *(t for e in busy for t in kept[e]))
        ctx.busy, ctx.counts, ctx.activation, ctx.k, ctx.num_tokens = busy, counts, activation, k, x.shape[0]
        return unsort(ys, token, inverse, x.shape[0], k)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        xs, gate, w_in, w_out, token, inverse, *activations = ctx.saved_tensors
        kept: list = [None] * len(ctx.counts)
        for i, e in enumerate(ctx.busy):
            kept[e] = activations[3 * i : 3 * i + 3]  # pre, h, out
        act_backward = ACTIVATION_GRADS[ctx.activation][1]
        need, counts = ctx.needs_input_grad, ctx.counts
        num_experts = w_in.shape[0]
        dys = dy.index_select(0, token)  # (M, D): each row's upstream gradient
        dxs = torch.empty_like(xs) if need[0] else None  # (M, D)
        dgate = torch.empty_like(gate) if need[1] else None  # (M,)
        dw_in = torch.empty_like(w_in) if need[2] else None  # (E, D, F)
        db_in = xs.new_empty(num_experts, w_in.shape[2]) if need[3] else None  # (E, F)
        dw_out = torch.empty_like(w_out) if need[4] else None  # (E, F, D)
        db_out = xs.new_empty(num_experts, w_out.shape[2]) if need[5] else None  # (E, D)
        per_expert = list(
            zip(
                torch.split(xs, counts),
                torch.split(dys, counts),
                torch.split(gate[:, None], counts),
                kept,
                w_in.transpose(1, 2).unbind(0),
                w_out.transpose(1, 2).unbind(0),
                _split(dxs, counts),
                _split(dgate, counts),
                _unbind(dw_in, num_experts),
                _unbind(db_in, num_experts),
                _unbind(dw_out, num_experts),
                _unbind(db_out, num_experts),
            )
        )

        def expert_backward(e: int) -> None:
            x_e, dy_e, gate_e, saved, w1_t, w2_t, dx_e, dgate_e, dw1, db1, dw2, db2 = per_expert[e]
            if saved is None:  # an idle expert: zero gradient
                for grad in (dw1, db1, dw2, db2):
                    if grad is not None:
                        grad.zero_()
                return
            pre, h, out = saved
            if dgate_e is not None:
                torch.sum(dy_e * out, 1, out=dgate_e)  # d gate_i = dy_i · out_i
            g = dy_e * gate_e  # (M_e, D) the gradient at out
            if dw2 is not None:
                torch.mm(h.t(), g, out=dw2)  # (F, D)
            if db2 is not None:
                torch.sum(g, 0, out=db2)
            dpre = act_backward(g @ w2_t, pre)  # (M_e, F)
            if dw1 is not None:
                torch.mm(x_e.t(), dpre, out=dw1)  # (D, F)
            if db1 is not None:
                torch.sum(dpre, 0, out=db1)
            if dx_e is not None:
                torch.mm(dpre, w1_t, out=dx_e)  # (M_e, D)

        over_experts(expert_backward, counts, 2 * w_in.shape[1] * w_in.shape[2])
        dx = unsort(dxs, token, inverse, ctx.num_tokens, ctx.k) if dxs is not None else None
        return dx, dgate, dw_in, db_in, dw_out, db_out, None, None, None, None, None


@method("sort_split")
def sort_split(x, experts, expert_index, gates, keep=None) -> torch.Tensor:
    """Sort assignments by expert, split into contiguous blocks, one matmul pair per block (``_SortedExperts``).

    x (N, D), stacked ``Experts``, expert_index and gates (N, K), keep (N, K) or
    None → y (N, D), the same as ``sort_dispatch``. Needs ``flag.applies``
    (``moe_course.dispatch`` checks it, and runs ``sort_dispatch`` otherwise).
    """
    token, expert, gate, inverse = sorted_assignments(expert_index, gates, keep)  # (M,) each
    if token.numel() == 0:
        return torch.zeros_like(x)
    counts = torch.bincount(expert, minlength=experts.num_experts).tolist()
    return _SortedExperts.apply(
        x,
        gate,
        experts.w_in,
        experts.b_in,
        experts.w_out,
        experts.b_out,
        token,
        inverse,
        counts,
        experts.activation,
        expert_index.shape[1],
    )
