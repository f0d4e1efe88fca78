"""``moe-course progress``: every lesson and exercise at a glance, without running anything.

An exercise shows its last check result while its cells are what was checked.
Otherwise the notebook itself tells: a stub still in place is "not started",
anything else is "changed since the last check" (or "not checked yet").
"""

from __future__ import annotations

import datetime as _dt
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from . import results
from .layout import CourseError, ExerciseInfo, Lesson, check_cell, exercise_fingerprint, is_stub, read_notebook
from .results import FAILED, NOT_STARTED, PASSED, SYMBOL

TO_CHECK = "to check"
SYMBOLS = {**SYMBOL, TO_CHECK: "✎"}


@dataclass(frozen=True)
class Row:
    info: ExerciseInfo
    status: str  # PASSED, FAILED, NOT_STARTED or TO_CHECK
    note: str


def exercise_row(info: ExerciseInfo, cells: list[dict[str, Any]] | None, problem: str, last: dict[str, Any] | None) -> Row:
    if cells is None:
        return Row(info, FAILED, problem)
    if check_cell(cells, info.ex_id) is None:
        return Row(info, FAILED, f"its check cell is missing: `moe-course reset {info.ex_id}` puts it back (your answer is kept)")
    if last and last.get("fingerprint") == exercise_fingerprint(cells, info.ex_id):
        status = last.get("status", FAILED)
        return Row(info, status, last.get("message", "") if status == FAILED else "")
    if is_stub(cells, info.ex_id):
        return Row(info, NOT_STARTED, "")
    lesson = info.stem[:2]
    if last:
        return Row(info, TO_CHECK, f"changed since the last check: `moe-course check {lesson}`")
    return Row(info, TO_CHECK, f"started, not checked yet: `moe-course check {lesson}`")


def lesson_rows(root: Path, lesson: Lesson, stored: dict[str, dict[str, Any]]) -> list[Row]:
    path = lesson.notebook(root)
    cells, problem = None, ""
    if not path.exists():
        problem = f"exercises/{lesson.stem}.ipynb is missing: `moe-course reset {lesson.number}` makes a fresh one"
    else:
        try:
            cells = read_notebook(path)["cells"]
        except CourseError as err:
            problem = f"{err}; `moe-course restore {lesson.number}` brings back a backup"
    return [exercise_row(e, cells, problem, stored.get(e.ex_id)) for e in lesson.exercises]


def show(root: Path, lessons: list[Lesson], out: TextIO | None = None) -> int:
    out = out or sys.stdout
    stored = results.load(root)
    counts = {PASSED: 0, FAILED: 0, TO_CHECK: 0, NOT_STARTED: 0}
    upcoming: Row | None = None
    width = max(len(e.name) for lesson in lessons for e in lesson.exercises)
    for lesson in lessons:
        rows = lesson_rows(root, lesson, stored)
        done = sum(r.status == PASSED for r in rows)
        print(f"{lesson.number} {lesson.title}  ({done}/{len(rows)})", file=out)
        for row in rows:
            counts[row.status] += 1
            if upcoming is None and row.status != PASSED:
                upcoming = row
            note = f"  {row.note}" if row.note else ""
            print(
                f"  {SYMBOLS[row.status]} {row.info.ex_id:<4} {row.info.name:<{width}}  {row.info.title}{note}".rstrip(), file=out
            )
    total = sum(counts.values())
    print(
        f"\n{counts[PASSED]} of {total} exercises passed · {counts[FAILED]} failing · {counts[TO_CHECK]} to check · "
        f"{counts[NOT_STARTED]} not started",
        file=out,
    )
    checked = [v.get("checked_at", "") for v in stored.values()]
    if checked:
        when = _dt.datetime.fromisoformat(max(checked)).strftime("%Y-%m-%d %H:%M")
        print(f"Last check: {when}. The symbols: ✅ passed, ❌ failed, ✎ to check, · not started.", file=out)
    else:
        print(
            "No check has run yet: `moe-course check 00` checks the first notebook. "
            "The symbols: ✅ passed, ❌ failed, ✎ to check, · not started.",
            file=out,
        )
    if upcoming is not None:
        print(f"Next: exercise {upcoming.info.ex_id} ({upcoming.info.name}) in exercises/{upcoming.info.stem}.ipynb", file=out)
    else:
        print("Every exercise passed. Well done!", file=out)
    return 0
