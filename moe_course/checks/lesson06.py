"""Checks for lesson 06: the steps of sort-based dispatch."""

from __future__ import annotations

import torch

from ..dispatch import combine_rows, slot_positions, sort_by_expert
from ._core import Exercise, Mistake, exercise


def _expert_index(g: torch.Generator, n: int, e: int, last_idle: bool) -> torch.Tensor:
    """Expert ids for n tokens; with ``last_idle`` the last expert gets no tokens, else every expert gets some (n >= e)."""
    if last_idle:
        return torch.randint(0, e - 1, (n,), generator=g)
    idx = torch.randint(0, e, (n,), generator=g)
    idx[torch.randperm(n, generator=g)[:e]] = torch.arange(e)  # every expert, the last one included, has a token
    return idx


@exercise("6.1", "sort_by_expert")
def check_sort_by_expert(ex: Exercise, fn) -> str:
    g = ex.generator()
    for n, e, last_idle in [(10, 3, True), (37, 5, False), (1, 2, True), (200, 8, True), (12, 4, False)]:
        idx = _expert_index(g, n, e, last_idle)
        what = f"{n} tokens, {e} experts" + (", the last one idle" if last_idle else ", every expert busy")
        order, counts = ex.expect_tuple(ex.call(fn, idx, e), ["order", "counts"])
        if (
            isinstance(order, torch.Tensor)
            and isinstance(counts, torch.Tensor)
            and order.shape == (e,)
            and counts.shape == (n,)
            and n != e
        ):
            ex.fail(
                "the two results are swapped: return (order, counts), the permutation of the N tokens first, then the E counts."
            )
        ex.expect_tensor(counts, name="counts")
        if counts.shape == (n,) and n != e:
            ex.fail(
                f"counts has one entry per token, shape ({n},); it needs one per expert, shape ({e},). (A one-hot table "
                "summed over dim 1 gives each token's 1: sum over the tokens, dim 0, or use torch.bincount.)"
            )
        if counts.ndim == 1 and counts.shape[0] < e:
            ex.fail(
                f"counts has {counts.shape[0]} entries but there are {e} experts; the last expert got no tokens in this test and still needs its 0 (torch.bincount's `minlength`)."
            )
        ex.expect_tensor(counts, shape=(e,), name="counts")
        if counts.is_floating_point():
            ex.fail(
                f"counts are numbers of tokens: return an integer tensor (int64, as torch.bincount gives), not {str(counts.dtype).replace('torch.', '')}."
            )
        true_counts = torch.bincount(idx, minlength=e)
        ex.match(
            counts.long(),
            true_counts,
            [
                Mistake(
                    true_counts.cumsum(0),
                    "these are cumulative counts (where each expert's block *ends*); return the number of tokens of each expert.",
                )
            ],
            context=what,
            name="counts",
        )
        if isinstance(order, (list, tuple)) and len(order) == n:
            ex.fail(
                "order should be one torch.Tensor of token indices, not a Python list: torch.tensor(order), or better torch.argsort."
            )
        ex.expect_tensor(order, name="order")
        if order.ndim == 1 and order.shape[0] < n and not last_idle:
            ex.fail(
                f"order lists {order.shape[0]} of the {n} tokens: some experts' tokens are missing. Does a loop over the "
                "experts stop one early? Every token, of every expert including the last, appears once."
            )
        ex.expect_tensor(order, shape=(n,), name="order")
        if order.is_floating_point():
            ex.fail("order should hold token indices (integers), not floats.")
        want, _ = sort_by_expert(idx, e)
        if torch.equal(order, want):
            continue
        if torch.equal(order, torch.argsort(want)):
            ex.fail(
                "this is the inverse permutation (for each token, its place in the sorted order); return `order`, the token "
                "at each place: torch.argsort(expert_index, stable=True)."
            )
        if torch.equal(order, idx.sort().values):
            ex.fail("order holds the sorted expert ids; return the permutation of the tokens instead (torch.argsort gives it).")
        if sorted(order.tolist()) != list(range(n)):
            ex.fail("order should be a permutation of the token indices 0..N-1 (each token exactly once).")
        sorted_experts = idx[order]
        if torch.equal(sorted_experts, idx.sort(descending=True).values) and not torch.equal(order, want):
            ex.fail("the tokens are sorted by expert in descending order; expert 0's tokens must come first.")
        if not torch.all(sorted_experts[1:] >= sorted_experts[:-1]):
            ex.fail("idx[order] is not sorted: x[order] must list expert 0's tokens, then expert 1's, and so on.")
        if not torch.equal(order, want):
            ex.fail(
                "within one expert the tokens are not in their original order; use a stable sort (torch.argsort(..., stable=True)) so earlier tokens stay first."
            )
    return "order is a stable sort by expert and counts include idle experts"


@exercise("6.2", "combine_rows")
def check_combine_rows(ex: Exercise, fn) -> str:
    g = ex.generator()
    cases = [("top-1", 6, 4), ("top-2", 5, 3), ("dropped", 9, 5)]
    for kind, n, d in cases:
        if kind == "top-1":
            token = torch.randperm(n, generator=g)  # (N,) every token once, in sorted-by-expert order
        elif kind == "top-2":
            token = torch.arange(n).repeat_interleave(2)[torch.randperm(2 * n, generator=g)]  # (2N,) every token twice
        else:
            token = torch.randperm(n, generator=g)[:6]  # three tokens were dropped: they never appear
        k = 2 if kind == "top-2" else 1  # contributions per token
        m = len(token)
        y_sorted = torch.randn(m, d, generator=g)
        gates = torch.rand(m, generator=g) + 0.1
        out = ex.call(fn, y_sorted, token, gates, n)
        ex.expect_tensor(out, name="the combined output")
        if out.shape == (m, d) and m != n:
            ex.fail(
                f"the output has {m} rows, one per expert output, but there are {n} tokens: every token needs a row (a dropped token gets zeros, and passes through the residual)."
            )
        ex.expect_tensor(out, shape=(n, d), name="the combined output")
        want = combine_rows(y_sorted, token, gates, n)
        if k == 2 and not torch.allclose(out, want, atol=1e-5):
            rows = y_sorted * gates[:, None]  # (2N, D)
            first, second = torch.zeros(n, d), torch.zeros(n, d)
            for i, t in enumerate(token.tolist()):  # the two contributions of each token
                (second if first[t].abs().sum() > 0 else first)[t] = rows[i]
            only_one = ((out - first).abs().amax(1) < 1e-5) | ((out - second).abs().amax(1) < 1e-5)
            if bool(only_one.all()):
                ex.fail(
                    "a token with two experts (top-2) must get the sum of both contributions; you kept only one of them (use index_add / +=, not assignment, which overwrites)."
                )
        mistakes = [
            Mistake(
                combine_rows(y_sorted, token, torch.ones(m), n),
                "the gate weights are missing: multiply each expert output by its gate before adding it back.",
            ),
            Mistake(
                y_sorted * gates[:, None],
                "the rows are still in sorted order: put each row back at its own token, out[token[i]] += ...",
            ),
            Mistake(
                combine_rows(y_sorted, token, 1 / gates, n), "you divided by the gates: multiply each expert output by its gate."
            ),
            Mistake(
                combine_rows(y_sorted, token, gates**2, n),
                "the gates are applied twice (squared): multiply each expert output by its gate once.",
            ),
        ]
        if m == n:
            mistakes.append(
                Mistake(
                    (y_sorted * gates[:, None])[token],
                    "you unsorted with the wrong permutation: out[token[i]] = row i (a scatter), not out[i] = row token[i] (a gather).",
                )
            )
        ex.match(out, want, mistakes, context=f"{n} tokens, {kind}, {m} expert outputs", name="the combined output")
    return "outputs go back to their tokens, weighted by their gates, summed for top-2, zero for dropped tokens"


@exercise("6.3", "slot_positions")
def check_slot_positions(ex: Exercise, fn) -> str:
    g = ex.generator()
    for n, e in [(8, 3), (30, 4), (1, 1), (100, 7)]:
        idx = torch.randint(0, e, (n,), generator=g)
        idx[-min(n, 3) :] = e - 1  # the last expert has tokens (and several: a slot above 0)
        out = ex.call(fn, idx, e)
        if isinstance(out, torch.Tensor) and out.shape == (n, e) and e > 1:
            ex.fail(
                f"the positions have shape ({n}, {e}), a count for every token and every expert; keep each token's own "
                "expert's count: .gather(1, expert_index[:, None]).squeeze(1)."
            )
        ex.expect_tensor(out, shape=(n,), name="the positions")
        if out.is_floating_point():
            ex.fail("positions are slot numbers: return an integer tensor.")
        want = slot_positions(idx, e)
        one_hot = torch.nn.functional.one_hot(idx, e)
        later = (torch.flip(torch.cumsum(torch.flip(one_hot, [0]), 0), [0]) - one_hot).gather(1, idx[:, None]).squeeze(1)
        ex.match(
            out.long(),
            want,
            [
                Mistake(want + 1, "off by one: the first token of each expert takes slot 0."),
                Mistake(
                    torch.arange(n), "you counted all earlier tokens; count only the earlier tokens sent to the same expert."
                ),
                Mistake(
                    later,
                    "you counted the later tokens; a token's slot is the number of *earlier* tokens of its expert (first come, first served).",
                ),
                Mistake(
                    torch.bincount(idx, minlength=e)[idx],
                    "that is each expert's total number of tokens; the slot counts only the tokens before this one.",
                ),
                Mistake(
                    torch.argsort(torch.argsort(idx, stable=True)),
                    "that is each token's place in the whole sorted order; its slot counts only the earlier tokens *of its own expert* (subtract where its expert's block starts).",
                ),
                Mistake(
                    want[torch.argsort(idx, stable=True)],
                    "these are the slots in sorted order; return them in token order: entry i is the slot of token i.",
                ),
                Mistake(
                    torch.where(idx == e - 1, 0, want),
                    f"every token of the last expert (expert {e - 1}) got slot 0: does a loop over the experts stop one early?",
                ),
            ],
            context=f"expert_index = {idx.tolist()[:12]}{' …' if n > 12 else ''}",
            name="the positions",
        )
    return "each token's slot is the number of earlier tokens of its expert"
