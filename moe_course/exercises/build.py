"""Generate ``exercises/`` from ``solutions/`` (the single source).

In a solution notebook every answer sits between two marker lines::

    def feed_forward(x, w_in, b_in, w_out, b_out):
        ### BEGIN SOLUTION 1.1: compute act(x W_in + b_in) W_out + b_out
        h = F.gelu(x @ w_in + b_in)
        return h @ w_out + b_out
        ### END SOLUTION

``build`` copies each notebook and turns every marked region into a stub at
the same indentation::

        raise NotImplementedError("Exercise 1.1: compute act(x W_in + b_in) W_out + b_out")

Everything outside the markers (instructions, hints, check cells) is kept.
Exercise notebooks are written as ``.ipynb`` only: they are the learner's
files, and a paired ``.py`` twin could disagree with them (a check reads the
``.ipynb``). ``exercises/jupytext.toml`` switches jupytext's pairing off there,
while lessons and solutions stay paired. Each written exercise gets a
fingerprint of its cell sources in ``exercises/.fingerprints.json``; if a
learner has edited an exercise since it was generated, ``build`` keeps it and
says how to regenerate anyway (``--force`` saves a timestamped copy under
``exercises/backups/`` first).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
import shutil
from collections.abc import Container
from dataclasses import dataclass, field
from pathlib import Path

import jupytext
import nbformat

from ..course.layout import BACKUPS, BEGIN, CHECK_CALL, END, CourseError, find_root
from ..course.layout import fingerprint as _fingerprint_cells

__all__ = [
    "BuildError",
    "Region",
    "stub_source",
    "exercise_notebook",
    "fingerprint",
    "build",
    "status",
    "find_root",
]

FINGERPRINTS = ".fingerprints.json"
# jupytext pairs every notebook (the course's jupytext.toml); this file, the
# nearest configuration for exercises/, turns that off for the learner's notebooks.
JUPYTEXT_TOML = "jupytext.toml"  # not hidden: JupyterLab's jupytext ignores hidden config files
UNPAIRED_CONFIG = (
    "# Exercise notebooks are the learner's files: .ipynb only, never paired with a .py\n"
    "# (lessons and solutions are paired by the course's top-level jupytext.toml).\n"
    'formats = "ipynb"\n'
)


class BuildError(CourseError):
    """A solution notebook breaks the marker rules; the message says where."""


@dataclass(frozen=True)
class Region:
    ex_id: str  # "N.M"
    task: str  # what the learner has to do, shown in the stub's message
    cell: int  # index of the cell in the notebook
    line: int  # 1-based line of the BEGIN marker in that cell


def stub_source(source: str, *, where: str = "", stub_only: Container[str] | None = None) -> tuple[str, list[Region]]:
    """Replace each marked region of one cell's source by a stub; return it and the regions.

    stub_only: stub only the exercises with these ids and keep the others'
    answers (without their markers); the tests use it to solve all but one.
    """
    out: list[str] = []
    regions: list[Region] = []
    inside: re.Match | None = None
    keep = False
    for number, line in enumerate(source.split("\n"), start=1):
        begin, end = BEGIN.match(line), END.match(line)
        if begin:
            if inside:
                raise BuildError(f"{where} line {number}: BEGIN SOLUTION inside another solution region")
            if not begin.group("id"):
                raise BuildError(
                    f"{where} line {number}: a BEGIN SOLUTION marker needs an exercise id and a task, "
                    f"e.g. '### BEGIN SOLUTION 1.2: count the parameters'"
                )
            inside = begin
            task = begin.group("task").strip()
            if not task:
                raise BuildError(f"{where} line {number}: say what to do after 'BEGIN SOLUTION {begin.group('id')}:'")
            regions.append(Region(begin.group("id"), task, -1, number))
            keep = stub_only is not None and begin.group("id") not in stub_only
            if not keep:
                message = json.dumps(f"Exercise {begin.group('id')}: {task}", ensure_ascii=False)
                out.append(f"{begin.group('indent')}raise NotImplementedError({message})")
        elif end:
            if not inside:
                raise BuildError(f"{where} line {number}: END SOLUTION without a BEGIN SOLUTION")
            inside = None
        elif not inside or keep:
            out.append(line)
    if inside:
        raise BuildError(f"{where}: BEGIN SOLUTION {inside.group('id')} is never closed by '### END SOLUTION'")
    return "\n".join(out), regions


def _cell_id(stem: str, index: int) -> str:
    return hashlib.sha1(f"{stem}:{index}".encode()).hexdigest()[:8]


def exercise_notebook(
    solution: nbformat.NotebookNode, stem: str, *, stub_only: Container[str] | None = None
) -> tuple[nbformat.NotebookNode, list[Region]]:
    """The exercise version of a solution notebook, and the regions it stubbed."""
    nb = nbformat.from_dict(json.loads(json.dumps(solution)))  # deep copy
    nb.metadata.pop("jupytext", None)  # the learner's notebook is not paired with a text file
    regions: list[Region] = []
    for index, cell in enumerate(nb.cells):
        cell["id"] = _cell_id(stem, index)  # deterministic, so regeneration is reproducible
        if cell.cell_type != "code":
            continue
        new, found = stub_source(cell.source, where=f"{stem} cell {index}", stub_only=stub_only)
        cell.source = new
        cell.outputs, cell.execution_count = [], None
        regions += [Region(r.ex_id, r.task, index, r.line) for r in found]
    _validate(nb, regions, stem)
    return nb, regions


def _validate(nb: nbformat.NotebookNode, regions: list[Region], stem: str) -> None:
    """Every exercise needs a check cell (tag ``check``) after its last region."""
    checks: dict[str, int] = {}
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and "check" in cell.metadata.get("tags", []):
            if not cell.metadata.get("jupyter", {}).get("source_hidden"):
                raise BuildError(f"{stem} cell {index}: a check cell should be collapsed: jupyter={{\"source_hidden\": true}}")
            if "NBVAL_CHECK_OUTPUT" in cell.source:
                raise BuildError(f"{stem} cell {index}: check cells must signal by raising, not by # NBVAL_CHECK_OUTPUT")
            for match in CHECK_CALL.finditer(cell.source):
                checks[match.group("id")] = index
    for region in regions:
        if not region.ex_id.startswith(f"{int(stem[:2])}.") and stem[:2].isdigit():
            raise BuildError(f"{stem} cell {region.cell}: exercise {region.ex_id} does not belong to lesson {stem[:2]}")
        after = checks.get(region.ex_id)
        if after is None:
            raise BuildError(f"{stem}: exercise {region.ex_id} has no check cell (a code cell tagged 'check' calling check({region.ex_id!r}, ...))")
        if after <= region.cell:
            raise BuildError(f"{stem}: the check cell of exercise {region.ex_id} (cell {after}) must come after its solution (cell {region.cell})")


def fingerprint(nb: nbformat.NotebookNode) -> str:
    """A hash of what a learner writes: the cell types and sources (not outputs)."""
    return _fingerprint_cells(nb.cells)


def _read(path: Path) -> nbformat.NotebookNode:
    return jupytext.read(path) if path.suffix == ".py" else nbformat.read(path, as_version=4)


def _write_text(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"


def lesson_key(lesson: str) -> str:
    """'1', '01' or '01_mlp' -> the prefix of the notebook's name ('01', '01', '01_mlp')."""
    lesson = lesson.strip()
    return lesson.zfill(2) if lesson.isdigit() else lesson


@dataclass
class Report:
    written: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)  # learner-edited, not overwritten
    backups: list[Path] = field(default_factory=list)
    retired: list[Path] = field(default_factory=list)  # old .py twins moved to backups/
    exercises: list[str] = field(default_factory=list)


def _targets(root: Path, only: str | None = None) -> dict[str, nbformat.NotebookNode]:
    """stem -> generated exercise notebook, for every solutions/NN_*.py (whose name starts with ``only``)."""
    sources = sorted((root / "solutions").glob("[0-9][0-9]_*.py"))
    if not sources:
        raise BuildError(f"no solution notebooks found in {root / 'solutions'}")
    if only is not None:
        key = lesson_key(only)
        sources = [p for p in sources if p.stem.startswith(key)]
        if not sources:
            names = ", ".join(p.stem[:2] for p in sorted((root / "solutions").glob("[0-9][0-9]_*.py")))
            raise BuildError(f"no lesson matches {only!r}; the lessons are {names}")
    return {p.stem: exercise_notebook(jupytext.read(p), p.stem)[0] for p in sources}


def backup_path(out_dir: Path, stem: str, stamp: str, suffix: str = ".ipynb") -> Path:
    """exercises/backups/<stem>.<stamp><suffix>, numbered if that name is taken (two backups in one second)."""
    folder = out_dir / BACKUPS
    folder.mkdir(exist_ok=True)
    path, n = folder / f"{stem}.{stamp}{suffix}", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}.{stamp}-{n}{suffix}"
    return path


def timestamp(now: _dt.datetime | None = None) -> str:
    return (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")


def write_unpaired_config(out_dir: Path) -> bool:
    """Make sure exercises/jupytext.toml turns pairing off; True if it was (re)written."""
    path = out_dir / JUPYTEXT_TOML
    if path.exists() and path.read_text() == UNPAIRED_CONFIG:
        return False
    path.write_text(UNPAIRED_CONFIG)
    return True


def build(root: Path | None = None, *, force: bool = False, only: str | None = None, now: _dt.datetime | None = None) -> Report:
    """Regenerate exercises/ from solutions/, never losing a learner's edits.

    only: a lesson number such as '1' or '01' (or a name prefix); an unknown one is an error.
    """
    root = root or find_root()
    out_dir = root / "exercises"
    out_dir.mkdir(exist_ok=True)
    prints_path = out_dir / FINGERPRINTS
    prints = json.loads(prints_path.read_text()) if prints_path.exists() else {}
    prints = {k: v for k, v in prints.items() if k.endswith(".ipynb")}  # older courses also fingerprinted .py twins
    report = Report()
    stamp = timestamp(now)
    if write_unpaired_config(out_dir):
        report.written.append(out_dir / JUPYTEXT_TOML)
    for stem, nb in _targets(root, only).items():
        report.exercises += sorted({m.group("id") for c in nb.cells for m in CHECK_CALL.finditer(c.source)})
        # An older course paired exercises with a .py twin. The .ipynb is the learner's file now;
        # the twin goes to backups/ (never deleted: it may hold the latest edits).
        twin = out_dir / f"{stem}.py"
        if twin.exists():
            moved = backup_path(out_dir, stem, stamp, ".py")
            shutil.move(twin, moved)
            report.retired.append(moved)
        path = out_dir / f"{stem}.ipynb"
        new_print, text = fingerprint(nb), _write_text(nb)
        if path.exists() and path.read_text() == text:
            report.unchanged.append(path)
            prints[path.name] = new_print
            continue
        edited = path.exists() and _edited(path, prints.get(path.name), new_print)
        if edited and not force:
            report.kept.append(path)
            continue
        if edited:
            backup = backup_path(out_dir, stem, stamp)
            shutil.copy2(path, backup)
            report.backups.append(backup)
        path.write_text(text)
        report.written.append(path)
        prints[path.name] = new_print
    prints_path.write_text(json.dumps(dict(sorted(prints.items())), indent=1) + "\n")
    return report


def _edited(path: Path, generated: str | None, new_print: str) -> bool:
    """Has the learner changed the code or text of ``path`` since it was generated?"""
    try:
        current = fingerprint(_read(path))
    except Exception:  # unreadable: treat as edited, never delete it
        return True
    return current not in (generated, new_print)


def status(root: Path | None = None) -> list[str]:
    """Problems that make exercises/ differ from what solutions/ generates (empty list: in sync).

    Each problem names the file and the command that fixes it. An exercise a
    learner has edited counts too (the tests and CI need exercises/ exactly as
    generated); its message says so and advises the command that keeps a backup.
    """
    root = root or find_root()
    problems = []
    out_dir = root / "exercises"
    prints_path = out_dir / FINGERPRINTS
    prints = json.loads(prints_path.read_text()) if prints_path.exists() else {}
    targets = _targets(root)
    for stem, nb in targets.items():
        path = out_dir / f"{stem}.ipynb"
        rel, lesson = path.relative_to(root), stem[:2]
        if not path.exists():
            problems.append(f"{rel} is missing: run `moe-exercises build --only {lesson}`")
            continue
        try:
            disk = _read(path)
        except Exception as err:
            problems.append(f"{rel} cannot be read ({err}): `moe-exercises build --force --only {lesson}` keeps it under "
                            f"exercises/{BACKUPS}/ and writes a fresh one")
            continue
        current, target = fingerprint(disk), fingerprint(nb)
        if current != target:
            if current != prints.get(path.name):
                changed = "" if prints.get(path.name) == target else ", and solutions/ changed since it was generated"
                problems.append(f"{rel} was edited (your work){changed}: `moe-exercises build --force --only {lesson}` "
                                f"saves your version under exercises/{BACKUPS}/ and regenerates it")
            else:
                problems.append(f"{rel} differs from what solutions/{stem}.py generates: run `moe-exercises build --only {lesson}`")
        elif [c.metadata.get("tags", []) for c in disk.cells] != [c.metadata.get("tags", []) for c in nb.cells]:
            problems.append(f"{rel} has different cell tags than solutions/{stem}.py: run `moe-exercises build --force --only {lesson}`")
        if (out_dir / f"{stem}.py").exists():
            problems.append(f"exercises/{stem}.py is a paired twin from an older course (exercises are .ipynb only now): "
                            f"`moe-exercises build --only {lesson}` moves it to exercises/{BACKUPS}/")
    extra = {p.stem for p in out_dir.glob("[0-9][0-9]_*.ipynb")} - set(targets)
    problems += [f"exercises/{stem}.ipynb has no solution notebook" for stem in sorted(extra)]
    config = out_dir / JUPYTEXT_TOML
    if not config.exists() or config.read_text() != UNPAIRED_CONFIG:
        problems.append(f"exercises/{JUPYTEXT_TOML} should switch jupytext's pairing off: run `moe-exercises build`")
    return problems
