"""The check machinery turns every kind of wrong answer into a clear message."""

from __future__ import annotations

import re

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


def test_a_crash_is_reported_in_the_learners_terms_with_no_torch_traceback():
    def crash(x, *rest):
        return x @ x  # wrong shapes

    with pytest.raises(ExerciseError) as caught:
        check("1.1", crash)
    msg = str(caught.value)
    assert (
        "raised RuntimeError in `return x @ x  # wrong shapes`" in msg
        and "a matrix product (@ or torch.matmul) got shapes (5, 8) and (5, 8)" in msg
    )
    assert "It was called with x (5, 8), number 2 (8, 32)" in msg and caught.value.named
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


@pytest.mark.parametrize(
    "body,words",
    [
        ("return x @ w.T", "(4, 3) is `w` transposed; drop the .T"),
        ("return x + w", "two tensors combined entry by entry"),
        ("return x.sum(dim=2)", "dim=2 does not exist on a tensor with 2 dimensions"),
        ("return x[10]", "index 10 is out of range for dimension 0 of size 5"),
        ("return x if x > 0 else -x", "used as a True/False"),
        ("return x[x.sum(1)]", "a float tensor was used as an index"),
        ("return x.view(7, -1)", "does not fit a tensor of 15 entries"),
        ("return torch.stack([x, w])", "torch.stack got tensors of different shapes"),
        ("return torch.bincount(x[:, 0])", "torch.bincount needs a 1-D tensor of non-negative integers"),
        ("return undefined_name * 2", "the name `undefined_name` is not defined inside your function"),
        ("return torch.topk(x, 9, dim=-1)", "torch.topk was asked for more entries than the dimension has"),
    ],
)
def test_torch_errors_are_translated(body, words):
    namespace = {"torch": torch}
    exec(f"def learner(x, w):\n    {body}\n", namespace)
    with pytest.raises(ExerciseError) as caught:
        _ex().call(namespace["learner"], torch.randn(5, 3), torch.randn(3, 4))
    assert words in str(caught.value) and caught.value.named, str(caught.value)
    assert "It was called with x (5, 3), w (3, 4)" in str(caught.value)


def test_a_wrong_signature_and_an_unknown_error_are_named_or_not():
    with pytest.raises(ExerciseError, match="takes 1 positional argument.*keep the signature of the stub") as caught:
        _ex().call(lambda x: x, torch.ones(2), torch.ones(2))
    assert caught.value.named

    def odd(x):
        raise RuntimeError("something nobody has seen before")

    with pytest.raises(ExerciseError, match="something nobody has seen before") as caught:
        _ex().call(odd, torch.ones(2))
    assert not caught.value.named


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
        ([1, 2], {}, "should be one torch.Tensor"),
        (torch.zeros(2, 3), {"shape": (3, 2)}, "shape (2, 3), expected (3, 2)"),
        ((torch.zeros(2), torch.zeros(2)), {}, "should be one torch.Tensor, but it is a tuple"),
        (torch.zeros(2), {"dtype": torch.int64}, "dtype float32, expected int64"),
        (torch.tensor([1.0, float("nan")]), {}, "NaN or inf"),
        (torch.zeros(2, dtype=torch.long), {"floating": True}, "floating-point"),
    ],
)
def test_expect_tensor_names_the_problem(value, kwargs, words):
    with pytest.raises(ExerciseError, match=words.replace("(", r"\(").replace(")", r"\)")):
        _ex().expect_tensor(value, **kwargs)


def test_expect_int_accepts_ints_only_and_says_why():
    import numpy as np

    ex = _ex()
    assert ex.expect_int(3) == 3 and ex.expect_int(np.int64(4)) == 4
    for bad, words in [
        (4.0, "the float 4.0. Its value is whole"),
        (2.5, "not even whole"),
        (torch.tensor(5), "a Python int, but it is a tensor"),
        ("3", "a whole number"),
        (True, "bool"),
        (None, "forget a `return`"),
    ]:
        with pytest.raises(ExerciseError, match=re.escape(words)):
            ex.expect_int(bad)


def test_an_integer_mask_is_refused_with_the_reason():
    with pytest.raises(ExerciseError, match="0/1 int64 tensor, but a mask must be a bool tensor"):
        _ex().expect_tensor(torch.tensor([1, 0, 1]), dtype=torch.bool, name="the keep mask")
    with pytest.raises(ExerciseError, match="whole numbers .* belong in an integer tensor"):
        _ex().expect_tensor(torch.tensor([1.0, 2.0]), dtype=torch.int64)


def test_expect_order_names_swapped_results():
    ex = _ex()
    a, b = torch.ones(2), torch.zeros(3)
    ex.expect_order([a, b], [a, b], ["order", "counts"])
    with pytest.raises(ExerciseError, match=r"you returned \(counts, order\); return \(order, counts\)"):
        ex.expect_order([b, a], [a, b], ["order", "counts"])


def test_match_names_the_first_matching_mistake_then_a_symptom_else_shows_the_largest_difference():
    ex = _ex()
    ref = torch.tensor([1.0, 2.0, 3.0])
    mistakes = [Mistake(ref * 2, "doubled"), Mistake(ref + 1, "shifted")]
    ex.match(ref + 1e-7, ref, mistakes)
    with pytest.raises(ExerciseError, match="shifted"):
        ex.match(ref + 1, ref, mistakes)
    with pytest.raises(ExerciseError, match="right everywhere except the last entry"):
        ex.match(torch.tensor([1.0, 2.0, 9.0]), ref, mistakes)
    with pytest.raises(ExerciseError, match=r"2 of 3 entries differ.*index \(2,\): you have 9, expected 3") as caught:
        ex.match(torch.tensor([1.0, 5.0, 9.0]), ref, mistakes)
    assert not caught.value.named
    with pytest.raises(ExerciseError, match="is 4, expected 7") as caught:
        ex.match(4, 7)
    assert not caught.value.named


def _probs(g, n=6, e=4):
    return torch.softmax(torch.randn(n, e, generator=g), dim=-1)


G = torch.Generator().manual_seed(0)
P = _probs(G)
LOGITS = torch.randn(6, 4, generator=G)


@pytest.mark.parametrize(
    "out,expected,words",
    [
        (P.T.contiguous()[:4, :4], P[:4, :4].T.T, "transposed"),
        (2 * P, P, "exactly twice"),
        (P / 2, P, "exactly half"),
        (-P, P, "the wrong sign"),
        (40 * P, P, "40 times too large, and 40 is N"),
        (P / 40, P, "40 times too small"),
        (
            torch.softmax(LOGITS, dim=0),
            torch.softmax(LOGITS, dim=-1),
            "sum to 1 along dim 0, but they should sum to 1 along dim 1",
        ),
        (torch.exp(LOGITS), torch.softmax(LOGITS, dim=-1), "not normalised"),
        (LOGITS, torch.softmax(LOGITS, dim=-1), "raw scores"),
        (torch.log_softmax(LOGITS, dim=-1), torch.softmax(LOGITS, dim=-1), "log-probabilities"),
        (torch.exp(LOGITS) / torch.exp(LOGITS).sum(), torch.softmax(LOGITS, dim=-1), "all entries together sum to 1"),
        (torch.softmax(torch.softmax(LOGITS, -1), -1), torch.softmax(LOGITS, -1), "a softmax applied twice"),
        (torch.tensor([3.0, 5.0, 0.0]), torch.tensor([3.0, 5.0, 2.0]), "except the last entry"),
        (torch.tensor([0.0, 5.0, 2.0]), torch.tensor([3.0, 5.0, 2.0]), "except the first entry"),
        (torch.tensor([0.0, 3.0, 5.0, 2.0]), torch.tensor([3.0, 5.0, 2.0, 4.0]), "shifted by one place"),
        (torch.tensor([5.0, 4.0, 3.0, 2.0]), torch.tensor([3.0, 5.0, 2.0, 4.0]), "sorted along dim 0"),
        (torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0.5, 1.5, 2.5]), "rounded down"),
        (torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]), "NaN at index (1,)"),
        (torch.tensor([1.0, 0.0]), torch.tensor([1.0, float("nan")]), "NaN belongs at index (1,)"),
        (P + 1, P, "off by +1 everywhere (off by one)"),
    ],
)
def test_general_symptoms_are_named(out, expected, words):
    with pytest.raises(ExerciseError, match=re.escape(words)) as caught:
        _ex().match(out, expected, sizes={"N, the number of tokens": 40})
    assert caught.value.named


def test_a_result_that_is_the_reference_plus_an_input_is_named():
    ex = _ex()
    x = torch.randn(4, 3)
    ex.call(lambda x, b: x, x, torch.randn(3))  # the checker's last call: its inputs are named x and b
    with pytest.raises(ExerciseError, match="the expected result plus `x`"):
        ex.match(P[:4, :3] + x, P[:4, :3])
    with pytest.raises(ExerciseError, match="your input `x` itself"):
        ex.match(x, P[:4, :3])


@pytest.mark.parametrize(
    "got,want,words",
    [
        ((3, 2), (2, 3), "transposed"),
        ((4,), (5,), "One entry short along dim 0"),
        ((1, 5), (5,), "extra dim 0 of size 1"),
        ((5,), (5, 3), "Dim 1 (of size 3) is missing"),
        ((), (5,), "a single number"),
        ((15,), (5, 3), "another shape"),
        ((2, 5, 3, 4), (2, 3, 5, 4), "right sizes in another order"),
    ],
)
def test_shape_hints(got, want, words):
    with pytest.raises(ExerciseError, match=re.escape(words)):
        _ex().expect_tensor(torch.zeros(got), shape=want)


def test_describe_is_short():
    assert describe(torch.zeros(2, 3)) == "tensor of shape (2, 3) and dtype float32"
    assert describe([torch.zeros(1)] * 6).startswith("list of 6")


def test_every_checker_passes_its_reference_and_rejects_a_stub():
    from mutants import MUTANTS  # noqa: F401 - the catalogue imports cleanly

    for ex_id in REGISTRY:
        with pytest.raises(ExerciseError, match="not done yet"):
            check(ex_id, lambda *a, **k: (_ for _ in ()).throw(NotImplementedError("stub")))
