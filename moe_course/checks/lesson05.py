"""Checks for lesson 05: the load-balancing loss, the router z-loss, capacity with dropping, expert choice."""

from __future__ import annotations

from typing import Any

import torch

from ..losses import load_balancing_loss, router_z_loss
from ..routing import capacity_mask, expert_choice_routing
from ._core import Exercise, ExerciseError, Mistake, describe, exercise, expect_pair


def _scalar(ex: Exercise, out: Any, name: str) -> torch.Tensor:
    if out is None:
        ex.fail(f"{name} is None. Did you forget a `return` statement?")
    if isinstance(out, (int, float)) and not isinstance(out, bool):
        ex.fail(
            f"{name} is a Python number ({out:.4g}); return a 0-dimensional torch tensor instead, so that it can be added to the training loss and backpropagated (avoid .item() and float())."
        )
    ex.expect_tensor(out, name=name, allow_nan=True)
    if out.numel() != 1:
        ex.fail(
            f"{name} should be one number (a 0-dimensional tensor), but it has shape {tuple(out.shape)}. Reduce over the experts and the tokens."
        )
    if not out.is_floating_point():
        ex.fail(f"{name} should be a floating-point tensor, got dtype {out.dtype}.".replace("torch.", ""))
    return out.reshape(())


def _routing_case(g: torch.Generator, n: int, e: int, empty: int | None, skew: float, noisy: bool = False):
    logits = torch.randn(n, e, generator=g) * skew
    if empty is not None:
        logits[:, empty] -= 50.0  # this expert never wins
    probs = torch.softmax(logits, dim=-1)
    index = probs.argmax(-1)  # (N,)
    if noisy:  # a noisy router (lesson 04): the chosen expert is often not the argmax of the clean probabilities
        noise = torch.randn(n, e, generator=g) * 2.0
        if empty is not None:
            noise[:, empty] = -1e9
        index = (logits + noise).argmax(-1)
        assert not torch.equal(index, probs.argmax(-1))
    return probs, index


@exercise("5.1", "load_balancing_loss")
def check_load_balancing_loss(ex: Exercise, fn) -> str:
    g = ex.generator()
    # (tokens, experts, an expert with no tokens, logit scale, noisy choice: expert_index is not the argmax)
    cases = [
        (64, 4, None, 1.5, False),
        (40, 6, 5, 2.0, False),
        (30, 3, None, 0.5, True),
        (50, 8, 0, 3.0, True),
        (9, 2, None, 1.0, False),
        (48, 5, None, 1.0, True),
    ]
    for n, e, empty, skew, noisy in cases:
        probs, index = _routing_case(g, n, e, empty, skew, noisy)
        leaf = probs.clone().requires_grad_(True)
        what = (
            f"{n} tokens, {e} experts"
            + (f" (expert {empty} gets no tokens)" if empty is not None else "")
            + (", a noisy router: expert_index is not always the argmax of router_probs" if noisy else "")
        )
        try:
            out = ex.call(fn, leaf, index)
        except ExerciseError as err:
            message = str(err)
            crashed = "not done yet" not in message and any(
                w in message.lower() for w in ("must match", "size", "shape", "index")
            )
            if empty is not None and crashed:
                ex.fail(
                    f"your function crashed when an expert gets no tokens ({what}). Count the tokens of every expert, including the idle ones: torch.bincount(expert_index, minlength=E) has one entry per expert.\n  The error was: {str(err).split(': ', 1)[-1]}"
                )
            raise
        out = _scalar(ex, out, "the loss")
        counts = torch.bincount(index, minlength=e).float()  # (E,)
        f = counts / n
        p = probs.mean(0)
        expected = load_balancing_loss(probs, index)
        mistakes = [
            Mistake(
                e * (p * p).sum(),
                "f is computed from the probabilities; f_i must be the *fraction of tokens* routed to expert i, counted from expert_index (e.g. torch.bincount(expert_index, minlength=E) / N). Only P uses the probabilities.",
            ),
            Mistake(
                (f * p).sum(),
                f"the factor E is missing: E · Σ f_i · P_i is 1.0 under perfectly uniform routing; without E it is 1/E = {1 / e:.3g}.",
            ),
            Mistake(
                e * (counts * p).sum(),
                f"your loss is N times too large (N = {n} tokens): f_i is the *fraction* of the tokens routed to expert i (its count divided by N), and P_i the *mean* probability of expert i over the tokens (the column sum divided by N). One of the two is missing its division by N.",
            ),
            Mistake((e * f * p).mean(), "sum over the experts, E · Σ_i f_i · P_i; you took the mean over them."),
            Mistake(
                e * (f * probs.max(-1).values.mean()).sum(),
                "P_i is the mean probability the router gives expert i (a column mean of router_probs), not the mean of each token's largest probability.",
            ),
            Mistake(
                e * (f * f).sum(),
                "both factors are computed from the counts: P_i must be the mean router *probability* of expert i, which carries the gradient (f does not).",
            ),
            Mistake(
                e * (torch.bincount(probs.argmax(-1), minlength=e).float() / n * p).sum(),
                "f is counted from router_probs.argmax, not from expert_index: the experts actually chosen (expert_index) can differ from the argmax, e.g. with a noisy router. Count expert_index.",
            ),
            Mistake(e * e * (f * p).sum(), f"you multiplied by E twice (E² = {e * e}): the loss is E · Σ f_i · P_i."),
            Mistake(
                0.01 * e * (f * p).sum(),
                "you multiplied by α = 0.01: the coefficient belongs in the training loss (loss + α · aux_loss); this function returns the unweighted loss.",
            ),
            Mistake(e * ((f * p) ** 2).sum(), "you squared each product f_i · P_i; the loss is E · Σ f_i · P_i, no square."),
            Mistake(
                e * (torch.zeros(e, dtype=torch.float64).index_add(0, index, probs.max(-1).values.double()) / n * p).sum(),
                "f_i sums the chosen tokens' top probabilities; f_i is the *fraction of tokens* routed to expert i (counts / N), no probabilities.",
            ),
            Mistake(
                e * f.mean() * p.mean(),
                "you multiplied the means of f and P; the loss sums their products expert by expert: E · Σ_i f_i · P_i.",
            ),
            Mistake(
                (probs.sum(0).std() / probs.sum(0).mean()) ** 2,
                "this is the importance loss of Shazeer et al. (the squared coefficient of variation of each expert's total probability); this exercise is the Switch loss E · Σ f_i · P_i.",
            ),
            Mistake(
                torch.zeros(()),
                "the loss is 0: is f all zeros? Dividing integer counts with // by N rounds every fraction down to 0: use / (or .float() first).",
            ),
        ]
        ex.match(
            out.detach(),
            expected,
            mistakes,
            context=what,
            name="the loss",
            sizes={"N, the number of tokens": n, "E, the number of experts": e},
        )
        if not out.requires_grad:
            ex.fail(
                "the loss carries no gradient back to router_probs, so it could not steer the router. Compute it with torch operations on router_probs (no .detach(), .item(), .numpy() or torch.no_grad())."
            )
        grad = torch.autograd.grad(out, leaf, allow_unused=True)[0]
        want = (e * f / n).expand(n, e)  # d loss / d p[n, i] = E · f_i / N: the gradient flows through P only
        if grad is None:
            ex.fail("the loss carries no gradient back to router_probs; compute P from router_probs without detaching it.")
        ex.match(
            grad,
            want,
            [
                Mistake(
                    2 * e * p.expand(n, e) / n,
                    "the gradient also flows through f: f_i is a fraction of *counts*, which has no gradient. Compute f from expert_index.",
                )
            ],
            context=f"{what}: the gradient with respect to router_probs should be E·f_i/N in column i",
            name="the gradient",
        )
    # perfectly uniform routing: the loss is 1
    n, e = 12, 4
    uniform = torch.full((n, e), 1.0 / e)
    out = _scalar(ex, ex.call(fn, uniform, torch.arange(n) % e), "the loss")
    if abs(out.item() - 1.0) > 1e-5:
        ex.fail(
            f"under perfectly uniform routing (every probability 1/E, every expert getting N/E tokens) the loss should be 1.0; got {out.item():.4g}."
        )
    return "E · Σ f_i · P_i: 1.0 when uniform, f from counts (idle experts included), gradient through P only"


@exercise("5.2", "router_z_loss")
def check_router_z_loss(ex: Exercise, fn) -> str:
    g = ex.generator()
    cases = [(20, 4, 1.0), (7, 8, 3.0), (1, 3, 1.0), (33, 5, 0.3)]
    for n, e, scale in cases:
        logits = torch.randn(n, e, generator=g) * scale + 0.5
        leaf = logits.clone().requires_grad_(True)
        out = _scalar(ex, ex.call(fn, leaf), "the z-loss")
        lse = torch.logsumexp(logits, dim=-1)  # (N,)
        expected = router_z_loss(logits)
        probs = torch.softmax(logits, dim=-1)
        mistakes = [
            Mistake(
                (torch.logsumexp(probs, dim=-1) ** 2).mean(),
                "you computed the z-loss on the probabilities: it penalises the *logits*. Take logsumexp over the experts of router_logits themselves (probabilities always sum to 1 and say nothing about how large the logits are).",
            ),
            Mistake(lse.mean(), "the square is missing: the z-loss is the mean of logsumexp(logits)², squared per token."),
            Mistake(
                (lse**2).sum(), "average over the tokens (the mean), not the sum: the z-loss should not grow with the batch size."
            ),
            Mistake(
                (torch.logsumexp(logits, dim=0) ** 2).mean(),
                "the logsumexp runs over the tokens (dim 0) instead of over the experts (the last dim).",
            ),
            Mistake(
                (logits**2).mean(),
                "this is the mean squared logit; the z-loss squares each token's logsumexp over the experts, log Σ_j exp(x_j).",
            ),
            Mistake(lse.mean() ** 2, "square each token's logsumexp first, then average: mean(lse²), not mean(lse)²."),
            Mistake(
                (torch.logsumexp(logits, dim=-1) ** 2).mean() / e,
                "you divided by the number of experts as well; the z-loss averages over the tokens only.",
            ),
            Mistake(
                (logits.max(-1).values ** 2).mean(),
                "you squared each token's largest logit; the z-loss squares its logsumexp, log Σ_j exp(x_j), a smooth maximum (larger than the max).",
            ),
            Mistake(
                torch.logsumexp(logits**2, dim=-1).mean(),
                "you squared the logits before the logsumexp; square after it: mean over tokens of logsumexp(logits)².",
            ),
            Mistake(
                1e-3 * expected,
                "you multiplied by the coefficient 1e-3: it belongs in the training loss (loss + c_z · z_loss); this function returns the unweighted z-loss.",
            ),
            Mistake(
                torch.logsumexp(logits.flatten(), dim=0) ** 2,
                "one logsumexp over every logit of the batch; take it per token (over the experts, dim=-1), square, then average over the tokens.",
            ),
            Mistake(
                (logits.mean(-1) ** 2).mean(),
                "you squared each token's mean logit; the z-loss squares its logsumexp over the experts.",
            ),
            Mistake((logits.exp().sum(-1) ** 2).mean(), "the log is missing: logsumexp is log(Σ exp(x)), not Σ exp(x)."),
        ]
        ex.match(
            out.detach(),
            expected,
            mistakes,
            context=f"{n} tokens, {e} experts",
            name="the z-loss",
            sizes={"N, the number of tokens": n, "E, the number of experts": e},
        )
        if not out.requires_grad:
            ex.fail(
                "the z-loss carries no gradient back to the logits, so it could not keep them small. Compute it with torch operations (no .detach(), .item() or torch.no_grad())."
            )
        grad = torch.autograd.grad(out, leaf)[0]
        ex.match(
            grad,
            2 * lse[:, None] * probs / n,
            context=f"{n} tokens, {e} experts: the gradient with respect to the logits",
            name="the gradient",
        )
    # a router whose logits have grown large: the naive log(sum(exp(x))) overflows
    logits = torch.randn(6, 4, generator=g) * 5 + 120.0
    out = ex.call(fn, logits)
    if isinstance(out, torch.Tensor) and out.is_floating_point() and not torch.isfinite(out).all():
        ex.fail(
            "with large logits (around 120) the z-loss is inf or NaN: exp(120) overflows float32. Use torch.logsumexp, which subtracts the maximum before exponentiating."
        )
    out = _scalar(ex, out, "the z-loss")
    ex.match(out.detach(), router_z_loss(logits), context="large logits, around 120", name="the z-loss", rtol=1e-4)
    return "mean over tokens of logsumexp(logits)², stable for large logits, with the right gradient"


def _as_mask(ex: Exercise, out: Any, n: int) -> torch.Tensor:
    if out is None:
        ex.fail("the result is None. Did you forget a `return` statement?")
    if isinstance(out, (tuple, list)):
        ex.fail(f"return one tensor, the keep mask of shape (N,) = ({n},); got {describe(out)}.")
    ex.expect_tensor(out, name="the keep mask", allow_nan=True)
    if out.ndim == 2 and out.shape[0] == n:
        ex.fail(
            f"the keep mask has shape {tuple(out.shape)}, one entry per token *and expert*; return one entry per token, "
            f"shape ({n},): whether the token keeps its place at the expert it chose (reduce over the experts, e.g. .any(-1))."
        )
    if out.ndim == 1 and out.shape[0] < n and not out.is_floating_point() and out.dtype != torch.bool:
        ex.fail(
            f"you returned {out.shape[0]} numbers for {n} tokens: the indices of the kept tokens? Return a mask instead, "
            f"one bool per token, shape ({n},): True where the token is kept."
        )
    if tuple(out.shape) != (n,):
        ex.fail(f"the keep mask should have one entry per token, shape ({n},); got {tuple(out.shape)}.")
    ex.expect_tensor(out, dtype=torch.bool, name="the keep mask")  # an int 0/1 tensor indexes rows instead of masking them
    return out


def _keep_variants(index: torch.Tensor, e: int, c: int) -> list[Mistake]:
    n = len(index)
    position = capacity_mask(index, e, c).position[:, 0]  # (N,) arrival order at its expert
    counts = torch.bincount(index, minlength=e)
    from_end = counts[index] - 1 - position  # how many later tokens share the expert
    out = []
    out.append(
        Mistake(
            from_end < c,
            f"you dropped the wrong tokens: your mask keeps the *last* {c} tokens of each expert. It is first come, first served: each expert keeps its first C tokens in token order and drops the later ones.",
        )
    )
    out.append(
        Mistake(position <= c, f"each expert keeps C + 1 = {c + 1} tokens; positions are counted from 0, so keep position < C.")
    )
    out.append(
        Mistake(position < c - 1, f"each expert keeps only C - 1 = {c - 1} tokens; keep positions 0, 1, …, C - 1 (position < C).")
    )
    out.append(
        Mistake(
            torch.arange(n) < c,
            f"you kept the first C = {c} tokens of the whole batch. Capacity is *per expert*: every expert has its own C slots, filled by its own tokens in order.",
        )
    )
    out.append(
        Mistake(
            torch.ones(n, dtype=torch.bool),
            f"nothing is dropped, but an expert with more than C = {c} tokens must drop the extra ones.",
        )
    )
    out.append(Mistake(position >= c, "True should mean *kept* and False dropped; your mask is the other way round."))
    out.append(
        Mistake(
            torch.arange(n) < c * e,
            f"you kept the first C·E = {c * e} tokens of the batch; capacity is per expert: every expert keeps its own first C tokens.",
        )
    )
    out.append(
        Mistake(
            counts[index] <= c,
            f"you dropped every token of an expert with more than C = {c} tokens; an over-full expert keeps its first C tokens and drops only the rest.",
        )
    )
    last = (position < c) & (index != e - 1)
    out.append(
        Mistake(
            last,
            f"the last expert (expert {e - 1}) keeps nobody: does your loop over the experts stop one early? range(num_experts) includes the last one.",
        )
    )
    return out


@exercise("5.3", "capacity_keep")
def check_capacity_keep(ex: Exercise, fn) -> str:
    g = ex.generator()
    cases = [
        ("a busy expert and an idle one", torch.tensor([0, 1, 0, 0, 2, 0, 1, 0, 2, 1]), 4, 2),
        ("random routing", torch.randint(0, 4, (40,), generator=g), 4, 6),
        ("capacity 1", torch.randint(0, 3, (12,), generator=g), 3, 1),
        ("lopsided routing", torch.where(torch.rand(30, generator=g) < 0.6, 2, torch.randint(0, 5, (30,), generator=g)), 5, 4),
        ("room for everybody", torch.randint(0, 3, (9,), generator=g), 3, 9),
    ]
    for what, index, e, c in cases:
        out = _as_mask(ex, ex.call(fn, index, e, c), len(index))
        expected = capacity_mask(index, e, c).keep[:, 0]
        ex.match(
            out,
            expected,
            [m for m in _keep_variants(index, e, c) if not torch.equal(m.output, expected)],
            context=f"{what}: expert_index = {index.tolist()}, {e} experts, capacity C = {c}",
            name="the keep mask",
        )
    return "each expert keeps its first C tokens in token order; idle experts, C = 1 and C ≥ N handled"


def _choice_pair(ex: Exercise, out: Any, e: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    index, gates = expect_pair(ex, out, ("token_index", "gates"), f"(E, C) = ({e}, {c})")
    ex.expect_tensor(index, name="token_index")
    ex.expect_tensor(gates, name="gates")
    if index.is_floating_point() and not gates.is_floating_point():
        ex.fail("the two results are swapped: return (token_index, gates), the integer token ids first.")
    if index.is_floating_point() or index.dtype == torch.bool:
        ex.fail(
            f"token_index should hold integer token ids (e.g. the indices torch.topk returns), but it has dtype {index.dtype}.".replace(
                "torch.", ""
            )
        )
    if tuple(index.shape) != (e, c) or tuple(gates.shape) != (e, c):
        hint = " It looks transposed: one row per expert, one column per slot." if tuple(index.shape) == (c, e) and c != e else ""
        if index.ndim == 2 and index.shape[1] == c and index.shape[0] != e:
            hint = (
                f" Shape ({index.shape[0]}, {c}) is one row per *token*: tokens choosing experts (token choice). In expert "
                "choice each expert (a column of the scores) picks its C tokens."
            )
        ex.fail(
            f"token_index and gates should both have shape (E, C) = ({e}, {c}): each expert picks C tokens. Got {tuple(index.shape)} and {tuple(gates.shape)}.{hint}"
        )
    dup = (index.sort(dim=-1).values.diff(dim=-1) == 0).any(dim=-1) if c > 1 else torch.zeros(e, dtype=torch.bool)
    if dup.any():
        r = int(dup.nonzero()[0])
        ex.fail(f"expert {r} picked the same token twice ({index[r].tolist()}): an expert's C picks must be C different tokens.")
    return index.long(), gates.detach()


@exercise("5.4", "expert_choice")
def check_expert_choice(ex: Exercise, fn) -> str:
    g = ex.generator()
    for n, e, c in [(12, 3, 4), (20, 5, 6), (8, 4, 8), (10, 6, 1), (16, 2, 5)]:
        logits = torch.randn(n, e, generator=g) * 2.0
        index, gates = _choice_pair(ex, ex.call(fn, logits, c), e, c)
        if index.min() < 0 or index.max() >= n:
            ex.fail(
                f"token_index holds ids from {int(index.min())} to {int(index.max())}, but the tokens are numbered 0 to {n - 1}."
            )
        ref = expert_choice_routing(logits, c)
        wrong = []
        col = torch.softmax(logits, dim=0)
        v, i = torch.topk(col.T, c, dim=-1)
        wrong.append(
            (
                i,
                v,
                "the softmax runs over the tokens (dim 0): the scores S = softmax(router_logits) must run over the *experts* (each token's scores sum to 1). Each expert then picks the C tokens with the highest score in its column.",
            )
        )
        v, i = torch.topk(logits.T, c, dim=-1)
        wrong.append(
            (
                i,
                v,
                "these are the raw logits: take the softmax over the experts first (S = softmax(router_logits, dim=-1)); the gates are the scores S of the picked tokens.",
            )
        )
        v, i = torch.topk(ref.router_probs.T, c, dim=-1, largest=False)
        wrong.append((i, v, "each expert picked its C *lowest*-scoring tokens: torch.topk picks the largest by default."))
        i = torch.topk(logits.T, c, dim=-1).indices
        wrong.append(
            (
                i,
                ref.router_probs.T.gather(-1, i),
                "you picked each expert's tokens by their raw logits; pick by the softmax scores S (softmax over the experts), which can rank tokens differently.",
            )
        )
        wrong.append(
            (
                ref.token_index,
                ref.gates / ref.gates.sum(-1, keepdim=True),
                "you renormalised each expert's C gates to sum to 1; the gates are the scores S of the picked tokens as they are (a token's score is its share of the router's attention).",
            )
        )
        v, i = torch.topk(logits.T, c, dim=-1)
        wrong.append(
            (
                i,
                torch.softmax(v, dim=-1),
                "you took a softmax over each expert's C picked logits; the gates are the scores S = softmax(router_logits) over the *experts*, of the picked tokens.",
            )
        )
        wrong.append(
            (
                ref.token_index,
                logits.T.gather(-1, ref.token_index),
                "the right tokens, but the gates are their raw logits: use the scores S = softmax over the experts.",
            )
        )
        wrong.append(
            (ref.token_index, ref.gates.log(), "these gates are log-scores (log_softmax): use the softmax scores S themselves.")
        )
        first = torch.arange(c).repeat(e, 1)
        wrong.append(
            (
                first,
                ref.router_probs.T.gather(-1, first),
                f"every expert took tokens 0..{c - 1}, the first C in order; each expert picks the C tokens with the *highest scores* in its column (torch.topk).",
            )
        )

        def canon(i: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            order = i.argsort(dim=-1)
            return torch.cat([i.gather(-1, order).double(), v.gather(-1, order).double()], dim=-1)

        ex.match(
            canon(index, gates),
            canon(ref.token_index, ref.gates),
            [Mistake(canon(i, v), m) for i, v, m in wrong],
            context=f"{n} tokens, {e} experts, C = {c}; compared per expert as (token, gate) pairs in any order",
            name="the (token, gate) pairs",
        )
    return "S = softmax over the experts, each expert takes its top-C tokens with their scores as gates; C = 1 to N"
