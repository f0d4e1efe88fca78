"""The check machinery turns every kind of wrong answer into a clear message."""

from __future__ import annotations

import pytest
import torch

from moe_course.checks import REGISTRY, ExerciseError, check
from moe_course.checks._core import Exercise, Mistake, describe


def _ex() -> Exercise:
    return Exercise("9.9", "thing")


def test_check_prints_exactly_one_line_on_success(capsys):
    check("0.1", lambda s, n: torch.bincount(s, minlength=n))
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("✅ Exercise 0.1 passed: ")


def test_unknown_exercise_lists_the_known_ones():
    with pytest.raises(ExerciseError, match="There is no exercise '7.7'.*0.1"):
        check("7.7", print)


def test_not_callable_and_none_are_named():
    with pytest.raises(ExerciseError, match="got None instead of a function"):
        check("1.1", None)
    with pytest.raises(ExerciseError, match="expected a function, got int 3"):
        check("1.1", 3)


def test_a_stub_says_not_done_yet():
    def stub(*args):
        raise NotImplementedError("Exercise 1.3: count")

    with pytest.raises(ExerciseError, match=r"not done yet.*Exercise 1.3: count"):
        check("1.3", stub)


def test_a_crash_is_reported_with_the_inputs_and_no_torch_traceback():
    def crash(x, *rest):
        return x @ x  # wrong shapes

    with pytest.raises(ExerciseError) as caught:
        check("1.1", crash)
    msg = str(caught.value)
    assert "raised RuntimeError" in msg and "It was called with: tensor of shape (5, 8)" in msg
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_in_place_modification_is_caught():
    ex = _ex()
    with pytest.raises(ExerciseError, match="in place"):
        ex.call(lambda x: x.mul_(2), torch.ones(3))
    with pytest.raises(ExerciseError, match="input `x` in place"):
        ex.call(lambda x=None: x.add_(1), x=torch.ones(3))
    assert torch.equal(ex.call(lambda x: x * 2, torch.ones(3)), torch.full((3,), 2.0))


@pytest.mark.parametrize(
    "value,kwargs,words",
    [
        (None, {}, "forget a `return`"),
        ([1, 2], {}, "should be a torch.Tensor"),
        (torch.zeros(2, 3), {"shape": (3, 2)}, "shape (2, 3), expected (3, 2)"),
        (torch.zeros(2), {"dtype": torch.int64}, "dtype float32, expected int64"),
        (torch.tensor([1.0, float("nan")]), {}, "NaN or inf"),
        (torch.zeros(2, dtype=torch.long), {"floating": True}, "floating-point"),
    ],
)
def test_expect_tensor_names_the_problem(value, kwargs, words):
    with pytest.raises(ExerciseError, match=words.replace("(", r"\(").replace(")", r"\)")):
        _ex().expect_tensor(value, **kwargs)


def test_expect_int_accepts_whole_numbers_only():
    ex = _ex()
    assert ex.expect_int(3) == 3 and ex.expect_int(4.0) == 4 and ex.expect_int(torch.tensor(5)) == 5
    for bad in (2.5, "3", True, None):
        with pytest.raises(ExerciseError):
            ex.expect_int(bad)


def test_match_names_the_first_matching_mistake_else_shows_the_largest_difference():
    ex = _ex()
    ref = torch.tensor([1.0, 2.0, 3.0])
    mistakes = [Mistake(ref * 2, "doubled"), Mistake(ref + 1, "shifted")]
    ex.match(ref + 1e-7, ref, mistakes)
    with pytest.raises(ExerciseError, match="shifted"):
        ex.match(ref + 1, ref, mistakes)
    with pytest.raises(ExerciseError, match=r"1 of 3 entries differ.*index \(2,\): you have 9, expected 3"):
        ex.match(torch.tensor([1.0, 2.0, 9.0]), ref, mistakes)
    with pytest.raises(ExerciseError, match="is 4, expected 5"):
        ex.match(4, 5)


def test_describe_is_short():
    assert describe(torch.zeros(2, 3)) == "tensor of shape (2, 3) and dtype float32"
    assert describe([torch.zeros(1)] * 6).startswith("list of 6")


def test_every_checker_passes_its_reference_and_rejects_a_stub():
    from mutants import MUTANTS  # noqa: F401 - the catalogue imports cleanly

    for ex_id in REGISTRY:
        with pytest.raises(ExerciseError, match="not done yet"):
            check(ex_id, lambda *a, **k: (_ for _ in ()).throw(NotImplementedError("stub")))
