"""Checks for lesson 03: the softmax gate, the dense mixture, specialisation, and its cost."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..analysis.specialisation import normalized_mutual_information, specialisation_score, top_expert_counts
from ..experts import FeedForward
from ..gating import softmax_gate
from ..mixture import dense_mixture_flops, mixture_probs
from ._core import Exercise, Mistake, describe, exercise


def _row_sums(out: torch.Tensor) -> str:
    sums = out.detach().sum(-1)
    worst = int((sums - 1).abs().argmax())
    return f"row {worst} sums to {sums[worst].item():.3g}"


@exercise("3.1", "softmax_gate")
def check_softmax_gate(ex: Exercise, fn) -> str:
    g = ex.generator()
    for n, d, e in [(6, 5, 3), (10, 8, 6), (4, 4, 4), (1, 4, 1)]:
        x = torch.randn(n, d, generator=g)
        w = torch.randn(d, e, generator=g)
        out = ex.call(fn, x, w)
        ex.expect_tensor(out, name="the gate weights", allow_nan=True)
        if tuple(out.shape) == (e, n) and e != n:
            ex.fail(
                f"the gate weights have shape {(e, n)}; expected (N, E) = {(n, e)}: one row per patient, one column per expert."
            )
        ex.expect_tensor(out, shape=(n, e), name="the gate weights")
        logits = x @ w  # (N, E)
        mistakes = [
            Mistake(
                torch.softmax(logits, dim=0),
                f"you took the softmax over the patients (dim 0) instead of over the experts (the last dim). Each patient's weights must sum to 1 over the experts; yours: {_row_sums(out)}.",
            ),
            Mistake(
                logits,
                "these are the gate's raw scores x @ w_gate: apply a softmax over the experts so that each patient's weights are positive and sum to 1.",
            ),
            Mistake(
                torch.sigmoid(logits),
                f"you used a sigmoid: each weight lies in (0, 1) but a patient's weights do not sum to 1 ({_row_sums(out)}), so the experts do not compete. Use a softmax over the experts.",
            ),
            Mistake(
                torch.softmax(x @ w.T, dim=-1) if d == e else None,
                "you multiplied by w_gate transposed: w_gate has shape (D, E), so the scores are x @ w_gate.",
            ),
            Mistake(
                logits / logits.sum(-1, keepdim=True),
                "you divided the raw scores by their sum: scores can be negative, so these are not weights. Exponentiate first (a softmax).",
            ),
            Mistake(
                torch.softmax(x, dim=-1) @ w,
                "you took the softmax of the patients' features and then multiplied by w_gate; score first (x @ w_gate), then take the softmax of the scores over the experts.",
            ),
            Mistake(
                torch.softmax(logits / d**0.5, dim=-1),
                "you divided the scores by sqrt(D) (a temperature, as in attention); the gate's softmax takes the scores x @ w_gate as they are.",
            ),
            Mistake(
                logits / logits.max(-1, keepdim=True).values,
                "you divided the scores by their maximum: that is not a softmax, and the weights need not be positive or sum to 1.",
            ),
            Mistake(
                logits.abs() / logits.abs().sum(-1, keepdim=True),
                "you normalised the absolute scores; a negative score must mean a *small* weight: exponentiate (softmax) instead.",
            ),
            Mistake(
                torch.nn.functional.one_hot(logits.argmax(-1), e).float(),
                "a hard choice of the top expert (a one-hot row); the dense gate gives every expert a soft weight: softmax over the experts.",
            ),
        ]
        ex.match(
            out,
            softmax_gate(x, w),
            [m for m in mistakes if m.output is not None],
            context=f"x of shape {(n, d)}, w_gate of shape {(d, e)}",
            name="the gate weights",
        )
    # a very sure GP: large scores overflow exp() unless the maximum is subtracted first
    x = torch.randn(5, 3, generator=g) * 60.0
    w = torch.randn(3, 4, generator=g)
    out = ex.call(fn, x, w)
    if isinstance(out, torch.Tensor) and out.is_floating_point() and not torch.isfinite(out).all():
        ex.fail(
            "with large scores (around 100) your weights contain NaN or inf: exp() overflows. Use torch.softmax (or subtract each row's maximum before exponentiating)."
        )
    ex.expect_tensor(out, shape=(5, 4), name="the gate weights")
    ex.match(out, softmax_gate(x, w), context="large scores", name="the gate weights")
    return "softmax over the experts, rows sum to 1, stable for large scores, for 1 to 6 experts"


def _mixture_case(g: torch.Generator, n: int, d: int, e: int, c: int) -> tuple[torch.Tensor, nn.Linear, list[nn.Module]]:
    seed = int(torch.randint(0, 2**31 - 1, (), generator=g))
    with torch.random.fork_rng(devices=[]):  # seed module initialisation without touching the learner's random state
        torch.manual_seed(seed)
        gate = nn.Linear(d, e)
        experts = [FeedForward(d, 8, d_out=c) for _ in range(e)]
    with torch.no_grad():
        gate.weight.mul_(3.0)  # a decisive gate, so that weighting matters
        for expert in experts:
            expert.fc_out.weight.mul_(3.0)  # confident experts, so that logits and probabilities differ
    x = torch.randn(n, d, generator=g)
    return x, gate, experts


@exercise("3.2", "dense_mixture")
def check_dense_mixture(ex: Exercise, fn) -> str:
    g = ex.generator()
    for n, d, e, c in [(7, 5, 3, 4), (12, 4, 5, 2), (9, 6, 9, 3), (1, 6, 1, 3)]:
        x, gate, experts = _mixture_case(g, n, d, e, c)
        out = ex.call(fn, x, gate, experts)
        ex.expect_tensor(out, name="the mixture's probabilities", allow_nan=True)
        if tuple(out.shape) == (n, e, c):
            ex.fail(
                f"the result has shape {(n, e, c)} = (N, E, classes): these are still the experts' separate answers. Weight them by the gate and sum over the experts to get (N, classes) = {(n, c)}."
            )
        ex.expect_tensor(out, shape=(n, c), name="the mixture's probabilities")
        with torch.no_grad():
            gate_logits = gate(x)  # (N, E)
            weights = torch.softmax(gate_logits, dim=-1)  # (N, E)
            logits = torch.stack([expert(x) for expert in experts], dim=1)  # (N, E, classes)
            probs = torch.softmax(logits, dim=-1)  # (N, E, classes)
            expected = mixture_probs(logits, weights)
            mistakes = [
                Mistake(
                    torch.softmax(torch.einsum("ne,nec->nc", weights, logits), dim=-1),
                    "you mixed the experts' logits (gate-weighted) and then took a softmax. Mix their probabilities instead: softmax each expert's logits over the diagnoses first, then take the gate-weighted sum.",
                ),
                Mistake(
                    torch.einsum("ne,nec->nc", weights, logits),
                    "you returned the gate-weighted sum of the experts' raw logits: these are not probabilities. Softmax each expert's logits first, then weight them by the gate.",
                ),
                Mistake(
                    probs.mean(1),
                    "you forgot to weight by the gate: this is a plain average of the experts (an ensemble). Multiply each expert's probabilities by its gate weight for that patient, then sum over the experts.",
                ),
                Mistake(
                    probs.sum(1), f"you summed the experts' probabilities without weighting by the gate: rows sum to E = {e}."
                ),
                Mistake(
                    torch.einsum("ne,nec->nc", torch.softmax(gate_logits, dim=0), probs),
                    "the gate's softmax runs over the patients (dim 0); it must run over the experts (the last dim), so that each patient's weights sum to 1.",
                ),
                Mistake(
                    torch.einsum("ne,nec->nc", weights, torch.softmax(logits, dim=1)),
                    "the experts' softmax runs over the experts (dim 1 of the stacked (N, E, classes) logits); each expert's probabilities must sum to 1 over the diagnoses (the last dim).",
                ),
                Mistake(
                    torch.einsum("ne,nec->nc", gate_logits, probs),
                    "you weighted the experts by the gate's raw scores; take the softmax of the gate's scores over the experts first.",
                ),
                Mistake(
                    expected.log(), "you returned log-probabilities; return the probabilities themselves (each row sums to 1)."
                ),
                Mistake(
                    probs[torch.arange(n), weights.argmax(-1)],
                    "you kept only each patient's top expert; the dense mixture weighs *every* expert's probabilities by the gate and adds them up.",
                ),
                Mistake(
                    torch.einsum("ne,nec->nc", weights, torch.log_softmax(logits, dim=-1)),
                    "you mixed the experts' log-probabilities; mix their probabilities (softmax), weighted by the gate.",
                ),
                Mistake(
                    weights[:, :1] * probs.sum(1),
                    "every expert got the weight of expert 0 (weights[:, 0]): each expert e needs its own weight weights[:, e].",
                ),
                Mistake(
                    torch.einsum("ne,nec->nc", torch.sigmoid(gate_logits), probs),
                    "you used a sigmoid for the gate: the weights then do not sum to 1 over the experts. Use a softmax over the experts.",
                ),
                Mistake(
                    torch.einsum("ne,nec->nc", weights**2, probs),
                    "the gate weights are squared: weigh each expert's probabilities by its gate weight once.",
                ),
                Mistake(
                    torch.einsum("ne,nec->nc", weights, probs) / e,
                    f"you divided the weighted sum by E = {e}: the gate weights already sum to 1, so the weighted sum is the answer.",
                ),
            ]
        ex.match(
            out.detach(),
            expected,
            mistakes,
            context=f"{n} patients of width {d}, {e} experts, {c} diagnoses",
            name="the mixture's probabilities",
        )
    return "gate-weighted average of the experts' probabilities, for 1 to 9 experts"


def _entropy(p: torch.Tensor) -> torch.Tensor:
    p = p[p > 0]
    return -(p * p.log()).sum()


def _nmi_variants(counts: torch.Tensor) -> dict[str, float]:
    """What typical mistaken normalisations of the mutual information give."""
    joint = counts.double() / counts.sum()
    ps, pe = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = (joint[nz] * (joint[nz] / (ps[:, None] * pe[None, :])[nz]).log()).sum()
    hs, he = _entropy(ps), _entropy(pe)
    safe = lambda a, b: float(a / b) if b > 0 else float("nan")  # noqa: E731
    count_h = lambda p: -(p[p > 0] * p[p > 0].log()).sum()  # noqa: E731 (entropies of unnormalised counts)
    c = counts.double()
    cs, ce = c.sum(1), c.sum(0)
    cnz = c > 0
    count_mi = (c[cnz] * (c[cnz] / (cs[:, None] * ce[None, :])[cnz]).log()).sum()
    return {
        "counts": float(2 * count_mi / (count_h(cs) + count_h(ce))) if count_h(cs) + count_h(ce) != 0 else float("nan"),
        "mi_bits": safe(2 * mi / math.log(2), hs + he),
        "purity": float(counts.max(dim=1).values.sum() / counts.sum()),
        "raw": float(mi),
        "bits": float(mi / math.log(2)),
        "by_specialty": safe(mi, hs),
        "by_expert": safe(mi, he),
        "by_sqrt": safe(mi, (hs * he).sqrt()),
    }


def _soft_score(weights: torch.Tensor, specialty: torch.Tensor, s: int) -> float:
    table = torch.zeros(s, weights.shape[1], dtype=torch.float64).index_add_(0, specialty, weights.double())
    return normalized_mutual_information(table)


def _as_number(ex: Exercise, out: Any) -> float:
    if out is None:
        ex.fail("the result is None. Did you forget a `return` statement?")
    if isinstance(out, torch.Tensor):
        if out.numel() != 1:
            ex.fail(f"return one number (the score), got a {describe(out)}.")
        out = out.item()
    if isinstance(out, bool) or not isinstance(out, (int, float)):
        ex.fail(f"return one number (a float), got {describe(out)}.")
    return float(out)


@exercise("3.3", "specialisation_score")
def check_specialisation_score(ex: Exercise, fn) -> str:
    g = ex.generator()

    def gate_for(top: torch.Tensor, e: int) -> torch.Tensor:
        """Gate weights (N, E) whose argmax is ``top``, with a little weight elsewhere."""
        w = torch.rand(len(top), e, generator=g) * 0.5
        w[torch.arange(len(top)), top] += 1.0
        return w / w.sum(-1, keepdim=True)

    cases = []
    # a partly specialised gate: specialties lean towards their own expert, experts 3 and 5 idle
    s, e, n = 4, 6, 200
    specialty = torch.randint(0, s, (n,), generator=g)
    lean = torch.tensor([0, 1, 2, 4])[specialty]
    top = torch.where(torch.rand(n, generator=g) < 0.7, lean, torch.tensor([0, 1, 2, 4])[torch.randint(0, s, (n,), generator=g)])
    cases.append(("a partly specialised gate with idle experts", gate_for(top, e), specialty, s))
    # random soft gate weights
    s, e, n = 3, 4, 150
    specialty = torch.randint(0, s, (n,), generator=g)
    w = torch.softmax(torch.randn(n, e, generator=g) * 2 + torch.eye(s, e)[specialty] * 1.5, dim=-1)
    cases.append(("random gate weights", w, specialty, s))
    # every specialty has its own expert (in shuffled order): a perfect score
    s, e, n = 4, 4, 80
    specialty = torch.arange(n) % s
    perm = torch.randperm(e, generator=g)
    cases.append(("a perfect one-to-one routing", gate_for(perm[specialty], e), specialty, s))
    # one expert takes everybody: knowing the specialty tells you nothing
    s, e, n = 3, 5, 60
    specialty = torch.arange(n) % s
    cases.append(("one expert takes every patient", gate_for(torch.full((n,), 2), e), specialty, s))
    # more experts than specialties: one specialty split over two experts
    s, e, n = 2, 3, 40
    specialty = torch.arange(n) % s
    top = torch.where(specialty == 0, torch.zeros(n, dtype=torch.long), 1 + (torch.arange(n) // 2) % 2)
    cases.append(("a specialty split over two experts", gate_for(top, e), specialty, s))
    for what, weights, specialty, s in cases:
        out = _as_number(ex, ex.call(fn, weights, specialty, s))
        expected = specialisation_score(weights, specialty, s)
        if math.isnan(out):
            ex.fail(
                f"the score is NaN for {what}. An expert (or a specialty) with no patients has probability 0, and 0 · log 0 gives NaN in floating point; its contribution is 0 (the limit), so skip empty cells."
            )
        counts = top_expert_counts(weights, specialty, s)
        v = _nmi_variants(counts)
        mistakes = [
            Mistake(
                v["raw"],
                "this is the mutual information itself (in nats); normalise it: 2·I / (H(specialty) + H(expert)), so that the score lies between 0 and 1.",
            ),
            Mistake(
                v["bits"],
                "this is the mutual information in bits; normalise it: 2·I / (H(specialty) + H(expert)), which lies between 0 and 1 whatever the log base.",
            ),
            Mistake(
                v["by_specialty"],
                "you divided the mutual information by H(specialty) alone (here that is also the smaller or larger of the two entropies). Divide by the mean of both, (H(specialty) + H(expert)) / 2, so that a specialty split over several experts and two specialties sharing one expert both lower the score.",
            ),
            Mistake(
                v["by_expert"],
                "you divided the mutual information by H(expert) alone (here that is also the smaller or larger of the two entropies). Divide by the mean of both, (H(specialty) + H(expert)) / 2, so that a specialty split over several experts and two specialties sharing one expert both lower the score.",
            ),
            Mistake(
                v["by_sqrt"],
                "you divided by the geometric mean sqrt(H(specialty)·H(expert)); this course's score divides by the arithmetic mean, (H(specialty) + H(expert)) / 2.",
            ),
            Mistake(
                _soft_score(weights, specialty, s),
                "you used the gate weights as soft counts; the score uses each patient's *top* expert (the argmax of its gate weights over the experts) and counts patients.",
            ),
            Mistake(
                math.sqrt(expected) if expected >= 0 else float("nan"),
                "you took a square root: the score is 2·I / (H(specialty) + H(expert)) itself.",
            ),
            Mistake(
                1 - expected,
                "you returned 1 - score: 1 means every specialty has its own expert, 0 means the expert tells nothing about the specialty.",
            ),
            Mistake(
                v["counts"],
                "you computed with counts, not probabilities: divide the table of counts by the number of patients first, so that the joint probabilities sum to 1.",
            ),
            Mistake(
                v["mi_bits"],
                "the mutual information is in bits and the entropies in nats (or the other way round): use the same log for all three.",
            ),
            Mistake(
                v["purity"],
                "this is the fraction of patients whose expert is their specialty's most common one (a purity); the score is the normalised mutual information 2·I / (H(specialty) + H(expert)).",
            ),
        ]
        mistakes = [m for m in mistakes if not math.isnan(m.output) and abs(m.output - expected) > 1e-6]
        ex.match(
            out,
            expected,
            mistakes,
            context=f"{what}: {len(specialty)} patients, {s} specialties, {weights.shape[1]} experts",
            name="the score",
            atol=1e-5,
            rtol=1e-4,
        )
    return (
        "normalised mutual information between specialty and top expert: 1 for one-to-one, 0 for one expert, idle experts handled"
    )


@exercise("3.4", "dense_mixture_flops")
def check_dense_mixture_flops(ex: Exercise, fn) -> str:
    for n, d, f, c, e in [(3, 5, 7, 2, 3), (10, 3, 11, 4, 6), (1024, 12, 16, 4, 4), (7, 9, 5, 3, 1)]:
        out = ex.expect_int(ex.call(fn, n, d, f, c, e), name="the FLOP count")
        gate = 2 * n * d * e
        expert = 2 * n * d * f + 2 * n * f * c
        mistakes = [
            Mistake(e * expert, "the gate is missing: it is a (D, E) matmul on every patient, 2·N·D·E FLOPs."),
            Mistake(
                gate + expert,
                "you counted a single expert: in a dense mixture every patient goes through all E experts, so the experts cost E times one expert.",
            ),
            Mistake(gate + e * 4 * n * d * f, "each expert maps D → F → classes (its second matmul is F × classes, not F × D)."),
            Mistake((gate + e * expert) // 2, "this is half the answer: a multiply-add counts as 2 FLOPs."),
            Mistake(2 * d * e + e * (2 * d * f + 2 * f * c), "the number of patients is missing: multiply by num_tokens."),
            Mistake(e * (gate + expert), "you counted the gate once per expert; there is one gate, 2·N·D·E FLOPs in total."),
            Mistake(
                2 * d * e + e * expert, "the gate's FLOPs lack the number of patients: the gate runs on every patient, 2·N·D·E."
            ),
            Mistake(
                gate + e * (2 * n * d * c + 2 * n * c * c),
                "you used num_classes where the hidden width d_ff belongs: each expert maps D → F → classes.",
            ),
            Mistake(
                3 * (gate + e * expert),
                "these are training FLOPs (forward + backward ≈ 3 × forward); count the forward pass only.",
            ),
            Mistake(
                gate + e * expert + 2 * n * e * c,
                "you also counted the weighted sum of the experts' answers (N·E·classes multiply-adds); the course counts the matmuls of the gate and the experts only.",
            ),
            Mistake(gate + e * 2 * n * d * f, "each expert's second matmul (F × classes, 2·N·F·classes FLOPs) is missing."),
            Mistake(2 * n * d * f + e * expert, "the gate is a D × E matmul (2·N·D·E FLOPs), not an FFN of width F."),
            Mistake(
                gate + e * e * expert, "E² experts: every patient goes through each of the E experts once, so E × one expert."
            ),
        ]
        ex.match(
            out,
            dense_mixture_flops(n, d, f, c, e),
            [m for m in mistakes if m.output != dense_mixture_flops(n, d, f, c, e)],
            context=f"num_tokens={n}, d_in={d}, d_ff={f}, num_classes={c}, num_experts={e}",
            name="the FLOP count",
        )
    return "gate + E experts, 2 FLOPs per multiply-add, for 4 sizes including E = 1"
