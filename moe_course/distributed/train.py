"""Train the course's Switch LM on several processes: data parallel for the dense parts, expert parallel for the experts.

    torchrun --standalone --nproc-per-node 2 -m moe_course.distributed.train \\
        --model switch --experts 8 --capacity-factor none --steps 2000 --out runs/switch8-ep2

It takes every flag of ``python -m moe_course.train`` (the same configs) plus
``--timeout``. Every rank builds the same model from the same seed, keeps its
E/W experts of every Switch layer (``shard_moe_layers``) and draws the same
global batch of ``--batch-size`` rows, of which it trains on its own
``batch_size / W`` rows. One step::

    loss_r = Σ cross-entropy over my targets / all targets in the global batch
             + my part of the router losses                 (parts sum to the one-process loss)
    loss_r.backward()                                       (experts: complete via the backward exchange)
    all_reduce_replicated_grads(model)                      (router, attention, embeddings: summed)
    clip_grad_norm_(model, ...)                             (the global norm)
    optimizer.step()                                        (AdamW, as one process)

so with ``--capacity-factor none`` (dropless) the loss curve equals one
process's at the same global batch, up to float round-off. With a capacity
factor the layers are capacity-padded with capacity counted per rank, which
equals one process making one forward call per rank's rows.

Rank 0 writes the run folder as ``moe_course.training.cli`` does (``config.json``,
``metrics.csv``, ``checkpoint.pt`` with every expert gathered, so
``moe_course.training.cli.load_run`` reads it); ``--resume`` is not supported here.
Processes find each other through torchrun's environment (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT); gloo on the CPU, NCCL with ``--device cuda``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..data.corpus import Corpus, LMBatch
from ..device import seed_everything
from ..training.lm import LMEvaluation, LMTask, evaluate_lm
from ..training.loop import TrainConfig, TrainResult, make_optimizer, model_logits
from ..transformer import GPT, flops_per_token, param_count
from .grads import all_reduce_replicated_grads, check_replicas_in_sync, clip_grad_norm_
from .group import DEFAULT_TIMEOUT_SECONDS, explain_collective_errors, init_process_group, require_process_group
from .layer import gather_full_state_dict, shard_moe_layers

__all__ = ["train_expert_parallel", "evaluate_expert_parallel", "main"]


def _my_rows(total: int, rank: int, world: int, what: str) -> slice:
    if total % world:
        raise ValueError(f"{what}={total} must be divisible by the number of processes ({world}): each rank takes an equal share")
    share = total // world
    return slice(rank * share, (rank + 1) * share)


def evaluate_expert_parallel(model: nn.Module, task: LMTask, *, group: Any = None) -> LMEvaluation:
    """``task.evaluation(model)`` on W ranks: each evaluation call's rows are shared out, the tallies summed.

    Call k evaluates the same held-out rows as one process's call k (rows
    k·chunk … of ``task.held_out``), rank r taking its 1/W of them, so per-call
    statistics (balance) match one process's too.
    """
    rank, world = require_process_group(group, "evaluate_expert_parallel")
    held, chunk = task.held_out, task.eval_chunk
    _my_rows(chunk, rank, world, "LMTask.eval_chunk")
    _my_rows(len(held), rank, world, "LMTask.eval_rows")
    S = len(task.domains)
    device = next(model.parameters()).device  # NCCL reduces tensors on the GPU only
    sums = torch.zeros(4 * S, dtype=torch.float64)
    dropped: list[list[float]] = []
    balance: list[list[float]] = []
    for start in range(0, len(held), chunk):
        part = held.rows(start, min(start + chunk, len(held)))
        mine = _my_rows(len(part), rank, world, "the rows of an evaluation call")
        ev = evaluate_lm(model, part.rows(mine.start, mine.stop), task.domains, chunk=len(part))
        sums += torch.cat([ev.loss_sum, ev.count.double(), ev.exact_right.double(), ev.exact_total.double()])
        dropped.append(ev.dropped)
        balance.append(ev.balance)
    layers = len(dropped[0])
    per_layer = torch.tensor(
        [
            [sum(d[i] for d in dropped) / len(dropped) for i in range(layers)],
            [sum(b[i] for b in balance) / len(balance) for i in range(layers)],
        ],
        dtype=torch.float64,
        device=device,
    )
    sums = sums.to(device)
    with explain_collective_errors("summing the evaluation over ranks (all_reduce)", group):
        dist.all_reduce(sums, group=group)
        dist.all_reduce(per_layer, group=group)
    sums, per_layer = (
        sums.cpu(),
        per_layer.cpu() / world,
    )  # dropped: mean of the ranks' shares; balance: the same global value on every rank
    return LMEvaluation(
        task.domains,
        sums[:S],
        sums[S : 2 * S].long(),
        sums[2 * S : 3 * S].long(),
        sums[3 * S :].long(),
        per_layer[0].tolist(),
        per_layer[1].tolist(),
    )


def _local_rows(batch: Any, rows: slice) -> tuple[Any, torch.Tensor, int]:
    """This rank's rows of a global batch: → (model input, targets, number of targets in the global batch)."""
    if isinstance(batch, LMBatch):
        local = batch.rows(rows.start, rows.stop)
        return local.x, local.y, batch.y.numel()
    x, y = batch  # ClassificationTask: (x (B, d_in), y (B,))
    return x[rows], y[rows], y.numel()


def train_expert_parallel(
    model: nn.Module,
    task: Any,
    config: TrainConfig = TrainConfig(),
    *,
    group: Any = None,
    progress: bool = False,
    on_step: Callable[[int, Any], None] | None = None,
) -> TrainResult:
    """``moe_course.training.train`` for a model whose MoE layers are ``ExpertParallelMoE`` (a collective).

    task: an ``LMTask`` (held-out rows shared out, ``evaluate_expert_parallel``)
    or a ``ClassificationTask`` (every rank evaluates the whole validation set,
    which is right for models that treat each patient alone). Every rank calls
    this with the same model (sharded from the same seed), task and config.
    The history (one row per evaluation, the same columns as ``train``) holds
    global numbers and is the same on every rank. ``on_step(step, output)``
    sees each step's model output (e.g. to record the exchanges). No
    checkpoints or resuming.
    """
    from tqdm.auto import tqdm

    rank, world = require_process_group(group, "train_expert_parallel")
    mine = _my_rows(config.batch_size, rank, world, "TrainConfig.batch_size")
    check_replicas_in_sync(model, group=group)
    device = next(model.parameters()).device
    optimizer = make_optimizer(model, config)  # as one process: the same update
    generator = torch.Generator().manual_seed(config.seed)
    rows: list[dict[str, float]] = []
    running: dict[str, float] = {}
    t0 = time.perf_counter()
    bar = tqdm(range(config.steps), desc=f"training on {world} processes", disable=not progress, leave=False)
    for step in bar:
        model.train()
        lr = config.lr_at(step)
        for g in optimizer.param_groups:
            g["lr"] = lr
        batch = task.sample_batch(config.batch_size, generator, device)  # the global batch: the same draw on every rank
        x, y, num_targets = _local_rows(batch, mine)
        out = model(x)
        logits, aux = model_logits(out)
        aux = torch.zeros((), device=device) if aux is None else aux  # my part of the router losses
        ce_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction="sum")
        loss = ce_sum / num_targets + aux  # my part of the global loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_replicated_grads(model, group=group)
        if config.grad_clip is not None:
            clip_grad_norm_(model, config.grad_clip, group=group)
        optimizer.step()
        parts = torch.stack([ce_sum.detach().double(), aux.detach().double()])
        with explain_collective_errors("summing the step's losses (all_reduce)", group):
            dist.all_reduce(parts, group=group)
        running["train_loss"] = running.get("train_loss", 0.0) + parts[0].item() / num_targets
        if isinstance(task, LMTask):  # the metrics LMTask.loss logs
            running["router_loss"] = running.get("router_loss", 0.0) + parts[1].item()
        running["_n"] = running.get("_n", 0.0) + 1
        if on_step is not None:
            on_step(step + 1, out)
        done = step + 1
        if done % config.eval_every == 0 or done == config.steps:
            n = running.pop("_n")
            row = {"step": done, "lr": lr, **{k: v / n for k, v in running.items()}}
            if isinstance(task, LMTask):
                row.update(evaluate_expert_parallel(model, task, group=group).as_dict())
            else:
                model.eval()
                row.update(task.evaluate(model, device))
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            running = {}
            bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k in ("train_loss", "val_loss")})
    bar.close()
    model.eval()
    return TrainResult(model, pd.DataFrame(rows), config, time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    """The torchrun entry point: ``python -m moe_course.train``'s flags, trained on every rank torchrun started."""
    from ..training.cli import CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE, build_parser, configs_from_args

    parser = build_parser()
    parser.prog = "torchrun --standalone --nproc-per-node N -m moe_course.distributed.train"
    d = parser.add_argument_group("distributed")
    d.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_SECONDS,
        help="seconds a rank waits for the others in any exchange before it fails (default %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.resume:
        parser.error("--resume is not supported when training on several processes; start a new --out")
    if args.stop_after is not None:
        parser.error("--stop-after is not supported when training on several processes")
    torch.set_num_threads(args.threads or 1)  # the processes share the cores: one thread each unless told otherwise
    try:
        model_cfg, corpus_cfg, train_cfg, task_kw = configs_from_args(args)
    except (ValueError, TypeError, FileNotFoundError, IsADirectoryError) as err:
        parser.error(str(err))
    use_cuda = (args.device or "cpu").startswith("cuda")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)  # one GPU per process, before NCCL starts
    try:
        rank, world = init_process_group(backend="nccl" if use_cuda else "gloo", timeout_seconds=args.timeout)
    except RuntimeError as err:
        parser.error(str(err))
    out = Path(args.out)
    try:
        for flag, value in (("--batch-size", train_cfg.batch_size), ("--eval-rows", task_kw["eval_rows"])):
            if value % world:
                parser.error(f"{flag}={value} must be divisible by the number of processes ({world}): each takes an equal share")
        if (out / CONFIG_FILE).exists() or (out / CHECKPOINT_FILE).exists():
            parser.error(f"{str(out)!r} already holds a run; choose another --out")
        corpus = Corpus(corpus_cfg)
        task = LMTask(corpus, model_cfg.block_size, eval_rows=task_kw["eval_rows"], eval_chunk=train_cfg.batch_size)
        seed_everything(train_cfg.seed)  # the same model on every rank, and the same as one process's
        model = shard_moe_layers(GPT(model_cfg).to(device))
        if rank == 0:
            pc, fc = param_count(model_cfg), flops_per_token(model_cfg)
            print(
                f"{model_cfg.ffn} model, {model_cfg.num_experts} expert(s) per Switch layer over {world} processes: "
                f"{pc.total:,} parameters ({pc.active:,} active per token), {fc.total:,} forward FLOPs per token",
                flush=True,
            )
        result = train_expert_parallel(model, task, train_cfg, progress=rank == 0 and not args.quiet)
        state = gather_full_state_dict(model)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            saved = {
                "model": model_cfg.to_dict(),
                "corpus": corpus_cfg.to_dict(),
                "train": asdict(train_cfg),
                "task": dict(task_kw),
                "distributed": {"world_size": world, "backend": dist.get_backend()},
            }
            (out / CONFIG_FILE).write_text(json.dumps(saved, indent=1) + "\n")
            result.history.to_csv(out / METRICS_FILE, index=False)
            torch.save(
                {
                    "model": state,
                    "step": train_cfg.steps,
                    "history": result.history.to_dict("records"),
                    "config": asdict(train_cfg),
                },
                out / CHECKPOINT_FILE,
            )
            row = result.final
            print(f"step {int(row['step'])}: val_loss={row['val_loss']:.4f}; wrote {out}/ ({result.seconds:.1f} s)", flush=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
