"""``moe-check 01`` (or ``python -m moe_course.course.check 01``): the older name of ``moe-course check 01``.

It runs the exercise notebook ``exercises/01_*.ipynb`` with nbval and prints one
line per exercise (see moe_course.course.checking). With no argument it checks
every exercise notebook.
"""

from __future__ import annotations

import sys

from .cli import check_alias as main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
