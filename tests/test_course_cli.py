"""`moe-course`: the learner's command (lab, check, progress, reset, restore, update), on a copy of the course."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from moe_course.course import backups, layout, results
from moe_course.course.cli import check_alias, lab_command, main
from moe_course.course.layout import answer_cell, check_cell, find_root, is_stub, lessons, read_notebook
from moe_course.course.results import CellOutcome, exercise_results
from moe_course.exercises.build import exercise_notebook, stub_source

from notebook_tools import ROOT, read_solution


@pytest.fixture
def course(tmp_path: Path) -> Path:
    """A copy of the course (what a learner cloned), to change freely."""
    root = tmp_path / "course"
    root.mkdir()
    for name in ("pyproject.toml", "conftest.py", "jupytext.toml"):
        shutil.copy(ROOT / name, root)
    skip = shutil.ignore_patterns("backups", ".ipynb_checkpoints", "__pycache__")
    for folder in ("solutions", "exercises"):
        shutil.copytree(ROOT / folder, root / folder, ignore=skip)
    (root / "notebooks").mkdir()
    for path in (ROOT / "notebooks").glob("0[04]_*.ipynb"):
        shutil.copy(path, root / "notebooks")
    return root


def _lesson(root: Path, number: str) -> layout.Lesson:
    return next(lesson for lesson in lessons(root) if lesson.number == number)


def _info(root: Path, ex_id: str) -> layout.ExerciseInfo:
    return next(e for lesson in lessons(root) for e in lesson.exercises if e.ex_id == ex_id)


def solution_code(ex_id: str) -> str:
    """The answer cell of exercise ``ex_id`` as a learner who solved it would have it (no markers)."""
    info = _info(ROOT, ex_id)
    nb = read_solution(info.stem)
    cell = nb.cells[answer_cell(nb.cells, ex_id, info.name)]
    return stub_source(cell.source, stub_only=set())[0]


def write_answer(root: Path, ex_id: str, code: str) -> Path:
    """Type ``code`` into exercise ``ex_id``'s cell and save, as JupyterLab would."""
    info = _info(root, ex_id)
    path = root / "exercises" / f"{info.stem}.ipynb"
    nb = nbformat.read(path, as_version=4)
    nb.cells[answer_cell(nb.cells, ex_id, info.name)].source = code
    nbformat.write(nb, path)
    return path


def cli(root: Path, *args: str, capsys) -> tuple[int, str, str]:
    code = main(["--root", str(root), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- layout: what the command knows about the course ------------------------------------------


def test_the_course_lists_every_exercise_of_every_solution():
    found = [e.ex_id for lesson in lessons(ROOT) for e in lesson.exercises]
    expected = []
    for path in sorted((ROOT / "solutions").glob("[0-9][0-9]_*.py")):
        _, regions = exercise_notebook(read_solution(path.stem), path.stem)
        expected += sorted({r.ex_id for r in regions}, key=layout.id_key)
    assert found == expected and len(found) >= 26
    assert all(e.name != "?" and e.title for lesson in lessons(ROOT) for e in lesson.exercises)


def test_the_answer_cell_is_the_one_that_defines_the_checked_name_in_every_generated_notebook():
    for lesson in lessons(ROOT):
        cells = read_notebook(lesson.notebook(ROOT))["cells"]
        for e in lesson.exercises:
            i = answer_cell(cells, e.ex_id, e.name)
            assert i is not None and i < check_cell(cells, e.ex_id), e.ex_id
            assert f'NotImplementedError("Exercise {e.ex_id}:' in layout.source(cells[i])
            assert is_stub(cells, e.ex_id)


def test_find_root_and_bad_targets_say_what_to_do(tmp_path, capsys):
    with pytest.raises(layout.CourseError, match="could not find the course folder"):
        find_root(tmp_path)
    for args, words in [
        (["check", "99"], "no lesson matches '99'"),
        (["reset", "9.9"], "there is no exercise 9.9"),
        (["restore", "77"], "no lesson matches '77'"),
    ]:
        code, _, err = cli(ROOT, *args, capsys=capsys)
        assert code == 2 and words in err, (args, err)


# -- progress -----------------------------------------------------------------------------------


def test_progress_lists_every_exercise_without_loading_torch(course):
    script = (
        "import sys; from moe_course.course.cli import main; code = main(['--root', sys.argv[1], 'progress']); "
        "print('torch loaded:', 'torch' in sys.modules); sys.exit(code)"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(course)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for lesson in lessons(course):
        assert f"{lesson.number} {lesson.title}  (0/{len(lesson.exercises)})" in out
        for e in lesson.exercises:
            assert re.search(rf"^  · {re.escape(e.ex_id)}\s+{e.name}\s", out, re.M), e.ex_id
    total = sum(len(lesson.exercises) for lesson in lessons(course))
    assert total >= 26 and f"0 of {total} exercises passed" in out and "Next: exercise 0.1 (count_patients)" in out
    assert "torch loaded: False" in out


def test_progress_shows_the_last_check_until_the_exercise_changes(course, capsys):
    write_answer(course, "1.1", solution_code("1.1"))
    write_answer(course, "1.2", "def ffn_param_count(d_model, d_ff):\n    return 2 * d_model * d_ff\n")
    code, out, _ = cli(course, "progress", capsys=capsys)
    assert re.search(r"✎ 1.1 .*started, not checked yet: `moe-course check 01`", out)
    cells = read_notebook(course / "exercises" / "01_mlp.ipynb")["cells"]
    results.save(
        course,
        "exercises/01_mlp.ipynb",
        [
            results.ExerciseResult("1.1", results.PASSED, "", 2, layout.exercise_fingerprint(cells, "1.1")),
            results.ExerciseResult("1.2", results.FAILED, "you forgot the biases", 4, layout.exercise_fingerprint(cells, "1.2")),
        ],
    )
    code, out, _ = cli(course, "progress", capsys=capsys)
    assert code == 0
    assert re.search(r"^  ✅ 1.1 ", out, re.M) and re.search(r"^  ❌ 1.2 .*you forgot the biases", out, re.M)
    assert "01 The feed-forward block  (1/4)" in out and "Next: exercise 0.1" in out and "Last check:" in out
    write_answer(course, "1.1", solution_code("1.1") + "\n# tidied up")
    code, out, _ = cli(course, "progress", capsys=capsys)
    assert re.search(r"^  ✎ 1.1 .*changed since the last check", out, re.M)


def test_progress_names_a_missing_notebook_and_a_lost_check_cell(course, capsys):
    (course / "exercises" / "00_welcome.ipynb").unlink()
    path = course / "exercises" / "02_ensembles_and_generalists.ipynb"
    nb = nbformat.read(path, as_version=4)
    del nb.cells[check_cell(nb.cells, "2.2")]
    nbformat.write(nb, path)
    code, out, _ = cli(course, "progress", capsys=capsys)
    assert re.search(r"❌ 0.1 .*exercises/00_welcome.ipynb is missing: `moe-course reset 00`", out)
    assert re.search(r"❌ 2.2 .*check cell is missing: `moe-course reset 2.2`", out)


# -- reset and restore ------------------------------------------------------------------------------


def test_reset_one_exercise_keeps_the_rest_and_a_backup(course, capsys):
    write_answer(course, "1.1", solution_code("1.1"))
    mine = write_answer(course, "1.2", solution_code("1.2"))
    nb = nbformat.read(mine, as_version=4)  # a scratch cell between the answer and its check: reset must not touch it
    nb.cells.insert(check_cell(nb.cells, "1.2"), nbformat.v4.new_code_cell("ffn_param_count(4, 8)  # try it"))
    nbformat.write(nb, mine)
    results.save(course, "exercises/01_mlp.ipynb", [results.ExerciseResult("1.2", results.PASSED, "", 4, "x")])
    code, out, _ = cli(course, "reset", "1.2", capsys=capsys)
    assert code == 0 and "Exercise 1.2 (ffn_param_count) is back to its stub" in out and "Reload Notebook" in out
    cells = read_notebook(mine)["cells"]
    assert is_stub(cells, "1.2") and not is_stub(cells, "1.1")
    assert any("# try it" in layout.source(c) for c in cells)
    (backup,) = backups.backups(course, "01_mlp")
    assert not is_stub(read_notebook(backup.path)["cells"], "1.2")
    assert "1.2" not in results.load(course)
    code, out, _ = cli(course, "reset", "1.2", capsys=capsys)
    assert "already at its stub" in out and len(backups.backups(course, "01_mlp")) == 1


def test_reset_a_lesson_then_restore_it(course, capsys):
    mine = write_answer(course, "1.3", solution_code("1.3"))
    before = mine.read_text()
    code, out, _ = cli(course, "reset", "1", capsys=capsys)
    assert code == 0 and "every exercise of lesson 01 is back to its stub" in out and "exercises/backups/01_mlp." in out
    assert is_stub(read_notebook(mine)["cells"], "1.3")
    code, out, _ = cli(course, "reset", "01", capsys=capsys)
    assert "already as generated" in out and len(backups.backups(course, "01_mlp")) == 1
    code, out, _ = cli(course, "restore", capsys=capsys)
    assert code == 0 and "01_mlp." in out and "answers to 1.3" in out
    code, out, _ = cli(course, "restore", "01", capsys=capsys)
    assert code == 0 and mine.read_text() == before
    assert len(backups.backups(course, "01_mlp")) == 1  # the fresh stub it replaced held nothing to keep


def test_restore_one_exercise_from_the_newest_backup_that_has_it(course, capsys):
    write_answer(course, "6.2", solution_code("6.2"))
    cli(course, "reset", "06", capsys=capsys)  # backup 1: the answer to 6.2
    write_answer(course, "6.1", solution_code("6.1"))
    cli(course, "reset", "6.1", capsys=capsys)  # backup 2: 6.1 answered, 6.2 a stub
    code, out, _ = cli(course, "restore", "6.2", capsys=capsys)
    assert code == 0 and "Exercise 6.2 (combine_rows) is back" in out
    cells = read_notebook(course / "exercises" / "06_fast_dispatch.ipynb")["cells"]
    assert not is_stub(cells, "6.2") and is_stub(cells, "6.1")
    code, out, err = cli(course, "restore", "6.3", capsys=capsys)
    assert code == 2 and "holds an answer to exercise 6.3" in err


def test_restore_from_an_old_py_twin(course, capsys):
    """A learner's answer typed into an old exercises/*.py twin is not lost: `restore --from` reads it."""
    import jupytext

    nb = nbformat.read(course / "exercises" / "00_welcome.ipynb", as_version=4)
    nb.cells[answer_cell(nb.cells, "0.1", "count_patients")].source = solution_code("0.1")
    twin = course / "exercises" / "backups" / "00_welcome.20250101-120000.py"
    twin.parent.mkdir()
    jupytext.write(nb, twin, fmt="py:percent")
    code, out, _ = cli(course, "restore", "--from", str(twin), capsys=capsys)
    assert code == 0, out
    cells = read_notebook(course / "exercises" / "00_welcome.ipynb")["cells"]
    assert not is_stub(cells, "0.1")


# -- lab, python -m, moe-check ------------------------------------------------------------------


def test_lab_opens_the_course_at_a_lesson_or_an_exercise(course, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, cwd=None: calls.append((cmd, cwd)) or 0)
    assert main(["--root", str(course), "lab", "--no-browser", "--port", "8899"]) == 0
    cmd, cwd = calls[-1]
    assert cmd[1:3] == ["-m", "jupyterlab"] and cwd == course
    assert f"--ServerApp.root_dir={course}" in cmd and "--LabApp.default_url=/lab/tree/notebooks/00_welcome.ipynb" in cmd
    assert cmd[-3:] == ["--no-browser", "--port", "8899"]
    assert "/lab/tree/notebooks/04_sparse_routing.ipynb" in " ".join(lab_command(course, "4", []))
    assert "/lab/tree/exercises/04_sparse_routing.ipynb" in " ".join(lab_command(course, "4.1", []))


def test_python_dash_m_and_the_old_moe_check_name(course):
    proc = subprocess.run([sys.executable, "-m", "moe_course", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and all(c in proc.stdout for c in ("lab", "check", "progress", "reset", "restore", "update"))
    proc = subprocess.run(
        [sys.executable, "-m", "moe_course.course.check", "--root", str(course), "99"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "no lesson matches '99'" in proc.stderr
    assert check_alias(["--root", str(course), "1.9"]) == 2


def test_check_names_a_missing_notebook_without_running_anything(course, capsys):
    (course / "exercises" / "00_welcome.ipynb").unlink()
    code, out, _ = cli(course, "check", "0", capsys=capsys)
    assert code == 1 and re.search(r"❌ 0.1 count_patients: exercises/00_welcome.ipynb is missing: `moe-course reset 00`", out)
    assert (course / ".moe-course" / "check.log").exists()


# -- from nbval's cells to one line per exercise -------------------------------------------------------


def test_exercise_results_from_cell_outcomes():
    cells = [
        CellOutcome(0, (), "passed"),
        CellOutcome(1, (), "passed"),
        CellOutcome(2, ("1.1",), "passed"),
        CellOutcome(3, (), "passed"),
        CellOutcome(4, ("1.2",), "failed", "ExerciseError", "Exercise 1.2 (ffn_param_count): you forgot the biases.\n  (d=3)"),
        CellOutcome(5, (), "failed", "SyntaxError", "invalid syntax (3467.py, line 2)"),
        CellOutcome(6, ("1.3",), "failed", "NameError", "name 'ffn_flops' is not defined"),
        CellOutcome(7, (), "passed"),
        CellOutcome(8, ("1.4",), "failed", "ExerciseError", "Exercise 1.4 (accuracy): not done yet: your function still raises"),
        CellOutcome(9, ("1.5",), "failed", "NameError", "name 'x' is not defined"),
    ]
    got = [(r.ex_id, r.status, r.message) for r in exercise_results(cells)]
    assert got == [
        ("1.1", "passed", ""),
        ("1.2", "failed", "you forgot the biases."),
        ("1.3", "failed", "your code (cell 5) raised SyntaxError: invalid syntax (line 2)"),
        ("1.4", "not started", "not started: its stub still raises NotImplementedError"),
        ("1.5", "failed", "the check cell raised NameError: name 'x' is not defined"),
    ]


# -- nbval runs (slow): plain pytest, and `moe-course check` --------------------------------------------


def _mixed_lesson_01(root: Path) -> None:
    """1.1 right, 1.2 wrong (forgot the biases), 1.3 a syntax error, 1.4 untouched."""
    write_answer(root, "1.1", solution_code("1.1"))
    write_answer(root, "1.2", "def ffn_param_count(d_model, d_ff):\n    return 2 * d_model * d_ff\n")
    write_answer(root, "1.3", "def ffn_flops(num_tokens, d_model, d_ff):\n    return 4 * num_tokens * d_model * d_ff +\n")


@pytest.mark.slow
def test_plain_pytest_names_the_exercise_and_stays_short_and_plain(course):
    _mixed_lesson_01(course)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "exercises/01_mlp.ipynb", "-p", "no:cacheprovider", "-rf"],
        cwd=course,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "300"},
    )
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:]
    assert "\x1b[" not in out  # not a terminal: no colour codes
    short = out.split("short test summary info")[1]
    assert re.search(
        r"^FAILED exercises/01_mlp.ipynb::Cell 4 · check 1.2 - Exercise 1.2 \(ffn_param_count\): you counted", short, re.M
    )
    assert re.search(r"^FAILED exercises/01_mlp.ipynb::Cell 5 - SyntaxError: invalid syntax", short, re.M)
    assert re.search(
        r"^FAILED exercises/01_mlp.ipynb::Cell 8 · check 1.4 - Exercise 1.4 \(accuracy_by_specialty\): not done", short, re.M
    )
    assert "Notebook cell execution failed" not in short
    for check in ("1.2", "1.4"):  # the checker's message alone: no frames of the checker, not 25 lines
        section = re.search(rf"^_+ \S+::Cell \d · check {check} _+\n(.*?)\n(?=_{{5}}|={{5}})", out, re.M | re.S)
        failure = section.group(1).strip().splitlines()
        assert len(failure) <= 3 and "Traceback" not in "".join(failure) and "_core.py" not in "".join(failure), failure
    summary = out.split("= exercises =")[1]
    assert re.search(r"^✅ 1.1$", summary, re.M) and re.search(r"^❌ 1.2  you counted the two weight matrices", summary, re.M)
    assert re.search(r"^❌ 1.3  your code \(cell 5\) raised SyntaxError", summary, re.M) and re.search(r"^· 1.4 ", summary, re.M)


@pytest.mark.slow
def test_check_fails_on_the_stubs_one_line_each_and_passes_on_the_solutions(course, capsys):
    code, out, _ = cli(course, "check", "01", capsys=capsys)
    lines = [line for line in out.splitlines() if line.startswith("  ")]
    assert code == 1 and len(lines) == 4 and all(re.match(r"  · 1\.\d \w+: not started$", line) for line in lines), out
    assert "0 of 4 exercises passed, 0 failed, 4 not started" in out and "NotImplementedError" in out
    log = (course / ".moe-course" / "check.log").read_text()
    assert "Exercise 1.1 (feed_forward): not done yet" in log and "exercises/01_mlp.ipynb::Cell 2 · check 1.1" in log

    shutil.copy(ROOT / "solutions" / "01_mlp.ipynb", course / "exercises" / "01_mlp.ipynb")
    code, out, _ = cli(course, "check", "1", capsys=capsys)
    assert code == 0, out
    assert [line.split()[:2] for line in out.splitlines() if line.startswith("  ")] == [["✅", f"1.{i}"] for i in range(1, 5)]
    assert "4 of 4 exercises passed" in out
    code, out, _ = cli(course, "progress", capsys=capsys)
    assert "01 The feed-forward block  (4/4)" in out


# -- update ------------------------------------------------------------------------------------------------


@pytest.fixture
def clones(course, tmp_path, monkeypatch):
    """An upstream course repository and a learner's clone of it."""
    for key, value in {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.org",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.org",
        "GIT_CONFIG_GLOBAL": os.devnull,
    }.items():
        monkeypatch.setenv(key, value)
    upstream = course

    def git(cwd: Path, *args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    git(upstream, "init", "-q", "-b", "main")
    (upstream / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    git(upstream, "add", "-A")
    git(upstream, "commit", "-q", "-m", "course v1")
    learner = tmp_path / "learner"
    git(tmp_path, "clone", "-q", str(upstream), str(learner))
    return upstream, learner, git


def _course_changes_lesson_00(upstream: Path, git) -> None:
    """A new version: a cell inserted above exercise 0.1 (every later cell moves) and a reworded lesson."""
    path = upstream / "exercises" / "00_welcome.ipynb"
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(1, nbformat.v4.new_markdown_cell("A new tip from the course."))
    nbformat.write(nb, path)
    lesson = upstream / "notebooks" / "00_welcome.ipynb"
    nb = nbformat.read(lesson, as_version=4)
    nb.cells[0].source += "\n\nA new sentence."
    nbformat.write(nb, lesson)
    git(upstream, "commit", "-q", "-am", "course v2")


def test_update_carries_answers_into_a_changed_notebook_and_keeps_untouched_ones(clones, capsys):
    upstream, learner, git = clones
    write_answer(learner, "0.1", solution_code("0.1"))
    nb = nbformat.read(learner / "exercises" / "00_welcome.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("count_patients(torch.tensor([0, 1]), 2)  # my scratch"))
    nbformat.write(nb, learner / "exercises" / "00_welcome.ipynb")
    untouched = write_answer(learner, "1.2", "def ffn_param_count(d_model, d_ff):\n    return 42\n")
    before = untouched.read_bytes()
    lesson = learner / "notebooks" / "00_welcome.ipynb"  # the learner ran the lesson: outputs only
    nb = nbformat.read(lesson, as_version=4)
    code_cell = next(c for c in nb.cells if c.cell_type == "code")
    code_cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="ran\n")]
    nbformat.write(nb, lesson)
    _course_changes_lesson_00(upstream, git)

    code, out, _ = cli(learner, "update", capsys=capsys)
    assert code == 0, out
    assert git(learner, "rev-parse", "HEAD") == git(upstream, "rev-parse", "HEAD")
    cells = read_notebook(learner / "exercises" / "00_welcome.ipynb")["cells"]
    assert layout.source(cells[1]) == "A new tip from the course."  # the new version
    assert not is_stub(cells, "0.1") and "bincount" in layout.source(cells[answer_cell(cells, "0.1", "count_patients")])
    assert any("# my scratch" in layout.source(c) for c in cells)
    assert "answers to 0.1 carried into the new version" in out
    assert untouched.read_bytes() == before  # not changed by the update: exactly the learner's file
    assert "A new sentence." in lesson.read_text()
    assert list((learner / "exercises" / "backups").glob("00_welcome.*.ipynb"))
    saved = learner / ".moe-course" / "update-backups"
    assert {p.name for p in saved.glob("*/exercises/*.ipynb")} == {"00_welcome.ipynb", "01_mlp.ipynb"}
    code, out, _ = cli(learner, "update", capsys=capsys)
    assert code == 0 and "up to date" in out


def test_update_refuses_when_the_learner_committed_and_outside_a_clone(clones, tmp_path, capsys):
    upstream, learner, git = clones
    write_answer(learner, "0.1", solution_code("0.1"))
    git(learner, "commit", "-q", "-am", "my work")
    _course_changes_lesson_00(upstream, git)
    head = git(learner, "rev-parse", "HEAD")
    code, out, _ = cli(learner, "update", capsys=capsys)
    assert code == 1 and "`git pull`" in out and "Nothing was changed" in out
    assert git(learner, "rev-parse", "HEAD") == head
    plain = tmp_path / "download"
    shutil.copytree(learner, plain, ignore=shutil.ignore_patterns(".git"))
    code, out, _ = cli(plain, "update", capsys=capsys)
    assert code == 2 and "not a git clone" in out
