"""Shared pytest set-up: a headless matplotlib, and the run time of every notebook."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

_notebook_seconds: dict[str, float] = defaultdict(float)


def pytest_collection_modifyitems(items):
    """Every notebook cell nbval runs is slow: `make test-fast` (pytest -m "not slow") leaves them out."""
    import pytest

    for item in items:
        if str(item.fspath).endswith(".ipynb"):
            item.add_marker(pytest.mark.slow)


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    if path.endswith(".ipynb"):
        _notebook_seconds[path] += report.duration


def pytest_terminal_summary(terminalreporter):
    if not _notebook_seconds:
        return
    terminalreporter.section("time per notebook (nbval)")
    for path, seconds in sorted(_notebook_seconds.items()):
        terminalreporter.write_line(f"{seconds:7.1f} s  {path}")
    terminalreporter.write_line(f"{sum(_notebook_seconds.values()):7.1f} s  in total")
    out = Path(os.environ.get("MOE_COURSE_TIMINGS", "build/notebook_times.tsv"))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(f"{p}\t{s:.2f}\n" for p, s in sorted(_notebook_seconds.items())))
    except OSError:
        pass


# Exercise notebooks under nbval: check cells named by their exercise, short plain failures,
# one line per exercise at the end (the same plugin `moe-course check` runs).
pytest_plugins = ["moe_course.course.pytest_plugin"]
