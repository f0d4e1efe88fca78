"""nbval on exercise notebooks, told in the learner's terms.

The course's ``conftest.py`` loads this plugin, so a plain ``pytest exercises/01_mlp.ipynb``
uses it, and ``moe-course check`` runs the same. It

- names each check cell by its exercise (``exercises/01_mlp.ipynb::Cell 2 · check 1.1``),
  so pytest's summary line says which exercise failed;
- shortens a failed check to the checker's message (no frames of the checker,
  no "Notebook cell execution failed"), which pytest's summary line then shows;
- writes plain text, without colour codes, when the output is not a terminal;
- sums up one line per exercise at the end, and with ``--moe-course-report PATH``
  writes those results as JSON (what ``moe-course check`` reads).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import pytest

from .layout import check_ids, exercise_fingerprint
from .results import ANSI, SYMBOL, CellOutcome, exercise_results, one_line

_KEY = pytest.StashKey[dict]()
_ERRORS: dict[str, str] = {}  # collection errors of notebooks, by node id (a collect report carries no config)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("moe-course", "moe-course exercise notebooks")
    group.addoption(
        "--moe-course-report",
        metavar="PATH",
        default=None,
        help="write one result per exercise of the notebooks run (JSON) to PATH",
    )


def pytest_configure(config: pytest.Config) -> None:
    # notebook node id -> {"cells": [CellOutcome], "seconds": float}; collection errors by node id
    config.stash[_KEY] = {"notebooks": defaultdict(lambda: {"cells": [], "seconds": 0.0})}
    _ERRORS.clear()


def _is_nbval_cell(item: pytest.Item) -> bool:
    return type(item).__name__ == "IPyNbCell" and hasattr(item, "cell")


def _plain(config: pytest.Config) -> bool:
    """No colour codes: asked for (--color=no), or the output goes to a file or a pipe."""
    if config.getoption("color", "auto") == "no":
        return True
    try:
        return not config.get_terminal_writer().hasmarkup
    except (AttributeError, AssertionError):  # no terminal reporter
        return True


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    plain = _plain(config)
    for item in items:
        if not _is_nbval_cell(item):
            continue
        ids = check_ids(item.cell)
        item.stash[_KEY] = {"checks": tuple(ids)}
        if ids:
            _rename(item, f"{item.name} · check {', '.join(ids)}")
        if plain:
            from nbval.plugin import nocolors

            item.colors = nocolors


def _rename(item: pytest.Item, name: str) -> None:
    """Give a collected item a new name, in its node id and in the heading of its failure too."""
    item.name = name
    if hasattr(item, "_id"):  # pytest >= 9: a structured node id
        item._id = item.parent.id.child(name)
    else:
        item._nodeid = f"{item.parent.nodeid}::{name}"
    path = item.path
    item.reportinfo = lambda: (path, 0, item.nodeid)  # nbval's reportinfo says "Cell k" only


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    if not _is_nbval_cell(item) or _KEY not in item.stash:
        return
    report: pytest.TestReport = outcome.get_result()
    state = item.config.stash[_KEY]["notebooks"][item.parent.nodeid]
    state["seconds"] += report.duration
    if call.when != "call" and not (report.failed or report.skipped):
        return
    outputs = getattr(item, "test_outputs", None) or []
    error = next((o for o in outputs if o.get("output_type") == "error"), None)
    ename, evalue = (str(error.get("ename", "")), str(error.get("evalue", ""))) if error else ("", "")
    if report.failed and error is None and call.excinfo is not None:
        evalue = str(call.excinfo.value)  # a timeout or a dead kernel: nbval's own message
    checks = item.stash[_KEY]["checks"]
    cells = item.parent.nb.cells
    state["cells"].append(
        CellOutcome(
            item.cell_num,
            checks,
            "failed" if report.failed else report.outcome,
            ename,
            evalue,
            exercise_fingerprint(cells, checks[0]) if checks else "",
        )
    )
    if report.failed:
        if ename == "ExerciseError":
            report.longrepr = ANSI.sub("", evalue).strip()  # the checker's message is the whole story
        elif isinstance(report.longrepr, str):
            text = report.longrepr if not _plain(item.config) else ANSI.sub("", report.longrepr)
            if ename:  # lead with the error itself (pytest's summary line shows the first line), then nbval's details
                text = f"{ename}: {one_line(evalue)}\n" + text.split("\n", 1)[-1]
            report.longrepr = text


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed and report.nodeid.endswith(".ipynb"):
        text = ANSI.sub("", str(report.longrepr)).strip().splitlines()
        _ERRORS[report.nodeid] = text[-1] if text else "could not be collected"


def _results(config: pytest.Config) -> dict[str, dict]:
    out = {}
    for nodeid, state in config.stash[_KEY]["notebooks"].items():
        out[nodeid] = {"exercises": [asdict(r) for r in exercise_results(state["cells"])], "seconds": round(state["seconds"], 2)}
    for nodeid, message in _ERRORS.items():
        out.setdefault(nodeid, {"exercises": [], "seconds": 0.0})["error"] = message
    return out


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    results = {k: v for k, v in _results(config).items() if Path(k).parent.name == "exercises"}
    if not any(r["exercises"] or r.get("error") for r in results.values()):
        return
    terminalreporter.section("exercises")
    for nodeid, result in results.items():
        if result.get("error"):
            terminalreporter.write_line(f"{SYMBOL['failed']} {nodeid}: {result['error']}")
        for r in result["exercises"]:
            message = f"  {r['message']}" if r["message"] else ""
            terminalreporter.write_line(f"{SYMBOL[r['status']]} {r['ex_id']}{message}")


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = session.config.getoption("moe_course_report", None)
    if path:
        Path(path).write_text(json.dumps(_results(session.config), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
