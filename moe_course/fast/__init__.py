"""The fast path: the same computations as the readable core, arranged for speed on a CPU.

Nothing here is needed to understand a Mixture-of-Experts layer; everything here
computes exactly what a readable function of the core computes (the tests compare
them, outputs and gradients). One op per file, as megablocks' ``ops/`` does:

    flag.py            the one switch (``ENABLED``, ``enabled(False)``) and the one predicate (``applies``)
    activations.py     every activation with its derivative, for hand-written backwards
    threads.py         expert parallelism on CPU threads: ``over_experts``, ``expert_threads``
    router_matmul.py   the router's product x @ w in the shapes a CPU matmul is quick at
    sorting.py         the kept assignments sorted by expert, and the way back to the tokens
    sorted_experts.py  dispatch method "sort_split": one autograd op with a hand-written backward
    grouped_mm.py      dispatch method "grouped_mm": torch's grouped matmul, one call per layer

The dispatch methods register themselves in ``METHODS`` (``registry.method``);
``moe_course.dispatch`` lists them next to its readable ones. The arrows run one
way: the core imports this package, this package imports nothing of the core.
"""

from . import grouped_mm, sorted_experts  # noqa: E402,F401  (they register their dispatch methods)
from .activations import ACTIVATION_GRADS
from .flag import applies, enabled
from .registry import METHODS
from .router_matmul import router_matmul
from .threads import expert_order, expert_threads, over_experts, worth_threading

__all__ = [
    "ACTIVATION_GRADS",
    "applies",
    "enabled",
    "METHODS",
    "router_matmul",
    "expert_order",
    "expert_threads",
    "over_experts",
    "worth_threading",
]
