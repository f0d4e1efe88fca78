"""Widgets work for a learner: JupyterLab in headless Chromium, run the lesson, move a slider.

Needs Debian's chromium (/usr/bin/chromium; .ci/run installs it) and the
`playwright` Python package (the dev extra). Playwright never downloads a
browser here: it drives the system Chromium. Skipped where either is missing.
Screenshots go to build/browser/ for a human to look at.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import nbformat
import pytest

from notebook_tools import ROOT, free_port, running_server, write_notebook

pytestmark = pytest.mark.slow  # a real JupyterLab server (and browser): see `make test-fast`

REQUIRED = os.environ.get("MOE_COURSE_REQUIRE_BROWSER") == "1"  # set by .ci/run: CI must not skip these
CHROMIUM = os.environ.get("MOE_COURSE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    if REQUIRED:
        raise RuntimeError(f"browser tests required but no Chromium at {CHROMIUM} (apt-get install chromium)")
    pytest.skip("no system Chromium (apt-get install chromium)", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api")

ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
SHOTS = ROOT / "build" / "browser"


@pytest.fixture(scope="module")
def lab_url(tmp_path_factory):
    """JupyterLab serving a *copy* of the lessons, so the browser can never save over the course."""
    root = tmp_path_factory.mktemp("lab")
    shutil.copytree(ROOT / "notebooks", root / "notebooks", ignore=shutil.ignore_patterns("*.py", ".ipynb_checkpoints"))
    write_playground_only(root / "notebooks")
    port, token = free_port(), "browser-test"
    SHOTS.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        # its own workspaces and settings: never restore tabs another JupyterLab left open
        f"--LabApp.workspaces_dir={root / '.workspaces'}",
        f"--LabApp.user_settings_dir={root / '.settings'}",
    ]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    base = f"http://127.0.0.1:{port}"
    with running_server(cmd, root, f"{base}/api/status?token={token}", SHOTS / "lab.log"):
        yield base, token


PLAYGROUND_05 = "notebooks/05_playground_only.ipynb"


def write_playground_only(notebooks: Path) -> None:
    """Lesson 05 cut down to the cells its playground needs: setup, the clinic's data, the playground.

    The lesson's own code, cell for cell; nbval runs the whole lesson elsewhere,
    so the browser need not repeat its minute of training.
    """
    nb = nbformat.read(notebooks / "05_balance_and_capacity.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    wanted = [code[0]]  # imports and settings
    for marker in ("clinic = make_clinic(", "waiting_room_playground(clinic)"):
        found = [c for c in code if marker in c.source]
        assert len(found) == 1, f"lesson 05 should have exactly one code cell with {marker!r}, found {len(found)}"
        wanted += found
    nb.cells = wanted
    write_notebook(nb, notebooks / Path(PLAYGROUND_05).name)


def run_notebook_in_browser(page, base: str, token: str, notebook: str, ready: str) -> None:
    """Open a notebook in a freshly reset JupyterLab workspace, wait for the kernel, run all cells,
    then wait for ``ready`` to appear and the kernel to be idle again."""
    page.goto(f"{base}/lab/tree/{notebook}?reset&token={token}", wait_until="domcontentloaded")
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
    page.locator(".jp-Notebook").first.click()
    page.locator(".lm-MenuBar-item", has_text="Run").first.click()
    page.locator(".lm-Menu-item", has_text="Run All Cells").first.click()
    page.wait_for_selector(ready, state="attached", timeout=300_000)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=300_000)


def test_hospital_explorer_slider_updates_the_numbers(lab_url):
    base, token = lab_url
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            run_notebook_in_browser(page, base, token, "notebooks/00_welcome.ipynb", ".widget-slider")
            slider = page.locator(".widget-slider").first
            slider.scroll_into_view_if_needed()
            summary = page.locator(".widget-html-content").filter(has_text="each patient sees").first
            summary.wait_for(timeout=30_000)
            before = summary.text_content()
            assert "8 specialists, each patient sees 1" in before
            slider.scroll_into_view_if_needed()
            slider.locator(".noUi-handle, .slider-handle, [role=slider]").first.focus()
            for _ in range(4):
                page.keyboard.press("ArrowRight")
            page.wait_for_function(
                "() => [...document.querySelectorAll('.widget-html-content')].some("
                "e => e.textContent.startsWith('12 specialists'))",
                timeout=30_000,
            )
            page.wait_for_timeout(1500)  # let the chart image catch up before the screenshot
            after = summary.text_content()
            assert "12 specialists, each patient sees 1" in after, after
            page.screenshot(path=str(SHOTS / "00_welcome_widget.png"), full_page=False)
            slider.screenshot(path=str(SHOTS / "00_welcome_slider.png"))
        except BaseException:
            page.screenshot(path=str(SHOTS / "00_welcome_failure.png"))
            (SHOTS / "00_welcome_failure.html").write_text(page.content())
            raise
        finally:
            browser.close()


def test_waiting_room_playground_capacity_slider_updates_the_numbers(lab_url):
    """Lesson 05's playground (its cells alone, ``write_playground_only``): lower the capacity factor
    with the keyboard; fewer chairs, more patients turned away."""
    base, token = lab_url
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        try:
            run_notebook_in_browser(page, base, token, PLAYGROUND_05, ".widget-slider")
            summary = page.locator(".widget-html-content").filter(has_text="chairs for").first
            summary.wait_for(timeout=60_000)
            summary.scroll_into_view_if_needed()
            before = summary.text_content()
            assert "capacity factor 1.00" in before, before
            slider = page.locator(".widget-slider").filter(has_text="capacity factor").first
            slider.locator(".noUi-handle, .slider-handle, [role=slider]").first.focus()
            for _ in range(2):
                page.keyboard.press("ArrowLeft")
            page.wait_for_function(
                "() => [...document.querySelectorAll('.widget-html-content')].some("
                "e => e.textContent.includes('capacity factor 0.50'))",
                timeout=60_000,
            )
            page.wait_for_timeout(1500)  # let the chart image catch up before the screenshot
            after = summary.text_content()

            def turned_away(text: str) -> int:
                return int(text.split("Turned away in this batch:")[1].split(" of ")[0])

            assert "capacity factor 0.50" in after, after
            assert turned_away(after) > turned_away(before), (before, after)
            assert after.split("chairs")[0] != before.split("chairs")[0]  # C itself changed
            page.locator(".widget-image").last.scroll_into_view_if_needed()
            page.screenshot(path=str(SHOTS / "05_playground_widget.png"), full_page=False)
        except BaseException:
            page.screenshot(path=str(SHOTS / "05_playground_failure.png"))
            (SHOTS / "05_playground_failure.html").write_text(page.content())
            raise
        finally:
            browser.close()
