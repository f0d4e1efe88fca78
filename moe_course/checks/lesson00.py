"""Checks for lesson 00 (the warm-up)."""

from __future__ import annotations

import torch

from ._core import Exercise, Mistake, exercise


@exercise("0.1", "count_patients")
def check_count_patients(ex: Exercise, count_patients) -> str:
    g = ex.generator()
    cases = [(12, 3), (200, 4), (50, 8)]
    for n, s in cases:
        # the last specialty gets no patients: counts must still have length s
        specialty = torch.randint(0, s - 1, (n,), generator=g)
        out = ex.call(count_patients, specialty, s)
        ex.expect_tensor(out, name="the counts")
        expected = torch.bincount(specialty, minlength=s)
        if out.shape == (s - 1,):
            ex.fail(
                f"with {s} specialties you returned {s - 1} counts: the last specialty has no patients "
                "in this test, and its count (0) is missing. Make the result always have one entry per "
                "specialty (torch.bincount has a `minlength` argument)."
            )
        ex.expect_tensor(out, shape=(s,), name="the counts")
        if out.is_floating_point():
            if torch.allclose(out.double(), expected.double() / n):
                ex.fail("you returned fractions (counts divided by the number of patients); return the counts themselves.")
            ex.fail(f"counts should be whole numbers (an integer tensor such as int64), not {out.dtype}.".replace("torch.", ""))
        shifted = torch.bincount(specialty + 1, minlength=s + 1)[:s]
        ex.match(
            out,
            expected,
            [Mistake(shifted, "the counts are shifted by one place: specialty labels start at 0, so patients with label 0 belong in entry 0.")],
            context=f"{n} patients, {s} specialties",
            name="the counts",
        )
    return "counts per specialty are right, including a specialty with no patients"
