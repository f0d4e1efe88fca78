"""From nbval's cell outcomes to one result per exercise, and the last results of every exercise.

nbval runs a notebook cell by cell. An exercise passed when its check cell
passed. It is *not started* when its check says so (the stub still raises
NotImplementedError, which the check turns into an ExerciseError saying "not
done yet"). Otherwise it failed, and the message is the checker's, or the error
of the learner's own cell when that cell failed first (a SyntaxError, say).

The last result of every exercise is kept in ``.moe-course/results.json``, with
a fingerprint of the exercise's cells at the time, so ``moe-course progress``
can tell "passed" from "changed since it passed" without running anything.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .layout import STATE_DIR

PASSED, FAILED, NOT_STARTED = "passed", "failed", "not started"
SYMBOL = {PASSED: "✅", FAILED: "❌", NOT_STARTED: "·"}
NOT_DONE = "not done yet"  # the checker's words for a stub (see moe_course.checks._core.Exercise.call)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
RESULTS = "results.json"


@dataclass(frozen=True)
class CellOutcome:
    number: int  # nbval's "Cell k": k counts code cells only
    checks: tuple[str, ...]  # the exercise ids this cell checks (empty for other cells)
    outcome: str  # "passed", "failed" or "skipped"
    ename: str = ""  # the exception's class, e.g. "ExerciseError"
    evalue: str = ""  # the exception's message
    fingerprint: str = ""  # for check cells: the exercise's cells when it ran


@dataclass(frozen=True)
class ExerciseResult:
    ex_id: str
    status: str  # PASSED, FAILED or NOT_STARTED
    message: str  # one line for the summary ("" when passed)
    cell: int  # nbval's cell number of the check cell
    fingerprint: str = ""


def one_line(text: str, ex_id: str = "") -> str:
    """The first line of an error message, without colour codes or the 'Exercise N.M (name): ' prefix."""
    text = ANSI.sub("", text).strip()
    first = text.splitlines()[0].strip() if text else ""
    first = re.sub(r"\(\d+\.py, line (\d+)\)", r"(line \1)", first)  # IPython's temporary file name says nothing
    if ex_id:
        first = re.sub(rf"^Exercise {re.escape(ex_id)}(?: \([^)]*\))?:\s*", "", first)
    return first


def exercise_results(cells: Sequence[CellOutcome]) -> list[ExerciseResult]:
    """One result per check cell, in notebook order."""
    results = []
    earlier_failure: CellOutcome | None = None  # a failed cell of the learner's since the previous check cell
    for cell in cells:
        if not cell.checks:
            if cell.outcome == "failed" and earlier_failure is None:
                earlier_failure = cell
            continue
        for ex_id in cell.checks:
            if cell.outcome == "passed":
                results.append(ExerciseResult(ex_id, PASSED, "", cell.number, cell.fingerprint))
            elif cell.ename == "ExerciseError" and one_line(cell.evalue, ex_id).startswith(NOT_DONE):
                results.append(
                    ExerciseResult(
                        ex_id,
                        NOT_STARTED,
                        "not started: its stub still raises NotImplementedError",
                        cell.number,
                        cell.fingerprint,
                    )
                )
            elif earlier_failure is not None:
                what = f"{earlier_failure.ename}: {one_line(earlier_failure.evalue)}" if earlier_failure.ename else "an error"
                results.append(
                    ExerciseResult(
                        ex_id, FAILED, f"your code (cell {earlier_failure.number}) raised {what}", cell.number, cell.fingerprint
                    )
                )
            elif cell.outcome == "skipped":
                results.append(
                    ExerciseResult(
                        ex_id,
                        FAILED,
                        "its check cell did not run (an earlier cell timed out or the kernel died)",
                        cell.number,
                        cell.fingerprint,
                    )
                )
            elif cell.ename == "ExerciseError":
                results.append(ExerciseResult(ex_id, FAILED, one_line(cell.evalue, ex_id), cell.number, cell.fingerprint))
            else:
                what = f"{cell.ename}: {one_line(cell.evalue)}" if cell.ename else "the check cell failed"
                results.append(ExerciseResult(ex_id, FAILED, f"the check cell raised {what}", cell.number, cell.fingerprint))
        earlier_failure = None
    return results


# -- the last results, kept between runs ------------------------------------------------------


def results_path(root: Path) -> Path:
    return root / STATE_DIR / RESULTS


def load(root: Path) -> dict[str, dict[str, Any]]:
    """exercise id -> {status, message, checked_at, fingerprint, notebook}; empty if never checked (or unreadable)."""
    try:
        data = json.loads(results_path(root).read_text(encoding="utf-8"))
        return dict(data.get("exercises", {}))
    except (OSError, ValueError, AttributeError):
        return {}


def save(root: Path, notebook: str, results: Sequence[ExerciseResult], now: _dt.datetime | None = None) -> None:
    """Record the results of one notebook's check run (other exercises keep their last results)."""
    stored = load(root)
    stamp = (now or _dt.datetime.now()).isoformat(timespec="seconds")
    for r in results:
        entry = asdict(r)
        entry.pop("ex_id")
        stored[r.ex_id] = {**entry, "checked_at": stamp, "notebook": notebook}
    _write(root, stored)


def forget(root: Path, ex_ids: Sequence[str]) -> None:
    """Drop the results of exercises that were reset (their last result no longer describes them)."""
    stored = load(root)
    if any(i in stored for i in ex_ids):
        _write(root, {k: v for k, v in stored.items() if k not in ex_ids})


def _write(root: Path, stored: dict[str, Any]) -> None:
    path = results_path(root)
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(
        json.dumps({"version": 1, "exercises": dict(sorted(stored.items()))}, indent=1, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    tmp.replace(path)
