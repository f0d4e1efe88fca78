"""Train several language models side by side: dense vs Switch, over seeds and expert counts.

Shape legend (used across the package): B batch, T time, D model width,
F hidden width, E experts, K top-k, C capacity, N = B·T tokens.

A fair comparison trains every model on the same stream of text, for the same
number of steps, from a seeded start, and judges it on the same held-out set.
``LMRun`` describes one such run (a label, a ``GPTConfig``, a ``TrainConfig``
and a seed); ``run_lms(runs, corpus_config)`` trains them all and returns one
``LMRunResult`` per run, in the order given.

Small models use one CPU core badly and two cores hardly better, so
``run_lms`` trains ``workers`` runs at once in separate processes, each on one
thread (``workers=1`` trains them one after another in this process). A run's
result does not depend on where it ran: the model is built after
``seed_everything(run.seed)``, the batches come from a generator seeded by
the run's seed, and every run trains on one thread (float sums over a
different number of threads round differently).

``results_table`` gives one row per run (held-out metrics, seconds per step);
``summarise`` gives mean and spread over the seeds of each label.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from functools import partial

import pandas as pd
import torch

from ..analysis.lm_routing import LayerRouting, RoutingTracker
from ..data.corpus import Corpus, CorpusConfig
from ..device import get_device, seed_everything
from ..training.lm import LMTask
from ..training.loop import TrainConfig, train
from ..transformer import GPT, GPTConfig
from .workers import run_in_workers

__all__ = ["LMRun", "LMRunResult", "run_lm", "run_lms", "results_table", "summarise", "seed_verdict"]


@dataclass(frozen=True)
class LMRun:
    """One training run: ``label`` names the model kind (runs of one label differ only in ``seed``)."""

    label: str  # e.g. "dense" or "switch E=8"
    model: GPTConfig
    train: TrainConfig
    seed: int = 0  # seeds the initialisation and the batch sampler (overrides train.seed)
    track_routing: bool = False  # record routing statistics at every evaluation (Switch models)

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not self.label:
            raise ValueError(f"LMRun.label must be a non-empty string, got {self.label!r}")
        if not isinstance(self.model, GPTConfig):
            raise TypeError(f"LMRun.model must be a GPTConfig, got {type(self.model).__name__}")
        if not isinstance(self.train, TrainConfig):
            raise TypeError(f"LMRun.train must be a TrainConfig, got {type(self.train).__name__}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"LMRun.seed must be an int >= 0, got {self.seed!r}")
        if self.track_routing and self.model.ffn != "switch":
            raise ValueError(f"LMRun {self.label!r}: track_routing needs a Switch model; this one is dense")


@dataclass
class LMRunResult:
    run: LMRun
    history: pd.DataFrame  # one row per evaluation: step, lr, train_loss, val_loss, val_loss_<domain>, ...
    seconds: float  # wall-clock time of the training (evaluations included)
    state_dict: dict[str, torch.Tensor]  # the trained weights, to rebuild the model with ``model()``
    routing: dict[int, list[LayerRouting]] = field(default_factory=dict)  # step → per-layer routing (track_routing)

    @property
    def final(self) -> dict[str, float]:
        return self.history.iloc[-1].to_dict()

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.run.train.steps

    def model(self) -> GPT:
        """The trained model, rebuilt on the CPU in eval mode."""
        model = GPT(self.run.model)
        model.load_state_dict(self.state_dict)
        return model.eval()

    def routing_tracker(self, task: LMTask) -> RoutingTracker:
        """The routing records as a ``RoutingTracker`` (for its ``history`` and ``summary`` tables)."""
        return RoutingTracker(task.held_out, task.domains, chunk=task.eval_chunk, reports=dict(self.routing))


def run_lm(
    run: LMRun,
    corpus_config: CorpusConfig,
    *,
    eval_rows: int = 96,
    eval_chunk: int | None = None,
    progress: bool = False,
    threads: int | None = 1,
    device: torch.device | str = "cpu",
) -> LMRunResult:
    """Train one run in this process and return its result (weights on the CPU).

    On the CPU it trains on ``threads`` threads (None: leave the setting as it is).
    """
    if threads is not None and torch.device(device).type == "cpu":
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return run_lm(run, corpus_config, eval_rows=eval_rows, eval_chunk=eval_chunk, progress=progress, threads=None)
        finally:
            torch.set_num_threads(previous)
    chunk = eval_chunk or run.train.batch_size
    task = LMTask(Corpus(corpus_config), block_size=run.model.block_size, eval_rows=eval_rows, eval_chunk=chunk)
    seed_everything(run.seed)
    model = GPT(run.model)
    tracker = RoutingTracker(task.held_out, task.domains, chunk=chunk) if run.track_routing else None
    start = time.perf_counter()
    result = train(model, task, replace(run.train, seed=run.seed), device=device, progress=progress, callback=tracker)
    seconds = time.perf_counter() - start
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return LMRunResult(run, result.history, seconds, state, dict(tracker.reports) if tracker else {})


def run_lms(
    runs: list[LMRun],
    corpus_config: CorpusConfig = CorpusConfig(),
    *,
    workers: int = 2,
    eval_rows: int = 96,
    eval_chunk: int | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> list[LMRunResult]:
    """Train every run (``workers`` at a time, each in its own one-thread process) → results in the order of ``runs``.

    Every run's model is trained on text of its own ``block_size`` from
    ``Corpus(corpus_config)`` and evaluated on that corpus's held-out set of
    ``eval_rows`` rows (the same rows for every run of the same block size).

    device: None picks one (CUDA, then Apple MPS, then the CPU). On a GPU the
    runs train one after another in this process (``workers`` is ignored).
    """
    runs = list(runs)
    if not runs:
        raise ValueError("run_lms needs at least one LMRun")
    for r in runs:
        if not isinstance(r, LMRun):
            raise TypeError(f"run_lms expects LMRun objects, got {type(r).__name__}")
    if not isinstance(corpus_config, CorpusConfig):
        raise TypeError(f"run_lms expects a CorpusConfig, got {type(corpus_config).__name__}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    device = torch.device(device) if device is not None else get_device()
    fn = partial(run_lm, corpus_config=corpus_config, eval_rows=eval_rows, eval_chunk=eval_chunk, device=device)
    return run_in_workers(
        fn,
        runs,
        workers=workers if device.type == "cpu" else 1,
        progress=progress,
        desc="training runs",
        name=lambda r: f"{r.label}, seed {r.seed}",
    )


def results_table(results: list[LMRunResult]) -> pd.DataFrame:
    """One row per run: label, experts, seed, the final held-out metrics, seconds and seconds per step."""
    rows = []
    for res in results:
        final = {k: v for k, v in res.final.items() if k.startswith("val_")}
        rows.append(
            {
                "label": res.run.label,
                "experts": res.run.model.num_experts,
                "seed": res.run.seed,
                **final,
                "seconds": res.seconds,
                "seconds_per_step": res.seconds_per_step,
            }
        )
    return pd.DataFrame(rows)


def summarise(table: pd.DataFrame, columns: list[str] | None = None) -> pd.DataFrame:
    """Mean and standard deviation over seeds of each label: columns (metric, "mean"/"std"), one row per label.

    Labels keep the order of their first appearance in ``table``.
    """
    if columns is None:
        columns = [c for c in table.columns if c.startswith("val_")]
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"summarise: no column(s) {missing} in the table; it has {list(table.columns)}")
    order = list(dict.fromkeys(table["label"]))
    stats = table.groupby("label", sort=False)[columns].agg(["mean", "std"])
    stats.insert(0, ("seeds", ""), table.groupby("label", sort=False)["seed"].count())
    return stats.loc[order]


def seed_verdict(table: pd.DataFrame, a: str, b: str, metrics: dict[str, bool], *, by: str = "label") -> pd.DataFrame:
    """Compare label ``b`` with label ``a`` over seeds, one row per metric, with the verdict computed.

    metrics: column → True when higher is better (recall), False when lower
    is (a loss). A verdict needs every seed to agree:

    * paired, when both labels ran the same seeds (a ``seed`` column): seed s
      gave both the same data, so B is compared with A seed by seed; "B
      better" when B beats A on every seed, "A better" when A beats B on every
      seed (by chance alone, five seeds all agree one time in sixteen);
    * otherwise by range: "B better" when B's worst seed beats A's best.

    Anything else is "within seed noise". Columns: A and B (the two labels),
    their mean ± sd and range over seeds, the difference of the means B − A,
    how many seeds B won, the verdict. Stack several with ``pd.concat``.
    """
    if by not in table.columns:
        raise ValueError(f"seed_verdict: the table has no column {by!r}")
    rows = []
    for metric, higher in metrics.items():
        if metric not in table.columns:
            raise ValueError(f"seed_verdict: the table has no column {metric!r}; it has {list(table.columns)}")
        values = {}
        for name in (a, b):
            part = table.loc[table[by] == name]
            if part.empty:
                raise ValueError(f"seed_verdict: no rows with {by} == {name!r}; there are {sorted(table[by].unique())}")
            values[name] = part.set_index("seed")[metric].astype(float) if "seed" in part.columns else part[metric].astype(float)
        va, vb = values[a], values[b]
        sign = 1 if higher else -1
        paired = "seed" in table.columns and va.index.is_unique and set(va.index) == set(vb.index)
        if paired:
            gain = sign * (vb - va.loc[vb.index])  # > 0 where B beat A on that seed
            wins = f"{int((gain > 0).sum())} of {len(gain)}"
            verdict = "B better" if (gain > 0).all() else "A better" if (gain < 0).all() else "within seed noise"
        else:
            wins = "unpaired"
            verdict = (
                "B better"
                if (sign * vb).min() > (sign * va).max()
                else "A better"
                if (sign * va).min() > (sign * vb).max()
                else "within seed noise"
            )
        sd = lambda v: v.std() if len(v) > 1 else float("nan")  # noqa: E731
        rows.append(
            {
                "metric": metric,
                "better": "higher" if higher else "lower",
                "A": a,
                "A mean ± sd": f"{va.mean():.3f} ± {sd(va):.3f}",
                "A range": f"{va.min():.3f}–{va.max():.3f}",
                "B": b,
                "B mean ± sd": f"{vb.mean():.3f} ± {sd(vb):.3f}",
                "B range": f"{vb.min():.3f}–{vb.max():.3f}",
                "B − A": vb.mean() - va.mean(),
                "B won": wins,
                "verdict": verdict,
            }
        )
    return pd.DataFrame(rows).set_index("metric")
