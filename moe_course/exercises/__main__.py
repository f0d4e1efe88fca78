"""Command line: ``moe-exercises build`` / ``moe-exercises status`` (instructors; learners use ``moe-course``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..course.layout import CourseError
from .build import build, find_root, status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-exercises", description="Generate exercises/ from solutions/ (the single source).")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="regenerate exercises/ from solutions/ (exercises you edited are kept)")
    b.add_argument("--force", action="store_true", help="also regenerate exercises you edited (your version is kept under exercises/backups/)")
    b.add_argument("--only", metavar="NN", help="only one lesson, e.g. 1 or 01")
    s = sub.add_parser("status", help="exit 1 if exercises/ differs from what solutions/ generates")
    for p in (b, s):
        p.add_argument("--root", type=Path, default=None, help="course folder (default: found from the current folder)")
    args = parser.parse_args(argv)
    try:
        root = args.root or find_root()
        if args.command == "status":
            problems = status(root)
            for p in problems:
                print(f"not in sync: {p}")
            if problems:
                return 1
            print("exercises/ is in sync with solutions/.")
            return 0
        report = build(root, force=args.force, only=args.only)
    except CourseError as err:  # BuildError is one
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in report.written:
        print(f"wrote   {path.relative_to(root)}")
    for path in report.backups:
        print(f"backup  {path.relative_to(root)}  (your edited version)")
    for path in report.retired:
        print(f"moved   {path.relative_to(root)}  (an old .py twin: exercises are .ipynb only now)")
    for path in report.kept:
        print(f"kept    {path.relative_to(root)}: you have edited it since it was generated, so it was not overwritten.")
    print(f"{len(report.written)} written, {len(report.unchanged)} unchanged, {len(report.kept)} kept, "
          f"{len(set(report.exercises))} exercises.")
    if report.kept:
        lessons = " ".join(sorted({p.name[:2] for p in report.kept}))
        print(f"Your work is safe. To take the new version of those anyway: `moe-course reset {lessons}` "
              f"(or `moe-exercises build --force`); your versions are saved under exercises/backups/ first.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
