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
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

__all__ = ["ExerciseError", "Exercise", "check", "exercise", "REGISTRY", "Mistake"]


class ExerciseError(AssertionError):
    """A check found a problem in the learner's answer. The message says which."""

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
    run: Callable[["Exercise", Any], str]


REGISTRY: dict[str, _Entry] = {}


def exercise(ex_id: str, title: str) -> Callable:
    """Register ``fn(ex, obj) -> summary`` as the checker of exercise ``ex_id``."""

    def register(fn: Callable[["Exercise", Any], str]):
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
        raise ExerciseError(str(err)) from None  # drop the internal traceback
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
        params = [p.name for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return [params[i] if i < len(params) else f"number {i + 1}" for i in range(count)]


class Exercise:
    """Helpers a checker uses; every message starts with the exercise id."""

    def __init__(self, ex_id: str, title: str) -> None:
        self.ex_id, self.title = ex_id, title

    # -- failing -------------------------------------------------------------
    def fail(self, message: str) -> None:
        __tracebackhide__ = True
        raise ExerciseError(f"Exercise {self.ex_id} ({self.title}): {message}")

    def generator(self, salt: int = 0) -> torch.Generator:
        """A fixed random stream, so a learner sees the same inputs every run."""
        return torch.Generator().manual_seed(1000 * _id_key(self.ex_id)[0] + 10 * _id_key(self.ex_id)[-1] + salt)

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
        shown = ", ".join([describe(a) for a in args] + [f"{k}={describe(v)}" for k, v in kwargs.items()])
        try:
            out = fn(*args, **kwargs)
        except NotImplementedError as err:
            hint = f" ({err})" if str(err) else ""
            self.fail(f"not done yet: your function still raises NotImplementedError{hint}. Replace the stub with your code, then run this cell again.")
        except ExerciseError:
            raise
        except Exception as err:  # the learner's code crashed: say where and with what
            self.fail(f"your function raised {type(err).__name__}: {err}\n  It was called with: {shown}.")
        names = _parameter_names(fn, len(args))
        for i, (old, new) in enumerate(zip(before, args)):
            if not _same(new, old):
                self.fail(f"your function changed its input `{names[i]}` ({describe(new)}) in place. Compute a new tensor instead of writing into the input (avoid `+=`, `.add_()`, `x[...] = ...` on inputs).")
        for k, old in before_kw.items():
            if not _same(kwargs[k], old):
                self.fail(f"your function changed its input `{k}` in place. Compute a new tensor instead of writing into the input.")
        return out

    # -- looking at what came back ------------------------------------------
    def expect_tensor(self, out: Any, shape: Sequence[int] | None = None, dtype: torch.dtype | None = None, name: str = "the result", *, floating: bool | None = None, allow_nan: bool = False) -> torch.Tensor:
        __tracebackhide__ = True
        if out is None:
            self.fail(f"{name} is None. Did you forget a `return` statement?")
        if not isinstance(out, torch.Tensor):
            self.fail(f"{name} should be a torch.Tensor, but it is a {describe(out)}.")
        if shape is not None and tuple(out.shape) != tuple(shape):
            self.fail(f"{name} has shape {tuple(out.shape)}, expected {tuple(shape)}.")
        if dtype is not None and out.dtype != dtype:
            self.fail(f"{name} has dtype {out.dtype}, expected {dtype}.".replace("torch.", ""))
        if floating is True and not out.is_floating_point():
            self.fail(f"{name} has dtype {out.dtype}, expected a floating-point tensor.".replace("torch.", ""))
        if out.is_floating_point() and not allow_nan and not torch.isfinite(out).all():
            bad = (~torch.isfinite(out)).nonzero()[0].tolist()
            self.fail(f"{name} contains NaN or inf (first at index {tuple(bad)}).")
        return out

    def expect_int(self, out: Any, name: str = "the result") -> int:
        __tracebackhide__ = True
        if out is None:
            self.fail(f"{name} is None. Did you forget a `return` statement?")
        if isinstance(out, torch.Tensor) and out.numel() == 1 and not out.is_floating_point():
            out = int(out.item())
        if isinstance(out, float) and out.is_integer():
            out = int(out)
        if isinstance(out, bool) or not isinstance(out, int):
            self.fail(f"{name} should be a whole number (int), but it is a {describe(out)}.")
        return out

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
    ) -> None:
        """Pass if ``out`` equals ``expected``; otherwise name the mistake it matches.

        Tensors are compared with tolerances; numbers exactly.
        """
        __tracebackhide__ = True
        if _close(out, expected, atol, rtol):
            return
        for mistake in mistakes:
            if _close(out, mistake.output, atol, rtol):
                self.fail(mistake.message + (f"\n  ({context})" if context else ""))
        self.fail(_difference(out, expected, name) + (f"\n  ({context})" if context else ""))


def _close(a: Any, b: Any, atol: float, rtol: float) -> bool:
    if isinstance(b, torch.Tensor):
        if not isinstance(a, torch.Tensor) or a.shape != b.shape:
            return False
        a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
        both_nan = torch.isnan(a) & torch.isnan(b)
        return bool(((a - b).abs() <= atol + rtol * b.abs()).logical_or(both_nan).all())
    if isinstance(b, float) and isinstance(a, (int, float)):
        return math.isclose(a, b, rel_tol=rtol, abs_tol=atol)
    return a == b


def _difference(out: Any, expected: Any, name: str) -> str:
    if isinstance(expected, torch.Tensor) and isinstance(out, torch.Tensor):
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
    return f"{name} is {out!r}, expected {expected!r}."
