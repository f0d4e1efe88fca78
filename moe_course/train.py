"""``python -m moe_course.train``: the same as ``moe-train`` (on several processes: ``moe_course.distributed.train``).

The command lives in ``moe_course.training.cli``; this entry stays because the README
and saved run scripts call ``python -m moe_course.train``.
"""

import sys

from .training.cli import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    SAMPLES_FILE,
    build_parser,
    configs_from_args,
    load_run,
    main,
)

__all__ = ["main", "build_parser", "configs_from_args", "load_run", "CONFIG_FILE", "CHECKPOINT_FILE", "METRICS_FILE", "SAMPLES_FILE"]

if __name__ == "__main__":
    sys.exit(main())
