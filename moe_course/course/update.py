"""``moe-course update``: take a new version of the course with git, keeping your work.

A plain ``git pull`` stops when it would overwrite a file you changed, and your
exercise notebooks are such files. This command does what a careful person would:

1. fetch the new version; stop if there is none, or if you committed to this clone
   yourself (then git's own merge is the right tool, and the command says so);
2. copy every file you changed to ``.moe-course/update-backups/<date>-<time>/``
   (exercise notebooks also to ``exercises/backups/``, where ``moe-course restore`` looks);
3. put those files back as they were committed, and fast-forward to the new version;
4. give you back your version of each file the update did not touch; for an exercise
   notebook the update did change, carry your answers into the new notebook, exercise
   by exercise; for any other file changed on both sides, keep the new version and
   say where yours is. Outputs of a lesson you ran are not work: the new lesson replaces them.

If anything goes wrong before the fast-forward, your files are put back as they were.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TextIO

import nbformat

from ..exercises.build import _write_text, backup_path, timestamp
from .backups import put_exercise
from .layout import STATE_DIR, CourseError, answer_cell, check_ids, fingerprint, is_stub, read_lesson


def _git(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)


def _blob(top: Path, commit: str, path: str) -> bytes | None:
    proc = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=top, capture_output=True)
    return proc.stdout if proc.returncode == 0 else None


def _changed_files(top: Path) -> list[str]:
    """Tracked files that differ from HEAD (in the index or the working tree), relative to the clone's top."""
    proc = _git(top, "status", "--porcelain=v1", "-z", "--untracked-files=no")
    entries = proc.stdout.split("\0")
    paths, i = [], 0
    while i < len(entries):
        entry = entries[i]
        if len(entry) > 3:
            paths.append(entry[3:])
            if entry[0] in "RC":  # a rename carries its old name next
                i += 1
                paths.append(entries[i])
        i += 1
    return sorted(set(paths))


def _in_the_way(top: Path, upstream: str) -> list[str]:
    """Untracked files of yours at paths the new version adds (git would refuse to overwrite them)."""
    untracked = set(_git(top, "ls-files", "--others", "--exclude-standard", "-z").stdout.split("\0")) - {""}
    if not untracked:
        return []
    incoming = set(_git(top, "diff", "--name-only", "-z", "HEAD", upstream).stdout.split("\0"))
    return sorted(untracked & incoming)


def _same_work(path: str, mine: bytes, base: bytes) -> bool:
    """Do two versions of a file hold the same cells (sources), so that only outputs differ?"""
    if not path.endswith(".ipynb"):
        return mine == base
    try:
        return fingerprint(json.loads(mine)["cells"]) == fingerprint(json.loads(base)["cells"])
    except (ValueError, KeyError, TypeError):
        return False


def merge_exercises(top: Path, path: str, mine: bytes, base: bytes | None, theirs: bytes) -> tuple[bytes, list[str]]:
    """The new exercise notebook with the learner's answers (and the cells they added) carried over."""
    solution = top / path.replace("exercises/", "solutions/", 1).replace(".ipynb", ".py")
    new = nbformat.reads(theirs.decode(), as_version=4)
    try:
        old = nbformat.reads(mine.decode(), as_version=4)
    except Exception:
        return theirs, ["your version could not be read as a notebook; the new one is in place"]
    lesson = read_lesson(solution) if solution.exists() else None
    carried = []
    for info in lesson.exercises if lesson else ():
        at = answer_cell(old.cells, info.ex_id, info.name)
        if at is None or is_stub(old.cells, info.ex_id):
            continue
        try:
            if put_exercise(new, old, info):
                carried.append(info.ex_id)
        except CourseError:
            continue
    # cells the learner added (not in the version they started from) go before the next check cell, or at the end
    base_ids = {c.get("id") for c in nbformat.reads(base.decode(), as_version=4).cells} if base else set()
    added = 0
    for i, cell in enumerate(old.cells):
        if cell.get("id") in base_ids or not base_ids or any(cell.get("id") == c.get("id") for c in new.cells):
            continue
        after = next((check_ids(c) for c in old.cells[i + 1 :] if check_ids(c)), [])
        at = next((j for j, c in enumerate(new.cells) if after and after[0] in check_ids(c)), len(new.cells))
        new.cells.insert(at, cell)
        added += 1
    notes = []
    if carried:
        notes.append(f"your answers to {', '.join(carried)} carried into the new version")
    if added:
        notes.append(f"{added} cell{'s' if added > 1 else ''} you added kept")
    return _write_text(new).encode(), notes


def update(root: Path, out: TextIO | None = None, now: _dt.datetime | None = None) -> int:
    out = out or sys.stdout
    say = lambda text: print(text, file=out, flush=True)  # noqa: E731
    proc = _git(root, "rev-parse", "--show-toplevel")
    if proc.returncode != 0:
        say(
            "This course folder is not a git clone, so it cannot update itself. Get the new version (clone or download "
            "it), then copy your notebooks from exercises/ into its exercises/ folder: your answers travel with them."
        )
        return 2
    top = Path(proc.stdout.strip())
    upstream = _git(top, "rev-parse", "--abbrev-ref", "--symbolic-full-name", "@{u}").stdout.strip()
    if not upstream:
        say("This clone has no upstream branch to take updates from (`git branch -u origin/main` sets one).")
        return 2
    say(f"Fetching the new version of the course ({upstream}) …")
    fetched = _git(top, "fetch", "--quiet")
    if fetched.returncode != 0:
        say(f"git fetch failed; nothing was changed.\n{fetched.stderr.strip()}")
        return 1
    behind = int(_git(top, "rev-list", "--count", f"HEAD..{upstream}").stdout.strip() or 0)
    ahead = int(_git(top, "rev-list", "--count", f"{upstream}..HEAD").stdout.strip() or 0)
    if behind == 0:
        say("The course is up to date.")
        return 0
    if ahead:
        say(
            f"You have made {ahead} commit{'s' if ahead > 1 else ''} of your own in this clone, so git has to merge: run "
            f"`git pull` and resolve what it asks (your committed work is safe in git). Nothing was changed."
        )
        return 1
    stamp = timestamp(now)
    mine_paths = _changed_files(top)
    in_the_way = _in_the_way(top, upstream)
    keep = top / STATE_DIR / "update-backups" / stamp
    saved: dict[str, bytes | None] = {}
    for rel in mine_paths + in_the_way:
        path = top / rel
        saved[rel] = path.read_bytes() if path.is_file() else None
        if saved[rel] is not None:
            (keep / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, keep / rel)
            if rel.startswith("exercises/") and rel.endswith(".ipynb") and "/" not in rel[len("exercises/") :]:
                shutil.copy2(path, backup_path(top / "exercises", Path(rel).stem, stamp))
    if saved:
        say(f"Your changed files are saved in {keep.relative_to(top)}/ ({len(saved)} file{'s' if len(saved) > 1 else ''}).")
    old_head = _git(top, "rev-parse", "HEAD").stdout.strip()

    def put_back() -> None:
        for rel, data in saved.items():
            if data is not None:
                (top / rel).parent.mkdir(parents=True, exist_ok=True)
                (top / rel).write_bytes(data)

    tracked = [rel for rel in mine_paths if _blob(top, "HEAD", rel) is not None]
    if tracked:
        reset = _git(top, "checkout", "HEAD", "--", *tracked)
        if reset.returncode != 0:
            put_back()
            say(f"Could not set your changed files aside ({reset.stderr.strip()}); nothing was changed.")
            return 1
    for rel in in_the_way:
        (top / rel).unlink()
    merged = _git(top, "merge", "--ff-only", "--quiet", upstream)
    if merged.returncode != 0:
        _git(top, "checkout", old_head, "--", ".")
        put_back()
        say(f"git could not take the new version ({merged.stderr.strip()}); your files are as they were.")
        return 1
    new_head = _git(top, "rev-parse", "HEAD").stdout.strip()
    log = _git(top, "log", "--oneline", f"{old_head}..{new_head}").stdout.strip().splitlines()
    say(f"Updated: {len(log)} new commit{'s' if len(log) > 1 else ''} of the course.")
    for rel, mine in saved.items():
        base, theirs = _blob(top, old_head, rel), _blob(top, new_head, rel)
        target = top / rel
        if mine is None:  # you had deleted it
            if theirs == base and target.exists():
                target.unlink()
            continue
        if theirs == base:  # the update did not touch it: yours, unchanged
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(mine)
            continue
        if theirs is None:
            say(f"  {rel}: removed from the course; your copy is in {keep.relative_to(top)}/{rel}")
            continue
        if base is not None and _same_work(rel, mine, base):
            continue  # only outputs (or nothing of yours) differed: the new version stands
        if rel.startswith("exercises/") and rel.endswith(".ipynb"):
            data, notes = merge_exercises(top, rel, mine, base, theirs)
            target.write_bytes(data)
            say(f"  {rel}: the new version, with {'; '.join(notes) if notes else 'nothing of yours to carry over'}")
            continue
        say(f"  {rel}: changed by the course and by you; the new version is in place, yours is in {keep.relative_to(top)}/{rel}")
    say("Done. `moe-course progress` shows where you are.")
    return 0
