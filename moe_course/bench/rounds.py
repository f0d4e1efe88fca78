"""Interleaved rounds: paired timings repeated over rounds, quiet and busy side by side, pooled.

One run of ``paired_times`` is one sample of a machine whose load moves by
minutes: on a shared laptop one run's ratio can move from the next by more
than the margin a speed target leaves.
So a claim rests on rounds: every round times every configuration once
quietly and once with ``busy`` background processes spinning (the phases
alternate which goes first from one round to the next), and the verdict is the
**pooled median**: the median of all paired ratios of all rounds. The spread is
given two ways: the lowest and highest round median, and the middle half of
the pooled pairs. Every round records the machine's one-minute load average
(``os.getloadavg``) before and after it, and the tasks running or waiting for
a core at its start (``moe_course.fast.shared_cores.runnable_tasks``), since a
"quiet" round is only as quiet as the machine was.

``spinning(n)`` starts n processes that each keep one core busy (what a
browser tab and a notebook kernel do to a laptop) and stops them afterwards.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pandas as pd

from ..fast.shared_cores import runnable_tasks

__all__ = ["spinning", "Round", "interleaved_rounds", "pooled", "format_pooled"]

SPIN = "while True: pass"


@contextmanager
def spinning(processes: int, *, settle: float = 0.5) -> Iterator[list[subprocess.Popen]]:
    """``with spinning(2):`` two background Python processes each spin one core at 100% until the block ends."""
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 0:
        raise ValueError(f"processes must be an int >= 0, got {processes!r}")
    procs = [subprocess.Popen([sys.executable, "-c", SPIN], stdin=subprocess.DEVNULL) for _ in range(processes)]
    try:
        if procs:
            time.sleep(settle)  # let them reach the scheduler before timing starts
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # Windows
        return float("nan")


@dataclass(frozen=True)
class Round:
    """One configuration timed once in one phase of one round: paired ratios per candidate."""

    index: int  # the round
    phase: str  # "quiet" or "busy"
    config: str
    ratios: dict[str, list[float]]  # candidate → its paired ratios to the baseline in this round
    seconds: dict[str, list[float]]  # candidate → its times (s)
    load_before: float  # one-minute load average
    load_after: float
    runnable: int | None  # tasks running or waiting for a core when the round started


def interleaved_rounds(
    measure: Callable[[str], dict],
    configs: list[str],
    *,
    rounds: int = 3,
    busy: int = 0,
    baseline: str = "dense",
    log: Callable[[str], None] | None = print,
) -> list[Round]:
    """Run ``measure(config)`` (→ name → ``PairedTiming``) for every config, ``rounds`` times, quiet and with ``busy`` spinners.

    Round r runs the quiet phase first when r is even and the busy one first
    when r is odd (without ``busy``, only quiet phases), and rotates the order
    of the configurations, so neither a slow spell nor warm caches favour one side.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")
    out: list[Round] = []
    for r in range(rounds):
        phases = ["quiet"] if not busy else (["quiet", "busy"] if r % 2 == 0 else ["busy", "quiet"])
        for phase in phases:
            with spinning(busy if phase == "busy" else 0):
                for config in configs[r % len(configs) :] + configs[: r % len(configs)]:
                    runnable, before = runnable_tasks(), _load()
                    timings = measure(config)
                    out.append(
                        Round(
                            r,
                            phase,
                            config,
                            {n: list(t.ratios) for n, t in timings.items()},
                            {n: list(t.seconds) for n, t in timings.items()},
                            before,
                            _load(),
                            runnable,
                        )
                    )
                    if log:
                        ratios = ", ".join(f"{n} {statistics.median(t.ratios):.3f}" for n, t in timings.items() if n != baseline)
                        log(f"  round {r + 1}/{rounds} {phase:5s} {config}: {ratios}  (load {before:.2f}, runnable {runnable})")
    return out


def pooled(rounds: list[Round]) -> pd.DataFrame:
    """One row per (config, phase, candidate): pooled median ratio, its middle half, the round medians' range, times, load.

    ``ratio`` is the median of every paired ratio of every round (the pooled
    median); ``round_low``/``round_high`` the lowest and highest of the
    per-round medians; ``q1``/``q3`` the quartiles of the pooled pairs.
    """
    rows = []
    keys = dict.fromkeys((r.config, r.phase) for r in rounds)
    for config, phase in keys:
        part = [r for r in rounds if r.config == config and r.phase == phase]
        for name in part[0].ratios:
            pairs = [x for r in part for x in r.ratios[name]]
            medians = [statistics.median(r.ratios[name]) for r in part]
            q1, _, q3 = statistics.quantiles(pairs, n=4, method="inclusive") if len(pairs) > 1 else (pairs[0],) * 3
            rows.append(
                {
                    "config": config,
                    "phase": phase,
                    "candidate": name,
                    "rounds": len(part),
                    "pairs": len(pairs),
                    "ratio": statistics.median(pairs),
                    "q1": q1,
                    "q3": q3,
                    "round_low": min(medians),
                    "round_high": max(medians),
                    "round_medians": medians,
                    "median_ms": 1000 * statistics.median(x for r in part for x in r.seconds[name]),
                    "load": statistics.mean([r.load_before for r in part] + [r.load_after for r in part]),
                    "runnable": [r.runnable for r in part],
                }
            )
    return pd.DataFrame(rows)


def format_pooled(table: pd.DataFrame, baseline: str = "dense") -> str:
    """The pooled table as text: per configuration and phase, every candidate's pooled ratio, spreads, time and load."""
    lines = []
    for (config, phase), part in table.groupby(["config", "phase"], sort=False):
        first = part.iloc[0]
        lines.append(
            f"\n{config}  [{phase}: {first['rounds']} rounds, load average {first['load']:.2f}, "
            f"runnable at round starts {first['runnable']}]"
        )
        for _, row in part.iterrows():
            if row["candidate"] == baseline:
                lines.append(f"  {row['candidate']:<20}{'1.00x':>8}{'':36}{row['median_ms']:9.2f} ms")
                continue
            rounds = " ".join(f"{m:.2f}" for m in row["round_medians"])
            lines.append(
                f"  {row['candidate']:<20}{row['ratio']:7.3f}x  middle half {row['q1']:.2f}-{row['q3']:.2f}  "
                f"rounds {row['round_low']:.2f}-{row['round_high']:.2f} ({rounds}){row['median_ms']:9.2f} ms"
            )
    lines.append(
        f"\nratio: pooled median of every paired ratio to {baseline} over all rounds; middle half: their quartiles; "
        "rounds: lowest-highest round median; ms: median time"
    )
    return "\n".join(lines)


def layer_rounds(
    configs,
    methods: list[str],
    *,
    rounds: int = 3,
    busy: int = 2,
    repeats: int = 7,
    warmup: int = 2,
    floor: bool = False,
    log: Callable[[str], None] | None = print,
) -> pd.DataFrame:
    """The layer benchmark's forward+backward, quiet and with ``busy`` spinners, in interleaved rounds → ``pooled`` table.

    configs: ``bench.BenchConfig``s; methods: the dispatch methods to time
    (each inside ``MoELayer``, against the dense FFN of ``bench``); ``floor``:
    also the experts alone ("experts_only", see ``bench.benchmark._experts_only``).
    """
    import torch

    from .benchmark import _candidates, _run, paired_times  # the layer benchmark's own candidates and step

    by_name, runs = {}, {}
    for cfg in configs:
        candidates = _candidates(cfg, methods, False, {}, floor=floor)
        grad = torch.randn(cfg.num_tokens, cfg.d_model, generator=torch.Generator().manual_seed(1))
        by_name[cfg.name] = cfg
        runs[cfg.name] = {c.name: (lambda c=c, grad=grad: _run(c, True, grad)) for c in candidates}

    def measure(name: str) -> dict:
        return paired_times(runs[name], baseline="dense", repeats=repeats, warmup=warmup)

    return pooled(interleaved_rounds(measure, list(runs), rounds=rounds, busy=busy, log=log))


def lm_rounds(
    configs, *, rounds: int = 3, busy: int = 0, repeats: int = 30, warmup: int = 5, log: Callable[[str], None] | None = print
) -> pd.DataFrame:
    """Training steps of the Switch LM against its dense twin (``bench.lm``), in interleaved rounds → ``pooled`` table."""
    from .benchmark import paired_times
    from .lm import lm_steps

    steps = {cfg.name: lm_steps(cfg) for cfg in configs}  # the same two models keep training from round to round

    def measure(name: str) -> dict:
        return paired_times(steps[name], baseline="dense", repeats=repeats, warmup=warmup)

    return pooled(interleaved_rounds(measure, list(steps), rounds=rounds, busy=busy, log=log))


def main_rounds(args) -> int:
    """``moe-bench --busy N`` and ``moe-bench --lm``: the command line's rounds modes (see ``bench.main``)."""
    import json

    import torch

    from ..dispatch import DEFAULT_METHOD
    from .benchmark import QUICK, STANDARD, steady_allocator, write_json

    steady = not args.system_allocator and steady_allocator()
    # A model training at a constant learning rate with no warm-up (the LM mode's steps) can drift into
    # a region where its attention gradients are full of denormal floats (below 1.2e-38), which x86 CPUs
    # handle up to a hundred times slower: a step's time then jumps by 2x within a few dozen steps, for the
    # dense model and the Switch model alike, and the ratio measures which model hit more of them. Flushed
    # to zero (set here, before any thread of PyTorch's pool starts, so that every one of them inherits it),
    # they cost nothing; the arithmetic is otherwise the same. ``--keep-denormals`` measures them too.
    flushed = bool(args.lm and not args.keep_denormals and torch.set_flush_denormal(True))
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.lm:
        torch.set_num_threads(1)  # as lesson 08 trains: one thread per model
    log = (lambda msg: print(msg, file=sys.stderr)) if args.json == "-" else print
    log(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, default dispatch: {DEFAULT_METHOD}, "
        f"allocator: {'steady (freed memory kept)' if steady else 'system default'}, {args.rounds} rounds, busy processes: {args.busy}, "
        f"load average now {_load():.2f}" + (", denormals flushed to zero (--keep-denormals keeps them)" if flushed else "")
    )
    if args.lm:
        from .lm import LMBenchConfig

        factor = None if str(args.capacity_factor).lower() == "none" else float(args.capacity_factor)
        configs = [
            LMBenchConfig(
                width=w,
                num_experts=args.num_experts,
                moe_every=args.moe_every,
                capacity_factor=factor,
                top_k=args.top_k,
                router=args.router,
                batch_size=args.batch_size,
                d_model=args.d_model,
                d_ff=args.d_ff,
                dispatch=args.dispatch,
            )
            for w in args.lm_widths
        ]
        repeats = args.repeats if args.repeats != 7 else 30  # steps are short: more pairs per round
        table = lm_rounds(configs, rounds=args.rounds, busy=args.busy, repeats=repeats, warmup=max(args.warmup, 5), log=log)
        described = [c.name for c in configs]
    else:
        configs = QUICK if args.quick else STANDARD
        methods = args.methods or list(dict.fromkeys([DEFAULT_METHOD, "masks_loop"]))
        table = layer_rounds(
            configs,
            methods,
            rounds=args.rounds,
            busy=args.busy,
            repeats=args.repeats,
            warmup=args.warmup,
            floor=args.floor,
            log=log,
        )
        described = [c.name for c in configs]
    log(format_pooled(table))
    if args.json:
        payload = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "default": DEFAULT_METHOD,
            "steady_allocator": steady,
            "flush_denormal": flushed,
            "mode": "lm" if args.lm else "layer",
            "busy": args.busy,
            "rounds": args.rounds,
            "configs": described,
            "results": json.loads(table.to_json(orient="records")),
        }
        write_json(payload, args.json)
    return 0
