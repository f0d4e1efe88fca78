"""The fast path: the same computations as the readable core, arranged for speed on a CPU.

Nothing here is needed to understand a Mixture-of-Experts layer; everything here
computes exactly what a readable function of the core computes (the tests compare
them, outputs and gradients). One op per file, as megablocks' ``ops/`` does:

    flag.py            the one switch (``ENABLED``, ``enabled(False)``) and the one predicate (``applies``)
    activations.py     every activation with its derivative, for hand-written backwards
    threads.py         expert parallelism on CPU threads: ``over_experts``, ``expert_threads``
    shared_cores.py    one thread while other programs hold the cores: ``busy``, ``one_thread_when_busy``
    router_matmul.py   the router's product x @ w in the shapes a CPU matmul is quick at
    router_softmax.py  the router's softmax over few experts, in the layout a CPU is quick at
    sorting.py         the kept assignments sorted by expert, and the way back to the tokens
    sorted_experts.py  dispatch method "sort_split": one autograd op with a hand-written backward
    grouped_blocks.py  sort_split's "grouped" arrangement: each product one grouped-matmul call for all experts
    fused_switch.py    the whole top-1 Switch layer (router to losses) as one autograd op
    grouped_mm.py      dispatch method "grouped_mm": torch's grouped matmul, one call per layer

The dispatch methods register themselves in ``METHODS`` (``registry.method``);
``moe_course.dispatch`` lists them next to its readable ones. The arrows run one
way: the core imports this package, this package imports nothing of the core.
"""

from . import grouped_mm, sorted_experts  # noqa: E402,F401  (they register their dispatch methods)
from .activations import ACTIVATION_GRADS
from .flag import applies, enabled
from .fused_switch import applies_to as switch_layer_applies
from .fused_switch import switch_layer
from .registry import METHODS
from .router_matmul import router_matmul
from .router_softmax import softmax
from .shared_cores import busy, contention, one_thread_when_busy
from .threads import expert_order, expert_threads, over_experts, worth_threading

__all__ = [
    "ACTIVATION_GRADS",
    "applies",
    "enabled",
    "METHODS",
    "router_matmul",
    "softmax",
    "switch_layer",
    "switch_layer_applies",
    "busy",
    "contention",
    "one_thread_when_busy",
    "expert_order",
    "expert_threads",
    "over_experts",
    "worth_threading",
]
