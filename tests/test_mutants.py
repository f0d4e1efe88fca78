"""Typical wrong answers are caught, and most with a message that names the mistake.

``python tests/test_mutants.py`` prints, per exercise, how many mutants get a message naming
the mistake and how many only a generic one ("does not match the reference", an untranslated crash).
"""

from __future__ import annotations

import contextlib
import io
import warnings

import pytest

from moe_course.checks import REGISTRY, ExerciseError, check

from mutants import MUTANTS

CASES = [(ex_id, name, fn, words) for ex_id, items in MUTANTS.items() for name, fn, words in items]


def caught(ex_id: str, fn) -> ExerciseError | None:
    """The error the check raises for ``fn`` (None if the wrong answer passed)."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            check(ex_id, fn)
        except ExerciseError as err:
            return err
    return None


def test_every_exercise_has_at_least_six_mutants_three_with_their_own_message():
    few = {ex_id: len(MUTANTS.get(ex_id, [])) for ex_id in REGISTRY if len(MUTANTS.get(ex_id, [])) < 6}
    assert not few, f"exercises with fewer than 6 mutants: {few}"
    unnamed = {ex_id: n for ex_id in REGISTRY if (n := sum(w is not None for _, _, w in MUTANTS[ex_id])) < 3}
    assert not unnamed, f"exercises with fewer than 3 mutants caught with their own message: {unnamed}"


@pytest.mark.parametrize("ex_id,name,fn,words", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_mutant_is_caught_with_a_message_naming_the_mistake(ex_id, name, fn, words, capsys):
    err = caught(ex_id, fn)
    assert err is not None, f"{name!r} passed the check of exercise {ex_id}"
    message = str(err)
    assert message.startswith(f"Exercise {ex_id} "), message
    if words is None:  # known to get only a generic message; if it is named now, give it its words
        assert not err.named, f"{name!r} is now named: put words from its message in tests/mutants.py:\n{message}"
        return
    assert err.named, f"{name!r}: the message is generic:\n{message}"
    assert words.lower() in message.lower(), f"{name!r}: expected {words!r} in the message, got:\n{message}"
    assert "✅" not in capsys.readouterr().out


def table() -> str:
    """Per exercise: mutants, named, generic, passed."""
    lines = [f"{'exercise':<9}{'mutants':>8}{'named':>7}{'generic':>9}{'passed':>8}"]
    totals = [0, 0, 0, 0]
    for ex_id, items in sorted(MUTANTS.items(), key=lambda kv: tuple(map(int, kv[0].split(".")))):
        errors = [caught(ex_id, fn) for _, fn, _ in items]
        row = [
            len(items),
            sum(bool(e and e.named) for e in errors),
            sum(bool(e and not e.named) for e in errors),
            sum(e is None for e in errors),
        ]
        totals = [a + b for a, b in zip(totals, row)]
        lines.append(f"{ex_id:<9}" + "".join(f"{v:>{w}}" for v, w in zip(row, (8, 7, 9, 8))))
    lines.append(f"{'all':<9}" + "".join(f"{v:>{w}}" for v, w in zip(totals, (8, 7, 9, 8))))
    return "\n".join(lines)


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    print(table())
