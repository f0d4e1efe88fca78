"""Checks for lesson 09: the exchange's split sizes, the all-to-all's backward, Soft MoE's weights, top-p routing.

Every check runs in one process: the exchange between W ranks is played with
count tables and ``simulate_all_to_all`` (what the W processes would send).
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
import torch.nn.functional as F

from ..distributed.exchange import exchange_matrix, simulate_all_to_all
from ..variants.adaptive import top_p_routing
from ..variants.soft_moe import soft_moe_weights
from ._core import Exercise, Mistake, describe, exercise, expect_pair

# -- 9.1 the split sizes ------------------------------------------------------------------------


def _as_int_list(ex: Exercise, value: Any, name: str, world: int, experts: int) -> list[int]:
    if isinstance(value, torch.Tensor):
        ex.fail(
            f"{name} is a tensor ({describe(value)}); torch.distributed.all_to_all_single takes split sizes as a Python "
            "list of ints. Convert with .tolist() (on a GPU that line waits for the GPU: the host needs the sizes)."
        )
    if not isinstance(value, (list, tuple)):
        ex.fail(f"{name} should be a list of {world} ints (one per rank), got {describe(value)}.")
    if any(isinstance(v, float) for v in value):
        ex.fail(
            f"{name} holds floats ({list(value)[:4]}); split sizes are numbers of rows: whole numbers (int). A / where a sum belongs?"
        )
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value):
        ex.fail(f"{name} should hold Python ints, got {describe(value)}.")
    if len(value) == experts and experts != world:
        ex.fail(
            f"{name} has {experts} entries, one per expert; the exchange needs one per rank ({world}): add up the counts of "
            f"each rank's {experts // world} experts (rank q holds experts q·E/W … (q+1)·E/W − 1)."
        )
    if len(value) != world:
        ex.fail(f"{name} should have one entry per rank, {world}; got {len(value)}: {list(value)}.")
    return [int(v) for v in value]


def _split_mistakes(counts: torch.Tensor, rank: int) -> list[Mistake]:
    W, E = counts.shape
    El = E // W
    M = exchange_matrix(counts)  # (W, W) rows s → q
    right_in, right_out = M[rank].tolist(), M[:, rank].tolist()
    interleaved = counts.view(W, El, W)  # expert e on rank e % W: (W, E_l, W)
    said = [
        (
            (right_in, right_in),
            "output_splits equals your input_splits: what rank r receives is not what it sends. Rank r receives, "
            "from each rank s, the rows s sends to r's experts: column r of the exchange matrix (the transpose), "
            "counts[:, r·E/W:(r+1)·E/W].sum(1).",
        ),
        ((right_out, right_in), "the two results are swapped: return (input_splits, output_splits), what this rank sends first."),
        (
            (interleaved[rank].sum(0).tolist(), interleaved[:, :, rank].sum(1).tolist()),
            "you gave expert e to rank e % W (round robin); here rank q holds a contiguous block, experts q·E/W … (q+1)·E/W − 1, "
            "so the rows for one rank are one block after sorting by expert: counts[r].view(W, E/W).sum(1).",
        ),
        (
            (M.sum(0).tolist(), right_out),
            "input_splits counts every rank's rows: what *this* rank sends is its own row of the table, "
            "counts[rank], summed over each destination's experts.",
        ),
        (
            (right_in, M.sum(0).tolist()),
            "output_splits holds what each rank receives from everybody (column sums); this rank needs, "
            "for each sender s, what s sends to *its* experts: column `rank` of the exchange matrix.",
        ),
        (
            (right_in, M.sum(1).tolist()),
            "output_splits holds what each rank sends in total (row sums); this rank receives from each "
            "sender s only the rows for its own experts: column `rank` of the exchange matrix.",
        ),
        (
            (right_in, M.T.sum(1).tolist()),
            "output_splits holds what each rank receives in total; this rank needs, per sender s, what s sends to its experts.",
        ),
    ]
    if El > 1:
        said.append(
            (
                (right_in, counts[:, rank].tolist()),
                f"output_splits counts only expert {rank} (column {rank} of the (W, E) table); "
                f"rank {rank} holds {El} experts, {rank * El} … {(rank + 1) * El - 1}: add their columns.",
            )
        )
        said.append(
            (
                (right_in, counts[:, rank * W : rank * W + El].sum(1).tolist() if rank * W + El <= E else []),
                f"rank {rank}'s experts start at rank·E/W = {rank * El}, not rank·W.",
            )
        )
    return [
        Mistake(tuple(map(tuple, pair)), message) for pair, message in said if pair[1] != [] and pair != (right_in, right_out)
    ]


@exercise("9.1", "split_sizes")
def check_split_sizes(ex: Exercise, fn) -> str:
    g = ex.generator()
    cases = [
        ("2 ranks, 4 experts", torch.tensor([[5, 1, 0, 2], [3, 3, 4, 1]]), 0),
        ("2 ranks, 4 experts", torch.tensor([[5, 1, 0, 2], [3, 3, 4, 1]]), 1),
        ("4 ranks, 8 experts, expert 5 idle", torch.randint(0, 9, (4, 8), generator=g).index_fill(1, torch.tensor([5]), 0), 2),
        ("3 ranks, 6 experts", torch.randint(0, 7, (3, 6), generator=g), 1),
        ("4 ranks, one expert each", torch.randint(0, 9, (4, 4), generator=g), 3),
        ("1 rank, 3 experts", torch.tensor([[4, 0, 2]]), 0),
    ]
    for what, counts, rank in cases:
        W, E = counts.shape
        out = ex.call(fn, counts.clone(), rank)
        first, second = expect_pair(ex, out, ("input_splits", "output_splits"), f"{W} ints")
        got = (tuple(_as_int_list(ex, first, "input_splits", W, E)), tuple(_as_int_list(ex, second, "output_splits", W, E)))
        M = exchange_matrix(counts)
        want = (tuple(M[rank].tolist()), tuple(M[:, rank].tolist()))
        ex.match(
            got,
            want,
            _split_mistakes(counts, rank),
            context=f"{what}, rank {rank}: counts = {counts.tolist()} (row s: rows rank s sends to each expert)",
            name="(input_splits, output_splits)",
        )
    return (
        "input splits: this rank's row summed per destination; output splits: the column of this rank's experts (the transpose)"
    )


# -- 9.2 the all-to-all's backward ---------------------------------------------------------------


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in parts]) if parts else torch.zeros(0)


def _backward_mistakes(grads: list[torch.Tensor], splits: torch.Tensor, sizes: list[int]) -> list[Mistake]:
    W = splits.shape[0]
    wanted = simulate_all_to_all(grads, splits.T)
    out = []

    def add(parts, message):
        if [p.shape[0] for p in parts] == sizes:
            out.append(Mistake(_cat(parts), message))

    if [g.shape[0] for g in grads] == [int(s) for s in splits.sum(1)]:
        add(
            simulate_all_to_all(grads, splits),
            "the gradients went through the same exchange as the rows, with the same splits. "
            "The backward sends each row's gradient back to where the row came from: the same "
            "exchange with the split lists swapped (the transposed table, splits.T).",
        )
    add(
        grads,
        "each rank kept the gradients of the rows it received; they belong to the ranks that sent those rows. Send them back: "
        "the exchange with the transposed splits.",
    )
    add(
        [g / W for g in wanted],
        f"the gradients are divided by the number of ranks W = {W}: nothing is averaged here, each row's "
        "gradient goes back whole (averaging is for replicated weights under DDP's convention).",
    )
    add(wanted[::-1], "the ranks are in reverse order: entry s of your list must be rank s's gradient.")
    back = simulate_all_to_all([g.flip(0) if g.numel() else g for g in grads], splits.T)
    add(back, "the rows within each block are reversed; keep the order of the rows.")
    blocks = [torch.split(g, splits[:, q].tolist()) for q, g in enumerate(grads)]  # blocks[q][s]: from q back to s
    add(
        [torch.cat([blocks[q][s] for q in reversed(range(W))]) for s in range(W)],
        "rank s's gradient blocks are in reverse order: its rows were sent to rank 0 first, then rank 1, …; the gradients "
        "must come back in that order.",
    )
    add(
        [torch.zeros_like(w) for w in wanted],
        "every gradient is zero: did you build the result but return something else (or detach)?",
    )
    return out


@exercise("9.2", "all_to_all_backward")
def check_all_to_all_backward(ex: Exercise, fn) -> str:
    g = ex.generator()
    D = 3
    cases = [
        ("3 ranks, each sends 8 rows and receives 8", torch.tensor([[2, 5, 1], [1, 2, 5], [5, 1, 2]])),
        ("2 ranks, uneven", torch.tensor([[3, 6], [1, 2]])),
        ("4 ranks, rank 3 receives nothing", torch.tensor([[2, 0, 3, 0], [1, 4, 0, 0], [0, 2, 2, 0], [3, 1, 1, 0]])),
        ("1 rank", torch.tensor([[5]])),
    ]
    for what, splits in cases:
        W = splits.shape[0]
        rows = [torch.randn(int(splits[s].sum()), D, generator=g, requires_grad=True) for s in range(W)]
        received = simulate_all_to_all(rows, splits)
        upstream = [torch.randn(r.shape, generator=g) for r in received]  # dL/d(received[q])
        truth = torch.autograd.grad(sum((r * u).sum() for r, u in zip(received, upstream)), rows)
        sizes = [r.shape[0] for r in rows]
        out = ex.call(fn, [u.clone() for u in upstream], splits.clone())
        if out is None:
            ex.fail("the result is None. Did you forget a `return` statement?")
        if isinstance(out, torch.Tensor) or not isinstance(out, (list, tuple)):
            ex.fail(f"return a list of {W} tensors, one per rank (rank s's gradient first); got {describe(out)}.")
        if len(out) != W:
            ex.fail(f"return one gradient per rank, {W} tensors; got {len(out)}.")
        for s, part in enumerate(out):
            ex.expect_tensor(part, name=f"the gradient of rank {s}")
            if part.ndim == 2 and part.shape[0] == received[s].shape[0] != sizes[s] and part.shape[1] == D:
                ex.fail(
                    f"rank {s}'s gradient has {part.shape[0]} rows, as many as it *received*; it needs one per row it *sent*, "
                    f"{sizes[s]} (= splits[{s}].sum()). The backward sends each gradient back where its row came from: the "
                    "exchange with the transposed splits.\n  (" + what + f": splits = {splits.tolist()})"
                )
            ex.expect_tensor(part, shape=(sizes[s], D), name=f"the gradient of rank {s}")
        ex.match(
            _cat([p.detach() for p in out]),
            _cat(list(truth)),
            _backward_mistakes(upstream, splits, sizes),
            context=f"{what}: splits = {splits.tolist()} (row s: rows rank s sends to each rank)",
            name="the gradients",
        )
    return "each row's gradient goes back to the rank that sent it: the same exchange with the splits swapped"


# -- 9.3 Soft MoE's dispatch and combine weights ------------------------------------------------


def _weights_mistakes(logits: torch.Tensor, which: str) -> list[Mistake]:
    B, T, S = logits.shape
    flat_tokens = F.softmax(logits.reshape(B * T, S), dim=0).reshape(B, T, S)
    every = F.softmax(logits.reshape(B, T * S), dim=-1).reshape(B, T, S)
    raw = logits
    if which == "dispatch":
        return [
            Mistake(
                F.softmax(logits, dim=2),
                "the dispatch weights are normalised over the slots (dim 2); each slot is a weighted average "
                "of the tokens, so a slot's weights over the tokens sum to 1: softmax over dim 1.",
            ),
            Mistake(
                F.softmax(logits, dim=0),
                "the softmax runs over the sequences of the batch (dim 0); a slot mixes the tokens of its own "
                "sequence: softmax over dim 1, the tokens.",
            ),
            Mistake(
                flat_tokens,
                "you normalised over the tokens of every sequence at once; a slot mixes the tokens of its own sequence "
                "only: softmax over dim 1 of the (B, T, S) logits.",
            ),
            Mistake(
                every,
                "you normalised over all tokens and slots together; the dispatch weights are a softmax over the tokens (dim 1) "
                "for each slot separately.",
            ),
            Mistake(raw, "these are the raw logits; the dispatch weights are their softmax over the tokens (dim 1)."),
            Mistake(
                torch.sigmoid(logits),
                "a sigmoid gives each weight on its own; the dispatch weights are a softmax over the tokens "
                "(dim 1), so that each slot is a weighted *average*.",
            ),
            Mistake(
                F.log_softmax(logits, dim=1), "these are log-weights (log_softmax); the dispatch weights are the softmax itself."
            ),
        ]
    return [
        Mistake(
            F.softmax(logits, dim=1),
            "the combine weights are normalised over the tokens (dim 1); each token mixes the slot outputs, "
            "so a token's weights over the slots sum to 1: softmax over dim 2.",
        ),
        Mistake(
            F.softmax(logits, dim=0),
            "the softmax runs over the sequences of the batch (dim 0); each token mixes the slots: softmax over dim 2.",
        ),
        Mistake(
            every,
            "you normalised over all tokens and slots together; the combine weights are a softmax over the slots (dim 2) for "
            "each token separately.",
        ),
        Mistake(raw, "these are the raw logits; the combine weights are their softmax over the slots (dim 2)."),
        Mistake(
            torch.sigmoid(logits),
            "a sigmoid gives each weight on its own; the combine weights are a softmax over the slots (dim 2).",
        ),
        Mistake(F.log_softmax(logits, dim=2), "these are log-weights (log_softmax); the combine weights are the softmax itself."),
    ]


@exercise("9.3", "soft_moe_weights")
def check_soft_moe_weights(ex: Exercise, fn) -> str:
    g = ex.generator()
    for B, T, S in [(2, 5, 3), (1, 4, 8), (3, 6, 6), (2, 1, 4), (1, 7, 2)]:
        logits = (torch.randn(B, T, S, generator=g) * 2.0).requires_grad_(True)
        dispatch, combine = soft_moe_weights(logits.detach())
        what = f"logits of shape (B, T, S) = ({B}, {T}, {S}): {B} sequence(s) of {T} tokens, {S} slots"
        out = ex.call(fn, logits)
        d, c = expect_pair(ex, out, ("dispatch", "combine"), f"(B, T, S) = ({B}, {T}, {S})")
        ex.expect_tensor(d, shape=(B, T, S), name="dispatch")
        ex.expect_tensor(c, shape=(B, T, S), name="combine")
        if T != S or B > 1:
            ex.expect_order([d.detach(), c.detach()], [dispatch, combine], ["dispatch", "combine"])
        if torch.allclose(d.detach(), c.detach()) and not torch.allclose(dispatch, combine):
            ex.fail(
                "dispatch and combine are the same tensor; they are the same logits normalised along two different axes: "
                "dispatch over the tokens (dim 1), combine over the slots (dim 2)."
            )
        ex.match(d.detach(), dispatch, _weights_mistakes(logits.detach(), "dispatch"), context=what, name="dispatch")
        ex.match(c.detach(), combine, _weights_mistakes(logits.detach(), "combine"), context=what, name="combine")
        if not (d.requires_grad and c.requires_grad):
            ex.fail(
                "the weights carry no gradient back to the logits, so the slots could never learn which tokens to mix. Compute "
                "them with torch operations on the logits (no .detach(), .item() or torch.no_grad())."
            )
    return "dispatch = softmax over the tokens (each slot averages its sequence), combine = softmax over the slots (each token averages the slots)"


# -- 9.4 top-p: how many doctors each patient sees ----------------------------------------------


def _top_p_reference(probs: torch.Tensor, p: float) -> torch.Tensor:
    r = top_p_routing(probs.log(), p)
    return torch.zeros_like(probs, dtype=torch.bool).scatter(1, r.choice_index, r.keep)


def _top_p_mistakes(probs: torch.Tensor, p: float) -> list[Mistake]:
    N, E = probs.shape
    top, index = probs.sort(dim=-1, descending=True)
    upto = top.cumsum(-1)  # probability covered including each expert
    before = upto - top

    def back(sorted_keep: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(probs, dtype=torch.bool).scatter(1, index, sorted_keep)

    k_fixed = max(1, round(p * E))
    return [
        Mistake(
            back(upto < p),
            "the expert that crosses p is left out (you kept experts while the total *including* them stays below "
            "p). Keep an expert when the probability of the better experts *before* it is still below p: the one "
            "that crosses p is used too, so every token gets at least one.",
        ),
        Mistake(
            back(torch.cat([torch.ones(N, 1, dtype=torch.bool), before[:, :-1] < p], dim=1)),
            "one expert too many: you keep the expert *after* the one that crosses p as well. Stop at the expert whose probability "
            "makes the total reach p.",
        ),
        Mistake(
            before.lt(p),
            "the mask is in sorted order (column j = the j-th most likely expert); entry [n, e] must be about expert e: "
            "put it back in expert order (scatter with the sort's indices).",
        ),
        Mistake(
            (probs.cumsum(-1) - probs) < p,
            "the running total runs over the experts in their own order; sort each token's "
            "probabilities first (largest first), then add them up.",
        ),
        Mistake(
            _ascending(probs, p),
            "the probabilities are sorted from smallest to largest: the token then takes its *least* likely experts first.",
        ),
        Mistake(
            probs >= p,
            "you kept the experts whose own probability is at least p; p is a total: take the most likely experts until "
            "their probabilities *add up* to p.",
        ),
        Mistake(
            back(torch.arange(E).expand(N, E) < k_fixed),
            f"every token got the same number of experts ({k_fixed}); with top-p that "
            "number depends on the token: add the sorted probabilities until they reach p.",
        ),
    ]


def _ascending(probs: torch.Tensor, p: float) -> torch.Tensor:
    top, index = probs.sort(dim=-1)
    keep = (top.cumsum(-1) - top) < p
    return torch.zeros_like(probs, dtype=torch.bool).scatter(1, index, keep)


@exercise("9.4", "top_p_mask")
def check_top_p_mask(ex: Exercise, fn) -> str:
    g = ex.generator()
    for N, E, scale, p in [(12, 4, 1.5, 0.6), (20, 8, 2.5, 0.8), (9, 3, 0.3, 0.5), (16, 6, 4.0, 0.9), (10, 5, 1.0, 1.0)]:
        probs = torch.softmax(torch.randn(N, E, generator=g) * scale, dim=-1)
        probs[0] = torch.softmax(
            torch.tensor([4.0] + [-0.1 * j for j in range(E - 1)]), 0
        )  # a confident token: one expert covers p
        out = ex.call(fn, probs.clone(), p)
        ex.expect_tensor(out, name="the mask")
        if out.ndim == 1 and out.shape == (N,):
            ex.fail(
                f"you returned one number per token ({N}); return the mask itself, shape (N, E) = ({N}, {E}): True where "
                "token n uses expert e. (mask.sum(-1) then counts each token's experts.)"
            )
        ex.expect_tensor(out, shape=(N, E), dtype=torch.bool, name="the mask")
        want = _top_p_reference(probs, p)
        mistakes = _top_p_mistakes(probs, p)
        what = f"{N} tokens, {E} experts, p = {p}; token 0's top expert has probability {probs[0].max().item():.2f}"
        if not torch.equal(out, want):
            if any(torch.equal(out, m.output) for m in mistakes):  # a known mistake first: its message says more
                ex.match(out, want, mistakes, context=what, name="the mask")
            empty = ~out.any(-1)
            if bool(empty.any()):
                n = int(empty.nonzero()[0])
                top = probs[n].max().item()
                extra = (
                    f" Token {n}'s most likely expert alone has probability {top:.2f} ≥ p = {p}: it must still be used."
                    if top >= p
                    else ""
                )
                ex.fail(
                    f"token {n} uses no expert at all; top-p gives every token at least one expert (the one that crosses p).{extra}"
                )
        ex.match(out, want, mistakes, context=what, name="the mask")
    return "each token takes its most likely experts until they cover p, the one that crosses p included; mask in expert order"
