"""Benchmark: MoE dispatch implementations against a dense FFN of the same active width.

    python -m moe_course.bench                  # the three standard configurations
    python -m moe_course.bench --quick          # small sizes, well under a minute
    python -m moe_course.bench --json out.json  # also write the results as JSON ('-': stdout)
    python -m moe_course.bench --busy 2         # quiet and with 2 spinning processes, 3 interleaved rounds, pooled
    python -m moe_course.bench --lm             # a training step of lesson 08's Switch LM against its dense twin

For every configuration (N tokens, D, F, E experts, top-k) it times, forward
(no grad) and forward+backward:

- ``dense``: ``FeedForward(D, k·F)``, the same arithmetic per token as k experts
  (the experts' share of a top-k MoE layer can at best match it; the router's
  product adds E/(2·k·F) of that arithmetic on top, 6% at E=64, F=512);
- ``MoELayer`` with each dispatch implementation of ``moe_course.dispatch``
  (router, routing and balance losses included; no token limit);
- ``hf_switch``: Hugging Face's ``SwitchTransformersSparseMLP`` as an outside
  peer, when transformers is installed (top-1 only; same D, F, E; no token limit).

Runs are paired, after warm-up: in every round each candidate runs next to
a fresh run of the dense layer, so a noisy neighbour slows both halves of a
pair alike; the table gives the median of those paired ratios (and, in the
JSON, their quartiles), median times, and the peak extra memory of one
forward+backward (``moe_course.bench.memory.peak_bytes``). Timings belong here, never
in unit tests.

The command line first makes the C allocator keep the memory it frees
(``steady_allocator``), so that no candidate pays for fresh pages on every
call; ``--system-allocator`` leaves it alone.

``--busy N`` times forward+backward of the default method, the masks loop and
dense in interleaved rounds, quiet and with N background processes spinning
(``moe_course.bench.rounds``); ``--lm`` times training steps of the language
model (``moe_course.bench.lm``). Both judge on the pooled median over
``--rounds`` rounds and print the spread and the load average beside it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import pandas as pd
import torch

from ..dispatch import DEFAULT_METHOD, METHODS
from ..experts import FeedForward
from ..moe import MoEConfig, MoELayer
from .memory import peak_bytes

__all__ = [
    "BenchConfig",
    "STANDARD",
    "QUICK",
    "steady_allocator",
    "PairedTiming",
    "paired_times",
    "run_benchmark",
    "EXPERTS_ONLY",
    "format_table",
    "main",
]


@dataclass(frozen=True)
class BenchConfig:
    num_tokens: int  # N
    d_model: int  # D
    d_ff: int  # F, per expert
    num_experts: int  # E
    top_k: int = 1  # K

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"BenchConfig.{name} must be a positive int, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"BenchConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}")

    @property
    def name(self) -> str:
        return f"N={self.num_tokens} D={self.d_model} F={self.d_ff} E={self.num_experts} k={self.top_k}"


STANDARD = (BenchConfig(4096, 256, 1024, 8), BenchConfig(16384, 128, 512, 64), BenchConfig(4096, 256, 1024, 8, 2))
QUICK = (BenchConfig(2048, 128, 512, 8), BenchConfig(4096, 64, 256, 32), BenchConfig(2048, 128, 512, 8, 2))
ONEHOT_LIMIT = 2**30  # skip the one-hot einsum when its (N, E, C) tensors would pass ~1 GiB


@dataclass
class _Candidate:
    name: str
    forward: Callable[[], torch.Tensor]
    params: list[torch.nn.Parameter]
    x: torch.Tensor


def _onehot_bytes(cfg: BenchConfig) -> int:
    capacity = 2 * cfg.top_k * cfg.num_tokens // cfg.num_experts  # a loose guess of the fullest expert (dropless)
    return 3 * 4 * cfg.num_tokens * cfg.num_experts * capacity  # dispatch, combine, one-hot slots in float32


EXPERTS_ONLY = "experts_only"


def _experts_only(cfg: BenchConfig) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[torch.nn.Parameter]]:
    """The floor of splitting the FFN into E experts: the default layer's experts on E equal blocks, nothing else.

    The N·K assignments are already in expert order (assignment i goes to expert
    i·E // (N·K)), the gates are 1, and there is no router, no softmax, no sort
    and no loss: ``sort_split``'s op (``fast.sorted_experts``) runs the experts
    on their blocks and adds the rows back to their tokens. What this costs
    beyond the dense FFN is what the experts' arithmetic costs in E blocks
    instead of one product (plus a gather and a sum back, which its identity
    order makes plain copies); what the layer costs beyond this is routing.
    """
    from ..fast.sorted_experts import _SortedExperts

    layer = MoELayer(MoEConfig(cfg.d_model, cfg.d_ff, cfg.num_experts))
    experts = layer.experts
    rows = cfg.num_tokens * cfg.top_k
    assignment = torch.arange(rows)
    token, expert = assignment // cfg.top_k, assignment * cfg.num_experts // rows  # (N·K,) each, already sorted
    counts = torch.bincount(expert, minlength=cfg.num_experts).tolist()
    gate = torch.ones(rows)

    def forward(x: torch.Tensor) -> torch.Tensor:
        args = (experts.w_in, experts.b_in, experts.w_out, experts.b_out, token, expert, assignment)
        return _SortedExperts.apply(x, gate, *args, counts, experts.activation, cfg.top_k)

    return forward, [p for p in (experts.w_in, experts.b_in, experts.w_out, experts.b_out) if p is not None]


def _candidates(
    cfg: BenchConfig, methods: list[str], peer: bool, notes: dict[str, str], *, floor: bool = False
) -> list[_Candidate]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.num_tokens, cfg.d_model, generator=g)
    torch.manual_seed(0)
    out = []
    dense = FeedForward(cfg.d_model, cfg.top_k * cfg.d_ff)
    out.append(_Candidate("dense", lambda m=dense: m(x_dense), list(dense.parameters()), x_dense := x.clone()))
    for method in methods:
        if method == "onehot_einsum" and _onehot_bytes(cfg) > ONEHOT_LIMIT:
            notes[method] = f"skipped: its (N, E, C) tensors would need about {_onehot_bytes(cfg) / 2**30:.1f} GiB"
            continue
        layer = MoELayer(
            MoEConfig(
                cfg.d_model,
                cfg.d_ff,
                cfg.num_experts,
                top_k=cfg.top_k,
                router="switch" if cfg.top_k == 1 else "top_k",
                dispatch=method,
            )
        )
        xm = x.clone()
        out.append(_Candidate(method, lambda m=layer, t=xm: m(t).y, list(layer.parameters()), xm))
    if floor:
        forward, params = _experts_only(cfg)
        xf = x.clone()
        out.append(_Candidate(EXPERTS_ONLY, lambda f=forward, t=xf: f(t), params, xf))
    if peer:
        if cfg.top_k != 1:
            notes["hf_switch"] = "skipped: the Switch peer is top-1 only"
        else:
            try:
                import transformers
                from transformers.models.switch_transformers import modeling_switch_transformers as hf
            except ImportError:
                notes["hf_switch"] = "skipped: transformers is not installed"
            else:
                config = transformers.SwitchTransformersConfig(
                    d_model=cfg.d_model,
                    d_ff=cfg.d_ff,
                    num_experts=cfg.num_experts,
                    expert_capacity=cfg.num_tokens,
                    router_bias=False,
                    router_jitter_noise=0.0,
                    router_dtype="float32",
                    dense_act_fn="relu",
                    dropout_rate=0.0,
                )
                module = hf.SwitchTransformersSparseMLP(config)
                with torch.no_grad():
                    for p in module.parameters():
                        p.normal_(0.0, 0.02, generator=g)
                xh = x.clone()[None]  # (1, N, D): their capacity counts per sequence, so one sequence = no limit
                out.append(_Candidate("hf_switch", lambda m=module, t=xh: m(t), list(module.parameters()), xh))
    return out


def steady_allocator() -> bool:
    """Make glibc keep freed memory in the process, so no candidate page-faults fresh memory on every call.

    By default glibc serves big blocks with ``mmap`` and returns them to the
    system when they are freed, so the next call faults every page in again
    (and zeroes it). Which candidates paid for that depended on what ran
    before them: on a 2-core machine the dense baseline (E=64 sizes) took
    about 230 ms with ~33,000 page faults per forward+backward in one run, and
    about 160 ms with none in another. With ``mmap`` and trimming off, every
    candidate reuses memory the process already owns, as PyTorch's caching
    allocator does on a GPU. For this process only, and for good: meant for
    the command line. Returns False, changing nothing, where there is no
    glibc ``mallopt`` (macOS, Windows, musl).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def _run(c: _Candidate, backward: bool, grad: torch.Tensor) -> None:
    if not backward:
        with torch.no_grad():
            c.forward()
        return
    c.x.requires_grad_(True)
    for p in c.params:
        p.grad = None
    y = c.forward()
    y.backward(grad.view(y.shape))
    c.x.grad = None


@dataclass
class PairedTiming:
    """One candidate's times (seconds) and its paired ratios to the baseline (median and quartiles)."""

    seconds: list[float]
    ratios: list[float]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def ratio_q1(self) -> float:
        return self._quartiles()[0]

    @property
    def ratio_q3(self) -> float:
        return self._quartiles()[2]

    def _quartiles(self) -> tuple[float, float, float]:
        if len(self.ratios) == 1:
            return self.ratios[0], self.ratios[0], self.ratios[0]
        return tuple(statistics.quantiles(self.ratios, n=4, method="inclusive"))


def paired_times(
    candidates: dict[str, Callable[[], object]], baseline: str, *, repeats: int = 7, warmup: int = 2
) -> dict[str, PairedTiming]:
    """Time each candidate next to a fresh run of the baseline: name → PairedTiming (the baseline's ratios are all 1).

    Every repeat runs each candidate once, paired with a baseline run right
    before it (even repeats) or right after it (odd repeats), and the order of
    the candidates rotates; so a noisy neighbour slowing the machine for a
    second slows both halves of a pair alike, and the ratio of the pair cancels it.
    """
    if baseline not in candidates:
        raise ValueError(f"the baseline {baseline!r} is not among the candidates {sorted(candidates)}")
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")

    def timed(name: str) -> float:
        start = time.perf_counter()
        candidates[name]()
        return time.perf_counter() - start

    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    others = [name for name in candidates if name != baseline]
    out = {name: PairedTiming([], []) for name in candidates}
    for r in range(repeats):
        if not others:  # the baseline alone
            out[baseline].seconds.append(timed(baseline))
            out[baseline].ratios.append(1.0)
            continue
        for name in others[r % len(others) :] + others[: r % len(others)]:
            pair = (baseline, name) if r % 2 == 0 else (name, baseline)
            took = {member: timed(member) for member in pair}
            out[name].seconds.append(took[name])
            out[name].ratios.append(took[name] / took[baseline])
            out[baseline].seconds.append(took[baseline])
            out[baseline].ratios.append(1.0)
    return out


def run_benchmark(
    configs=STANDARD,
    methods: list[str] | None = None,
    *,
    repeats: int = 7,
    warmup: int = 2,
    peer: bool = True,
    memory: bool = True,
    floor: bool = False,
    log: Callable[[str], None] | None = print,
) -> pd.DataFrame:
    """Time every candidate on every configuration; one row per (config, implementation, mode).

    ``floor``: also the layer's experts alone on equal blocks (``_experts_only``, named "experts_only").

    Timed in pairs with the dense layer (``paired_times``): ``ratio_to_dense``
    is the median of the paired ratios, ``ratio_q1`` and ``ratio_q3`` its
    quartiles; ``median_ms`` is the median time.
    """
    methods = list(methods or METHODS)
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown dispatch methods {sorted(unknown)}; choose from {sorted(METHODS)}")
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    rows = []
    for cfg in configs:
        notes: dict[str, str] = {}
        candidates = _candidates(cfg, methods, peer, notes, floor=floor)
        grad = torch.randn(cfg.num_tokens, cfg.d_model, generator=torch.Generator().manual_seed(1))
        if log:
            log(f"{cfg.name}: {', '.join(c.name for c in candidates)}")
        peaks = {c.name: peak_bytes(lambda c=c: _run(c, True, grad)) for c in candidates} if memory else {}
        for mode, backward in (("forward", False), ("forward+backward", True)):
            timed = paired_times(
                {c.name: (lambda c=c: _run(c, backward, grad)) for c in candidates},
                baseline="dense",
                repeats=repeats,
                warmup=warmup,
            )
            for name, t in timed.items():
                rows.append(
                    {
                        "config": cfg.name,
                        "implementation": name,
                        "mode": mode,
                        "median_ms": 1000 * statistics.median(t.seconds),
                        "ratio_to_dense": t.ratio,
                        "ratio_q1": t.ratio_q1,
                        "ratio_q3": t.ratio_q3,
                        "peak_MiB": peaks.get(name, float("nan")) / 2**20,
                        "default": name == DEFAULT_METHOD,
                        "note": "",
                    }
                )
        for name, note in notes.items():
            rows.append(
                {
                    "config": cfg.name,
                    "implementation": name,
                    "mode": "",
                    "median_ms": float("nan"),
                    "ratio_to_dense": float("nan"),
                    "ratio_q1": float("nan"),
                    "ratio_q3": float("nan"),
                    "peak_MiB": float("nan"),
                    "default": False,
                    "note": note,
                }
            )
    return pd.DataFrame(rows)


def format_table(results: pd.DataFrame) -> str:
    """One block per configuration: implementations × (forward, forward+backward) ratios, ms and peak memory.

    Each ratio is the median of the paired ratios to dense; in brackets, the
    middle half of them (lower to upper quartile).
    """
    lines = []
    for config, part in results.groupby("config", sort=False):
        lines.append(f"\n{config}")
        lines.append(f"  {'implementation':<22}{'forward':>30}{'forward+backward':>32}{'peak MiB':>10}")
        timed = part[part["mode"] != ""]
        for name, rows in timed.groupby("implementation", sort=False):
            by_mode = {r["mode"]: r for _, r in rows.iterrows()}
            tag = " (default)" if by_mode["forward"]["default"] else ""
            cells = [
                f"{r['ratio_to_dense']:5.2f}x ({r['ratio_q1']:4.2f}-{r['ratio_q3']:4.2f}) {r['median_ms']:7.1f} ms"
                for r in (by_mode["forward"], by_mode["forward+backward"])
            ]
            lines.append(f"  {name + tag:<22}{cells[0]:>30}{cells[1]:>32}{by_mode['forward']['peak_MiB']:>10.1f}")
        for _, r in part[part["mode"] == ""].iterrows():
            lines.append(f"  {r['implementation']:<22}{r['note']}")
    lines.append("\nratio: median of paired runs against dense (middle half in brackets); ms: median time")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small configurations (well under a minute)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per candidate and mode (default 7)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), help="dispatch implementations (default: all)")
    parser.add_argument("--no-peer", action="store_true", help="leave out the Hugging Face Switch layer")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also time the experts alone on equal, pre-sorted blocks (no router): what splitting the FFN costs by itself",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's choice)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH ('-' for stdout)")
    parser.add_argument(
        "--system-allocator",
        action="store_true",
        help="leave the C allocator as it is (default: keep freed memory, see steady_allocator)",
    )
    rounds = parser.add_argument_group("rounds (--busy, --lm): interleaved rounds, judged on the pooled median")
    rounds.add_argument(
        "--busy",
        type=int,
        default=0,
        metavar="N",
        help="also time every round with N background processes spinning (forward+backward only)",
    )
    rounds.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    lm = parser.add_argument_group("--lm: a training step of the Switch LM against its dense twin (lesson 08's sizes)")
    lm.add_argument("--lm", action="store_true", help="time LM training steps instead of layers (one thread unless --threads)")
    lm.add_argument("--lm-widths", type=int, nargs="+", default=[1, 4], help="d_model and d_ff times these (default 1 4)")
    lm.add_argument(
        "--keep-denormals",
        action="store_true",
        help="leave denormal floats as they are (default: flushed to zero, see bench.rounds.main_rounds)",
    )
    lm.add_argument("--num-experts", type=int, default=8)
    lm.add_argument("--moe-every", type=int, default=1)
    lm.add_argument("--capacity-factor", default="1.25", help="a number, or 'none' for dropless (default 1.25)")
    lm.add_argument("--top-k", type=int, default=1)
    lm.add_argument("--router", default=None, help="GPTConfig.router, where the GPTConfig has one (default: Switch)")
    lm.add_argument("--batch-size", type=int, default=32)
    lm.add_argument("--d-model", type=int, default=64, help="D at width 1 (default 64)")
    lm.add_argument("--d-ff", type=int, default=128, help="F at width 1, the dense FFN's and every expert's (default 128)")
    lm.add_argument(
        "--dispatch", default=None, choices=sorted(METHODS), help="the Switch layers' dispatch method (default: the default)"
    )
    args = parser.parse_args(argv)
    if args.lm or args.busy:
        from .rounds import main_rounds

        return main_rounds(args)
    steady = not args.system_allocator and steady_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = QUICK if args.quick else STANDARD
    log = (lambda msg: print(msg, file=sys.stderr)) if args.json == "-" else print
    log(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, default dispatch: {DEFAULT_METHOD}, "
        f"allocator: {'steady (freed memory kept)' if steady else 'system default'}"
    )
    results = run_benchmark(
        configs,
        args.methods,
        repeats=args.repeats,
        warmup=args.warmup,
        peer=not args.no_peer,
        memory=not args.no_memory,
        floor=args.floor,
        log=log,
    )
    log(format_table(results))
    if args.json:
        payload = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "default": DEFAULT_METHOD,
            "steady_allocator": steady,
            "configs": [asdict(c) | {"name": c.name} for c in configs],
            "results": json.loads(results.to_json(orient="records")),
        }
        write_json(payload, args.json)
    return 0


def write_json(payload: dict, dest: str) -> None:
    """``--json DEST``: the results as indented JSON to the file DEST, or to stdout when DEST is "-"."""
    text = json.dumps(payload, indent=1)
    if dest == "-":
        print(text)
    else:
        with open(dest, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
