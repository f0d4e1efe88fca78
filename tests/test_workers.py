"""Tests for moe_course.experiments.workers: jobs in worker processes give what they give in this process, in job order."""

from __future__ import annotations

import pytest
import torch

from moe_course.experiments.workers import run_in_workers


def _seeded_sum(seed: int) -> tuple[int, float, int]:
    """A job that draws from its own seed and reports the thread count it ran with."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(64, 64, generator=g)
    return seed, float((a @ a).sum()), torch.get_num_threads()


def _fail(job: int) -> int:
    if job == 2:
        raise RuntimeError("job 2 went wrong")
    return job


@pytest.mark.slow  # spawns worker processes
def test_workers_return_results_in_job_order_equal_to_this_process():
    jobs = [3, 1, 4, 1, 5]
    here = run_in_workers(_seeded_sum, jobs, workers=1)
    done = []
    there = run_in_workers(_seeded_sum, jobs, workers=2, on_done=lambda i, r: done.append(i))
    assert [r[0] for r in there] == jobs
    assert [r[1] for r in there] == [r[1] for r in here]  # bit for bit
    assert {r[2] for r in there} == {1}  # every worker runs on one thread
    assert sorted(done) == list(range(len(jobs)))


@pytest.mark.slow  # spawns worker processes
def test_a_failing_job_in_a_worker_raises_here():
    with pytest.raises(RuntimeError, match="job 2 went wrong"):
        run_in_workers(_fail, [1, 2, 3], workers=2)


def test_a_failing_job_raises_here_and_bad_settings_are_refused():
    with pytest.raises(RuntimeError, match="job 2 went wrong"):
        run_in_workers(_fail, [1, 2, 3], workers=1)
    with pytest.raises(ValueError, match="workers must be a positive int"):
        run_in_workers(_fail, [1], workers=0)
    with pytest.raises(TypeError, match="fn must be a function"):
        run_in_workers("not a function", [1])
    assert run_in_workers(_fail, [], workers=2) == []


def test_the_progress_bar_names_the_jobs(capsys):
    assert run_in_workers(_fail, [5, 7], workers=1, progress=True, desc="little jobs", name=lambda j: f"job {j}") == [5, 7]
    err = capsys.readouterr().err
    assert "little jobs" in err and "finished job 7" in err and "2/2" in err
    run_in_workers(_fail, [5], workers=1)  # no bar unless asked for
    assert capsys.readouterr().err == ""


def test_one_thread_holds_this_process_on_one_thread_and_restores_the_count_even_after_an_error():
    import pytest
    import torch

    from moe_course.experiments.workers import one_thread

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError), one_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError("a job failed")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
