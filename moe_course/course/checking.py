"""``moe-course check [NN ...]``: run exercise notebooks with nbval, one line per exercise.

Each notebook runs in its own ``pytest --nbval-lax`` process (several at once on a
machine with cores to spare), with the course's pytest plugin, which writes one
result per exercise. The terminal gets one line per exercise and a total; the
full pytest output goes to ``.moe-course/check.log``; the results are kept for
``moe-course progress``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from . import results
from .layout import STATE_DIR, Lesson
from .results import FAILED, NOT_STARTED, PASSED, SYMBOL, ExerciseResult

LOG = "check.log"


@dataclass
class NotebookRun:
    lesson: Lesson
    results: list[ExerciseResult] = field(default_factory=list)
    seconds: float = 0.0
    log: str = ""


def default_jobs(count: int) -> int:
    """Notebooks to run at once: one per two cores (each kernel's torch uses a few), at most 4."""
    return max(1, min(count, (os.cpu_count() or 1) // 2, 4))


def pytest_command(notebook: str, report: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pytest",
        notebook,
        "-p",
        "moe_course.course.pytest_plugin",
        f"--moe-course-report={report}",
        "--nbval-lax",
        "--nbval-current-env",
        "--nbval-cell-timeout=300",
        "-o",
        "addopts=",
        "-p",
        "no:cacheprovider",
        "--color=no",
        "-q",
        "-rN",
    ]


def run_notebook(root: Path, lesson: Lesson) -> NotebookRun:
    """Run one exercise notebook under nbval; its results, one per exercise of the lesson."""
    run = NotebookRun(lesson)
    path = lesson.notebook(root)
    rel = path.relative_to(root).as_posix()
    if not path.exists():
        run.results = [
            ExerciseResult(e.ex_id, FAILED, f"{rel} is missing: `moe-course reset {lesson.number}` makes a fresh one", -1)
            for e in lesson.exercises
        ]
        return run
    with tempfile.TemporaryDirectory(prefix="moe-course-") as tmp:
        report = Path(tmp) / "report.json"
        start = time.perf_counter()
        proc = subprocess.run(
            pytest_command(rel, report), cwd=root, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        run.seconds = time.perf_counter() - start
        run.log = proc.stdout + (f"\n[stderr]\n{proc.stderr}" if proc.stderr.strip() else "")
        data = json.loads(report.read_text()) if report.exists() else {}
    found = data.get(rel, {})
    by_id = {r["ex_id"]: ExerciseResult(**r) for r in found.get("exercises", [])}
    if found.get("error") or not data:
        why = found.get("error") or _last_line(run.log) or "pytest did not run"
        problem = f"{rel} could not be run ({why}); the full log says more"
    else:
        problem = f"its check cell is missing from {rel}: `moe-course reset {{ex_id}}` puts it back (your answer is kept)"
    run.results = [
        by_id.get(e.ex_id) or ExerciseResult(e.ex_id, FAILED, problem.format(ex_id=e.ex_id), -1) for e in lesson.exercises
    ]
    return run


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def line(info_name: str, result: ExerciseResult) -> str:
    """One line per exercise: symbol, id, the function's name, and what is wrong."""
    text = f"  {SYMBOL[result.status]} {result.ex_id} {info_name}"
    if result.status == NOT_STARTED:
        return text + ": not started"
    return text + (f": {result.message}" if result.message else "")


def check(root: Path, lessons: list[Lesson], *, jobs: int | None = None, out: TextIO | None = None) -> int:
    """Check the lessons' exercise notebooks; 0 if every exercise passed, 1 otherwise."""
    out = out or sys.stdout
    state = root / STATE_DIR
    state.mkdir(exist_ok=True)
    log_path = state / LOG
    jobs = jobs or default_jobs(len(lessons))
    names = (
        ", ".join(f"exercises/{lesson.stem}.ipynb" for lesson in lessons)
        if len(lessons) <= 2
        else f"{len(lessons)} exercise notebooks"
    )
    print(
        f"Checking {names} with nbval{f' ({jobs} at a time)' if jobs > 1 else ''}. "
        "Save your notebooks in JupyterLab first: the check reads the saved file.",
        file=out,
        flush=True,
    )
    twins = [lesson.stem for lesson in lessons if (root / "exercises" / f"{lesson.stem}.py").exists()]
    if twins:
        print(
            f"Note: exercises/{twins[0]}.py{' and others' if len(twins) > 1 else ''} are left from an older version of the "
            "course; the check reads the .ipynb only (`moe-exercises build` moves the .py files to exercises/backups/).",
            file=out,
        )
    counts = {PASSED: 0, FAILED: 0, NOT_STARTED: 0}
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log, ThreadPoolExecutor(max_workers=jobs) as pool:
        log.write(f"moe-course check, {_dt.datetime.now().isoformat(timespec='seconds')}, in {root}\n")
        futures = [pool.submit(run_notebook, root, lesson) for lesson in lessons]
        for future in futures:  # in lesson order, each as soon as it is done
            run = future.result()
            lesson = run.lesson
            took = f"{run.seconds:.0f} s" if run.seconds else ""
            print(f"{lesson.number} {lesson.title}  {took}".rstrip(), file=out)
            names = {e.ex_id: e.name for e in lesson.exercises}
            for result in run.results:
                counts[result.status] += 1
                print(line(names[result.ex_id], result), file=out, flush=True)
            log.write(f"\n===== exercises/{lesson.stem}.ipynb ({took}) =====\n{run.log}\n")
            results.save(root, f"exercises/{lesson.stem}.ipynb", run.results)
    total = sum(counts.values())
    print(
        f"\n{counts[PASSED]} of {total} exercises passed, {counts[FAILED]} failed, {counts[NOT_STARTED]} not started "
        f"({time.perf_counter() - start:.0f} s). Full log: {log_path.relative_to(root)}",
        file=out,
    )
    if counts[FAILED]:
        print(
            "❌ names the mistake: the check raised an ExerciseError (its check cell in the notebook shows the whole "
            "message). · means the exercise still raises NotImplementedError: replace its stub with your code.",
            file=out,
        )
    elif counts[NOT_STARTED]:
        print("· means the exercise still raises NotImplementedError: replace its stub with your code.", file=out)
    return 0 if counts[PASSED] == total else 1
