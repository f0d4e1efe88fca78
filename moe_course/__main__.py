"""``python -m moe_course``: the learner's command, the same as ``moe-course`` (see moe_course.course.cli)."""

import sys

from .course.cli import main

sys.exit(main())
