"""Typical wrong answers are caught, each with a message that names the mistake."""

from __future__ import annotations

import pytest

from moe_course.checks import REGISTRY, ExerciseError, check

from mutants import MUTANTS

CASES = [(ex_id, name, fn, words) for ex_id, items in MUTANTS.items() for name, fn, words in items]


def test_every_exercise_has_at_least_three_mutants():
    missing = {ex_id: len(MUTANTS.get(ex_id, [])) for ex_id in REGISTRY if len(MUTANTS.get(ex_id, [])) < 3}
    assert not missing, f"exercises with fewer than 3 mutants: {missing}"


@pytest.mark.parametrize("ex_id,name,fn,words", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_mutant_is_caught_with_a_message_naming_the_mistake(ex_id, name, fn, words, capsys):
    with pytest.raises(ExerciseError) as caught:
        check(ex_id, fn)
    message = str(caught.value)
    assert message.startswith(f"Exercise {ex_id} "), message
    assert words.lower() in message.lower(), f"{name!r}: expected {words!r} in the message, got:\n{message}"
    assert "✅" not in capsys.readouterr().out
