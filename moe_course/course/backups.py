"""``moe-course reset`` and ``moe-course restore``: back to the stub, and back again.

Every command that replaces a learner's notebook first copies it to
``exercises/backups/NN_topic.<date>-<time>.ipynb``. ``reset NN`` writes the
lesson's notebook afresh from ``solutions/``; ``reset N.M`` puts only exercise
N.M's cell back to its stub (and its check cell, if it was lost), keeping the rest
of the notebook. ``restore NN`` brings back the newest backup of a lesson;
``restore N.M`` brings back only that exercise's answer from the newest backup
that holds one.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import jupytext
import nbformat

from ..exercises.build import FINGERPRINTS, _targets, _write_text, backup_path, fingerprint, timestamp
from . import results
from .layout import BACKUPS, CourseError, ExerciseInfo, Lesson, answer_cell, check_cell, is_stub, source

RELOAD = "If that notebook is open in JupyterLab, reload it (File › Reload Notebook from Disk) before you save it there."
BACKUP_NAME = re.compile(r"^(?P<stem>\d\d_[^.]+)\.(?P<stamp>\d{8}-\d{6})(?:-(?P<n>\d+))?\.(?P<ext>ipynb|py)$")


@dataclass(frozen=True)
class Backup:
    path: Path
    stem: str
    when: _dt.datetime
    n: int

    @property
    def order(self) -> tuple[_dt.datetime, int]:
        return self.when, self.n


def backups(root: Path, stem: str | None = None) -> list[Backup]:
    """Backups in exercises/backups/, newest first (of one lesson if ``stem`` is given)."""
    found = []
    for path in (root / "exercises" / BACKUPS).glob("*"):
        m = BACKUP_NAME.match(path.name)
        if m and (stem is None or m.group("stem") == stem):
            when = _dt.datetime.strptime(m.group("stamp"), "%Y%m%d-%H%M%S")
            found.append(Backup(path, m.group("stem"), when, int(m.group("n") or 1)))
    return sorted(found, key=lambda b: b.order, reverse=True)


def read_any(path: Path) -> nbformat.NotebookNode:
    """A notebook from an .ipynb, or from an old exercise's .py twin (as a notebook without pairing)."""
    try:
        nb = jupytext.read(path) if path.suffix == ".py" else nbformat.read(path, as_version=4)
    except Exception as err:  # a broken file: say which and how to go on
        raise CourseError(f"{path} cannot be read as a notebook ({type(err).__name__}: {err})") from None
    nb.metadata.pop("jupytext", None)
    return nb


def generated(root: Path, lesson: Lesson) -> nbformat.NotebookNode:
    """The lesson's exercise notebook as solutions/ generates it today."""
    return _targets(root, lesson.stem)[lesson.stem]


def save_with_backup(root: Path, lesson: Lesson, nb: nbformat.NotebookNode, *, stamp: str) -> Path | None:
    """Write ``nb`` as the lesson's exercise notebook, first copying the current file to backups/ (returned)."""
    path = lesson.notebook(root)
    saved = None
    if path.exists():
        saved = backup_path(root / "exercises", lesson.stem, stamp)
        shutil.copy2(path, saved)
    path.write_text(_write_text(nb), encoding="utf-8")
    return saved


def _pristine(root: Path, lesson: Lesson) -> bool:
    """Is the learner's notebook exactly as generated (nothing of theirs to back up)?"""
    path = lesson.notebook(root)
    try:
        return fingerprint(read_any(path)) == fingerprint(generated(root, lesson))
    except CourseError:
        return False


def _record_generated(root: Path, lesson: Lesson, nb: nbformat.NotebookNode) -> None:
    """Keep exercises/.fingerprints.json right, so `moe-exercises build` sees the fresh notebook as unedited."""
    path = root / "exercises" / FINGERPRINTS
    prints = json.loads(path.read_text()) if path.exists() else {}
    name = f"{lesson.stem}.ipynb"
    if prints.get(name) != fingerprint(nb):
        prints[name] = fingerprint(nb)
        path.write_text(json.dumps(dict(sorted(prints.items())), indent=1) + "\n")


def _cell_of(cells: list, info: ExerciseInfo, like: nbformat.NotebookNode | None = None) -> int | None:
    return answer_cell(cells, info.ex_id, info.name, like.get("id") if like is not None else None)


def _fresh(cell: nbformat.NotebookNode) -> nbformat.NotebookNode:
    cell = nbformat.from_dict(json.loads(json.dumps(cell)))
    if cell.cell_type == "code":
        cell.outputs, cell.execution_count = [], None
    return cell


def put_exercise(target: nbformat.NotebookNode, donor: nbformat.NotebookNode, info: ExerciseInfo) -> bool:
    """Put exercise ``info``'s answer cell (and check cell, if missing) of ``donor`` into ``target``; True if changed."""
    d_answer, d_check = _cell_of(donor.cells, info), check_cell(donor.cells, info.ex_id)
    if d_answer is None:
        raise CourseError(f"exercise {info.ex_id}'s cell (the one defining `{info.name}`) is not in the source notebook")
    new = _fresh(donor.cells[d_answer])
    t_answer = _cell_of(target.cells, info, new)
    t_check = check_cell(target.cells, info.ex_id)
    changed = False
    if t_answer is not None:
        if source(target.cells[t_answer]) != source(new):
            new["id"] = target.cells[t_answer].get("id", new.get("id"))
            target.cells[t_answer] = new
            changed = True
    elif t_check is not None:
        target.cells.insert(t_check, new)
        t_answer, t_check, changed = t_check, t_check + 1, True
    else:
        raise CourseError(
            f"exercise {info.ex_id} is not in your notebook any more (neither its cell nor its check cell); "
            f"`moe-course reset {info.stem[:2]}` writes the whole notebook afresh (yours is backed up first)"
        )
    if t_check is None and d_check is not None:
        target.cells.insert(t_answer + 1, _fresh(donor.cells[d_check]))
        changed = True
    return changed


def reset(root: Path, picks: list[tuple[Lesson, ExerciseInfo | None]], *, now: _dt.datetime | None = None) -> list[str]:
    """Put lessons or single exercises back to their stubs; returns what was done, one line each."""
    stamp, lines = timestamp(now), []
    for lesson, info in picks:
        path, rel = lesson.notebook(root), f"exercises/{lesson.stem}.ipynb"
        fresh = generated(root, lesson)
        if info is None:  # the whole notebook
            if path.exists() and path.read_text(encoding="utf-8") == _write_text(fresh):
                lines.append(f"{rel} is already as generated: nothing to reset.")
                continue
            saved = None if (path.exists() and _pristine(root, lesson)) else save_with_backup(root, lesson, fresh, stamp=stamp)
            if saved is None:
                path.write_text(_write_text(fresh), encoding="utf-8")
            _record_generated(root, lesson, fresh)
            results.forget(root, [e.ex_id for e in lesson.exercises])
            lines.append(
                f"{rel} is fresh from solutions/: every exercise of lesson {lesson.number} is back to its stub."
                + (f" Your version: {saved.relative_to(root)}." if saved else "")
            )
            continue
        if not path.exists():
            raise CourseError(f"{rel} is missing: `moe-course reset {lesson.number}` makes a fresh one")
        mine = read_any(path)
        if not put_exercise(mine, fresh, info):
            lines.append(f"Exercise {info.ex_id} is already at its stub in {rel}: nothing to reset.")
            continue
        saved = save_with_backup(root, lesson, mine, stamp=stamp)
        results.forget(root, [info.ex_id])
        lines.append(
            f"Exercise {info.ex_id} ({info.name}) is back to its stub in {rel}; the rest of the notebook is as you "
            f"left it. Your version: {saved.relative_to(root)} (`moe-course restore {info.ex_id}` brings it back)."
        )
    if any("Your version" in line for line in lines):
        lines.append(RELOAD)
    return lines


def _describe(root: Path, backup: Backup, lesson: Lesson | None) -> str:
    age = _dt.datetime.now() - backup.when
    ago = (
        f"{age.days} days ago"
        if age.days
        else (f"{age.seconds // 3600} h ago" if age.seconds >= 3600 else f"{age.seconds // 60} min ago")
    )
    done = ""
    if lesson is not None:
        try:
            cells = read_any(backup.path).cells
            answered = [e.ex_id for e in lesson.exercises if _cell_of(cells, e) is not None and not is_stub(cells, e.ex_id)]
            done = f"; answers to {', '.join(answered)}" if answered else "; no answers"
        except CourseError:
            done = "; unreadable"
    return f"  {backup.path.relative_to(root)}  ({backup.when:%Y-%m-%d %H:%M}, {ago}{done})"


def listing(root: Path, lessons: list[Lesson]) -> list[str]:
    found = backups(root)
    if not found:
        return [
            "No backups yet: exercises/backups/ is empty. (reset, restore, update and `moe-exercises build --force` "
            "save your notebook there before they replace it.)"
        ]
    by_stem = {lesson.stem: lesson for lesson in lessons}
    lines = ["Backups, newest first:"] + [_describe(root, b, by_stem.get(b.stem)) for b in found]
    lines.append(
        "`moe-course restore NN` brings back a lesson's newest backup, `restore N.M` one exercise's answer, "
        "`restore --from FILE` a chosen backup. The notebook it replaces is backed up first."
    )
    return lines


def restore(
    root: Path,
    picks: list[tuple[Lesson, ExerciseInfo | None]],
    *,
    source_file: Path | None = None,
    now: _dt.datetime | None = None,
) -> list[str]:
    """Bring back a backup: a whole lesson's notebook, or one exercise's answer."""
    stamp, lines = timestamp(now), []
    for lesson, info in picks:
        rel = f"exercises/{lesson.stem}.ipynb"
        if source_file is not None:
            candidates = [source_file]
        else:
            candidates = [b.path for b in backups(root, lesson.stem)]
        if not candidates:
            raise CourseError(f"there is no backup of lesson {lesson.number} in exercises/{BACKUPS}/")
        if info is None:
            chosen = candidates[0]
            nb = read_any(chosen)
            if lesson.notebook(root).exists() and _pristine(root, lesson):
                lesson.notebook(root).write_text(_write_text(nb), encoding="utf-8")
                saved = None
            else:
                saved = save_with_backup(root, lesson, nb, stamp=stamp)
            lines.append(
                f"{rel} is back as in {chosen.relative_to(root) if chosen.is_relative_to(root) else chosen}."
                + (f" The version it replaced: {saved.relative_to(root)}." if saved else "")
            )
            continue
        mine = read_any(lesson.notebook(root)) if lesson.notebook(root).exists() else generated(root, lesson)
        for path in candidates:  # the newest backup that holds an answer to this exercise, different from the current one
            donor = read_any(path)
            if _cell_of(donor.cells, info) is None or is_stub(donor.cells, info.ex_id):
                continue
            if put_exercise(mine, donor, info):
                saved = save_with_backup(root, lesson, mine, stamp=stamp)
                results.forget(root, [info.ex_id])
                lines.append(
                    f"Exercise {info.ex_id} ({info.name}) is back in {rel} from {path.relative_to(root) if path.is_relative_to(root) else path}; "
                    f"the rest of the notebook is as it was. The version it replaced: {saved.relative_to(root)}."
                )
                break
        else:
            raise CourseError(
                f"no backup of lesson {lesson.number} holds an answer to exercise {info.ex_id} different from the one in {rel}"
            )
    lines.append(RELOAD)
    return lines
