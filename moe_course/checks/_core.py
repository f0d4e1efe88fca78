"""The machinery behind every check cell.

A check cell in an exercise notebook runs ``check("N.M", learner_object)``.
The checker for that id calls the learner's code on fresh random inputs,
compares with the package's reference, and either prints one line::

    ✅ Exercise N.M passed: <what was checked>

or raises ``ExerciseError`` with a message that says what is wrong in words
(the learner sees it in the notebook, and ``pytest --nbval-lax`` fails at the
check cell). Checkers recognise typical mistakes by computing what those
mistakes would produce and naming the one that matches.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import _crashes, _symptoms

__all__ = ["ExerciseError", "Exercise", "check", "exercise", "REGISTRY", "Mistake"]


class ExerciseError(AssertionError):
    """A check found a problem in the learner's answer. The message says which.

    ``named`` is False when the check could only say *that* the answer is wrong
    ("does not match the reference", an unrecognised crash), not which mistake it is.
    """

    named: bool = True

    def _render_traceback_(self) -> list[str]:
        """What Jupyter shows for a failed check: the message alone, without the checker's frames.

        (IPython calls this instead of printing a traceback; nbval reports the same lines.)
        """
        return f"\x1b[0;31mExerciseError\x1b[0m: {self}".splitlines()


@dataclass(frozen=True)
class Mistake:
    """A typical wrong answer: what it would produce, and what to tell the learner."""

    output: Any  # what the mistaken code returns on the same inputs
    message: str  # names the mistake, e.g. "softmax over the tokens instead of the experts"


@dataclass(frozen=True)
class _Entry:
    ex_id: str
    title: str  # e.g. "feed_forward"
    run: Callable[[Exercise, Any], str]


REGISTRY: dict[str, _Entry] = {}


def exercise(ex_id: str, title: str) -> Callable:
    """Register ``fn(ex, obj) -> summary`` as the checker of exercise ``ex_id``."""

    def register(fn: Callable[[Exercise, Any], str]):
        if ex_id in REGISTRY:
            raise ValueError(f"exercise {ex_id} registered twice")
        REGISTRY[ex_id] = _Entry(ex_id, title, fn)
        return fn

    return register


def check(ex_id: str, obj: Any) -> None:
    """Check the learner's answer ``obj`` to exercise ``ex_id``.

    Prints one line on success; raises ExerciseError naming the mistake otherwise.
    """
    __tracebackhide__ = True  # pytest and IPython hide this frame
    entry = REGISTRY.get(str(ex_id))
    if entry is None:
        known = ", ".join(sorted(REGISTRY, key=_id_key))
        raise ExerciseError(f"There is no exercise {ex_id!r}. Known exercises: {known}.")
    ex = Exercise(entry.ex_id, entry.title)
    try:
        summary = entry.run(ex, obj)
    except ExerciseError as err:
        short = ExerciseError(str(err))  # drop the internal traceback
        short.named = err.named
        raise short from None
    print(f"✅ Exercise {ex_id} passed: {summary}")


def _id_key(ex_id: str) -> tuple[int, ...]:
    return tuple(int(p) for p in ex_id.split("."))


def describe(value: Any) -> str:
    """Short description of a value for messages: shapes for tensors."""
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}".replace("torch.", "")
    if value is None:
        return "None"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(describe(v) for v in value[:4])
        return f"{type(value).__name__} of {len(value)} ({inner}{', …' if len(value) > 4 else ''})"
    return f"{type(value).__name__} {value!r}"[:120]


def expect_pair(ex: Exercise, out: Any, names: tuple[str, str], shape: str) -> tuple[Any, Any]:
    """The learner's two results, when ``out`` is a pair: else a clear failure naming ``names`` and their ``shape``."""
    if out is None:
        ex.fail("the result is None. Did you forget a `return` statement?")
    if isinstance(out, torch.Tensor) or not isinstance(out, (tuple, list)) or len(out) != 2:
        ex.fail(f"return two tensors, ({names[0]}, {names[1]}), each of shape {shape}; got {describe(out)}.")
    return out[0], out[1]


def _snapshot(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    try:
        return copy.deepcopy(value)
    except Exception:  # pragma: no cover - uncopyable objects are not compared
        return None


def _same(a: Any, b: Any) -> bool:
    """Is ``a`` (after the learner's call) still what ``b`` (a snapshot) was?"""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point():
            return bool(torch.allclose(a.detach(), b, rtol=0.0, atol=0.0, equal_nan=True))
        return bool(torch.equal(a, b))
    return True


def _parameter_names(fn: Callable, count: int) -> list[str]:
    """The learner's own names for the first ``count`` positional arguments."""
    try:
        params = [
            p.name for p in inspect.signature(fn).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    return [params[i] if i < len(params) else f"number {i + 1}" for i in range(count)]


class Exercise:
    """Helpers a checker uses; every message starts with the exercise id."""

    def __init__(self, ex_id: str, title: str) -> None:
        self.ex_id, self.title = ex_id, title
        self.inputs: dict[str, Any] = {}  # the arguments of the last call, by the learner's names

    # -- failing -------------------------------------------------------------
    def fail(self, message: str, *, named: bool = True) -> None:
        __tracebackhide__ = True
        err = ExerciseError(f"Exercise {self.ex_id} ({self.title}): {message}")
        err.named = named
        raise err

    def generator(self) -> torch.Generator:
        """A fixed random stream, so a learner sees the same inputs every run."""
        return torch.Generator().manual_seed(1000 * _id_key(self.ex_id)[0] + 10 * _id_key(self.ex_id)[-1])

    # -- calling the learner's code -----------------------------------------
    def expect_callable(self, obj: Any, what: str = "a function") -> None:
        if obj is None:
            self.fail(f"got None instead of {what}. Pass your function itself, e.g. check({self.ex_id!r}, {self.title}).")
        if not callable(obj):
            self.fail(f"expected {what}, got {describe(obj)}.")

    def call(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """Call the learner's ``fn``; turn errors and in-place edits into clear messages."""
        __tracebackhide__ = True
        self.expect_callable(fn)
        before = [_snapshot(a) for a in args]
        before_kw = {k: _snapshot(v) for k, v in kwargs.items()}
        names = _parameter_names(fn, len(args))
        self.inputs = {**dict(zip(names, args)), **kwargs}
        try:
            out = fn(*args, **kwargs)
        except NotImplementedError as err:
            if not _crashes.raised_by_learner(err):  # e.g. torch's "bincount_cpu" not implemented for 'Float'
                message, named = _crashes.explain(err, [*names, *kwargs], [*args, *kwargs.values()])
                self.fail(message, named=named)
            hint = f" ({err})" if str(err) else ""
            self.fail(
                f"not done yet: your function still raises NotImplementedError{hint}. Replace the stub with your code, then run this cell again."
            )
        except ExerciseError:
            raise
        except Exception as err:  # the learner's code crashed: say where, and what the error means
            message, named = _crashes.explain(err, [*names, *kwargs], [*args, *kwargs.values()])
            self.fail(message, named=named)
        for i, (old, new) in enumerate(zip(before, args)):
            if not _same(new, old):
                self.fail(
                    f"your function changed its input `{names[i]}` ({describe(new)}) in place. Compute a new tensor instead of writing into the input (avoid `+=`, `.add_()`, `x[...] = ...` on inputs)."
                )
        for k, old in before_kw.items():
            if not _same(kwargs[k], old):
                self.fail(
                    f"your function changed its input `{k}` in place. Compute a new tensor instead of writing into the input."
                )
        return out

    # -- looking at what came back ------------------------------------------
    def expect_tensor(
        self,
        out: Any,
        shape: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
        name: str = "the result",
        *,
        floating: bool | None = None,
        allow_nan: bool = False,
    ) -> torch.Tensor:
        __tracebackhide__ = True
        if out is None:
            self.fail(f"{name} is None. Did you forget a `return` statement?")
        if type(out).__module__ == "numpy":
            self.fail(
                f"{name} is a NumPy {type(out).__name__}; return a torch.Tensor (compute with torch, or wrap it with torch.as_tensor)."
            )
        if isinstance(out, (tuple, list)):
            self.fail(
                f"{name} should be one torch.Tensor, but it is a {describe(out)}. Return a single tensor "
                "(torch.tensor(...) or torch.stack(...) turns a list into one; return one result, not several)."
            )
        if not isinstance(out, torch.Tensor):
            self.fail(f"{name} should be a torch.Tensor, but it is a {describe(out)}.")
        if shape is not None and tuple(out.shape) != tuple(shape):
            hint = _symptoms.shape_hint(tuple(out.shape), tuple(shape))
            self.fail(f"{name} has shape {tuple(out.shape)}, expected {tuple(shape)}.{hint}", named=bool(hint))
        if dtype is not None and out.dtype != dtype:
            self.fail(_dtype_message(out, dtype, name))
        if floating is True and not out.is_floating_point():
            self.fail(
                f"{name} has dtype {out.dtype}, expected a floating-point tensor: an integer division (//) or integer inputs? Use / and float tensors.".replace(
                    "torch.", ""
                )
            )
        if out.is_floating_point() and not allow_nan and not torch.isfinite(out).all():
            bad = (~torch.isfinite(out)).nonzero()[0].tolist()
            self.fail(
                f"{name} contains NaN or inf (first at index {tuple(bad)}): 0/0, log(0), or exp() of a large number overflowing?"
            )
        return out

    def expect_int(self, out: Any, name: str = "the result") -> int:
        """A whole number as a Python int (NumPy integers too); floats and tensors are refused with a reason."""
        __tracebackhide__ = True
        if out is None:
            self.fail(f"{name} is None. Did you forget a `return` statement?")
        if isinstance(out, bool) or (isinstance(out, torch.Tensor) and out.dtype == torch.bool):
            self.fail(f"{name} should be a whole number (int), but it is a bool ({out!r}).")
        if isinstance(out, numbers.Integral):
            return int(out)
        if isinstance(out, torch.Tensor):
            what = f"a tensor ({describe(out)})"
            value = f" holding {out.item():g}" if out.numel() == 1 else ""
            self.fail(
                f"{name} should be a Python int, but it is {what}{value}. Return int(...) of it (a count is a plain number)."
            )
        if isinstance(out, float):
            detail = (
                " Its value is whole, but an int is asked for: use // for integer division, or int(...)."
                if out.is_integer()
                else " It is not even whole: a / where // belongs, or a fraction in the formula?"
            )
            self.fail(f"{name} should be an int, but it is the float {out!r}.{detail}")
        self.fail(f"{name} should be a whole number (int), but it is a {describe(out)}.")
        return 0  # unreachable

    def expect_tuple(self, out: Any, names: Sequence[str], what: str = "") -> list[Any]:
        """The learner's ``len(names)`` results, refusing a single tensor, a dict, None or a wrong count."""
        __tracebackhide__ = True
        want = f"({', '.join(names)})"
        if out is None:
            self.fail(f"the result is None. Did you forget `return {', '.join(names)}`?")
        if isinstance(out, dict):
            self.fail(f"return a tuple {want}, not a dict.")
        if isinstance(out, torch.Tensor) or not isinstance(out, (tuple, list)):
            self.fail(f"return {len(names)} things, {want}{what}; you returned one {describe(out)}.")
        if len(out) != len(names):
            self.fail(f"return {len(names)} things, {want}{what}; you returned {len(out)}: {describe(out)}.")
        return list(out)

    def expect_order(
        self, parts: Sequence[Any], expected: Sequence[Any], names: Sequence[str], *, atol: float = 1e-5, rtol: float = 1e-4
    ) -> None:
        """Fail with "swapped" if the learner's results match the expected ones in another order."""
        __tracebackhide__ = True
        if all(_close(p, e, atol, rtol) for p, e in zip(parts, expected)):
            return
        for perm in itertools.permutations(range(len(parts))):
            if perm != tuple(range(len(parts))) and all(_close(parts[i], expected[j], atol, rtol) for j, i in enumerate(perm)):
                got = ", ".join(names[j] for j in sorted(range(len(parts)), key=lambda j: perm.index(j)))
                self.fail(f"the results are in the wrong order: you returned ({got}); return ({', '.join(names)}).")

    def match(
        self,
        out: Any,
        expected: Any,
        mistakes: Iterable[Mistake] = (),
        *,
        context: str = "",
        atol: float = 1e-5,
        rtol: float = 1e-4,
        name: str = "the result",
        sizes: Mapping[str, int] | None = None,
    ) -> None:
        """Pass if ``out`` equals ``expected``; otherwise name the mistake it matches.

        First the exercise's typical mistakes (what each would return on these inputs), then
        general symptoms (transposed, double, normalised over the wrong axis, ...; ``sizes``
        names the sizes a wrong factor may be, e.g. {"N, the number of tokens": 40}), and only
        then a plain "does not match". Tensors are compared with tolerances; numbers exactly.
        """
        __tracebackhide__ = True
        if _close(out, expected, atol, rtol):
            return
        where = f"\n  ({context})" if context else ""
        for mistake in mistakes:
            if _close(out, mistake.output, atol, rtol):
                self.fail(mistake.message + where)
        symptom = _symptoms.diagnose(out, expected, sizes or {}, name, self.inputs)
        if symptom:
            self.fail(symptom[0] + where, named=symptom[1])
        self.fail(_difference(out, expected, name) + where, named=False)


def _dtype_message(out: torch.Tensor, dtype: torch.dtype, name: str) -> str:
    got, want = str(out.dtype).replace("torch.", ""), str(dtype).replace("torch.", "")
    if dtype == torch.bool and not out.is_floating_point() and bool(((out == 0) | (out == 1)).all()):
        return (
            f"{name} is a 0/1 {got} tensor, but a mask must be a bool tensor: indexing with integers picks rows by "
            "number (x[mask] gives rows 0 and 1 again and again) instead of keeping the rows where the mask is True. "
            "Build it with a comparison (e.g. position < capacity), or convert with .bool()."
        )
    if out.is_floating_point() and not dtype.is_floating_point and dtype != torch.bool:
        return (
            f"{name} has dtype {got}, expected {want}: whole numbers (counts, ids, positions) belong in an integer "
            "tensor. A division (/) turned them into floats? Use integer ops, or .long() at the end."
        )
    if dtype.is_floating_point and not out.is_floating_point():
        return f"{name} has dtype {got}, expected {want}: fractions need a float tensor. An integer division (//) or integer inputs? Use / and .float()."
    return f"{name} has dtype {got}, expected {want}."


def _close(a: Any, b: Any, atol: float, rtol: float) -> bool:
    if isinstance(b, torch.Tensor):
        if not isinstance(a, torch.Tensor) or a.shape != b.shape:
            return False
        a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
        both_nan = torch.isnan(a) & torch.isnan(b)
        return bool(((a - b).abs() <= atol + rtol * b.abs()).logical_or(both_nan).all())
    if isinstance(a, torch.Tensor):
        return a.numel() == 1 and isinstance(b, (int, float)) and _close(a.item(), b, atol, rtol)
    if isinstance(b, float) and isinstance(a, (int, float)):
        return math.isclose(a, b, rel_tol=rtol, abs_tol=atol)
    try:
        return bool(a == b)
    except Exception:  # e.g. a tuple of tensors: not equal to a number
        return False


def _difference(out: Any, expected: Any, name: str) -> str:
    if isinstance(expected, torch.Tensor) and isinstance(out, torch.Tensor) and out.shape == expected.shape:
        diff = (out.detach().double() - expected.double()).abs()
        diff = torch.nan_to_num(diff, nan=float("inf"))
        flat = int(diff.argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)) if diff.ndim else ()
        got, want = out.detach().reshape(-1)[flat].item(), expected.reshape(-1)[flat].item()
        wrong = int((diff > 1e-4 + 1e-3 * expected.double().abs()).sum())
        return (
            f"{name} does not match the reference: {wrong} of {diff.numel()} entries differ; "
            f"the largest difference is at index {idx}: you have {got:.4g}, expected {want:.4g}."
        )
    if isinstance(expected, torch.Tensor):
        return f"{name} is a {describe(out)}, expected a {describe(expected)}."
    shown = f"{out:,}" if isinstance(out, int) and not isinstance(out, bool) else repr(out)
    want = f"{expected:,}" if isinstance(expected, int) and not isinstance(expected, bool) else repr(expected)
    return f"{name} is {shown}, expected {want}."
