"""Check your exercise notebooks from the shell: ``moe-check 01`` (or ``python -m moe_course.check 01``).

It runs ``pytest --nbval-lax`` on ``exercises/01_*.ipynb`` (save the notebook
in JupyterLab first): every cell runs top to bottom, and each check cell
either passes or fails with a message naming the mistake. With no argument it
checks every exercise notebook.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from .exercises.build import BuildError, find_root


def notebooks(root: Path, lessons: list[str]) -> list[Path]:
    folder = root / "exercises"
    if not lessons:
        return sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    found = []
    for lesson in lessons:
        key = lesson.zfill(2) if lesson.isdigit() else lesson
        matches = sorted(folder.glob(f"{key}*.ipynb"))
        if not matches:
            raise BuildError(f"no exercise notebook matches {lesson!r} in {folder}")
        found += matches
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-check", description="Check exercise notebooks with nbval.")
    parser.add_argument("lessons", nargs="*", help="lesson numbers such as 01 (default: all)")
    parser.add_argument("--root", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        root = args.root or find_root()
        paths = notebooks(root, args.lessons)
    except BuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rel = [str(p.relative_to(root)) for p in paths]
    print("Checking", ", ".join(rel), "with nbval (save your notebook in JupyterLab first).", flush=True)
    cmd = [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env", "-p", "no:cacheprovider", "-q", "--no-header", "-rN", *rel]
    code = subprocess.call(cmd, cwd=root)
    if code == 0:
        print("✅ Every check passed.")
    else:
        print("❌ Some cells failed. Scroll up to the first failure: an ExerciseError names the mistake; "
              "a NotImplementedError means that exercise is not done yet.")
    return code


if __name__ == "__main__":
    sys.exit(main())
