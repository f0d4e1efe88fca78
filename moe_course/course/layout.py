"""Where things are: the course folder, its lessons and exercises, and the cell that holds each answer.

The list of exercises comes from ``solutions/NN_topic.py`` (the single source):
``### BEGIN SOLUTION N.M: task`` markers, ``## Exercise N.M · Title`` headings and
``check("N.M", name)`` calls. A learner's notebook is read as plain JSON, so
nothing here needs torch, nbformat or a kernel.

The *answer cell* of exercise N.M is the code cell, before N.M's check cell, that
defines the checked name (``def name(``). Finding it by what it defines (not by
its position or cell id) keeps working when a learner adds scratch cells or when
a course update inserts new cells.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATE_DIR = ".moe-course"  # the learner's check results and logs (git ignores it; JupyterLab hides it)
BACKUPS = "backups"  # exercises/backups/: every version of a learner's notebook that a command replaced

BEGIN = re.compile(r"^(?P<indent>[ \t]*)### BEGIN SOLUTION(?:\s+(?P<id>\d+\.\d+)\s*:\s*(?P<task>.*?))?\s*$")
END = re.compile(r"^[ \t]*### END SOLUTION\s*$")
CHECK_CALL = re.compile(r"""check\(\s*["'](?P<id>\d+\.\d+)["']""")
CHECK_NAME = re.compile(r"""check\(\s*["'](?P<id>\d+\.\d+)["']\s*,\s*(?P<name>[A-Za-z_]\w*)""")
EXERCISE_HEADING = re.compile(r"^#\s*##\s*Exercise\s+(?P<id>\d+\.\d+)\s*[·:.-]?\s*(?P<title>.*?)\s*$")
LESSON_HEADING = re.compile(r"^#\s*#\s+(?P<title>.*?)\s*$")
STUB = re.compile(r"""NotImplementedError\(\s*["']Exercise (?P<id>\d+\.\d+):""")


class CourseError(ValueError):
    """Something about the course folder or a command's arguments is wrong; the message says what to do."""


def find_root(start: Path | None = None) -> Path:
    """The course folder: the nearest parent holding solutions/ and pyproject.toml."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "solutions").is_dir() and (folder / "pyproject.toml").exists():
            return folder
    raise CourseError(
        f"could not find the course folder (with solutions/ and pyproject.toml) above {here}: "
        "run the command inside the course folder, or pass --root"
    )


@dataclass(frozen=True)
class ExerciseInfo:
    ex_id: str  # "N.M"
    stem: str  # the lesson's notebook name, e.g. "01_mlp"
    name: str  # what the check cell checks, e.g. "feed_forward"
    title: str  # from the heading "## Exercise N.M · Title"
    task: str  # the stub's text, from "### BEGIN SOLUTION N.M: task"

    @property
    def key(self) -> tuple[int, ...]:
        return id_key(self.ex_id)


@dataclass(frozen=True)
class Lesson:
    stem: str  # "01_mlp"
    title: str  # "The feed-forward block"
    exercises: tuple[ExerciseInfo, ...]

    @property
    def number(self) -> str:
        return self.stem[:2]

    def notebook(self, root: Path) -> Path:
        return root / "exercises" / f"{self.stem}.ipynb"


def id_key(ex_id: str) -> tuple[int, ...]:
    return tuple(int(p) for p in ex_id.split("."))


def _comment_text(line: str) -> str:
    return line[1:].strip() if line.startswith("#") else line.strip()


def read_lesson(path: Path) -> Lesson:
    """A lesson's exercises from its solution notebook ``solutions/NN_topic.py`` (py:percent text)."""
    text = path.read_text(encoding="utf-8")
    title, headings, tasks, names = path.stem, {}, {}, {}
    for line in text.splitlines():
        if (m := LESSON_HEADING.match(line)) and title == path.stem:
            title = re.sub(r"^Exercises\s+\d+\s*[·:-]\s*", "", m.group("title"))
        elif m := EXERCISE_HEADING.match(line):
            headings.setdefault(m.group("id"), m.group("title"))
        elif (m := BEGIN.match(line)) and m.group("id"):
            tasks.setdefault(m.group("id"), m.group("task").strip())
        for m in CHECK_NAME.finditer(line):
            names.setdefault(m.group("id"), m.group("name"))
    ids = sorted(set(tasks) | set(names), key=id_key)
    exercises = tuple(
        ExerciseInfo(i, path.stem, names.get(i, "?"), headings.get(i) or tasks.get(i, ""), tasks.get(i, "")) for i in ids
    )
    return Lesson(path.stem, title, exercises)


def lessons(root: Path) -> list[Lesson]:
    """Every lesson with exercises, in order."""
    sources = sorted((root / "solutions").glob("[0-9][0-9]_*.py"))
    if not sources:
        raise CourseError(f"no solution notebooks in {root / 'solutions'}: is this the course folder?")
    return [lesson for lesson in map(read_lesson, sources) if lesson.exercises]


def select(all_lessons: Sequence[Lesson], targets: Iterable[str]) -> list[tuple[Lesson, ExerciseInfo | None]]:
    """Resolve command-line targets: '1', '01', '01_mlp' (a whole lesson) or '1.2' (one exercise).

    Returns (lesson, None) for a lesson and (lesson, exercise) for one exercise, in the order given.
    """
    chosen: list[tuple[Lesson, ExerciseInfo | None]] = []
    for target in targets:
        target = target.strip()
        if re.fullmatch(r"\d+\.\d+", target):
            found = [(lesson, e) for lesson in all_lessons for e in lesson.exercises if e.key == id_key(target)]
            if not found:
                known = ", ".join(e.ex_id for lesson in all_lessons for e in lesson.exercises)
                raise CourseError(f"there is no exercise {target}; the exercises are {known}")
            pick = found[0]
        else:
            key = target.zfill(2) if target.isdigit() else target
            matches = [lesson for lesson in all_lessons if key and lesson.stem.startswith(key)]
            if not matches:
                known = ", ".join(lesson.number for lesson in all_lessons)
                raise CourseError(f"no lesson matches {target!r}; the lessons with exercises are {known}")
            pick = (matches[0], None)
        if pick not in chosen:
            chosen.append(pick)
    return chosen


# -- reading a notebook as JSON ---------------------------------------------------------


def read_notebook(path: Path) -> dict[str, Any]:
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CourseError(f"{path} cannot be read as a notebook ({err})") from None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise CourseError(f"{path} is not a notebook (no list of cells)")
    return nb


def source(cell: Mapping[str, Any]) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def is_code(cell: Mapping[str, Any]) -> bool:
    return cell.get("cell_type") == "code"


def check_ids(cell: Mapping[str, Any]) -> list[str]:
    """The exercises a code cell checks (``check("N.M", ...)``); empty for other cells."""
    return [m.group("id") for m in CHECK_CALL.finditer(source(cell))] if is_code(cell) else []


def check_cell(cells: Sequence[Mapping[str, Any]], ex_id: str) -> int | None:
    return next((i for i, c in enumerate(cells) if ex_id in check_ids(c)), None)


def span(cells: Sequence[Mapping[str, Any]], ex_id: str) -> list[int]:
    """Indices of the code cells that belong to exercise ``ex_id``: after the previous check cell, up to its own."""
    end = check_cell(cells, ex_id)
    if end is None:
        return []
    start = max((i for i in range(end) if check_ids(cells[i])), default=-1) + 1
    return [i for i in range(start, end + 1) if is_code(cells[i])]


def answer_cell(cells: Sequence[Mapping[str, Any]], ex_id: str, name: str, cell_id: str | None = None) -> int | None:
    """The index of the code cell holding the answer to ``ex_id``: the last one in its span that defines ``name``."""
    defines = re.compile(rf"^\s*(?:async\s+)?(?:def|class)\s+{re.escape(name)}\b|^{re.escape(name)}\s*=", re.M)
    within = span(cells, ex_id) or range(len(cells))  # its check cell lost: look everywhere
    candidates = [i for i in within if is_code(cells[i]) and not check_ids(cells[i])]
    for i in reversed(candidates):
        if defines.search(source(cells[i])):
            return i
    return next((i for i in candidates if cell_id and cells[i].get("id") == cell_id), None)


def fingerprint(cells: Iterable[Mapping[str, Any]]) -> str:
    """A hash of what a learner writes: the cell types and sources (not outputs)."""
    h = hashlib.sha256()
    for cell in cells:
        h.update(str(cell.get("cell_type", "")).encode() + b"\0" + source(cell).strip().encode() + b"\0\0")
    return h.hexdigest()


def exercise_fingerprint(cells: Sequence[Mapping[str, Any]], ex_id: str) -> str:
    return fingerprint(cells[i] for i in span(cells, ex_id))


def is_stub(cells: Sequence[Mapping[str, Any]], ex_id: str) -> bool:
    """Does exercise ``ex_id`` still hold its stub (raise NotImplementedError("Exercise N.M: ..."))?"""
    return any(m.group("id") == ex_id for i in span(cells, ex_id) for m in STUB.finditer(source(cells[i])))
