"""Checks for lesson 01: the feed-forward block, its size and its cost."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..analysis.metrics import accuracy_by_group
from ..experts import FeedForward
from ..flops import count_parameters, ffn_flops, ffn_param_count
from ._core import Exercise, Mistake, exercise


def _ffn_inputs(g: torch.Generator, shape: tuple[int, ...], d_ff: int):
    d = shape[-1]
    x = torch.randn(*shape, generator=g)
    w_in = torch.randn(d, d_ff, generator=g) / d**0.5
    b_in = torch.randn(d_ff, generator=g)
    w_out = torch.randn(d_ff, d, generator=g) / d_ff**0.5
    b_out = torch.randn(d, generator=g)
    return x, w_in, b_in, w_out, b_out


@exercise("1.1", "feed_forward")
def check_feed_forward(ex: Exercise, fn) -> str:
    g = ex.generator()
    shapes = [((5, 8), 32), ((2, 3, 6), 10), ((1, 4), 4)]
    for shape, d_ff in shapes:
        x, w_in, b_in, w_out, b_out = _ffn_inputs(g, shape, d_ff)
        out = ex.call(fn, x, w_in, b_in, w_out, b_out)
        if isinstance(out, torch.Tensor) and out.shape == (*shape[:-1], d_ff) and d_ff != shape[-1]:
            ex.fail(
                f"the output has the hidden width F = {d_ff} (shape {tuple(out.shape)}): this is the hidden layer. "
                "Multiply it by w_out and add b_out to come back to width D."
            )
        ex.expect_tensor(out, shape=shape, dtype=torch.float32, name="the output")
        h = x @ w_in + b_in
        tanh_gelu = F.gelu(h, approximate="tanh") @ w_out + b_out
        if torch.allclose(out, tanh_gelu, atol=1e-5):
            continue  # the tanh approximation of GELU is fine too
        mistakes = [
            Mistake(F.gelu(x @ w_in) @ w_out, "both biases are missing: add b_in before the activation and b_out at the end."),
            Mistake(F.gelu(x @ w_in) @ w_out + b_out, "b_in is missing: add it to x @ w_in before the activation."),
            Mistake(F.gelu(h) @ w_out, "b_out is missing: add it after the second matmul."),
            Mistake(
                F.relu(h) @ w_out + b_out, "you used ReLU; this course's feed-forward block uses GELU (torch.nn.functional.gelu)."
            ),
            Mistake(
                h @ w_out + b_out,
                "the activation is missing: apply GELU to the hidden layer, between the two matmuls. Without it the block is just one linear map.",
            ),
            Mistake(
                F.gelu(h @ w_out + b_out),
                "the activation is in the wrong place: apply GELU to the hidden layer (after the first matmul), not to the output.",
            ),
            Mistake(
                torch.sigmoid(h) @ w_out + b_out,
                "you used a sigmoid; this course's feed-forward block uses GELU (torch.nn.functional.gelu).",
            ),
            Mistake(
                torch.tanh(h) @ w_out + b_out,
                "you used tanh; this course's feed-forward block uses GELU (torch.nn.functional.gelu).",
            ),
            Mistake(
                F.silu(h) @ w_out + b_out,
                "you used SiLU (swish); this course's feed-forward block uses GELU (torch.nn.functional.gelu).",
            ),
            Mistake(F.gelu(F.gelu(h)) @ w_out + b_out, "GELU is applied twice: once on the hidden layer is enough."),
            Mistake(F.gelu(x @ w_in * b_in) @ w_out + b_out, "b_in is multiplied; a bias is *added*: x @ w_in + b_in."),
            Mistake(F.gelu(h) @ w_out * b_out, "b_out is multiplied; a bias is *added*: ... @ w_out + b_out."),
        ]
        ex.match(out, F.gelu(h) @ w_out + b_out, mistakes, context=f"x of shape {shape}, d_ff={d_ff}", name="the output")
    # the same numbers as the package's module
    module = FeedForward(4, 12)
    x = torch.randn(3, 4, generator=g)
    with torch.no_grad():
        want = module(x)
        got = ex.call(
            fn, x, module.fc_in.weight.T.contiguous(), module.fc_in.bias, module.fc_out.weight.T.contiguous(), module.fc_out.bias
        )
    ex.match(got, want, context="weights taken from moe_course.experts.FeedForward", name="the output")
    return "matches FeedForward on 2-D and 3-D inputs, with D ≠ F"


@exercise("1.2", "ffn_param_count")
def check_ffn_param_count(ex: Exercise, fn) -> str:
    for d, f in [(3, 5), (8, 32), (64, 256), (1, 1)]:  # odd sizes first: every mistake gives a different number
        out = ex.expect_int(ex.call(fn, d, f), name="the count")
        expected = ffn_param_count(d, f)
        assert expected == count_parameters(FeedForward(d, f))
        ex.match(
            out,
            expected,
            [
                Mistake(
                    2 * d * f, "you counted the two weight matrices but forgot the biases (one per hidden unit, one per output)."
                ),
                Mistake(2 * d * f + f, "the output bias is missing: the second linear layer has D biases."),
                Mistake(2 * d * f + d, "the hidden bias is missing: the first linear layer has F biases."),
                Mistake(d * f + d + f, "only one weight matrix counted: W_in is D×F and W_out is F×D, so 2·D·F weights."),
                Mistake(2 * d * f + 2 * f, "the output bias has D entries (one per output), not F."),
                Mistake(2 * d * f + 2 * d, "the hidden bias has F entries (one per hidden unit), not D."),
                Mistake(
                    4 * d * f,
                    "4·D·F is the FLOP count of one token (exercise 1.3), not the parameter count: W_in and W_out hold D·F weights each, plus F + D biases.",
                ),
                Mistake(d + f, "you counted only the biases (F + D); the two weight matrices hold D·F parameters each."),
                Mistake(2 * d * d + f + d, "you used d_model where the hidden width d_ff belongs: W_in is D×F and W_out is F×D."),
                Mistake(2 * f * f + f + d, "you used d_ff where the model width d_model belongs: W_in is D×F and W_out is F×D."),
                Mistake(
                    d * f, "that is one weight matrix without any bias: there are two matrices (D×F and F×D) and two biases."
                ),
                Mistake(
                    3 * d * f + f + d,
                    "three weight matrices: this block has two, W_in (D×F) and W_out (F×D). (A SwiGLU block, as in lesson 10, has three.)",
                ),
                Mistake(
                    (d + f) ** 2, "(D + F)² is not how the parts add up: W_in and W_out hold D·F weights each, plus F + D biases."
                ),
            ],
            context=f"d_model={d}, d_ff={f}",
            name="the count",
        )
    return "parameter counts match nn.Module counts for 4 sizes"


@exercise("1.3", "ffn_flops")
def check_ffn_flops(ex: Exercise, fn) -> str:
    for n, d, f in [(3, 5, 7), (10, 3, 11), (1024, 64, 256)]:  # odd sizes first: every mistake gives a different number
        out = ex.expect_int(ex.call(fn, n, d, f), name="the FLOP count")
        ex.match(
            out,
            ffn_flops(n, d, f),
            [
                Mistake(
                    2 * n * d * f,
                    "this is half the answer: either you counted one FLOP per multiply-add (it is 2: a multiply and an add), or only one of the two matmuls.",
                ),
                Mistake(
                    4 * d * f, "the number of tokens is missing: every token goes through the block, so multiply by num_tokens."
                ),
                Mistake(
                    n * d * f, "a quarter of the answer: each of the two matmuls costs 2·N·D·F FLOPs (a multiply-add is 2 FLOPs)."
                ),
                Mistake(
                    4 * n * d * f + n * (d + f),
                    "you also counted the bias additions; the course convention counts only matmul FLOPs (biases and activations are tiny next to them).",
                ),
                Mistake(4 * n * d * d, "you used d_model where the hidden width d_ff belongs."),
                Mistake(
                    4 * n * f * f,
                    "you used d_ff where the model width d_model belongs: the matmuls are (N, D) @ (D, F) and (N, F) @ (F, D).",
                ),
                Mistake(
                    6 * n * d * f,
                    "these are training FLOPs (forward + backward ≈ 3 × forward); count the forward pass only: 4·N·D·F.",
                ),
                Mistake(
                    n * (f * (2 * d - 1) + d * (2 * f - 1)),
                    "you counted D - 1 additions per dot product; the course counts 2 FLOPs per multiply-add, so 2·D·F per matmul and token.",
                ),
                Mistake(
                    4 * n * d * f + n * f,
                    "you also counted the activation (one per hidden unit); the course counts only the matmul FLOPs.",
                ),
                Mistake(
                    4 * n * d * f + 2 * n * (d + f),
                    "you also counted the bias additions (and then some); the course counts only the matmul FLOPs.",
                ),
                Mistake(
                    4 * n * (d + f),
                    "you added d_model and d_ff where they multiply: a (N, D) @ (D, F) matmul costs 2·N·D·F FLOPs.",
                ),
            ],
            context=f"num_tokens={n}, d_model={d}, d_ff={f}",
            name="the FLOP count",
        )
    return "FLOP counts are 4·N·D·F for 3 sizes"


@exercise("1.4", "accuracy_by_specialty")
def check_accuracy_by_specialty(ex: Exercise, fn) -> str:
    g = ex.generator()
    # the last specialty empty, then present (a loop that stops one early must show), then the first empty
    for n, classes, s, empty in [(40, 3, 4, 3), (60, 3, 4, None), (7, 5, 2, 1), (300, 4, 6, None), (50, 4, 5, 0)]:
        logits = torch.randn(n, classes, generator=g)
        diagnosis = torch.randint(0, classes, (n,), generator=g)
        specialty = torch.randint(0, s - 1, (n,), generator=g)
        if empty is None:  # every specialty present
            specialty[:s] = torch.arange(s)
        elif empty != s - 1:  # shift labels so that `empty` is the one nobody has
            specialty = torch.where(specialty >= empty, specialty + 1, specialty)
        out = ex.call(fn, logits, diagnosis, specialty, s)
        ex.expect_tensor(out, name="the accuracies", allow_nan=True)
        if out.shape != (s,):
            last = (
                " The last specialty has no patients in this test; it still needs an entry (NaN)."
                if out.shape == (s - 1,) and empty == s - 1
                else ""
            )
            ex.fail(f"the accuracies should have one entry per specialty, shape ({s},), but have shape {tuple(out.shape)}.{last}")
        if not out.is_floating_point():
            ex.fail(
                f"accuracies are fractions between 0 and 1, so the result should be a float tensor, not {out.dtype}.".replace(
                    "torch.", ""
                )
            )
        expected = accuracy_by_group(logits, diagnosis, specialty, s)
        correct = (logits.argmax(-1) == diagnosis).float()
        hits = torch.zeros(s).index_add_(0, specialty, correct)
        if empty is not None:
            rest = [i for i in range(s) if i != empty]
            if torch.allclose(out[rest].double(), expected[rest].double(), atol=1e-6) and not torch.isnan(out[empty]):
                ex.fail(
                    f"a specialty with no patients has no accuracy: its entry should be NaN (0/0), but you returned {out[empty].item():g}. Divide hits by counts without replacing the empty case."
                )
        if (
            empty is None
            and torch.allclose(out[:-1].double(), expected[:-1].double(), atol=1e-6)
            and not torch.allclose(out[-1:].double(), expected[-1:].double())
        ):
            ex.fail(
                f"every specialty is right except the last one (you have {out[-1].item():g}, expected {expected[-1].item():.4g}): "
                "does your loop stop one early? range(num_specialties) includes the last specialty."
            )
        probs = torch.softmax(logits, dim=-1)[torch.arange(n), diagnosis]  # (N,) probability of the true diagnosis

        def by_group(v: torch.Tensor) -> torch.Tensor:  # (N,) → (S,) mean per specialty
            return (
                torch.zeros(s, dtype=torch.float64).index_add_(0, specialty, v.double())
                / torch.bincount(specialty, minlength=s).double()
            )

        ex.match(
            out.nan_to_num(-1.0),
            expected.nan_to_num(-1.0),
            [
                Mistake(
                    (hits / n),
                    "you divided by the number of all patients; divide each specialty's correct answers by that specialty's number of patients.",
                ),
                Mistake(
                    hits,
                    "these are counts of correct answers; divide by the number of patients in each specialty to get accuracies.",
                ),
                Mistake(
                    correct.mean().expand(s), "every entry is the overall accuracy: compute it separately within each specialty."
                ),
                Mistake(
                    100 * expected.nan_to_num(-0.01), "these are percentages; return fractions between 0 and 1 (no factor 100)."
                ),
                Mistake(
                    1 - expected.nan_to_num(2.0),
                    "these are error rates (the fraction of *wrong* answers); return the fraction of correct ones.",
                ),
                Mistake(
                    by_group((logits.argmax(-1) == specialty).float()).nan_to_num(-1.0),
                    "you compared the predictions with the specialty; compare them with the diagnosis (the true class).",
                ),
                Mistake(
                    by_group(probs).nan_to_num(-1.0),
                    "this is the mean probability of the true diagnosis; accuracy counts the predictions (argmax over the classes) that equal the diagnosis.",
                ),
                Mistake(
                    (hits / hits.sum()).double(),
                    "each specialty's share of all correct answers; accuracy divides a specialty's correct answers by *its own* number of patients.",
                ),
                Mistake(
                    (correct.sum() / torch.bincount(specialty, minlength=s).double()).nan_to_num(-1.0, posinf=-1.0),
                    "the numerator is every correct answer of all specialties; count only that specialty's correct answers.",
                ),
            ],
            context=f"{n} patients, {classes} diagnoses, {s} specialties"
            + (f" (specialty {empty} empty)" if empty is not None else " (all present)")
            + "; NaN shown as -1",
            name="the accuracies",
        )
    return "per-specialty accuracies are right, with NaN for an empty specialty, the first or the last"
