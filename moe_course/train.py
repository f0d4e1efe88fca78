"""``python -m moe_course.train``: the same as ``moe-train``; under ``torchrun`` with several processes, expert parallel.

The command lives in ``moe_course.training.cli``; this entry stays because the README
and saved run scripts call ``python -m moe_course.train``. Started by
``torchrun --standalone --nproc-per-node N -m moe_course.train ...`` (WORLD_SIZE > 1),
it hands over to ``moe_course.distributed.train``, which takes the same flags.
"""

import os
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

__all__ = [
    "main",
    "build_parser",
    "configs_from_args",
    "load_run",
    "CONFIG_FILE",
    "CHECKPOINT_FILE",
    "METRICS_FILE",
    "SAMPLES_FILE",
]

if __name__ == "__main__":
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun started several processes: experts spread over them
        from .distributed.train import main as distributed_main

        code = distributed_main()  # every file written, the process group destroyed
        # Then leave without the interpreter's teardown: there, gloo's worker threads can still abort a rank
        # ("terminate called without an active exception", exit -6) after a run that succeeded (seen once in
        # CI; pytorch/pytorch#190489). Nothing is left to run or to flush but the standard streams.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(main())
