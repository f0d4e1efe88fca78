"""Who sends how many tokens to whom: the exchanges of a real run on W processes, step by step.

    from moe_course.distributed.launch import run_on_processes
    from moe_course.distributed.traffic import record_traffic, traffic_table, exchange_matrices

    results = run_on_processes(record_traffic, 2, MoEConfig(...), TrainConfig(...), {"num_specialties": 4})
    table = traffic_table(results)          # one row per (step, layer, source rank, destination rank)
    mats = exchange_matrices(table)         # (steps, layers, W, W) rows sent, source → destination

``record_traffic`` trains a model with expert parallelism on every rank
(``train_expert_parallel``) and keeps, after every step and for every MoE
layer, what ``ExpertParallelOutput`` reports: the rows this rank sent to each
rank (capacity-padded: full and empty slots), the token rows among them, the
load of each rank's experts, and the time spent exchanging and computing.
The model is a ``ClinicMoE`` on clinic patients (an ``MoEConfig``) or the
Switch GPT on the corpus (a ``GPTConfig``).
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from ..data.clinic import make_clinic
from ..data.corpus import Corpus, CorpusConfig
from ..device import seed_everything
from ..models import ClinicMoE
from ..moe import MoEConfig
from ..training.lm import LMTask
from ..training.loop import ClassificationTask, TrainConfig
from ..transformer import GPT, GPTConfig
from .layer import ExpertParallelOutput, shard_moe_layers
from .train import train_expert_parallel

__all__ = ["record_traffic", "traffic_table", "exchange_matrices", "layer_outputs", "imbalance_timings"]


def layer_outputs(output: Any) -> list[tuple[int, ExpertParallelOutput]]:
    """(layer, ExpertParallelOutput) for every expert-parallel layer in a model's output (GPTOutput, ClinicMoEOutput)."""
    moe = getattr(output, "moe", None)
    if isinstance(moe, ExpertParallelOutput):
        return [(0, moe)]
    return [(i, m) for i, m in enumerate(moe or ()) if isinstance(m, ExpertParallelOutput)]


def record_traffic(
    rank: int,
    world_size: int,
    model_config: MoEConfig | GPTConfig,
    train_config: TrainConfig,
    data: dict | CorpusConfig | None = None,
    *,
    eval_rows: int = 32,
) -> dict:
    """Train with expert parallelism on this rank and record every exchange (run it with ``run_on_processes``).

    model_config: an ``MoEConfig`` trains ``ClinicMoE`` on ``make_clinic(**data)``
    patients; a ``GPTConfig`` (with ffn="switch") trains the GPT on
    ``Corpus(data)``. Every rank builds the model from ``train_config.seed``.
    Returns {"rank", "traffic": list of row dicts, "history": the metrics
    table, "seconds"}; rows hold step, layer, src, dst, rows, tokens, bytes
    (rows · D · 4, one way), load (assignments for dst's experts, all ranks),
    exchange_seconds and expert_seconds (src's, for the whole layer).
    """
    torch.set_num_threads(1)
    if isinstance(model_config, GPTConfig):
        corpus = Corpus(data if data is not None else CorpusConfig())
        task = LMTask(corpus, model_config.block_size, eval_rows=eval_rows, eval_chunk=train_config.batch_size)
        seed_everything(train_config.seed)
        model = GPT(model_config)
        d_model = model_config.d_model
    elif isinstance(model_config, MoEConfig):
        clinic = make_clinic(**(data or {}))
        task = ClassificationTask.from_clinic(clinic)
        seed_everything(train_config.seed)
        model = ClinicMoE(clinic.d_in, clinic.num_diagnoses, model_config)
        d_model = model_config.d_model
    else:
        raise TypeError(
            f"model_config must be an MoEConfig (clinic) or a GPTConfig (language model), got {type(model_config).__name__}"
        )
    shard_moe_layers(model)
    rows: list[dict] = []

    def keep(step: int, output: Any) -> None:
        for layer, m in layer_outputs(output):
            for dst in range(world_size):
                rows.append(
                    {
                        "step": step,
                        "layer": layer,
                        "src": rank,
                        "dst": dst,
                        "rows": int(m.sent[dst]),
                        "tokens": int(m.sent_tokens[dst]),
                        "bytes": int(m.sent[dst]) * d_model * 4,
                        "load": int(m.tokens_per_rank[dst]),
                        "dropped": int(m.num_dropped),
                        "exchange_seconds": m.exchange_seconds,
                        "expert_seconds": m.expert_seconds,
                    }
                )

    result = train_expert_parallel(model, task, train_config, on_step=keep)
    return {"rank": rank, "traffic": rows, "history": result.history, "seconds": result.seconds}


def traffic_table(results: list[dict]) -> pd.DataFrame:
    """Every rank's rows from ``record_traffic`` in one table, sorted by step, layer, src, dst."""
    if not results or any("traffic" not in r for r in results):
        raise ValueError("traffic_table expects the list of results of record_traffic, one per rank")
    table = pd.DataFrame([row for r in results for row in r["traffic"]])
    return table.sort_values(["step", "layer", "src", "dst"], ignore_index=True)


def exchange_matrices(table: pd.DataFrame, column: str = "rows") -> torch.Tensor:
    """The table as (steps, layers, W, W): entry [t, l, s, q] = ``column`` sent from rank s to rank q."""
    steps, layers = sorted(table["step"].unique()), sorted(table["layer"].unique())
    world = int(table["src"].max()) + 1
    out = torch.zeros(len(steps), len(layers), world, world, dtype=torch.int64)
    si, li = {s: i for i, s in enumerate(steps)}, {name: i for i, name in enumerate(layers)}
    for row in table.itertuples():
        out[si[row.step], li[row.layer], row.src, row.dst] = getattr(row, column)
    return out


def imbalance_timings(
    rank: int,
    world_size: int,
    shares: list[float],
    *,
    tokens_per_rank: int = 2048,
    d_model: int = 64,
    d_ff: int = 256,
    experts_per_rank: int = 2,
    repeats: int = 5,
) -> list[dict]:
    """The busiest rank sets the pace: time forward+backward of an expert-parallel layer as routing gets lopsided.

    For each share p, every rank sends a fraction p of its tokens to rank 0's
    experts and spreads the rest evenly over the others' (p = 1/W is perfect
    balance). The routing is steered through the input: the router is 10·I on
    the first E features and each token is the one-hot of its expert plus small
    noise. Returns one row per (share, repeat) for this rank: the wall time of
    the whole forward+backward (``step_seconds``, after a barrier), the CPU time
    this process spent on it (``cpu_seconds``: its own work; a rank waiting in an
    exchange sleeps and uses none), the forward time of its own experts and of
    its exchanges, and the rows it received.

    On one machine the ranks share its cores, so a waiting rank lends its core
    to the busy one and the wall time hides the imbalance; the CPU time shows
    each rank's work, and on separate devices the step cannot be shorter than
    the busiest rank's.
    """
    import time

    import torch.distributed as dist

    from .layer import ExpertParallelMoE

    torch.set_num_threads(1)
    E = experts_per_rank * world_size
    if d_model < E:
        raise ValueError(f"d_model={d_model} must be at least the number of experts E={E} (one steering feature per expert)")
    for p in shares:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"every share must be in [0, 1], got {p!r}")
    torch.manual_seed(0)
    layer = ExpertParallelMoE(MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=E, capacity_factor=None))
    with torch.no_grad():
        layer.w_router.zero_()
        layer.w_router[:E, :E] = 10.0 * torch.eye(E)
    g = torch.Generator().manual_seed(rank)
    inputs = []
    for p in shares:
        n_busy = round(p * tokens_per_rank)
        busy = torch.arange(n_busy) % experts_per_rank  # rank 0's experts
        others = experts_per_rank + torch.arange(tokens_per_rank - n_busy) % (E - experts_per_rank)
        target = torch.cat([busy, others])  # (N,) the expert each token should reach
        inputs.append(
            torch.nn.functional.one_hot(target, d_model).float() + 0.01 * torch.randn(tokens_per_rank, d_model, generator=g)
        )
    rows = []
    for r in range(repeats + 1):  # round 0 warms up; the shares take turns, so a slow spell hits them all
        for p, x in zip(shares, inputs):
            dist.barrier()
            t0, cpu0 = time.perf_counter(), time.process_time()
            x_in = x.clone().requires_grad_(True)
            out = layer(x_in)
            (out.y.square().sum() + out.router_loss).backward()
            step, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            if r:
                rows.append(
                    {
                        "share": p,
                        "repeat": r,
                        "rank": rank,
                        "step_seconds": step,
                        "cpu_seconds": cpu,
                        "expert_seconds": out.expert_seconds,
                        "exchange_seconds": out.exchange_seconds,
                        "received": int(out.received.sum()),
                        "load": out.tokens_per_rank.tolist(),
                    }
                )
    return rows
