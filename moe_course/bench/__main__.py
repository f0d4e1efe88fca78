"""``python -m moe_course.bench``: the same as ``moe-bench`` (see moe_course.bench.benchmark)."""

import sys

from .benchmark import main

sys.exit(main())
