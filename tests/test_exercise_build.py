"""The exercise generator: stubs, validation, sync, and never losing a learner's work."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

from moe_course.exercises.__main__ import main as cli
from moe_course.exercises.build import BuildError, build, exercise_notebook, fingerprint, status, stub_source

from notebook_tools import ROOT

SOLUTION = '''# %% [markdown]
# # Exercises 07 · Test
# Instructions stay.

# %%
def double(x):
    """Twice x."""
    # a hint outside the region stays
    ### BEGIN SOLUTION 7.1: return two times x
    y = 2 * x
    return y
    ### END SOLUTION


# %% tags=["check"] jupyter={"source_hidden": true}
from moe_course.checks import check
print("checked", double)
check_ids = ["check('7.1', double)"]
'''


def test_stub_replaces_the_region_at_its_indentation():
    source = "def f(x):\n    # hint\n    ### BEGIN SOLUTION 3.2: add one\n    return x + 1\n    ### END SOLUTION\n"
    stub, regions = stub_source(source)
    assert stub == 'def f(x):\n    # hint\n    raise NotImplementedError("Exercise 3.2: add one")\n'
    assert [(r.ex_id, r.task, r.line) for r in regions] == [("3.2", "add one", 3)]
    namespace: dict = {}
    exec(stub, namespace)
    with pytest.raises(NotImplementedError, match="Exercise 3.2: add one"):
        namespace["f"](1)


def test_stub_only_keeps_the_other_answers():
    source = (
        "def f(x):\n    ### BEGIN SOLUTION 3.1: a\n    return 1\n    ### END SOLUTION\n"
        "def g(x):\n    ### BEGIN SOLUTION 3.2: b\n    return 2\n    ### END SOLUTION\n"
    )
    stub, regions = stub_source(source, stub_only={"3.2"})
    assert "return 1" in stub and "return 2" not in stub and "BEGIN" not in stub
    assert 'raise NotImplementedError("Exercise 3.2: b")' in stub and len(regions) == 2


@pytest.mark.parametrize(
    "source,words",
    [
        ("### BEGIN SOLUTION 1.1: a\n### BEGIN SOLUTION 1.2: b\n### END SOLUTION\n", "inside another"),
        ("### BEGIN SOLUTION 1.1: a\nx = 1\n", "never closed"),
        ("x = 1\n### END SOLUTION\n", "without a BEGIN"),
        ("### BEGIN SOLUTION\nx = 1\n### END SOLUTION\n", "needs an exercise id"),
        ("### BEGIN SOLUTION 1.1:\nx = 1\n### END SOLUTION\n", "say what to do"),
    ],
)
def test_bad_markers_are_reported_with_the_line(source, words):
    with pytest.raises(BuildError, match=words):
        stub_source(source, where="07_test cell 1")


def _nb(text: str) -> nbformat.NotebookNode:
    return jupytext.reads(text, fmt="py:percent")


def test_an_exercise_without_a_check_cell_is_refused():
    with pytest.raises(BuildError, match="no check cell"):
        exercise_notebook(_nb(SOLUTION.replace("check('7.1', double)", "")), "07_test")


def test_a_check_cell_must_be_collapsed_and_come_after_the_answer():
    with pytest.raises(BuildError, match="collapsed"):
        exercise_notebook(_nb(SOLUTION.replace(' jupyter={"source_hidden": true}', "")), "07_test")
    moved = _nb(SOLUTION)
    moved.cells = [moved.cells[0], moved.cells[2], moved.cells[1]]
    with pytest.raises(BuildError, match="must come after"):
        exercise_notebook(moved, "07_test")


def test_an_exercise_id_must_match_its_lesson():
    with pytest.raises(BuildError, match="does not belong to lesson"):
        exercise_notebook(_nb(SOLUTION), "08_test")


@pytest.fixture
def course(tmp_path: Path) -> Path:
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (tmp_path / "solutions").mkdir()
    (tmp_path / "solutions" / "07_test.py").write_text(SOLUTION)
    return tmp_path


def test_build_writes_an_unpaired_notebook_and_is_then_in_sync(course):
    assert status(course)  # nothing generated yet: out of date
    report = build(course)
    assert sorted(p.name for p in report.written) == ["07_test.ipynb", "jupytext.toml"]
    assert status(course) == []
    assert not (course / "exercises" / "07_test.py").exists()  # the learner's notebook has no twin
    text = (course / "exercises" / "07_test.ipynb").read_text()
    assert "y = 2 * x" not in text and "NotImplementedError" in text and "a hint outside the region stays" in text
    assert "jupytext" not in nbformat.read(course / "exercises" / "07_test.ipynb", as_version=4).metadata
    assert build(course).written == []  # a second build changes nothing


def test_build_is_deterministic(course, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    shutil.copytree(course / "solutions", other / "solutions")
    shutil.copy(course / "pyproject.toml", other)
    build(course), build(other)
    for name in ("07_test.ipynb", ".fingerprints.json", "jupytext.toml"):
        assert (course / "exercises" / name).read_bytes() == (other / "exercises" / name).read_bytes()


def test_status_notices_a_changed_solution(course):
    build(course)
    (course / "solutions" / "07_test.py").write_text(SOLUTION.replace("two times x", "2·x"))
    assert any("differs" in p for p in status(course))


def _edit_like_a_learner(course: Path) -> str:
    path = course / "exercises" / "07_test.ipynb"
    nb = nbformat.read(path, as_version=4)
    mine = "def double(x):\n    return x + x  # my own answer"
    nb.cells[1].source = mine
    nbformat.write(nb, path)
    return mine


def test_rebuild_keeps_an_edited_exercise_and_says_how_to_force(course, capsys):
    build(course)
    mine = _edit_like_a_learner(course)
    (course / "solutions" / "07_test.py").write_text(SOLUTION.replace("Instructions stay.", "New instructions."))
    # keeping the learner's work is not an error: `make exercises` must not end in "Error 1"
    assert cli(["build", "--root", str(course)]) == 0
    out = capsys.readouterr().out
    assert "kept" in out and "--force" in out and "backups" in out and "reset 07" in out
    assert nbformat.read(course / "exercises" / "07_test.ipynb", as_version=4).cells[1].source == mine


def test_force_saves_a_timestamped_backup_first(course):
    build(course)
    mine = _edit_like_a_learner(course)
    report = build(course, force=True, now=dt.datetime(2026, 1, 2, 3, 4, 5))
    backups = sorted(p.name for p in report.backups)
    assert "07_test.20260102-030405.ipynb" in backups
    saved = nbformat.read(course / "exercises" / "backups" / "07_test.20260102-030405.ipynb", as_version=4)
    assert saved.cells[1].source == mine
    assert status(course) == []


def test_outputs_alone_are_not_edits(course):
    """A learner who only ran the notebook loses nothing they wrote, so rebuilding may overwrite it."""
    build(course)
    path = course / "exercises" / "07_test.ipynb"
    nb = nbformat.read(path, as_version=4)
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", name="stdout", text="hello\n")]
    nb.cells[2].execution_count = 1
    nbformat.write(nb, path)
    (course / "solutions" / "07_test.py").write_text(SOLUTION.replace("Instructions stay.", "New instructions."))
    report = build(course)
    assert report.kept == [] and report.backups == [] and "New instructions" in path.read_text()


def test_fingerprint_ignores_outputs_but_not_code():
    a = _nb(SOLUTION)
    b = _nb(SOLUTION)
    b.cells[2].outputs = [nbformat.v4.new_output("stream", name="stdout", text="x")]
    assert fingerprint(a) == fingerprint(b)
    b.cells[1].source += "\n# changed"
    assert fingerprint(a) != fingerprint(b)


@pytest.mark.slow  # a fresh interpreter in a subprocess
def test_command_line_status_on_the_course_itself():
    proc = subprocess.run([sys.executable, "-m", "moe_course.exercises", "status"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "in sync" in proc.stdout


def test_console_scripts_are_installed():
    """Every console script pyproject.toml declares (moe-course among them) is installed next to this Python."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"moe-course", "moe-exercises", "moe-check"} <= set(scripts)
    bindir = Path(sys.executable).parent
    missing = [s for s in scripts if not (bindir / s).exists()]
    assert not missing, f"console scripts {missing} missing from {bindir}: reinstall the package (pip install -e .)"


def _with_legacy_twin(course: Path) -> Path:
    build(course)
    twin = course / "exercises" / "07_test.py"
    twin.write_text("# my answer typed into the old .py twin\n")
    return twin


def test_an_old_py_twin_is_moved_to_backups_never_deleted(course, capsys):
    twin = _with_legacy_twin(course)
    assert any("07_test.py is a paired twin" in p and "--only 07" in p for p in status(course))
    assert cli(["build", "--root", str(course), "--only", "7"]) == 0
    assert "moved" in capsys.readouterr().out
    assert not twin.exists()
    (saved,) = (course / "exercises" / "backups").glob("07_test.*.py")
    assert "my answer" in saved.read_text()
    assert status(course) == []


@pytest.mark.parametrize("only", ["7", "07", "07_test"])
def test_only_takes_a_lesson_number_with_or_without_its_zero(course, only):
    report = build(course, only=only)
    assert [p.name for p in report.written if p.suffix == ".ipynb"] == ["07_test.ipynb"]


def test_only_with_an_unknown_lesson_is_an_error(course, capsys):
    assert cli(["build", "--root", str(course), "--only", "99"]) == 2
    assert "no lesson matches '99'" in capsys.readouterr().err
    assert not (course / "exercises" / "07_test.ipynb").exists()


def test_status_advises_a_command_that_then_works(course, capsys):
    """`moe-exercises status` on an edited, out-of-date exercise names a command that regenerates it (keeping a backup)."""
    build(course)
    mine = _edit_like_a_learner(course)
    (course / "solutions" / "07_test.py").write_text(SOLUTION.replace("Instructions stay.", "New instructions."))
    assert cli(["status", "--root", str(course)]) == 1
    out = capsys.readouterr().out
    assert "was edited (your work), and solutions/ changed" in out
    command = out.split("`")[1]
    assert command == "moe-exercises build --force --only 07"
    assert cli([*command.split()[1:], "--root", str(course)]) == 0
    assert status(course) == []
    (backup,) = (course / "exercises" / "backups").glob("07_test.*.ipynb")
    assert nbformat.read(backup, as_version=4).cells[1].source == mine


def _contents_manager(root: Path):
    from jupytext import TextFileContentsManager

    return TextFileContentsManager(root_dir=str(root))


def test_jupyterlab_does_not_pair_exercises_but_pairs_solutions(course):
    """Saving through JupyterLab's contents manager (with jupytext, as `make lab` runs it) writes no .py for an exercise."""
    shutil.copy(ROOT / "jupytext.toml", course)
    build(course)
    jupytext.write(_nb(SOLUTION), course / "solutions" / "07_test.ipynb")
    cm = _contents_manager(course)
    for path in ("exercises/07_test.ipynb", "solutions/07_test.ipynb"):
        cm.save(cm.get(path), path)
    assert not (course / "exercises" / "07_test.py").exists()
    assert (course / "solutions" / "07_test.py").exists()
    names = [item["name"] for item in cm.get("exercises")["content"]]
    assert names.count("07_test.ipynb") == 1 and not any(n.endswith(".py") for n in names)  # no twin listed
    # without exercises/jupytext.toml the course-wide pairing would apply: the config file is what unpairs them
    (course / "exercises" / "jupytext.toml").unlink()
    cm = _contents_manager(course)
    cm.save(cm.get("exercises/07_test.ipynb"), "exercises/07_test.ipynb")
    assert (course / "exercises" / "07_test.py").exists()


def test_an_exercise_edited_outside_jupyterlab_still_opens(course):
    """No twin, so no "more recent than" refusal when a learner edits the .ipynb in another editor."""
    shutil.copy(ROOT / "jupytext.toml", course)
    build(course)
    cm = _contents_manager(course)
    cm.save(cm.get("exercises/07_test.ipynb"), "exercises/07_test.ipynb")
    mine = _edit_like_a_learner(course)  # written by nbformat, as VS Code or a script would
    assert cm.get("exercises/07_test.ipynb")["content"]["cells"][1]["source"] == mine


def test_fingerprints_file_matches_the_generated_exercises():
    prints = json.loads((ROOT / "exercises" / ".fingerprints.json").read_text())
    for path in sorted((ROOT / "exercises").glob("[0-9][0-9]_*.ipynb")):
        assert prints[path.name] == fingerprint(nbformat.read(path, as_version=4))
