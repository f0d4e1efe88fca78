"""Test helpers: read course notebooks and run their code cells in-process.

Running cells with ``exec`` in a fresh namespace is much faster than starting
a Jupyter kernel, so the tests can afford one run per exercise (every other
exercise solved, this one stubbed). The nbval tests run real kernels too.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parents[1]


def solution_sources() -> list[Path]:
    return sorted((ROOT / "solutions").glob("[0-9][0-9]_*.py"))


def read_solution(stem: str) -> nbformat.NotebookNode:
    return jupytext.read(ROOT / "solutions" / f"{stem}.py")


def is_check(cell) -> bool:
    return cell.cell_type == "code" and "check" in cell.metadata.get("tags", [])


@dataclass
class CellRun:
    index: int  # index among all cells
    error: BaseException | None
    stdout: str


def run_cells(nb: nbformat.NotebookNode, cwd: Path | None = None) -> list[CellRun]:
    """Execute every code cell in order in one namespace; keep going after errors (like nbval)."""
    namespace: dict = {"__name__": "__main__"}
    runs = []
    old = Path.cwd()
    os.chdir(cwd or ROOT / "exercises")
    try:
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            if any(line.lstrip().startswith(("%", "!")) for line in cell.source.splitlines()):
                raise AssertionError(f"cell {index} uses IPython magics; exercise notebooks must be plain Python")
            out = io.StringIO()
            error = None
            with contextlib.redirect_stdout(out):
                try:
                    exec(compile(cell.source, f"<cell {index}>", "exec"), namespace)
                except BaseException as err:  # noqa: BLE001 - we record every failure
                    error = err
            runs.append(CellRun(index, error, out.getvalue()))
    finally:
        os.chdir(old)
        import matplotlib.pyplot as plt

        plt.close("all")
    return runs


def run_nbval(paths: list[Path], tmp: Path, cwd: Path = ROOT) -> dict[str, str]:
    """Run pytest --nbval-lax on notebooks in a subprocess: 'classname::Cell k' → 'passed' / 'failed'."""
    report = tmp / "nbval.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "--nbval-lax",
        "--nbval-current-env",
        "-p",
        "no:cacheprovider",
        "-q",
        f"--junitxml={report}",
        "-o",
        "addopts=",
        *map(str, paths),
    ]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    if not report.exists():
        raise AssertionError(f"nbval did not run:\n{proc.stdout}\n{proc.stderr}")
    results = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        failed = case.find("failure") is not None or case.find("error") is not None
        results[f"{case.get('classname')}::{case.get('name')}"] = "failed" if failed else "passed"
    results["_output"] = proc.stdout
    return results


def code_cell_number(nb: nbformat.NotebookNode, index: int) -> int:
    """nbval names items 'Cell k' counting code cells only."""
    return sum(1 for c in nb.cells[:index] if c.cell_type == "code")


def write_notebook(nb: nbformat.NotebookNode, path: Path) -> Path:
    path.write_text(nbformat.writes(nb))
    return path


def with_outputs(nb: nbformat.NotebookNode, outputs_by_index: dict[int, list]) -> nbformat.NotebookNode:
    """A copy of ``nb`` whose cells carry saved outputs (and execution counts, as Jupyter writes them)."""
    nb = nbformat.from_dict(json.loads(json.dumps(nb)))
    count = 0
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            count += 1
            if index in outputs_by_index:
                cell.outputs = [nbformat.from_dict(o) for o in outputs_by_index[index]]
                cell.execution_count = count
    return nb


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(cmd: list[str], cwd: Path, status_url: str, log_path: Path, timeout: float = 90.0):
    """Start a server process (its own session), wait until ``status_url`` answers, stop it afterwards."""
    import signal
    import time
    import urllib.request

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    urllib.request.urlopen(status_url, timeout=5)
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise AssertionError(f"server did not start: {log_path.read_text()[-2000:]}") from None
                    time.sleep(0.5)
            yield proc
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
