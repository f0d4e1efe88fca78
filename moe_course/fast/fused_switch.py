"""The whole Switch layer (top-1) as one autograd op: router, routing, capacity, experts and losses.

Legend: N tokens, D model width, F hidden width, E experts, M kept tokens, C capacity.

``MoELayer.forward`` reads as five steps, each a few PyTorch calls, most of
them recorded by autograd: about a hundred calls forward and more backward,
where a dense FFN makes about fifteen. A call costs microseconds whatever its
size (more with its backward node), so at lesson 08's sizes (N=1024, D=64,
F=128, E=8) the calls, not the arithmetic, decide how far the Switch step is
from the dense one (``python -m moe_course.bench --lm`` prints the ratio).
This op computes the same ``MoEOutput`` fields with about half the calls and
one autograd node:

- the router's logits, softmax and top-1 choice are three calls: with few
  experts in the (E, N) layout (``router_matmul`` and ``router_softmax``: rows
  of N values, which a CPU walks quickly), with many in the usual (N, E); the
  z-loss's log-sum-exp comes from the top probability (log Z = l_max - log p_max);
- the tokens are counted per expert once, and one stable sort by expert gives
  the capacity (a token's rank among its expert's tokens, kept if < C), the
  order of the experts' blocks and the way back; where the dropped rows'
  arithmetic is cheap (``CARRY_FLOPS``) they stay in their blocks with gate 0
  instead of being cut out;
- the experts run as in ``sort_split`` (``sorted_experts``: batched or block by block, threads);
- the backward is written out: the experts' part as in ``sort_split``, then
  the gradient at the probabilities (from the gates, the balance loss and the
  caller), one softmax backward with the z-loss's term folded in, and the
  router's two products.

It applies to the plain Switch configuration only (``applies_to``);
anything else runs the readable forward. The tests compare
both: every output and every gradient, with and without drops, in each
arrangement of the experts' work.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from .activations import ACTIVATION_GRADS
from .flag import applies
from .router_matmul import FEW_EXPERTS
from .sorted_experts import ARRANGEMENTS, arrangement
from .sorting import unsort

# MoEConfig fields this op knows; any other field must keep its default for the op to apply
# (a new option is then never silently ignored: the readable forward runs instead).
KNOWN_FIELDS = frozenset(
    {
        "d_model",
        "d_ff",
        "num_experts",
        "top_k",
        "capacity_factor",
        "min_capacity",
        "router",
        "aux_loss_coef",
        "z_loss_coef",
        "router_jitter",
        "init_scale",
        "activation",
        "bias",
        "dispatch",
    }
)


# Carry dropped rows (gate 0) instead of compacting the kept ones while one expert product over the dropped rows
# costs at most this many FLOPs (2·dropped·D·F). Measured with `python -m moe_course.bench --lm` in interleaved
# A/B rounds against always compacting: lesson 08's race (D=64, F=32, ~0.8 MFLOP wasted) 1.17x against 1.21x
# dense; D=64, F=128 (~3 MFLOP) even; at 2x and 4x that width compacting won (1.23x against 1.28x, 1.08x against 1.26x).
CARRY_FLOPS = 2**22

# The layer's steps, any of which a subclass or an instance attribute may replace (the playground routes
# on given logits by setting ``layer.router``): the op computes the class's own steps, so it then steps aside.
STEPS = ("router", "jitter", "route", "capacity", "slots", "expert_output")


def applies_to(layer, tokens: torch.Tensor, cls: type) -> bool:
    """Whether ``switch_layer`` may run ``layer`` on tokens (N, D): a layer of exactly ``cls`` (``MoELayer``).

    None of its steps replaced (``STEPS``), the Switch router (top-1, raw
    gate), no router jitter while training, the default dispatch, experts
    with a hand-written derivative, every other config field at its default,
    and ``flag.applies`` (fast path on, float32 throughout, no autocast).
    """
    if type(layer) is not cls or any(name in vars(layer) for name in STEPS):
        return False
    cfg = layer.config
    if not (_plain_switch(cfg) and (cfg.router_jitter == 0 or not layer.training) and tokens.ndim == 2 and tokens.shape[0] > 0):
        return False
    experts = layer.experts
    return tokens.dtype == torch.float32 and applies(tokens, layer.w_router, experts.w_in, activation=experts.activation)


@functools.lru_cache(maxsize=256)
def _plain_switch(cfg) -> bool:
    """The Switch router, top-1, the default dispatch, and every field this op does not know at its default."""
    return (
        cfg.router == "switch"
        and cfg.top_k == 1
        and cfg.dispatch in (None, "sort_split")
        and all(f.name in KNOWN_FIELDS or getattr(cfg, f.name) == f.default for f in dataclasses.fields(cfg))
    )


def _add(a, b):
    """a + b where either may be None (no gradient)."""
    if a is None:
        return b
    return a if b is None else a + b


class _SwitchLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, w_in, b_in, w_out, b_out, capacity: int | None, activation: str, aux_coef: float, z_coef: float):
        ctx.set_materialize_grads(False)
        num_tokens, num_experts = x.shape[0], w.shape[1]
        # 1. router and routing. The scores' layout: (E, N) = (x @ w)^T with few experts, (N, E) with many;
        # ex is the experts' dimension in it
        few = num_experts < FEW_EXPERTS
        scores = w.t().contiguous() @ x.t() if few else x @ w  # (E, N) or (N, E) logits
        ex = 0 if few else 1
        probs = torch.softmax(scores, dim=ex)  # softmax over the experts
        gate, index = probs.max(dim=ex)  # (N,), (N,): the top-1 expert and its raw probability
        counts = torch.bincount(index, minlength=num_experts)  # (E,) tokens routed to each expert, counted once
        # 2. capacity: one stable sort by expert; a token's rank among its expert's tokens decides
        order = torch.argsort(index, stable=True)  # (N,) sorted row -> token
        routed = counts.tolist()
        kept_count = routed if capacity is None else [min(c, capacity) for c in routed]
        num_kept = sum(kept_count)
        # With a few cheap drops, keep every sorted row and give the dropped ones gate 0 ("carry"): their expert
        # rows are computed and multiplied by 0, so they add nothing to y or to any gradient, and every call has
        # the same shapes and a gather for the way back. Where those rows' arithmetic is cheaper than the calls
        # and fresh buffers of a compacted copy (CARRY_FLOPS), that pays; elsewhere the kept rows are compacted.
        wasted = 2 * (num_tokens - num_kept) * w_in.shape[1] * w_in.shape[2]  # FLOPs of one product on the dropped rows
        carry = 0 < wasted <= CARRY_FLOPS
        keep = kept_rows = None
        if num_kept < num_tokens:
            starts = torch.cumsum(counts, 0) - counts  # (E,) first sorted row of each expert
            rank = torch.arange(num_tokens, device=x.device) - starts.repeat_interleave(counts, output_size=num_tokens)  # (N,)
            kept_rows = rank < capacity  # (N,) in sorted order
            keep = torch.empty_like(kept_rows).scatter_(0, order, kept_rows)  # (N,) in token order
        if kept_rows is None or carry:
            token, block_counts = order, routed  # every row: (N,), rows per expert
        else:
            token, block_counts = order[kept_rows], kept_count  # the kept rows only: (M,)
        inverse = None
        if token.shape[0] == num_tokens:  # every row: the way back is a gather by the inverse permutation
            inverse = torch.empty_like(order).scatter_(0, order, torch.arange(num_tokens, device=x.device))
        # 3. the experts on their blocks of sorted rows, weighted by the gates (as sort_split)
        xs = x.index_select(0, token)  # (M, D)
        gate_rows = gate.index_select(0, token)  # (M,)
        if carry:
            gate_rows = gate_rows * kept_rows  # a dropped row's gate is 0
        ctx.arrangement = arrangement(xs, w_in, block_counts)
        arrange = ARRANGEMENTS[ctx.arrangement][0]
        ys, saved = arrange(xs, gate_rows, w_in, b_in, w_out, b_out, block_counts, ACTIVATION_GRADS[activation][0])
        y = unsort(ys, token, inverse, num_tokens, 1)  # (N, D)
        # 4. the losses: balance E·Σ f·P and z = mean (log Z)²
        f = counts.float() / num_tokens  # (E,) share of the tokens routed to each expert
        aux = torch.dot(f, probs.sum(dim=1 - ex)) * (num_experts / num_tokens)  # E · Σ_e f_e · mean_n p_en
        # log Z_n = l_n,max - log p_n,max: the softmax already holds it (p_max = gate >= 1/E, so the log is
        # well conditioned), and a log-sum-exp along the E dimension would be a slow kernel of its own
        log_z = scores.gather(ex, index.unsqueeze(ex)).squeeze(ex) - gate.log()  # (N,)
        z = torch.dot(log_z, log_z) / num_tokens  # mean of (log Z)²
        router_loss = torch.add(aux * aux_coef, z, alpha=z_coef)
        ctx.save_for_backward(
            x, w, w_in, w_out, xs, probs, log_z, f, gate_rows, token, index, inverse, keep if carry else None, *saved
        )
        ctx.ex = ex
        ctx.counts, ctx.busy = block_counts, [e for e, c in enumerate(block_counts) if c > 0]
        ctx.activation, ctx.aux_coef, ctx.z_coef = activation, aux_coef, z_coef
        keep = torch.ones(num_tokens, dtype=torch.bool, device=x.device) if keep is None else keep
        num_dropped = torch.tensor(num_tokens - num_kept, device=x.device)
        expert_index = index[:, None]
        ctx.mark_non_differentiable(expert_index, keep, counts, num_dropped)
        logits, probs = (scores.t(), probs.t()) if few else (scores, probs)  # (N, E)
        return y, logits, probs, gate[:, None], expert_index, keep[:, None], aux, z, router_loss, counts, num_dropped

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dlogits, dprobs, dgates, _index, _keep, daux, dz, drouter, _counts, _dropped):
        x, w, w_in, w_out, xs, probs, log_z, f, gate_rows, token, index, inverse, carried, *saved = ctx.saved_tensors
        need, ex = ctx.needs_input_grad, ctx.ex  # ex: the experts' dimension of probs, (E, N) or (N, E) as in forward
        num_experts, num_tokens = probs.shape[ex], probs.shape[1 - ex]
        layout = (lambda t: t.t()) if ex == 0 else (lambda t: t)  # (N, E) ↔ the forward's layout
        router = need[0] or need[1]  # the gradient at the logits is needed for x or the router weight
        dxs = dgate_rows = dw_in = db_in = dw_out = db_out = None
        if dy is not None:  # the experts' part, as in sort_split
            dys = dy.index_select(0, token)  # (M, D)
            arrange = ARRANGEMENTS[ctx.arrangement][1]
            wants = (need[0], router, need[2], need[3], need[4], need[5])
            dxs, dgate_rows, dw_in, db_in, dw_out, db_out = arrange(
                ctx,
                xs,
                dys,
                gate_rows,
                index.index_select(0, token),
                w_in,
                w_out,
                saved,
                wants,
                ACTIVATION_GRADS[ctx.activation][1],
            )
        dx = dw = None
        if router:
            if drouter is not None:
                daux, dz = _add(daux, ctx.aux_coef * drouter), _add(dz, ctx.z_coef * drouter)
            # the gradient at the probabilities dp_en: the caller's (dprobs), the balance loss's a_e, the gates' dg_n at e = i_n
            # aux = E·Σ_e f_e·mean_n p_en: d aux / d p_en = E·f_e / N, one number per expert
            a = daux * (num_experts / num_tokens) * f if daux is not None else None  # (E,)
            dgate = dgates[:, 0] if dgates is not None else None  # (N,)
            if dgate_rows is not None:  # each kept token's gate also weighed its expert's output
                from_rows = (
                    dgate_rows.index_select(0, inverse)
                    if inverse is not None
                    else gate_rows.new_zeros(num_tokens).index_add_(0, token, dgate_rows)
                )
                if carried is not None:  # a carried row's gate was gate · keep: no gradient reaches a dropped token's gate
                    from_rows = from_rows * carried
                dgate = _add(dgate, from_rows)
            # softmax backward, dl_en = p_en·(dp_en − Σ_e' p_ne'·dp_ne'), with the z-loss's term
            # d z / d logits_en = (2 log Z_n / N) · p_en
            z_term = (dz * (2.0 / num_tokens)) * log_z if dz is not None else None  # (N,)
            if dprobs is not None:  # the caller's gradient at every probability: dp in full
                dp = layout(dprobs).clone()
                if a is not None:
                    dp += a.unsqueeze(1 - ex)
                if dgate is not None:
                    dp.scatter_add_(ex, index.unsqueeze(ex), dgate.unsqueeze(ex))
                inner = dp - (probs * dp).sum(dim=ex, keepdim=True)
                dl = probs * (inner if z_term is None else inner + z_term.unsqueeze(ex))
            else:  # as in training: dp_en = a_e + [e = i_n]·dg_n, so Σ_e p_ne·dp_ne = (p·a)_n + p_n,i_n·dg_n, and
                # dl_en = p_en·(a_e + r_n) + [e = i_n]·p_n,i_n·dg_n with r_n = z_n − (p·a)_n − p_n,i_n·dg_n: no (N, E) dp
                chosen = None if dgate is None else probs.gather(ex, index.unsqueeze(ex)).squeeze(ex) * dgate  # (N,)
                pa = None if a is None else (probs @ a if ex == 1 else a @ probs)  # (N,)
                r = z_term
                for term in (pa, chosen):
                    if term is not None:
                        r = -term if r is None else r - term
                if r is None:  # no balance loss, no gate, no z-loss reached the router
                    dl = torch.zeros_like(probs)
                else:
                    dl = probs * (r.unsqueeze(ex) if a is None else a.unsqueeze(1 - ex) + r.unsqueeze(ex))
                if chosen is not None:
                    dl.scatter_add_(ex, index.unsqueeze(ex), chosen.unsqueeze(ex))
            if dlogits is not None:
                dl += layout(dlogits)
            if need[1]:
                dw = (dl @ x).t() if ex == 0 else x.t() @ dl  # (D, E)
            if need[0]:
                dx = torch.mm(dl.t(), w.t()) if ex == 0 else dl @ w.t()  # (N, D) the router's share of x's gradient
        if need[0] and dxs is not None:
            dx = dx.index_add_(0, token, dxs) if dx is not None else unsort(dxs, token, inverse, num_tokens, 1)
        return dx, dw, dw_in, db_in, dw_out, db_out, None, None, None, None


def switch_layer(layer, tokens: torch.Tensor, capacity: int | None, shape: torch.Size) -> dict:
    """``layer`` (an ``MoELayer``, ``applies_to`` it) on tokens (N, D) → the fields of its ``MoEOutput``, y shaped ``shape``."""
    cfg, experts = layer.config, layer.experts
    y, logits, probs, gates, expert_index, keep, aux, z, router_loss, counts, num_dropped = _SwitchLayer.apply(
        tokens,
        layer.w_router,
        experts.w_in,
        experts.b_in,
        experts.w_out,
        experts.b_out,
        capacity,
        experts.activation,
        float(cfg.aux_loss_coef),
        float(cfg.z_loss_coef),
    )
    return dict(
        y=y.reshape(shape),
        router_loss=router_loss,
        aux_loss=aux,
        z_loss=z,
        router_logits=logits,
        router_probs=probs,
        expert_index=expert_index,
        gates=gates,
        keep=keep,
        num_dropped=num_dropped,
        tokens_per_expert=counts,
        capacity=capacity,
    )
