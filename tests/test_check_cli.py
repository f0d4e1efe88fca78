"""`moe-check NN`: the learner's shell command for checking an exercise notebook with nbval."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from moe_course.check import main, notebooks
from moe_course.exercises.build import BuildError

from notebook_tools import ROOT


def _run(root, *args):
    return subprocess.run([sys.executable, "-m", "moe_course.check", "--root", str(root), *args],
                          capture_output=True, text=True, timeout=600)


def test_finds_notebooks_by_lesson_number():
    assert [p.name for p in notebooks(ROOT, ["0"])] == ["00_welcome.ipynb"]
    assert len(notebooks(ROOT, [])) == len(list((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb")))
    with pytest.raises(BuildError, match="no exercise notebook matches"):
        notebooks(ROOT, ["99"])


def test_unknown_lesson_exits_2(capsys):
    assert main(["--root", str(ROOT), "99"]) == 2
    assert "no exercise notebook" in capsys.readouterr().err


@pytest.mark.slow  # nbval in a subprocess
def test_a_fresh_exercise_notebook_fails_and_a_solved_one_passes(tmp_path):
    fresh = _run(ROOT, "00")
    assert fresh.returncode != 0 and "Some cells failed" in fresh.stdout and "not done yet" in fresh.stdout

    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'copy'\n")
    (tmp_path / "solutions").mkdir()
    (tmp_path / "exercises").mkdir()
    shutil.copy(ROOT / "solutions" / "00_welcome.ipynb", tmp_path / "exercises" / "00_welcome.ipynb")
    solved = _run(tmp_path, "00")
    assert solved.returncode == 0, solved.stdout[-2000:]
    assert "Every check passed" in solved.stdout
