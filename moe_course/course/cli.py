"""``moe-course`` (or ``python -m moe_course``): the learner's one command.

moe-course lab [NN | N.M]      open the course in JupyterLab (a lesson, or an exercise's notebook)
moe-course check [NN | N.M …]  run exercise notebooks with nbval: one line per exercise, and a total
moe-course progress            every lesson and exercise at a glance (from the last checks; runs nothing)
moe-course reset NN | N.M …    a lesson's notebook, or one exercise, back to its stub (yours is backed up)
moe-course restore [NN | N.M]  bring back a backup (without an argument: list them)
moe-course update              take a new version of the course with git, keeping your work
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

from .layout import CourseError, find_root, lessons, select

COMMANDS = ("lab", "check", "progress", "reset", "restore", "update")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-course",
        description="The Mixture-of-Experts course: open it, check your exercises, see your progress.",
        epilog="Lessons are numbers such as 1 or 01; exercises are ids such as 1.2.",
    )
    parser.add_argument("--root", type=Path, default=None, help="the course folder (default: found from the current folder)")
    common = argparse.ArgumentParser(add_help=False)  # --root after the command works too
    common.add_argument("--root", type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    add = lambda name, **kw: sub.add_parser(name, parents=[common], **kw)  # noqa: E731
    p = add(
        "lab",
        help="open the course in JupyterLab",
        description="Open the course in JupyterLab. Any further arguments go to JupyterLab (e.g. --no-browser --port 8899).",
    )
    p.add_argument(
        "target", nargs="?", help="a lesson (opens notebooks/NN_*.ipynb) or an exercise id (opens its exercise notebook)"
    )
    p = add("check", help="check exercise notebooks: one line per exercise")
    p.add_argument("targets", nargs="*", metavar="NN", help="lessons to check, e.g. 01 (default: every lesson)")
    p.add_argument(
        "--jobs", "-j", type=int, default=None, help="notebooks to run at once (default: one per two cores, at most 4)"
    )
    add("progress", help="the whole course at a glance, from the last checks")
    p = add("reset", help="put a lesson's exercise notebook, or one exercise, back to its stub")
    p.add_argument("targets", nargs="+", metavar="NN|N.M", help="a lesson (e.g. 01) or an exercise (e.g. 1.2)")
    p = add("restore", help="bring back a backup from exercises/backups/ (no argument: list them)")
    p.add_argument("targets", nargs="*", metavar="NN|N.M", help="a lesson (its newest backup) or one exercise's answer")
    p.add_argument("--from", dest="source", type=Path, default=None, metavar="FILE", help="restore from this backup file")
    add("update", help="take a new version of the course with git, keeping your work")
    return parser


def lab_command(root: Path, target: str | None, extra: list[str]) -> list[str]:
    """The JupyterLab command that opens the course at a lesson (or an exercise's notebook)."""
    page = "notebooks/00_welcome.ipynb"
    if target:
        ((lesson, info),) = select(lessons(root), [target])
        folder = "exercises" if info is not None else "notebooks"
        matches = sorted((root / folder).glob(f"{lesson.number}_*.ipynb"))
        if matches:
            page = matches[0].relative_to(root).as_posix()
    cmd = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={root}", f"--LabApp.default_url=/lab/tree/{page}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # Jupyter refuses to run as root unless told (containers)
    return cmd + extra


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `moe-course progress | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _split_lab(argv: list[str]) -> tuple[list[str], list[str]]:
    """`lab [NN|N.M] <anything for JupyterLab>`: our part, and the rest, which goes to JupyterLab untouched."""
    if "lab" not in argv:
        return argv, []
    at = argv.index("lab") + 1
    if at < len(argv) and re.fullmatch(r"\d+(\.\d+)?|\d\d_\w+", argv[at]):
        at += 1
    rest = argv[at:]
    if rest[:1] in (["-h"], ["--help"]):
        return argv[:at] + rest[:1], []
    return argv[:at], rest


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    ours, extra = _split_lab(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(ours)
    try:
        root = (args.root or find_root()).resolve()
        if args.command == "lab":
            cmd = lab_command(root, args.target, extra)
            print("Opening the course in JupyterLab (Ctrl-C stops it):", " ".join(cmd[2:]), flush=True)
            try:
                return subprocess.call(cmd, cwd=root)
            except KeyboardInterrupt:
                return 130
        if args.command == "update":
            from .update import update

            return update(root)
        all_lessons = lessons(root)
        if args.command == "progress":
            from .progress import show

            return show(root, all_lessons)
        if args.command == "check":
            from .checking import check

            picked = select(all_lessons, args.targets) if args.targets else [(lesson, None) for lesson in all_lessons]
            chosen = list(dict.fromkeys(lesson for lesson, _ in picked))
            return check(root, chosen, jobs=args.jobs)
        from . import backups

        if args.command == "reset":
            lines = backups.reset(root, select(all_lessons, args.targets))
        elif not args.targets and args.source is None:
            lines = backups.listing(root, all_lessons)
        else:
            picks = select(all_lessons, args.targets or [_lesson_of(args.source)])
            lines = backups.restore(root, picks, source_file=args.source)
        print("\n".join(lines))
        return 0
    except CourseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _lesson_of(path: Path) -> str:
    """The lesson a backup file belongs to, from its name (NN_topic.<date>-<time>.ipynb)."""
    if not path.exists():
        raise CourseError(f"{path} does not exist")
    return path.name[:2]


def check_alias(argv: list[str] | None = None) -> int:
    """``moe-check [NN …]``: the older name of ``moe-course check``."""
    return main(["check", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
