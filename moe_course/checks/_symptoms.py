"""Name a mistake from its symptom, for any exercise.

A checker first compares the learner's result with what the typical mistakes of
*that* exercise would give. When none matches, these general symptoms still say
more than "does not match": the result is the reference transposed, exactly
double or half, N times too large, off by a constant, normalised over the wrong
axis or not at all, right everywhere but the last class, rounded down to whole
numbers, log-probabilities where probabilities belong, NaN where a number belongs.
Each function returns a sentence, or None. Some symptoms describe the result
without naming a mistake (an arbitrary constant factor, the right values in other
places, within 1% of the reference): those sentences start with ``WEAK``, which
``diagnose`` strips and reports as not named.

``sizes`` maps a size of the problem to its name, e.g. ``{"N, the number of tokens": 40}``,
so that a factor of 40 can be named.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

Sizes = Mapping[str, int]
WEAK = "\0weak\0"  # marks a symptom that describes the result but names no mistake


def _factor_name(ratio: float, sizes: Sizes) -> str | None:
    for name, size in sizes.items():
        if size > 2 and math.isclose(ratio, size, rel_tol=1e-4):
            return f"{size} times too large, and {size} is {name}. A sum where a mean belongs, or a division by it missing?"
        if size > 2 and math.isclose(ratio, 1 / size, rel_tol=1e-4):
            return f"{size} times too small, and {size} is {name}. A mean where a sum belongs, or divided by it once too often?"
    return None


def scale(ratio: float, sizes: Sizes, what: str) -> str | None:
    """A sentence for a result that is the reference times ``ratio``."""
    if math.isclose(ratio, 2.0, rel_tol=1e-4):
        return f"{what}: exactly twice the expected value, a factor 2 too many (counted twice, or a sum of two equal parts)?"
    if math.isclose(ratio, 0.5, rel_tol=1e-4):
        return (
            f"{what}: exactly half the expected value, a factor 2 missing (one of two equal parts, or a division by 2 too many)?"
        )
    if math.isclose(ratio, -1.0, rel_tol=1e-4):
        return f"{what}: the right size but the wrong sign, a minus sign missing or extra?"
    named = _factor_name(ratio, sizes)
    if named:
        return f"{what}: {named}"
    if ratio > 0 and not math.isclose(ratio, 1.0, rel_tol=1e-3):
        return f"{WEAK}{what}: the expected value times {ratio:.4g}, everywhere; a constant factor is wrong (a scale, a division, or a count)."
    return None


def shape_hint(got: tuple[int, ...], want: tuple[int, ...]) -> str:
    """Why a result might have the wrong shape (empty if nothing stands out)."""
    if got == () and want != ():
        return " It is a single number: a .mean() or .sum() without dim= reduced over every axis. Give the dim to reduce over."
    if len(got) == len(want) >= 2 and got == want[:-2] + (want[-1], want[-2]):
        return " It looks transposed: the last two axes are swapped."
    if len(got) == len(want):
        short = [i for i, (g, w) in enumerate(zip(got, want)) if g == w - 1]
        if len(short) == 1 and all(g == w for i, (g, w) in enumerate(zip(got, want)) if i != short[0]):
            return (
                f" One entry short along dim {short[0]}: the last class (or expert) is missing, e.g. a loop that stops one early "
                "or torch.bincount without minlength, when nobody falls in the last one."
            )
    if len(got) == len(want) + 1 and any(got[:i] + got[i + 1 :] == want for i in range(len(got))):
        i = next(i for i in range(len(got)) if got[:i] + got[i + 1 :] == want)
        extra = (
            " (keepdim=True, or an unsqueeze)"
            if got[i] == 1
            else " that should have been reduced (a sum or mean over it is missing)"
        )
        return f" It has an extra dim {i} of size {got[i]}{extra}."
    if len(got) + 1 == len(want) and any(want[:i] + want[i + 1 :] == got for i in range(len(want))):
        i = next(i for i in range(len(want)) if want[:i] + want[i + 1 :] == got)
        return f" Dim {i} (of size {want[i]}) is missing: you reduced over an axis that should stay (check the dim of your sum/mean/max)."
    if sorted(got) == sorted(want) and len(got) == len(want) > 2:
        return " It has the right sizes in another order: a transpose or permute of the wrong axes?"
    if math.prod(got) == math.prod(want) and got != want:
        return " It has the right number of entries in another shape: a reshape or flatten too many (or too few)?"
    return ""


def _sums_to_one(t: torch.Tensor, dim: int) -> bool:
    return bool(torch.isfinite(t).all()) and bool(((t.sum(dim) - 1).abs() < 1e-4).all())


def _relation_to_inputs(o: torch.Tensor, e: torch.Tensor, inputs: Mapping[str, Any], name: str, close) -> str | None:
    """The result is an input, or differs from the reference by an input (times ±1 or ±2)?"""
    diff = o - e
    for arg, value in inputs.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.numel() < 2:
            continue
        a = value.detach().double()
        try:
            a = a.expand_as(o)
        except RuntimeError:
            continue
        if close(o, a):
            return (
                f"{name}: your input `{arg}` itself, unchanged. Did the computation happen (and is its result what you return)?"
            )
        for c, said in (
            (1.0, f"plus `{arg}`: you added `{arg}` once too often (a residual connection belongs outside this function?)"),
            (-1.0, f"minus `{arg}`: `{arg}` is missing from your sum, or subtracted"),
            (-2.0, f"minus 2 × `{arg}`: `{arg}` is subtracted where it should be added"),
            (2.0, f"plus 2 × `{arg}`: `{arg}` is added twice"),
        ):
            if close(diff, c * a):
                return f"{name}: the expected result {said}."
    return None


def tensors(
    out: torch.Tensor, expected: torch.Tensor, sizes: Sizes, name: str, inputs: Mapping[str, Any] | None = None
) -> str | None:
    """Symptoms of a tensor result of the right shape that does not match."""
    o, e = out.detach().double(), expected.detach().double()
    if o.shape != e.shape:
        return None
    if e.numel() == 0:
        return None
    o_nan, e_nan = torch.isnan(o), torch.isnan(e)
    if bool((o_nan & ~e_nan).any()):
        at = tuple(int(i) for i in (o_nan & ~e_nan).nonzero()[0])
        return (
            f"{name}: NaN at index {at}, where a number ({e[at].item():.4g}) is expected: 0/0, log(0) or inf - inf "
            "somewhere? An empty group needs care, and exp/log of large numbers overflows."
        )
    if bool((e_nan & ~o_nan).any()):
        at = tuple(int(i) for i in (e_nan & ~o_nan).nonzero()[0])
        return (
            f"{name}: NaN belongs at index {at} (there is nothing to average there: 0/0), but you have {o[at].item():.4g}. "
            "Do not replace an empty group's value by a number."
        )
    ok = ~e_nan  # NaN sits at the same places in both now
    o, e = o.nan_to_num(0.0), e.nan_to_num(0.0)

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.shape == b.shape and bool(((a - b).abs() <= 1e-5 + 1e-4 * b.abs()).all())

    weak: list[str] = []  # symptoms that describe without naming: said only if nothing better fits
    # shifted by one place along an axis (an off-by-one index)
    for axis in range(e.ndim):
        n = e.shape[axis]
        if n < 3:
            continue
        head, tail = torch.arange(n - 1), torch.arange(1, n)
        for a, b in ((tail, head), (head, tail)):
            if close(o.index_select(axis, a), e.index_select(axis, b)) and not close(o, e):
                return (
                    f"{name}: shifted by one place along dim {axis}; entry i holds what belongs in entry i "
                    f"{'- 1' if a is tail else '+ 1'}. An off-by-one in an index (ids and labels start at 0)?"
                )
    # the right numbers in another order
    if torch.equal(o[ok].sort().values, e[ok].sort().values) or close(o.flatten().sort().values, e.flatten().sort().values):
        if e.ndim >= 2 and e.shape[-1] == e.shape[-2] and close(o.transpose(-1, -2), e):
            return f"{name}: transposed, rows and columns are swapped (e.g. scores of shape (E, N) where (N, E) belongs, or a .T too many)."
        for axis in range(e.ndim):
            for descending in (True, False):
                if e.shape[axis] > 2 and close(o, e.sort(dim=axis, descending=descending).values):
                    return (
                        f"{name}: the right values, sorted along dim {axis}; keep them in their own order "
                        "(entry i belongs to id i)."
                    )
        weak.append(f"{name}: the right values in the wrong places; the order (of tokens, rows or entries) is mixed up.")
    # a constant factor: named when it is 2, 1/2, -1 or a size of the problem
    nz = (e.abs() > 1e-6) & ok
    if bool(nz.any()):
        ratio = o[nz] / e[nz]
        r = ratio.median().item()
        if bool(((ratio - r).abs() <= 1e-4 * max(1.0, abs(r))).all()) and close(o, e * r):
            said = scale(r, sizes, name)
            if said and not said.startswith(WEAK):
                return said
            if said:
                weak.append(said[len(WEAK) :])
    # normalisation: over the wrong axis, or missing
    for axis in range(e.ndim):
        if e.shape[axis] > 1 and _sums_to_one(e, axis) and not _sums_to_one(o, axis):
            others = [b for b in range(o.ndim) if b != axis and o.shape[b] > 1 and _sums_to_one(o, b)]
            if others:
                last = " (the last one)" if axis == e.ndim - 1 else ""
                return (
                    f"{name}: the values sum to 1 along dim {others[0]}, but they should sum to 1 along dim {axis}{last}: "
                    "the softmax or normalisation runs over the wrong axis."
                )
            if close(o.exp(), e):
                return f"{name}: log-probabilities (log_softmax, or a log too many); return the probabilities themselves."
            if abs(o.sum().item() - 1) < 1e-4 and e.numel() > e.shape[axis]:
                return (
                    f"{name}: all entries together sum to 1; you normalised over every entry at once. Normalise along "
                    f"dim {axis} only (each row its own softmax)."
                )
            if bool((o >= 0).all()) and bool((o.sum(axis) > 0).all()) and close(o / o.sum(axis, keepdim=True), e):
                return f"{name}: not normalised; along dim {axis} the values should sum to 1. Divide by their sum."
            if close(torch.softmax(o, dim=axis), e):
                return f"{name}: raw scores; apply a softmax over dim {axis} so that they become probabilities."
        if e.shape[axis] > 1 and _sums_to_one(e, axis) and _sums_to_one(o, axis) and close(o, torch.softmax(e, dim=axis)):
            return f"{name}: a softmax applied twice (to probabilities); take the softmax once, of the scores."
    related = _relation_to_inputs(o, e, inputs or {}, name, close)
    if related:
        return related
    # all right except the first or last entry along one axis
    for axis in range(e.ndim):
        n = e.shape[axis]
        if n < 2:
            continue
        for at, which, hint in (
            (n - 1, "last", "a loop that stops one early (range(n - 1))?"),
            (0, "first", "a loop that starts at 1, or labels counted from 1?"),
        ):
            idx = torch.tensor([i for i in range(n) if i != at])
            if close(o.index_select(axis, idx), e.index_select(axis, idx)):
                return (
                    f"{name}: right everywhere except the {which} entry along dim {axis} (index {at}): {hint} "
                    "Every class and every expert counts, including the " + ("last" if at else "first") + " one."
                )
    # whole numbers where fractions belong
    if e.numel() > 1 and bool((o == o.round()).all()) and not bool((e == e.round()).all()):
        if close(o, e.floor()) or close(o, e.trunc()):
            return f"{name}: rounded down to whole numbers; an integer division (//) or an integer tensor where fractions belong?"
        return f"{name}: whole numbers where fractions are expected; an integer dtype or // somewhere?"
    # a constant offset: named when it is one
    diff = (o - e)[ok]
    c = diff.mean().item()
    if abs(c) > 1e-5 and bool(((diff - c).abs() <= 1e-5 + 1e-4 * abs(c)).all()):
        if math.isclose(abs(c), 1.0, rel_tol=1e-6):
            return f"{name}: off by {c:+.4g} everywhere (off by one); a constant is added or missing."
        weak.append(f"{name}: off by {c:+.4g} everywhere; a constant is added or missing.")
    scale_ = e[ok].abs().max().item()
    worst = diff.abs().max().item()
    if scale_ > 0 and worst <= 1e-2 * scale_:
        weak.append(
            f"{name}: within {100 * worst / scale_:.2g}% of the reference, but not equal; an approximation, an "
            "epsilon added somewhere, or lower precision (float16)?"
        )
    return WEAK + weak[0] if weak else None


def numbers(out: float, expected: float, sizes: Sizes, name: str) -> str | None:
    """Symptoms of a single number that does not match."""
    if isinstance(expected, int) and isinstance(out, int) and abs(out - expected) == 1:
        return f"{name}: off by one ({out:,} instead of {expected:,}); a +1 or -1 too many, or a range that starts or stops one early?"
    if expected != 0 and out != 0:
        said = scale(out / expected, sizes, name)
        if said and not said.startswith(WEAK):  # any two numbers have *some* ratio: only a telling one is said
            return said
    if (
        isinstance(out, float)
        and not isinstance(expected, int)
        and math.isfinite(out)
        and out == int(out)
        and expected != int(expected)
    ):
        return f"{name}: a whole number where a fraction is expected; an integer division (//) or int() somewhere?"
    if expected and abs(out - expected) <= 1e-2 * abs(expected):
        return f"{WEAK}{name}: within 1% of the reference but not equal; an approximation or an epsilon somewhere?"
    return None


def diagnose(
    out: Any, expected: Any, sizes: Sizes, name: str, inputs: Mapping[str, Any] | None = None
) -> tuple[str, bool] | None:
    """(sentence, named) for a result that does not match, or None if no symptom stands out.

    ``inputs``: the arguments of the learner's last call by name, to recognise a result that is
    an input, or the reference plus or minus an input.
    """
    said = None
    if isinstance(expected, torch.Tensor) and isinstance(out, torch.Tensor):
        if out.shape == expected.shape:
            said = tensors(out, expected, sizes, name, inputs)
    elif isinstance(expected, (int, float)) and isinstance(out, (int, float)) and not isinstance(out, bool):
        if math.isfinite(out) and math.isfinite(expected):
            said = numbers(out, expected, sizes, name)
    if said is None:
        return None
    return (said[len(WEAK) :], False) if said.startswith(WEAK) else (said, True)
