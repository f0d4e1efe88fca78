"""Things that must stay in step: notebook pairs, exercises vs solutions, environment vs package."""

from __future__ import annotations

import re
import tomllib

import jupytext
import nbformat
import pytest

from moe_course.exercises import status

from notebook_tools import ROOT

FOLDERS = ("notebooks", "solutions", "exercises")
PAIRED = ("notebooks", "solutions")  # for instructors; learners' exercises/ are .ipynb only
NOTEBOOKS = sorted(p for folder in FOLDERS for p in (ROOT / folder).glob("*.ipynb"))
PAIRED_NOTEBOOKS = [p for p in NOTEBOOKS if p.parent.name in PAIRED]
TEXTS = sorted(p for folder in PAIRED for p in (ROOT / folder).glob("[0-9][0-9]_*.py"))


def test_there_are_notebooks_in_every_folder():
    for folder in FOLDERS:
        assert list((ROOT / folder).glob("[0-9][0-9]_*.ipynb")), f"{folder}/ has no notebooks"


@pytest.mark.parametrize("path", TEXTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_py_has_its_ipynb(path):
    assert path.with_suffix(".ipynb").exists(), f"{path.name} has no paired .ipynb (run `make sync`)"


def test_exercise_notebooks_are_not_paired():
    """A learner edits one file per exercise notebook; a .py twin could disagree with the .ipynb the checks read."""
    twins = sorted(p.name for p in (ROOT / "exercises").glob("*.py"))
    assert not twins, f"exercises/ holds .py files {twins}: exercises are .ipynb only (run `moe-exercises build`)"
    config = (ROOT / "exercises" / "jupytext.toml").read_text()
    assert re.search(r'^formats\s*=\s*"ipynb"\s*$', config, re.M), config
    for path in sorted((ROOT / "exercises").glob("*.ipynb")):
        assert "jupytext" not in nbformat.read(path, as_version=4).metadata, f"{path.name} carries jupytext pairing metadata"


@pytest.mark.parametrize("path", PAIRED_NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_ipynb_and_py_pair_have_the_same_cells(path):
    text = path.with_suffix(".py")
    assert text.exists(), f"{path.name} has no paired .py (run `make sync`)"
    nb, py = nbformat.read(path, as_version=4), jupytext.read(text)
    assert len(nb.cells) == len(py.cells), f"{path.name}: {len(nb.cells)} cells, its .py has {len(py.cells)}"
    for i, (a, b) in enumerate(zip(nb.cells, py.cells)):
        assert a.cell_type == b.cell_type, f"{path.name} cell {i}: {a.cell_type} vs {b.cell_type}"
        assert a.source.strip() == b.source.strip(), f"{path.name} cell {i} differs between .ipynb and .py (run `make sync`)"
        assert a.metadata.get("tags", []) == b.metadata.get("tags", []), f"{path.name} cell {i}: tags differ"
        assert a.metadata.get("jupyter", {}) == b.metadata.get("jupyter", {}), f"{path.name} cell {i}: jupyter metadata differs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs, f"{path.name} cell {i} carries outputs"
            assert cell.execution_count is None, f"{path.name} cell {i} carries an execution count"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernelspec python3 missing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_check_cells_are_tagged_collapsed_and_unmarked(path):
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        calls_check = cell.cell_type == "code" and re.search(r"^check\(", cell.source, re.M)
        if calls_check and path.parent.name != "notebooks":
            assert "check" in cell.metadata.get("tags", []), f"{path.name} cell {i} calls check() but is not tagged 'check'"
            assert cell.metadata.get("jupyter", {}).get("source_hidden") is True, f"{path.name} cell {i} is not collapsed"
        assert "NBVAL_CHECK_OUTPUT" not in cell.source, f"{path.name} cell {i}: check cells must not compare outputs"


def test_exercises_are_in_sync_with_solutions():
    problems = status(ROOT)
    assert not problems, "exercises/ is out of date, run `moe-exercises build`:\n" + "\n".join(problems)


def test_notebooks_define_no_nn_module():
    """The package is the only home of model code: lessons import it, never define modules."""
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py")):
        source = path.read_text()
        assert not re.search(r"^\s*class \w+\(.*(nn\.Module|Module)\)", source, re.M), f"{path.name} defines an nn.Module"


CONDA_NAMES = {"pytorch": "torch"}  # conda-forge name → PyPI name


def _normalise(requirement: str) -> str:
    name = re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")
    return CONDA_NAMES.get(name, name)


def test_python_version_is_the_same_everywhere():
    """pyproject.toml, environment.yml and the README ask for the same lowest Python (3.11: the tests read TOML with tomllib)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lowest = re.fullmatch(r">=\s*(3\.\d+)", project["requires-python"]).group(1)
    env = re.search(r"^\s*-\s*python\s*>=\s*(3\.\d+)", (ROOT / "environment.yml").read_text(), re.MULTILINE)
    assert env and env.group(1) == lowest, (
        f"environment.yml asks for python>={env and env.group(1)}, pyproject.toml for >={lowest}"
    )
    assert f"Python ≥ {lowest}" in (ROOT / "README.md").read_text(), f"the README should say Python ≥ {lowest}"
    assert tuple(map(int, lowest.split("."))) >= (3, 11), "the tests import tomllib (Python 3.11+)"


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_normalise(r) for r in project["dependencies"]}  # learners' packages; the test extra is pip-only
    env_text = (ROOT / "environment.yml").read_text()
    conda, pip = set(), set()
    section = None
    for line in env_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("dependencies:"):
            section = "conda"
        elif stripped == "- pip:":
            section = "pip"
        elif stripped.startswith("- ") and section:
            item = stripped[2:].strip().strip("'\"")
            (pip if section == "pip" and line.startswith("      ") else conda).add(item)
    listed = {_normalise(i) for i in conda | pip if not i.startswith("-e")} - {"python", "pip"}
    editable = {i for i in pip if i.startswith("-e")}
    assert listed == wanted, f"only in pyproject: {sorted(wanted - listed)}; only in environment.yml: {sorted(listed - wanted)}"
    assert editable == {"-e ."}, f"environment.yml should install the package editable, without extras, found {editable}"
    assert "conda-forge" in env_text
