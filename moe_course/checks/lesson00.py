"""Checks for lesson 00 (the warm-up)."""

from __future__ import annotations

import torch

from ._core import Exercise, Mistake, exercise


def _specialties(g: torch.Generator, n: int, s: int, absent: int | None) -> torch.Tensor:
    """n patients' specialties in 0..s-1; every specialty present except ``absent`` (if given)."""
    present = torch.tensor([i for i in range(s) if i != absent])
    labels = present[torch.randint(0, len(present), (n,), generator=g)]
    labels[: len(present)] = present  # each present specialty has at least one patient
    return labels[torch.randperm(n, generator=g)]


@exercise("0.1", "count_patients")
def check_count_patients(ex: Exercise, count_patients) -> str:
    g = ex.generator()
    # the last specialty absent, then present; the first absent; everybody present
    cases = [(12, 3, 2), (200, 4, None), (50, 8, 0), (30, 5, None), (9, 6, 5)]
    for n, s, absent in cases:
        specialty = _specialties(g, n, s, absent)
        what = f"{n} patients, {s} specialties" + (
            f", none in specialty {absent}" if absent is not None else ", every specialty present"
        )
        out = ex.call(count_patients, specialty, s)
        ex.expect_tensor(out, name="the counts")
        expected = torch.bincount(specialty, minlength=s)
        if out.shape == (n,) and n != s:
            ex.fail(
                f"you returned one number per patient, shape ({n},); count per specialty instead, shape ({s},). "
                "(Summing a one-hot table over dim 1 gives each patient's 1; sum over the patients, dim 0.)"
            )
        if out.shape == (s - 1,) and absent == s - 1:
            ex.fail(
                f"with {s} specialties you returned {s - 1} counts: the last specialty has no patients "
                "in this test, and its count (0) is missing. Make the result always have one entry per "
                "specialty (torch.bincount has a `minlength` argument)."
            )
        if out.ndim == 1 and out.shape[0] == len(torch.unique(specialty)) and out.shape[0] < s:
            ex.fail(
                f"you returned {out.shape[0]} counts, one per specialty that has patients; a specialty with no patients "
                f"still needs its 0 ({s} entries). torch.unique skips it: use torch.bincount(..., minlength=...)."
            )
        ex.expect_tensor(out, shape=(s,), name="the counts")
        if out.is_floating_point():
            if torch.allclose(out.double(), expected.double() / n):
                ex.fail("you returned fractions (counts divided by the number of patients); return the counts themselves.")
            ex.fail(f"counts should be whole numbers (an integer tensor such as int64), not {out.dtype}.".replace("torch.", ""))
        shifted = torch.bincount(specialty + 1, minlength=s + 1)[:s]
        early = expected.clone()
        early[-1] = 0
        ex.match(
            out,
            expected,
            [
                Mistake(
                    shifted,
                    "the counts are shifted by one place: specialty labels start at 0, so patients with label 0 belong in entry 0.",
                ),
                Mistake(
                    early,
                    f"the last specialty's count is 0 although {int(expected[-1])} patients have it: does your loop "
                    "stop one early? range(num_specialties) runs over every specialty, including the last.",
                ),
            ],
            context=what,
            name="the counts",
            sizes={"the number of patients": n},
        )
    return "counts per specialty are right, with the first or the last specialty empty or present"
