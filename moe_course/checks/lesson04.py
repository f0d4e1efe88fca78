"""Checks for lesson 04: top-k routing, noisy top-k gating, and a Switch (top-1) layer."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..experts import FeedForward
from ..routing import noisy_top_k_routing, switch_routing, top_k_routing
from ._core import Exercise, Mistake, _close, exercise, expect_pair


def _pair(ex: Exercise, out: Any, n: int, e: int, k: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The learner's (expert_index, gates), checked for types, shapes and dtypes."""
    index, gates = expect_pair(ex, out, ("expert_index", "gates"), f"(N, k) = ({n}, {k})")
    ex.expect_tensor(index, name="expert_index")
    ex.expect_tensor(gates, name="gates", allow_nan=True)
    if index.is_floating_point() and gates.dtype in (torch.int64, torch.int32):
        ex.fail("the two results are swapped: return (expert_index, gates), the integer expert ids first.")
    if index.is_floating_point() or index.dtype == torch.bool:
        ex.fail(
            f"expert_index should hold integer expert ids (e.g. the indices torch.topk returns), but it has dtype {index.dtype}.".replace(
                "torch.", ""
            )
        )
    if tuple(index.shape) != (n, k) or tuple(gates.shape) != (n, k):
        hint = ""
        if k == 1 and tuple(index.shape) == (n,):
            hint = " For k = 1 keep the k dimension: shape (N, 1), not (N,) (no .squeeze())."
        elif tuple(index.shape) == (k, n) and k != n:
            hint = " It looks transposed: one row per token, one column per choice."
        elif tuple(index.shape) == (k, e) or index.shape[-1:] == (n,) or gates.shape[-1:] == (n,):
            hint = " Did you take the top-k over the tokens (dim 0) instead of over the experts (the last dim)?"
        ex.fail(
            f"expert_index and gates should both have shape (N, k) = ({n}, {k}), {what}; got {tuple(index.shape)} and {tuple(gates.shape)}.{hint}"
        )
    if not gates.is_floating_point():
        ex.fail(f"gates should be floating-point weights, but have dtype {gates.dtype}.".replace("torch.", ""))
    if not torch.isfinite(gates).all():
        ex.fail("gates contain NaN or inf.")
    index = index.long()
    dup = (index.sort(dim=-1).values.diff(dim=-1) == 0).any(dim=-1) if k > 1 else torch.zeros(n, dtype=torch.bool)
    if dup.any():
        t = int(dup.nonzero()[0])
        ex.fail(
            f"token {t} chose the same expert twice ({index[t].tolist()}): the k choices of a token must be k different experts."
        )
    return index, gates.detach()


def _canonical(index: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """(N, 2K): each token's (expert, gate) pairs sorted by expert id, so the order of the k choices does not matter."""
    order = index.argsort(dim=-1)
    return torch.cat([index.gather(-1, order).double(), gates.gather(-1, order).double()], dim=-1)


def _sum_hint(gates: torch.Tensor) -> str:
    sums = gates.sum(-1)
    worst = int((sums - 1).abs().argmax())
    return f"token {worst}'s gates sum to {sums[worst].item():.3g}"


def _topk_pair(scores: torch.Tensor, k: int, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    values, index = torch.topk(scores, k, dim=-1, largest=largest)
    return index, values


def _match_routing(
    ex: Exercise,
    index: torch.Tensor,
    gates: torch.Tensor,
    ref_index: torch.Tensor,
    ref_gates: torch.Tensor,
    wrong: list[tuple[torch.Tensor, torch.Tensor, str]],
    context: str,
) -> None:
    """Compare routings per token as (expert, gate) pairs in any order: a typical mistake, wrong gates, or wrong experts."""
    got, want = _canonical(index, gates), _canonical(ref_index, ref_gates)
    if _close(got, want, 1e-5, 1e-4):
        return
    where = f"\n  ({context})"
    for i, v, message in wrong:
        if _close(got, _canonical(i, v), 1e-5, 1e-4):
            ex.fail(message + where)
    k = index.shape[-1]
    if torch.equal(got[:, :k], want[:, :k]):  # the right experts for every token: only the gates differ
        ex.match(
            got[:, k:],
            want[:, k:],
            context=context + "; the experts are right, the gates are not (sorted by expert id)",
            name="the gates",
            sizes={"k, the number of experts per token": k},
        )
    t = int((got[:, :k] != want[:, :k]).any(-1).nonzero()[0])
    ex.fail(
        f"token {t} went to experts {got[t, :k].long().tolist()}, but should go to {want[t, :k].long().tolist()}.{where}",
        named=False,
    )


def _check_range(ex: Exercise, index: torch.Tensor, e: int) -> None:
    if index.numel() and (index.min() < 0 or index.max() >= e):
        ex.fail(
            f"expert_index holds ids from {int(index.min())} to {int(index.max())}, but the experts are numbered 0 to {e - 1}."
        )


@exercise("4.1", "top_k_routing")
def check_top_k_routing(ex: Exercise, fn) -> str:
    g = ex.generator()
    for n, e, k in [(6, 4, 2), (10, 8, 3), (5, 3, 1), (7, 5, 5), (1, 6, 2), (12, 6, 2)]:
        logits = torch.randn(n, e, generator=g) * 2.0
        index, gates = _pair(ex, ex.call(fn, logits, k), n, e, k, f"for {n} tokens, {e} experts and k={k}")
        _check_range(ex, index, e)
        ref = top_k_routing(logits, k)
        probs = ref.router_probs
        wrong = []
        i, v = _topk_pair(probs, k)
        wrong.append(
            (
                i,
                v,
                f"the gates are not renormalised: each token's k gates should sum to 1, but {_sum_hint(gates)}. After picking the top k probabilities, divide them by their sum.",
            )
        )
        col = torch.softmax(logits, dim=0)  # softmax over the tokens
        i, v = _topk_pair(col, k)
        wrong.append(
            (
                i,
                v / v.sum(-1, keepdim=True),
                "the softmax runs over the tokens (dim 0) instead of over the experts (the last dim): each token's probabilities must sum to 1 over the experts.",
            )
        )
        wrong.append(
            (
                i,
                v,
                "the softmax runs over the tokens (dim 0) instead of over the experts (the last dim), and the gates are not renormalised.",
            )
        )
        i, v = _topk_pair(logits, k)
        wrong.append(
            (i, v, "these gates are the raw router logits: take the softmax over the experts first, then renormalise the top k.")
        )
        wrong.append(
            (
                i,
                v / v.sum(-1, keepdim=True),
                "you renormalised the raw logits: they can be negative, so these are not weights. Take the softmax over the experts first, then renormalise the top k probabilities.",
            )
        )
        i, v = _topk_pair(probs, k, largest=False)
        wrong.append(
            (
                i,
                v / v.sum(-1, keepdim=True),
                "you picked the k *least* likely experts: torch.topk returns the largest by default (largest=True).",
            )
        )
        wrong.append(
            (
                i,
                v,
                "you picked the k *least* likely experts (torch.topk(..., largest=True) picks the best), and the gates are not renormalised.",
            )
        )
        i, v = _topk_pair(probs, k)
        wrong.append(
            (
                i,
                torch.log(v),
                "these gates are log-probabilities: take the softmax (not log_softmax) over the experts, then renormalise the top k.",
            )
        )
        wrong.append(
            (
                i,
                torch.full_like(v, 1.0 / k),
                f"every gate is 1/k = {1 / k:.3g}: the gates must follow the router's probabilities, the top k renormalised to sum to 1.",
            )
        )
        wrong.append(
            (
                i,
                torch.softmax(v, dim=-1),
                "you took a softmax of the top-k *probabilities*: renormalise them by dividing by their sum (or take the softmax of the top-k *logits*).",
            )
        )
        wrong.append(
            (
                i.sort(-1).values,
                v / v.sum(-1, keepdim=True),
                "you sorted the expert ids but not their gates, so ids and gates no longer pair up: keep each gate with its expert.",
            )
        )
        if n > 1:
            wrong.append(
                (
                    i,
                    v / v.sum(0, keepdim=True),
                    "you renormalised over the tokens (dim 0): each *token's* k gates must sum to 1, so divide by the sum over the last dim (keepdim=True).",
                )
            )
        _match_routing(
            ex,
            index,
            gates,
            ref.expert_index,
            ref.gates,
            wrong,
            f"{n} tokens, {e} experts, k={k}; compared per token as (expert, gate) pairs in any order",
        )
    # a fresh router with zero weights: every expert equally likely, any k of them will do
    n, e, k = 5, 4, 2
    index, gates = _pair(ex, ex.call(fn, torch.zeros(n, e), k), n, e, k, f"for {n} tokens, {e} experts and k={k}")
    _check_range(ex, index, e)
    if not torch.allclose(gates.double(), torch.full((n, k), 1.0 / k, dtype=torch.float64), atol=1e-6):
        ex.fail(
            f"with all logits equal (a router with zero weights) every expert is equally likely, so each of the k={k} gates should be 1/k = {1 / k:g}; got {gates[0].tolist()} for token 0."
        )
    return "softmax over the experts, the top k, gates renormalised to sum to 1; k = 1 to E, ties included"


@exercise("4.2", "noisy_top_k")
def check_noisy_top_k(ex: Exercise, fn) -> str:
    g = ex.generator()
    cases = [(8, 4, 2, 1.0), (10, 6, 3, 1.0), (6, 5, 1, 1.0), (7, 4, 2, 0.0), (9, 8, 2, 2.0)]
    for n, e, k, scale in cases:
        clean = torch.randn(n, e, generator=g)
        noise_logits = torch.randn(n, e, generator=g) * 1.5
        noise = torch.randn(n, e, generator=g) * scale  # ε ~ N(0, 1) (zero in the noiseless case)
        index, gates = _pair(ex, ex.call(fn, clean, noise_logits, noise, k), n, e, k, f"for {n} tokens, {e} experts and k={k}")
        _check_range(ex, index, e)
        h = clean + noise * F.softplus(noise_logits)  # (N, E), Shazeer et al. eq. 4
        ref = noisy_top_k_routing(h, noise_logits, k, training=False)  # without noise: top-k of H, softmax over the kept
        wrong = []

        def keep_softmax(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            r = top_k_routing(scores, k)
            return r.expert_index, r.gates

        if scale > 0:
            wrong.append(
                (
                    *keep_softmax(clean + noise),
                    "the noise is not scaled: multiply ε by the learned noise scale softplus(noise_logits) before adding it to the clean logits.",
                )
            )
            wrong.append(
                (
                    *keep_softmax(clean + noise * noise_logits),
                    "the noise scale must be softplus(noise_logits), which is always positive; you multiplied ε by noise_logits itself.",
                )
            )
            wrong.append(
                (
                    *keep_softmax(clean + noise * noise_logits.exp()),
                    "the noise scale must be softplus(noise_logits) = log(1 + exp(noise_logits)); you used exp(noise_logits).",
                )
            )
            wrong.append(
                (
                    *keep_softmax(clean + noise * F.relu(noise_logits)),
                    "the noise scale must be softplus(noise_logits); you used relu, which switches the noise off wherever noise_logits < 0.",
                )
            )
            i, _ = _topk_pair(clean, k)
            wrong.append(
                (
                    i,
                    torch.softmax(h.gather(-1, i), dim=-1),
                    "the experts were picked on the clean logits: pick the top k of the *noisy* scores H = clean + ε·softplus(noise_logits); the noise is there to make the choice explore.",
                )
            )
            wrong.append(
                (
                    ref.expert_index,
                    torch.softmax(clean.gather(-1, ref.expert_index), dim=-1),
                    "the gates come from the clean logits: take the softmax over the k kept *noisy* scores H.",
                )
            )
        i, v = _topk_pair(torch.softmax(h, dim=-1), k)
        wrong.append(
            (
                i,
                v,
                f"the softmax runs over all E experts, so the kept gates do not sum to 1 ({_sum_hint(gates)}): set the scores outside the top k to -inf first (KeepTopK), then take the softmax, so that it covers only the k kept experts.",
            )
        )
        i, v = _topk_pair(torch.softmax(h, dim=0), k)
        wrong.append(
            (
                i,
                v / v.sum(-1, keepdim=True),
                "the softmax runs over the tokens (dim 0) instead of over the experts (the last dim).",
            )
        )
        i, v = _topk_pair(h, k)
        wrong.append((i, v, "these gates are the noisy scores themselves: take the softmax over the k kept scores."))
        wrong.append(
            (
                i,
                v / v.sum(-1, keepdim=True),
                "you divided the kept noisy scores by their sum; scores can be negative: take the softmax over the k kept scores.",
            )
        )
        full = torch.softmax(torch.zeros_like(h).scatter(-1, i, v), dim=-1).gather(-1, i)
        wrong.append(
            (
                i,
                full,
                "outside the top k you set the scores to 0, not -inf: exp(0) = 1, so the experts you dropped still take part in the softmax. Fill them with float('-inf').",
            )
        )
        if scale > 0:
            wrong.append(
                (
                    *keep_softmax(clean + F.softplus(noise_logits)),
                    "ε is missing: the noise is ε · softplus(noise_logits), a random draw times the learned scale; you added the scale alone.",
                )
            )
            wrong.append(
                (
                    *keep_softmax(clean + noise_logits * F.softplus(noise)),
                    "the roles are swapped: softplus goes on noise_logits (the learned scale), and the random draw ε multiplies it: clean + ε · softplus(noise_logits).",
                )
            )
            wrong.append(
                (
                    *keep_softmax(clean * noise * F.softplus(noise_logits)),
                    "the noise is *added* to the clean logits, not multiplied: H = clean + ε · softplus(noise_logits).",
                )
            )
            wrong.append(
                (
                    *keep_softmax(clean - noise * F.softplus(noise_logits)),
                    "the noise is added with a minus sign: H = clean + ε · softplus(noise_logits) (with ε as given).",
                )
            )
            wrong.append(
                (
                    *keep_softmax(clean + noise * torch.sigmoid(noise_logits)),
                    "the noise scale is softplus(noise_logits); you used a sigmoid, which caps it at 1.",
                )
            )
        _match_routing(
            ex,
            index,
            gates,
            ref.expert_index,
            ref.gates,
            wrong,
            f"{n} tokens, {e} experts, k={k}, noise ε {'of zero' if scale == 0 else 'drawn from N(0, 1)'}; compared per token as (expert, gate) pairs in any order",
        )
    return "H = clean + ε·softplus(noise_logits), top k of H, softmax over the k kept; no noise gives plain top-k"


class _CountingExpert(nn.Module):
    """An expert that remembers how many token rows it processed."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0] if x.ndim >= 1 else 1
        return self.inner(x)


def _switch_reference(x: torch.Tensor, w_router: torch.Tensor, experts) -> torch.Tensor:
    routing = switch_routing(x @ w_router)
    index, gate = routing.expert_index[:, 0], routing.gates[:, 0]  # (N,), (N,)
    y = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        rows = (index == e).nonzero(as_tuple=True)[0]
        if rows.numel():
            y = y.index_add(0, rows, gate[rows, None] * expert.inner(x[rows]))
    return y


def _route_with(x, w_router, experts, probs: torch.Tensor, index: torch.Tensor, use_gate: bool = True) -> torch.Tensor:
    gate = probs.gather(-1, index[:, None])[:, 0]
    outs = torch.stack([expert.inner(x) for expert in experts], dim=1)  # (N, E, D)
    picked = outs[torch.arange(len(x)), index]  # (N, D)
    return gate[:, None] * picked if use_gate else picked


@exercise("4.3", "switch_layer")
def check_switch_layer(ex: Exercise, fn) -> str:
    g = ex.generator()
    for n, d, e, f, idle in [(10, 6, 4, 12, False), (16, 8, 3, 8, True), (1, 5, 2, 4, False), (24, 4, 6, 6, True)]:
        seed = int(torch.randint(0, 2**31 - 1, (), generator=g))
        with torch.random.fork_rng(devices=[]):  # module initialisation must not touch the learner's random state
            torch.manual_seed(seed)
            experts = [_CountingExpert(FeedForward(d, f)) for _ in range(e)]
        x = torch.randn(n, d, generator=g)
        w_router = torch.randn(d, e, generator=g)
        if idle:  # the last expert never wins: an expert with no tokens
            w_router[:, -1] = 0.0
            x = x.abs()
            w_router[:, :-1] = w_router[:, :-1].abs() + 0.1
        w_router.requires_grad_(True)
        out = ex.call(fn, x, w_router, experts)
        ex.expect_tensor(out, shape=(n, d), name="the output y")
        rows = sum(expert.rows for expert in experts)
        with torch.no_grad():
            logits = x @ w_router
            probs = torch.softmax(logits, dim=-1)
            ref = _switch_reference(x, w_router, experts)
            top = probs.argmax(-1)
            mistakes = [
                Mistake(
                    _route_with(x, w_router, experts, probs, top, use_gate=False),
                    "each token's expert output must be multiplied by its gate, the router's softmax probability p_i for the chosen expert. Without it (or with a top-1 gate renormalised to 1.0) the router gets no gradient, so it never learns whom to send where.",
                ),
                Mistake(
                    _route_with(x, w_router, experts, logits, top),
                    "you multiplied by the raw router logit; the gate is the softmax probability p_i = softmax(x @ w_router)_i of the chosen expert.",
                ),
                Mistake(
                    _route_with(x, w_router, experts, torch.softmax(logits, dim=0), torch.softmax(logits, dim=0).argmax(-1)),
                    "the softmax runs over the tokens (dim 0) instead of over the experts (the last dim).",
                ),
                Mistake(
                    _route_with(x, w_router, experts, torch.softmax(logits, dim=0), top),
                    "the gate's softmax runs over the tokens (dim 0) instead of over the experts (the last dim).",
                ),
                Mistake(
                    torch.einsum("ne,ned->nd", probs, torch.stack([m.inner(x) for m in experts], dim=1)),
                    "you ran every expert on every token and added their gate-weighted outputs: that is the dense mixture of lesson 03. A Switch layer sends each token to its top-1 expert only.",
                ),
                Mistake(
                    _route_with(x, w_router, experts, probs, probs.argmin(-1)),
                    "each token went to its *least* likely expert: use argmax.",
                ),
                Mistake(
                    torch.einsum(
                        "ne,ned->nd",
                        torch.zeros_like(probs).scatter(
                            -1, torch.topk(probs, min(2, e), -1).indices, torch.topk(probs, min(2, e), -1).values
                        ),
                        torch.stack([m.inner(x) for m in experts], dim=1),
                    )
                    if e > 1
                    else None,
                    "each token went to its top-2 experts; a Switch layer is top-1: one expert per token (argmax), scaled by its gate.",
                ),
                Mistake(
                    _route_with(x, w_router, experts, 1 - probs, top),
                    "you scaled by 1 - p_i; the gate is p_i itself, the probability of the chosen expert.",
                ),
                Mistake(
                    x + ref,
                    "you added the input x to the output: the residual connection belongs to the block around the layer, not inside the Switch layer. Return the experts' weighted outputs only.",
                ),
                Mistake(
                    _route_with(x, w_router, experts, probs**2, top),
                    "the gate is squared: multiply each expert output by its gate p_i once.",
                ),
                Mistake(
                    _route_with(x, w_router, [experts[len(experts) - 1 - j] for j in range(len(experts))], probs, top),
                    "the experts are in the wrong order: expert e must serve the tokens whose argmax is e (experts[e], not reversed).",
                ),
                Mistake(
                    _route_with(x, w_router, experts, probs, top, use_gate=False) * probs.max(-1).values.mean(),
                    "every token got the same gate (the mean over tokens); each token's output is scaled by its *own* gate p_i.",
                ),
            ]
        mistakes = [m for m in mistakes if m.output is not None]
        ex.match(
            out.detach(),
            ref,
            mistakes,
            context=f"{n} tokens of width {d}, {e} experts" + (" (the last expert gets no tokens)" if idle else ""),
            name="the output y",
        )
        if rows != n:
            ex.fail(
                f"your experts processed {rows} token rows in all for {n} tokens. Run each expert only on the tokens routed to it (x[rows_of_expert_e]), so that every token costs one expert: running every expert on every token and picking afterwards gives the right numbers at E times the cost."
            )
        # the gate is how the router learns: its gradient must match the reference's
        if not out.requires_grad:
            ex.fail(
                "y carries no gradient back to w_router: the router could never learn. Compute the gate from x @ w_router with differentiable torch operations (no .detach(), .item() or torch.no_grad()) and multiply each expert output by it."
            )
        probe = torch.randn(n, d, generator=g)
        grad = torch.autograd.grad((out * probe).sum(), w_router, allow_unused=True)[0]
        with torch.enable_grad():
            w = w_router.detach().clone().requires_grad_(True)
            want = torch.autograd.grad((_switch_reference(x, w, experts) * probe).sum(), w)[0]
        if grad is None or torch.count_nonzero(grad) == 0:
            ex.fail(
                "w_router receives no gradient: multiply each expert output by its gate p_i, computed from x @ w_router without .detach()."
            )
        ex.match(
            grad,
            want,
            context="the gradient of the layer's output with respect to w_router",
            name="the router's gradient",
            atol=1e-4,
            rtol=1e-3,
        )
    return "top-1 expert per token, output scaled by the raw gate, each expert runs on its own tokens only, and the router gets its gradient"
