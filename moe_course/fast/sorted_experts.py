"""Dispatch method "sort_split": every expert on its block of sorted rows, as one autograd op with a hand-written backward.

Legend: N tokens, M kept assignments, D model width, F hidden width, E experts, K choices per token.

x (N, D) → xs = x[token] (M, D), sorted by expert; expert e owns the next
counts[e] rows: pre = xs_e W_in[e] + b_in[e], h = act(pre),
out_e = h W_out[e] + b_out[e], ys_e = gate_e · out_e; then y_n sums the rows
of token n. It computes what ``moe_course.dispatch.sort_dispatch`` computes;
the speed comes from four things:

- the backward writes each expert's weight gradients straight into the
  stacked (E, D, F) and (E, F, D) gradients: PyTorch's autograd would keep E
  separate gradients and copy them into one stack, and keep some 10·E nodes of
  bookkeeping;
- without drops the rows go back to their tokens by a gather, not a scatter (``sorting.unsort``);
- per expert only the matmuls run; how the rest is arranged depends on size:

  - small layers (``batched``: at most ``BATCHED_ELEMENTS`` hidden values in
    all): the activation, the gate and their gradients run once over all M
    rows, and the bias gradients are one ``index_add`` each. A PyTorch call
    costs several µs whatever its size, and at lesson 08's sizes (N=1024,
    D=64, F=128, E=8) those fixed costs weigh as much as the arithmetic;
    Where torch has a grouped matmul (and the cores are not busy, see
    ``arrangement``), each product is one grouped call for all experts
    instead of a loop (``grouped_blocks``, the "grouped" arrangement);
  - big layers: every expert's whole FFN runs on its block while the block
    is in cache (a hidden buffer of all rows would not fit);

- the experts run on several cores at once when there are many small
  blocks, or when other programs keep the cores busy (``threads.over_experts``,
  ``shared_cores``).
"""

from __future__ import annotations

import torch

from .activations import ACTIVATION_GRADS
from .grouped_blocks import HAS_GROUPED_MM, grouped_backward, grouped_forward, worth_grouping
from .registry import method
from .shared_cores import fitted_threads, sharing
from .sorting import sorted_assignments, unsort
from .threads import over_experts, threaded

# Above this many hidden values (M·F) in all, each expert's FFN runs block by block in cache.
# Lesson 08's layers (N=1024, F=128: M·F = 2^17) run batched, the benchmark's standard E=8 layer
# (N=4096, F=1024: 2^22) blocked. To move the bound, time both arrangements (monkeypatch this
# constant) with `python -m moe_course.bench --lm` and `python -m moe_course.bench --quick`.
BATCHED_ELEMENTS = 2**20
# Whether the batched arrangement may hand its per-expert matmuls to torch's grouped matmul (grouped_blocks.py).
GROUPED = HAS_GROUPED_MM


def batched(rows: int, hidden: int) -> bool:
    """Whether the elementwise work runs once over all ``rows`` (M) instead of per expert: M·F <= BATCHED_ELEMENTS."""
    return rows * hidden <= BATCHED_ELEMENTS


def _unbind(t: torch.Tensor | None, n: int):
    """t.unbind(0), or n Nones for a missing tensor (e.g. no biases)."""
    return t.unbind(0) if t is not None else [None] * n


def _split(t: torch.Tensor | None, counts: list[int]):
    """t split into blocks of counts rows, or Nones for a missing tensor."""
    return torch.split(t, counts) if t is not None else [None] * len(counts)


def _linear(x_e, w, b, out=None):
    """x_e (M_e, D) @ w (+ b): one matmul, written into ``out`` when given."""
    if b is None:
        return torch.mm(x_e, w, out=out)
    return torch.addmm(b, x_e, w, out=out)


def _ffn_block(x_e, w1, b1, w2, b2, act):
    """Expert FFN on one block of rows, keeping what the backward needs: x_e (M_e, D) → pre, h (M_e, F) and out (M_e, D)."""
    pre = _linear(x_e, w1, b1)  # (M_e, F)
    h = act(pre)
    return pre, h, _linear(h, w2, b2)  # out (M_e, D)


def _blocked_forward(xs, gate, w_in, b_in, w_out, b_out, counts, act):
    """Every expert's whole FFN on its block: ys (M, D) and, per busy expert, (pre, h, out) for the backward."""
    ys = xs.new_empty(xs.shape[0], w_out.shape[2])  # (M, D)
    kept: list = [None] * len(counts)
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
    return ys, [t for saved in kept if saved is not None for t in saved]


def _batched_forward(xs, gate, w_in, b_in, w_out, b_out, counts, act):
    """Per expert only its two matmuls, into (M, ·) buffers; activation and gate once over all rows: ys and (pre, h, out)."""
    rows, num_experts = xs.shape[0], len(counts)
    pre = xs.new_empty(rows, w_in.shape[2])  # (M, F)
    out = xs.new_empty(rows, w_out.shape[2])  # (M, D)
    x_blocks, pre_blocks, out_blocks = torch.split(xs, counts), torch.split(pre, counts), torch.split(out, counts)
    w1s, b1s, w2s, b2s = w_in.unbind(0), _unbind(b_in, num_experts), w_out.unbind(0), _unbind(b_out, num_experts)
    flops = 2 * w_in.shape[1] * w_in.shape[2]

    def first(e: int) -> None:
        if counts[e]:
            _linear(x_blocks[e], w1s[e], b1s[e], out=pre_blocks[e])

    over_experts(first, counts, flops)
    h = act(pre)  # (M, F)
    h_blocks = torch.split(h, counts)

    def second(e: int) -> None:
        if counts[e]:
            _linear(h_blocks[e], w2s[e], b2s[e], out=out_blocks[e])

    over_experts(second, counts, flops)
    return out * gate[:, None], [pre, h, out]


def _blocked_backward(ctx, xs, dys, gate, expert, w_in, w_out, saved, need, act_backward):
    """The gradients block by block, each expert's while its rows are in cache: dxs, dgate, dw_in, db_in, dw_out, db_out."""
    counts, num_experts = ctx.counts, w_in.shape[0]
    kept: list = [None] * num_experts
    for i, e in enumerate(ctx.busy):
        kept[e] = saved[3 * i : 3 * i + 3]  # pre, h, out
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
        x_e, dy_e, gate_e, saved_e, w1_t, w2_t, dx_e, dgate_e, dw1, db1, dw2, db2 = per_expert[e]
        if saved_e is None:  # an idle expert: zero gradient
            for grad in (dw1, db1, dw2, db2):
                if grad is not None:
                    grad.zero_()
            return
        pre, h, out = saved_e
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
    return dxs, dgate, dw_in, db_in, dw_out, db_out


def _batched_backward(ctx, xs, dys, gate, expert, w_in, w_out, saved, need, act_backward):
    """The gradients with only the matmuls per expert (``batched``): dxs, dgate, dw_in, db_in, dw_out, db_out."""
    counts, num_experts = ctx.counts, w_in.shape[0]
    pre, h, out = saved  # (M, F), (M, F), (M, D)
    dgate = (dys * out).sum(1) if need[1] else None  # (M,) d gate_i = dy_i · out_i
    g = dys * gate[:, None]  # (M, D) the gradient at out
    dh = torch.empty_like(h)  # (M, F)
    dxs = torch.empty_like(xs) if need[0] else None  # (M, D)
    dw_in = torch.empty_like(w_in) if need[2] else None  # (E, D, F)
    dw_out = torch.empty_like(w_out) if need[4] else None  # (E, F, D)
    x_blocks, g_blocks, h_blocks, dh_blocks = (
        torch.split(xs, counts),
        torch.split(g, counts),
        torch.split(h, counts),
        torch.split(dh, counts),
    )
    w1_ts, w2_ts = w_in.transpose(1, 2).unbind(0), w_out.transpose(1, 2).unbind(0)
    dw1s, dw2s, dx_blocks = _unbind(dw_in, num_experts), _unbind(dw_out, num_experts), _split(dxs, counts)
    flops = 2 * w_in.shape[1] * w_in.shape[2]

    def first(e: int) -> None:
        if not counts[e]:  # an idle expert: zero gradient
            for grad in (dw1s[e], dw2s[e]):
                if grad is not None:
                    grad.zero_()
            return
        torch.mm(g_blocks[e], w2_ts[e], out=dh_blocks[e])  # (M_e, F)
        if dw2s[e] is not None:
            torch.mm(h_blocks[e].t(), g_blocks[e], out=dw2s[e])  # (F, D)

    over_experts(first, counts, flops)
    dpre = act_backward(dh, pre)  # (M, F)
    dpre_blocks = torch.split(dpre, counts)

    def second(e: int) -> None:
        if not counts[e]:
            return
        if dw1s[e] is not None:
            torch.mm(x_blocks[e].t(), dpre_blocks[e], out=dw1s[e])  # (D, F)
        if dx_blocks[e] is not None:
            torch.mm(dpre_blocks[e], w1_ts[e], out=dx_blocks[e])  # (M_e, D)

    over_experts(second, counts, flops)
    # the bias gradients sum each expert's rows (expert (M,): the expert of every sorted row)
    db_in = xs.new_zeros(num_experts, dpre.shape[1]).index_add_(0, expert, dpre) if need[3] else None  # (E, F)
    db_out = xs.new_zeros(num_experts, g.shape[1]).index_add_(0, expert, g) if need[5] else None  # (E, D)
    return dxs, dgate, dw_in, db_in, dw_out, db_out


# how the experts' work is laid out (``arrangement``): name → (forward, backward)
ARRANGEMENTS = {
    "batched": (_batched_forward, _batched_backward),
    "blocked": (_blocked_forward, _blocked_backward),
    "grouped": (grouped_forward, grouped_backward),
}


def arrangement(xs: torch.Tensor, w_in: torch.Tensor, counts: list[int]) -> str:
    """How to lay out the experts' work on rows xs (M, D) with weights w_in (E, D, F), counts[e] rows each.

    "blocked" when M·F > BATCHED_ELEMENTS (``batched``); else "grouped" (one
    grouped-matmul call per product, ``grouped_blocks``) where ``GROUPED`` is
    on and grouped_mm can run (``worth_grouping``), except on a busy machine
    where the experts would run on one-thread workers (``shared_cores``,
    ``threads.threaded``); else "batched".

    On a quiet machine one grouped call beats E small blocks on threads:
    measured forward+backward against dense (2 threads, interleaved pairs),
    e.g. N=4096 D=64 F=256 E=32 1.95x against 2.85x, N=4096 D=128 F=256
    E=16 1.62x against 2.43x. With the cores busy the workers won (2.09x
    against 2.43x for the second), so there the threads keep them.
    """
    hidden = w_in.shape[2]
    if not batched(xs.shape[0], hidden):
        return "blocked"
    if GROUPED and worth_grouping(xs, hidden) and (sharing() is None or not threaded(counts, 2 * w_in.shape[1] * hidden)):
        return "grouped"
    return "batched"


class _SortedExperts(torch.autograd.Function):
    """Gather, every expert's FFN on its block, gate and unsort in one step (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, gate, w_in, b_in, w_out, b_out, token, expert, inverse, counts: list[int], activation: str, k: int):
        with fitted_threads():  # other programs hold the cores: one intra-op thread, experts on workers (shared_cores.py)
            xs = x.index_select(0, token)  # (M, D)
            ctx.arrangement = arrangement(xs, w_in, counts)
            arrange = ARRANGEMENTS[ctx.arrangement][0]
            ys, saved = arrange(xs, gate, w_in, b_in, w_out, b_out, counts, ACTIVATION_GRADS[activation][0])
            ctx.save_for_backward(xs, gate, w_in, w_out, token, expert, inverse, *saved)
            ctx.busy = [e for e, c in enumerate(counts) if c > 0]
            ctx.counts, ctx.activation, ctx.k, ctx.num_tokens = counts, activation, k, x.shape[0]
            return unsort(ys, token, inverse, x.shape[0], k)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        with fitted_threads():
            xs, gate, w_in, w_out, token, expert, inverse, *saved = ctx.saved_tensors
            dys = dy.index_select(0, token)  # (M, D): each row's upstream gradient
            arrange = ARRANGEMENTS[ctx.arrangement][1]
            dxs, dgate, dw_in, db_in, dw_out, db_out = arrange(
                ctx, xs, dys, gate, expert, w_in, w_out, saved, ctx.needs_input_grad, ACTIVATION_GRADS[ctx.activation][1]
            )
            dx = unsort(dxs, token, inverse, ctx.num_tokens, ctx.k) if dxs is not None else None
            return dx, dgate, dw_in, db_in, dw_out, db_out, None, None, None, None, None, None


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
        expert,
        inverse,
        counts,
        experts.activation,
        expert_index.shape[1],
    )
