"""Expert parallelism on CPU cores now lives in ``moe_course.fast.threads``; this name stays until the package is laid out in folders."""

from .fast.threads import (  # noqa: F401
    MAX_BLOCK_FLOPS,
    MIN_BLOCK_FLOPS,
    MIN_EXPERTS_PER_THREAD,
    expert_order,
    expert_threads,
    over_experts,
    worth_threading,
)

__all__ = ["expert_order", "worth_threading", "over_experts", "expert_threads", "MIN_EXPERTS_PER_THREAD", "MAX_BLOCK_FLOPS", "MIN_BLOCK_FLOPS"]
