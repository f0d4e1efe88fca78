"""Checks for lesson 02: ensembles (second opinions) and the bias/variance decomposition."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..experiments.ensembles import average_probs, brier_decomposition, ensemble_log_loss
from ._core import Exercise, Mistake, _close, describe, exercise


def _member_logits(g: torch.Tensor | torch.Generator, r: int, n: int, c: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(r, n, c, generator=g) * scale  # (R, N, classes)


@exercise("2.1", "average_probs")
def check_average_probs(ex: Exercise, fn) -> str:
    g = ex.generator()
    for r, n, c in [(5, 7, 4), (3, 10, 2), (1, 3, 6)]:  # R > 1 first: with one member several mistakes coincide
        logits = _member_logits(g, r, n, c)
        out = ex.call(fn, logits)
        ex.expect_tensor(out, name="the ensemble's probabilities", allow_nan=True)
        if tuple(out.shape) == (r, c) and r != n:
            ex.fail(
                f"the result has shape {(r, c)} = (R, classes): you averaged over the patients (dim 1); average over the members (dim 0) to get one prediction per patient, shape (N, classes) = {(n, c)}."
            )
        if tuple(out.shape) == (r, n, c):
            ex.fail(
                f"the result still has the members' axis, shape {(r, n, c)}: take the mean over the members (dim 0) to get shape (N, classes) = {(n, c)}."
            )
        ex.expect_tensor(out, shape=(n, c), name="the ensemble's probabilities")
        probs = torch.softmax(logits, dim=-1)  # (R, N, classes)
        mistakes = [
            Mistake(
                torch.softmax(logits.mean(0), dim=-1),
                "you averaged the logits and then took a softmax. Average the probabilities instead: softmax each member's logits over the classes first, then take the mean over the members.",
            ),
            Mistake(
                logits.mean(0),
                "you averaged the raw logits (scores), which are not probabilities: rows do not sum to 1. Softmax each member's logits over the classes first, then average.",
            ),
            Mistake(
                torch.softmax(logits, dim=0).mean(0),
                "you took the softmax over the members (dim 0) instead of over the classes (the last dim): each member's probabilities should sum to 1 over the diagnoses.",
            ),
            Mistake(
                probs.sum(0),
                f"you summed the members' probabilities instead of averaging them: every row sums to R = {r}, not 1. Divide by the number of members (use .mean(dim=0)).",
            ),
            Mistake(
                torch.softmax(torch.log_softmax(logits, dim=-1).mean(0), dim=-1),
                "you averaged log-probabilities (a geometric mean, renormalised). The ensemble averages the probabilities themselves.",
            ),
            Mistake(
                torch.log_softmax(logits, dim=-1).mean(0).exp(),
                "you averaged log-probabilities and exponentiated: that is a geometric mean, and its rows do not sum to 1. Average the probabilities themselves.",
            ),
            Mistake(
                torch.log_softmax(logits, dim=-1).mean(0),
                "you averaged log-probabilities (log_softmax): return the mean of the probabilities themselves (softmax).",
            ),
            Mistake(probs.median(0).values, "you took the median over the members; the ensemble averages them (.mean(dim=0))."),
            Mistake(
                probs.max(0).values,
                "you kept each class's largest probability over the members (max); the ensemble averages them (.mean(dim=0)).",
            ),
            Mistake(probs[0], "this is the first member's prediction alone; average over all R members (dim 0)."),
            Mistake(
                torch.sigmoid(logits).mean(0),
                "a sigmoid treats each class on its own, so a member's probabilities do not sum to 1: take the softmax over the classes.",
            ),
            Mistake(
                torch.softmax(logits.sum(0), dim=-1),
                "you summed the logits and then took a softmax. Average the probabilities instead: softmax each member's logits over the classes first, then take the mean over the members.",
            ),
        ]
        ex.match(
            out,
            average_probs(logits),
            mistakes,
            context=f"{r} members, {n} patients, {c} diagnoses",
            name="the ensemble's probabilities",
        )
    # very confident members: exp() of large logits overflows unless the softmax subtracts the maximum
    logits = _member_logits(g, 3, 4, 5, scale=1.0)
    logits[:, :, 0] += 120.0
    out = ex.call(fn, logits)
    if isinstance(out, torch.Tensor) and out.is_floating_point() and not torch.isfinite(out).all():
        ex.fail(
            "with very confident members (logits around 120) your result contains NaN or inf: exp(120) overflows float32. Use torch.softmax, which subtracts each row's maximum before exponentiating."
        )
    ex.expect_tensor(out, shape=(4, 5), name="the ensemble's probabilities")
    ex.match(
        out, average_probs(logits), context="very confident members (logits around 120)", name="the ensemble's probabilities"
    )
    return "the mean of the members' probabilities, for 1 to 5 members, also with very confident members"


def _three_numbers(ex: Exercise, out: Any) -> torch.Tensor:
    """The learner's (error, bias, variance) as a float64 tensor of 3 numbers."""
    if out is None:
        ex.fail("the result is None. Did you forget a `return error, bias, variance`?")
    if isinstance(out, dict):
        ex.fail("return a tuple (error, bias, variance), not a dict.")
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        ex.fail(f"return three numbers, (error, bias, variance); got {describe(out)}.")
    values = []
    for name, v in zip(("error", "bias", "variance"), out):
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                ex.fail(
                    f"`{name}` is a {describe(v)}; return one number: the mean over the patients (and over the members, for the error and the variance)."
                )
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            ex.fail(f"`{name}` should be a number, got {describe(v)}.")
        values.append(float(v))
    return torch.tensor(values, dtype=torch.float64)


@exercise("2.2", "bias_variance")
def check_bias_variance(ex: Exercise, fn) -> str:
    g = ex.generator()
    for r, n, c in [(6, 20, 3), (4, 50, 5), (1, 5, 4)]:
        probs = torch.softmax(_member_logits(g, r, n, c, scale=1.5), dim=-1)  # (R, N, classes)
        targets = torch.randint(0, c, (n,), generator=g)
        got = _three_numbers(ex, ex.call(fn, probs, targets))
        parts = brier_decomposition(probs, targets)
        e, b, v = (parts.error.double().mean(), parts.bias.double().mean(), parts.variance.double().mean())
        expected = torch.stack([e, b, v])
        onehot = F.one_hot(targets, c).double()
        p = probs.double()
        mean = p.mean(0)
        mistakes = [
            Mistake(
                torch.stack([e, b, v * r / (r - 1)]) if r > 1 else None,
                f"your variance divides by R - 1 = {r - 1} (the unbiased sample variance). The decomposition error = bias + variance is exact only with the plain mean over the R = {r} members: divide by R.",
            ),
            Mistake(
                expected / c,
                f"you averaged the squared differences over the {c} classes; the squared distance between two probability vectors is the *sum* over the classes (then the mean over patients and members).",
            ),
            Mistake(
                torch.stack([e, b, e]),
                "your variance measures the spread around the truth (that is the error). Measure the spread around the members' mean prediction p̄ instead.",
            ),
            Mistake(
                torch.stack([e, (mean - onehot).abs().sum(-1).mean(), v]),
                "your bias is not squared: use the squared distance ||p̄ - y||², summed over the classes.",
            ),
            Mistake(
                torch.stack([e, e, v]),
                "your bias is the members' average error; the bias is the error of the members' *average prediction* p̄, ||p̄ - y||².",
            ),
            Mistake(expected * n, f"you summed over the {n} patients; take the mean over the patients."),
            Mistake(
                torch.stack([b, e, v]), "you returned (bias, error, variance): return them in the order (error, bias, variance)."
            ),
        ]
        std = (p - mean).pow(2).mean(0).sqrt().sum(-1).mean()  # a standard deviation per class, summed
        mistakes += [
            Mistake(
                torch.stack([e, b, std]),
                "your variance is a standard deviation (a square root); the decomposition needs the variance itself: the mean squared distance to p̄.",
            ),
            Mistake(torch.stack([e, b, v * r]), f"your variance sums over the R = {r} members; take the mean over the members."),
            Mistake(
                torch.stack([e, b, ((p[0] - mean) ** 2).sum(-1).mean()]),
                "your variance uses only the first member: average the squared distance to p̄ over all R members.",
            ),
            Mistake(
                torch.stack([b, b, v]),
                "your error is the bias: the error is the members' own mean squared distance to the truth, ||p_r - y||² averaged over the members (and the patients).",
            ),
            Mistake(
                torch.stack(
                    [
                        ((p - targets[:, None].double()) ** 2).sum(-1).mean(),
                        ((mean - targets[:, None].double()) ** 2).sum(-1).mean(),
                        v,
                    ]
                ),
                "you compared the probabilities with the class number itself; compare them with the one-hot vector of the true diagnosis (F.one_hot(targets, num_classes)).",
            ),
        ]
        mistakes = [m for m in mistakes if m.output is not None and not _close(m.output, expected, 1e-5, 1e-4)]
        what = f"{r} members, {n} patients, {c} diagnoses"
        for m in mistakes:
            if _close(got, m.output, 1e-5, 1e-4):
                ex.fail(m.message + f"\n  ({what})")
        ex.expect_order(list(got), list(expected), ["error", "bias", "variance"])
        for i, part in enumerate(("error", "bias", "variance")):  # say which of the three is wrong, and how
            others = (
                " (the other two are right)" if all(_close(got[j], expected[j], 1e-5, 1e-4) for j in range(3) if j != i) else ""
            )
            ex.match(
                float(got[i]),
                float(expected[i]),
                context=what,
                name=f"your {part}{others}",
                atol=1e-5,
                rtol=1e-4,
                sizes={"R, the number of members": r, "N, the number of patients": n, "the number of diagnoses": c},
            )
        if r == 1 and abs(got[2]) > 1e-7:
            ex.fail("with a single member there is nothing to disagree about: the variance must be 0.")
    return "error, bias² and variance match, and error = bias + variance, also for a single member"


@exercise("2.3", "ensemble_log_loss")
def check_ensemble_log_loss(ex: Exercise, fn) -> str:
    g = ex.generator()
    cases = []
    for r, n, c in [(4, 30, 5), (2, 8, 3), (1, 6, 4)]:
        cases.append((_member_logits(g, r, n, c), torch.randint(0, c, (n,), generator=g), ""))
    # every member is certain the true diagnosis is impossible: its probability underflows to 0 in float32
    r, n, c = 3, 6, 4
    logits = _member_logits(g, r, n, c)
    targets = torch.randint(0, c, (n,), generator=g)
    logits[:, torch.arange(n), targets] -= 150.0
    cases.append((logits, targets, "confident"))
    for logits, targets, kind in cases:
        r, n, c = logits.shape
        out = ex.call(fn, logits, targets)
        if isinstance(out, torch.Tensor):
            if out.numel() != 1:
                ex.fail(f"return one number (the mean over the patients), got a {describe(out)}.")
            out = out.item()
        if out is None:
            ex.fail("the result is None. Did you forget a `return` statement?")
        if isinstance(out, bool) or not isinstance(out, (int, float)):
            ex.fail(f"return one number, got {describe(out)}.")
        out = float(out)
        if kind and not math.isfinite(out):
            ex.fail(
                "your loss is inf or NaN when every member gives the true diagnosis a probability so small that it underflows to 0 (log 0 = -inf). Work in log space: log p̄ = logsumexp over members of log_softmax(logits) - log R."
            )
        if not math.isfinite(out):
            ex.fail(f"your loss is {out}; it should be a finite number.")
        expected = ensemble_log_loss(logits, targets).item()
        flat = logits.reshape(r * n, c)
        members = F.cross_entropy(flat, targets.repeat(r)).item()
        mistakes = [
            Mistake(
                members,
                "this is the members' average cross-entropy. The ensemble's loss is the cross-entropy of the *averaged probabilities*, -log(mean over members of p_r(y)), which is never larger (Jensen's inequality).",
            ),
            Mistake(
                F.cross_entropy(logits.mean(0), targets).item(),
                "you averaged the logits before the cross-entropy; the ensemble averages probabilities: -log(mean over members of softmax(logits_r)[y]).",
            ),
            Mistake(
                expected - math.log(r),
                f"you forgot to divide by the number of members inside the log: subtract log R = log {r} after the logsumexp (a mean is a sum divided by R).",
            ),
            Mistake(expected * n, f"you summed over the {n} patients; take the mean."),
            Mistake(
                -expected,
                "the sign is flipped: the loss is minus the mean log-probability of the true diagnosis (a positive number).",
            ),
            Mistake(
                expected / math.log(2),
                "this is the loss in bits (log base 2); use the natural log, as torch.log and F.cross_entropy do.",
            ),
            Mistake(
                expected - 2 * math.log(r),
                f"you added log R instead of subtracting it: the log of a mean is logsumexp - log R (R = {r}).",
            ),
            Mistake(
                F.cross_entropy(torch.softmax(logits, -1).mean(0), targets).item(),
                "you passed the averaged probabilities to F.cross_entropy, which expects logits (it applies its own softmax). Take -log of the averaged probability of the true diagnosis instead, in log space.",
            ),
            Mistake(
                F.nll_loss(torch.softmax(logits, -1).mean(0), targets).item(),
                "F.nll_loss expects log-probabilities, and you passed probabilities: take the log (in log space: logsumexp of log_softmax - log R).",
            ),
            Mistake(
                -(torch.logsumexp(torch.log_softmax(logits, -1), dim=-1) - math.log(r)).mean().item(),
                "the logsumexp runs over the classes; it must run over the members (dim 0), which is how the log of the mean over members is taken.",
            ),
            Mistake(
                F.cross_entropy(logits[0], targets).item(),
                "this is the first member's loss alone; the ensemble averages the probabilities of all R members.",
            ),
            Mistake(
                F.cross_entropy(logits.sum(0), targets).item(),
                "you summed the members' logits before the cross-entropy; the ensemble averages their probabilities.",
            ),
        ]
        ex.match(
            out,
            expected,
            mistakes,
            context=f"{r} members, {n} patients, {c} diagnoses" + (", members certain the truth is impossible" if kind else ""),
            name="the loss",
            atol=1e-4,
            rtol=1e-4,
        )
    return "the cross-entropy of the averaged probabilities, stable even when a probability underflows"
