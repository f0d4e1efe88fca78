"""Every hidden check is real: it fails on its stub, passes on its solution, and nothing else breaks."""

from __future__ import annotations

import re

import pytest

from moe_course.checks import REGISTRY, ExerciseError
from moe_course.exercises.build import CHECK_CALL, exercise_notebook

from notebook_tools import (
    ROOT,
    code_cell_number,
    is_check,
    read_solution,
    run_cells,
    run_nbval,
    solution_sources,
    with_outputs,
    write_notebook,
)

STEMS = [p.stem for p in solution_sources()]


def exercise_ids(stem: str) -> list[str]:
    _, regions = exercise_notebook(read_solution(stem), stem)
    return sorted({r.ex_id for r in regions}, key=lambda i: tuple(map(int, i.split("."))))


CASES = [(stem, ex_id) for stem in STEMS for ex_id in exercise_ids(stem)]


def check_cell_of(nb, ex_id: str) -> int:
    for index, cell in enumerate(nb.cells):
        if is_check(cell) and any(m.group("id") == ex_id for m in CHECK_CALL.finditer(cell.source)):
            return index
    raise AssertionError(f"no check cell for {ex_id}")


def test_every_registered_checker_has_an_exercise():
    assert set(REGISTRY) == {ex_id for _, ex_id in CASES}


@pytest.mark.parametrize("stem", STEMS)
def test_solution_passes_every_check_in_process(stem):
    nb = read_solution(stem)
    runs = run_cells(nb)
    failures = {r.index: repr(r.error) for r in runs if r.error is not None}
    assert not failures, failures
    for ex_id in exercise_ids(stem):
        out = next(r.stdout for r in runs if r.index == check_cell_of(nb, ex_id))
        assert out.strip().splitlines() == [out.strip()] and out.startswith(f"✅ Exercise {ex_id} passed: "), out


@pytest.mark.parametrize("stem,ex_id", CASES)
def test_stub_fails_exactly_its_own_check(stem, ex_id):
    """Every other exercise solved, this one stubbed: only its own check cell fails."""
    nb, _ = exercise_notebook(read_solution(stem), stem, stub_only={ex_id})
    runs = run_cells(nb)
    failed = [r.index for r in runs if r.error is not None]
    assert failed == [check_cell_of(nb, ex_id)], [(r.index, repr(r.error)) for r in runs if r.error]
    error = next(r.error for r in runs if r.error is not None)
    assert isinstance(error, ExerciseError)
    assert f"Exercise {ex_id}" in str(error) and "not done yet" in str(error)


@pytest.mark.slow  # nbval in a subprocess
@pytest.mark.parametrize("stem", STEMS)
def test_nbval_fails_exactly_at_the_check_cells_of_the_generated_exercises(stem, tmp_path):
    nb = read_solution(stem)
    exercise, _ = exercise_notebook(nb, stem)
    path = ROOT / "exercises" / f"{stem}.ipynb"
    results = run_nbval([path], tmp_path)
    failed = sorted(int(re.search(r"Cell (\d+)", k).group(1)) for k, v in results.items() if v == "failed")
    expected = sorted(code_cell_number(exercise, check_cell_of(exercise, e)) for e in exercise_ids(stem))
    assert failed == expected, results["_output"][-3000:]


@pytest.mark.slow  # nbval in a subprocess
@pytest.mark.parametrize("stem", STEMS)
def test_saved_outputs_never_decide_a_check(stem, tmp_path):
    """A learner's saved notebook with a stale failure still passes once the answer is right,
    and a stale success does not hide a stub (check cells signal by raising, not by output)."""
    solution = read_solution(stem)
    stale_error = [{"output_type": "error", "ename": "ExerciseError", "evalue": "Exercise: old failure", "traceback": ["old"]}]
    checks = {i: stale_error for i, c in enumerate(solution.cells) if is_check(c)}
    passed = write_notebook(with_outputs(solution, checks), tmp_path / f"{stem}.ipynb")

    exercise, _ = exercise_notebook(solution, stem)
    stale_pass = [{"output_type": "stream", "name": "stdout", "text": "✅ Exercise passed: old success\n"}]
    stubbed_dir = tmp_path / "stubbed"
    stubbed_dir.mkdir()
    stubbed = write_notebook(
        with_outputs(exercise, {i: stale_pass for i, c in enumerate(exercise.cells) if is_check(c)}),
        stubbed_dir / f"{stem}.ipynb",
    )
    results = run_nbval([passed, stubbed], tmp_path)
    solved = {k: v for k, v in results.items() if k != "_output" and "stubbed" not in k}
    stubs = {k: v for k, v in results.items() if "stubbed" in k}
    assert solved and all(v == "passed" for v in solved.values()), results["_output"][-3000:]
    assert sum(v == "failed" for v in stubs.values()) == len(exercise_ids(stem)), results["_output"][-3000:]
