"""Benchmark: one training step of the Switch language model against its dense twin.

    python -m moe_course.bench --lm                       # lesson 08's sizes and 4x wider, 3 interleaved rounds
    python -m moe_course.bench --lm --moe-every 2 --capacity-factor none --top-k 2 --router top_k

A step is what ``moe_course.training.train`` runs for every batch
(``train_step``): forward, the loss with the router losses, backward,
gradient clipping and the AdamW update. Drawing the batch is left out (it
costs the same for both models and would only dilute the ratio): a few
batches are drawn once and the two models cycle through the same ones.
Both models are built from lesson 08's ``GPTConfig`` (``LMBenchConfig.models``):
the dense twin has one FFN of width d_ff per block, the Switch model E
experts of that width, so a token costs the same FLOPs in both (plus the
router's). Timed in pairs (``bench.paired_times``) over interleaved rounds
(``bench.rounds``), on one thread unless told otherwise: lesson 08 trains
each model in its own process on one thread.

A third model splits the Switch step's extra time in two: the hash twin
(``hash_twin``, lesson 08's hash layer) has the same experts and no router.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import torch

from ..data.corpus import Corpus, CorpusConfig
from ..training.lm import LMTask
from ..training.loop import TrainConfig, make_optimizer, train_step
from ..transformer import GPT, GPTConfig
from .benchmark import PairedTiming, paired_times

__all__ = ["LMBenchConfig", "LESSON_08", "hash_twin", "lm_steps", "time_lm_steps"]


@dataclass(frozen=True)
class LMBenchConfig:
    """A dense GPT and its Switch twin as lesson 08 builds them, ``width`` times wider (d_model and d_ff)."""

    width: int = 1  # multiplies d_model and d_ff
    block_size: int = 32  # T
    d_model: int = 64  # D at width 1
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 128  # F at width 1, the dense FFN's and every expert's
    num_experts: int = 8  # E
    batch_size: int = 32  # B: N = B·T tokens per step
    moe_every: int = 1  # every moe_every-th block is a Switch block
    capacity_factor: float | None = 1.25  # None: dropless
    top_k: int = 1  # K (needs a GPTConfig with top_k, and router "top_k" for K > 1)
    router: str | None = None  # None: GPTConfig's default (the Switch router)
    dispatch: str | None = None  # the MoE dispatch method; None: the default (moe_course.dispatch.DEFAULT_METHOD)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("capacity_factor", "router", "dispatch"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"LMBenchConfig.{f.name} must be a positive int, got {value!r}")

    @property
    def name(self) -> str:
        extra = "" if self.top_k == 1 and self.router is None else f" {self.router or 'switch'} k={self.top_k}"
        extra += f" dispatch={self.dispatch}" if self.dispatch else ""
        return (
            f"width x{self.width}: D={self.d_model * self.width} F={self.d_ff * self.width} E={self.num_experts} "
            f"T={self.block_size} B={self.batch_size} layers={self.n_layers} moe_every={self.moe_every} "
            f"capacity={self.capacity_factor}{extra}"
        )

    def models(self, vocab_size: int) -> tuple[GPTConfig, GPTConfig]:
        """(dense, switch) GPTConfigs: lesson 08's ``dense`` and ``dense.switch_twin(E)``, with this config's options."""
        dense = GPTConfig(
            vocab_size=vocab_size,
            block_size=self.block_size,
            d_model=self.d_model * self.width,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            d_ff=self.d_ff * self.width,
            moe_every=self.moe_every,
            capacity_factor=self.capacity_factor,
            dispatch=self.dispatch,
        )
        routing = {}
        if self.router is not None:
            routing["router"] = self.router
        if self.top_k != 1:
            routing["top_k"] = self.top_k
        if routing:
            known = {f.name for f in fields(GPTConfig)}
            missing = sorted(set(routing) - known)
            if missing:
                raise ValueError(f"this GPTConfig has no field(s) {missing}: the LM benchmark cannot set them")
        return dense, replace(dense.switch_twin(self.num_experts), **routing)


# The reference of issue 17: lesson 08's GPT (T=32, D=64, 2 layers, 4 heads, B=32) with F=128 and a Switch layer of
# E=8 in every block. Lesson 08's race now uses a narrower FFN, Switch in every other block:
# ``python -m moe_course.bench --lm --d-ff 32 --moe-every 2``.
LESSON_08 = LMBenchConfig()


def hash_twin(switch: GPTConfig) -> GPTConfig | None:
    """The Switch model's hash twin (lesson 08's third runner): the same experts, no router; None for top-k > 1.

    Each token goes to the expert a fixed table assigns to its character, with
    gate 1 and no capacity: no router product, no softmax, no router losses,
    nothing dropped, but the same sorting by expert, the same expert products
    and the same parameters. Its step time is what the experts cost without the
    GP, so "hash" minus "dense" is the price of splitting the FFN into experts,
    and "switch" minus "hash" the price of the learned router. Two differences
    remain: the hash layer still fills a Switch layer's ``MoEOutput`` fields (a
    dozen small calls), and it drops nothing, so where the Switch layer drops
    tokens for lack of capacity it does less expert arithmetic than its hash
    twin (at 4x lesson 08's width the hash twin is the slower of the two).
    A hash layer sends one token to one expert: for top-k > 1 it is no like-for-like twin.
    """
    if getattr(switch, "top_k", 1) != 1:
        return None
    return replace(switch, router="hash", capacity_factor=None)


def lm_steps(config: LMBenchConfig, *, batches: int = 8, seed: int = 0, hash_floor: bool = True) -> dict:
    """Callables "dense", "switch" and (``hash_floor``, top-1) "hash" (``hash_twin``): each runs one training step
    of its model on the next of ``batches`` fixed batches."""
    corpus = Corpus(CorpusConfig())
    task = LMTask(corpus, block_size=config.block_size, eval_rows=1)
    generator = torch.Generator().manual_seed(seed)
    fixed = [task.sample_batch(config.batch_size, generator, torch.device("cpu")) for _ in range(batches)]
    train_config = TrainConfig(batch_size=config.batch_size, lr=1e-2)  # lesson 08's learning rate and clipping
    steps = {}
    models = dict(zip(("dense", "switch"), config.models(corpus.vocab_size)))
    hashed = hash_twin(models["switch"]) if hash_floor else None
    if hashed is not None:
        models["hash"] = hashed
    for name, gpt in models.items():
        torch.manual_seed(seed)
        model = GPT(gpt).train()
        optimizer = make_optimizer(model, train_config)
        turn = iter(range(10**12))

        def step(model=model, optimizer=optimizer, turn=turn) -> None:
            train_step(model, task, fixed[next(turn) % len(fixed)], optimizer, train_config)

        steps[name] = step
    return steps


def time_lm_steps(config: LMBenchConfig, *, repeats: int = 30, warmup: int = 5) -> dict[str, PairedTiming]:
    """Paired step times of the Switch model against the dense twin (fresh models): name → ``PairedTiming``."""
    return paired_times(lm_steps(config), baseline="dense", repeats=repeats, warmup=warmup)


def describe(config: LMBenchConfig) -> dict:
    return asdict(config) | {"name": config.name}
