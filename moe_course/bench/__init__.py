"""Benchmarks: what the speed of a piece of code is, measured fairly.

    benchmark  ``moe-bench`` (or ``python -m moe_course.bench``): every dispatch method against a dense FFN,
               as paired ratios; paired_times(), the one fair way the course times code
    timing     time_per_batch(): models timed side by side, as paired ratios
    memory     peak_bytes(): the extra memory a piece of code needs, on any device
    serving    weight_bytes(), serving_table(): what an MoE must hold, tokens per second by batch size (lesson 10)
    rounds     interleaved rounds, quiet and with busy background processes, pooled (``moe-bench --busy 2``)
    lm         a training step of the Switch LM against its dense twin (``moe-bench --lm``)

Timings live here and in the lessons that measure them, never in docstrings or unit tests.
"""

from .benchmark import (
    QUICK,
    STANDARD,
    BenchConfig,
    PairedTiming,
    format_table,
    main,
    paired_times,
    run_benchmark,
    steady_allocator,
)
from .memory import MemoryRecorder, peak_bytes
from .timing import time_per_batch

__all__ = [
    "BenchConfig",
    "STANDARD",
    "QUICK",
    "steady_allocator",
    "PairedTiming",
    "paired_times",
    "run_benchmark",
    "format_table",
    "main",
    "time_per_batch",
    "MemoryRecorder",
    "peak_bytes",
]
