"""The README's first command serves the course in JupyterLab (checked through its REST API)."""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path

import pytest

from notebook_tools import ROOT, free_port, running_server

pytestmark = pytest.mark.slow  # a real JupyterLab server (and browser): see `make test-fast`


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def lab():
    port, token = free_port(), "moe-course-test"
    args = f"--no-browser --ServerApp.ip=127.0.0.1 --ServerApp.port={port} --IdentityProvider.token={token}"
    in_course_venv = Path(sys.executable).parent == ROOT / ".venv" / "bin" and (ROOT / ".venv" / ".installed").exists()
    if in_course_venv:  # the real README command
        cmd = ["make", "--no-print-directory", "lab", f"LAB_ARGS={args}"]
    else:  # another environment (e.g. conda): the same server from this interpreter
        cmd = [sys.executable, "-m", "jupyterlab", *args.split(), *(["--allow-root"] if os.geteuid() == 0 else [])]
    base = f"http://127.0.0.1:{port}"
    with running_server(cmd, ROOT, f"{base}/api/status?token={token}", ROOT / "build" / "lab-test.log"):
        yield base, token


def test_lab_serves_the_course_folder_with_every_lesson(lab):
    base, token = lab
    listing = _get(f"{base}/api/contents/notebooks?token={token}")
    names = {item["name"] for item in listing["content"]}
    lessons = {p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    assert lessons and lessons <= names


def test_lab_has_a_python_kernel_and_widgets(lab):
    base, token = lab
    specs = _get(f"{base}/api/kernelspecs?token={token}")
    assert "python3" in specs["kernelspecs"]
    status = _get(f"{base}/api/status?token={token}")
    assert "started" in status
    extensions = _get(f"{base}/lab/api/extensions?token={token}")
    names = {e["name"] for e in (extensions if isinstance(extensions, list) else extensions.get("data", []))}
    assert "jupyter-widgets-jupyterlab-manager" in names and "jupyterlab-jupytext" in names
