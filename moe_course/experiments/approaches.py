"""The essay's four approaches, measured side by side on the clinic (lesson 04's headline).

Shape legend (used across the package): B batch, T time, D model width,
F hidden width, E experts, K top-k, C capacity, N = B·T tokens. Here a token
is a patient; S counts specialties (a clinic-only letter).

    1 · second cardiologists  E cardiologists of F hidden units each, every one trained on the
                              cardiology patients only (different seeds), their probabilities averaged
    2 · a generalist          one MLP of E·F hidden units, trained on everyone (lessons 01-02)
    3 · every specialist      DenseMixture: a gate and E experts of F units, all of them run (lesson 03)
    4a · the GP, top-1        RoutedMixture: the same gate and experts, each patient sees its top-1
                              expert, Switch's raw gate (lesson 04)
    4b · the GP, top-2        the same, each patient sees its two best experts, gates renormalised

The budget is matched: every approach has E·F hidden units in all, so the
parameter counts agree to within a few per cent (the gate, and E output
layers instead of one, are the difference). What differs is how many of those
units a patient pays for. FLOPs per patient are *measured*: PyTorch's FLOP
counter (``torch.utils.flop_counter``) records every matmul the trained model
runs on the held-out patients (2 FLOPs per multiply-add, the course's
convention), divided by the number of patients.

Every approach is judged on every held-out patient, overall and per
specialty, so a doctor's blind spot shows. For the three gated models a
``SpecialisationTracker`` records, at the start and every ``track_every`` steps, the specialisation score (does each specialty get its
own expert?), the top-expert counts and the share of the GP's decision that
comes from the department's cue (``context_share``). That is what shows a
router that locks in early.

Optionally a sixth row, the specialists with a perfect GP (``specialists``,
the oracle that peeks at the specialty), gives the upper bound the GP aims at.

Every (approach, seed) pair is one job; ``workers`` jobs train at once in
one-thread worker processes (``moe_course.experiments.workers``). A job seeds everything
it draws from its seed, so the numbers do not depend on ``workers``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..analysis.metrics import accuracy_by_group
from ..analysis.specialisation import SpecialisationTracker, context_share, effective_experts, specialisation_score
from ..data.clinic import Clinic
from ..experts import FeedForward
from ..flops import count_parameters, measure_flops_per_example
from ..mixture import DenseMixture, DenseMixtureConfig, RoutedMixture, RoutedMixtureConfig
from ..training.loop import ClassificationTask, TrainConfig, train
from .ensembles import train_ensemble
from .specialists import train_specialists
from .workers import run_in_workers

__all__ = [
    "APPROACHES",
    "CARDIOLOGISTS",
    "GENERALIST",
    "DENSE",
    "TOP_1",
    "TOP_2",
    "ORACLE",
    "GATED",
    "measure_flops_per_example",
    "FourApproaches",
    "four_approaches",
    "median_seed",
    "Comparison",
    "paired_difference",
]

CARDIOLOGISTS = "1 · second cardiologists (ensemble)"
GENERALIST = "2 · one generalist"
DENSE = "3 · every specialist (dense mixture)"
TOP_1 = "4a · the GP, top-1 (Switch)"
TOP_2 = "4b · the GP, top-2"
APPROACHES = (CARDIOLOGISTS, GENERALIST, DENSE, TOP_1, TOP_2)
ORACLE = "specialists with a perfect GP (oracle)"
GATED = (DENSE, TOP_1, TOP_2)  # the approaches with a gate: specialisation is measured for these


def _own_specialist(specialists: Sequence[nn.Module], specialty: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The oracle's visit: each patient of x (N, D) sees only the specialist of its specialty (N,)."""

    def predict(x: torch.Tensor) -> torch.Tensor:
        if len(x) != len(specialty):
            raise ValueError(f"the oracle knows the specialties of {len(specialty)} patients, got {len(x)}")
        out = None
        for s, model in enumerate(specialists):
            rows = (specialty == s).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            logits = model(x[rows])  # (M, classes)
            out = x.new_zeros(len(x), logits.shape[-1]) if out is None else out
            out = out.index_copy(0, rows, logits)
        return out

    return predict


@dataclass(frozen=True)
class _Job:
    """One approach, one seed: everything a worker process needs (it pickles)."""

    approach: str
    seed: int
    clinic: Clinic
    config: TrainConfig
    num_experts: int
    d_ff: int
    aux_loss_coef: float
    home: int  # the specialty of the second cardiologists
    track_every: int


@dataclass
class _Outcome:
    row: dict[str, Any]
    model: Any
    history: pd.DataFrame | None = None  # gated approaches: step, score, context_share
    counts: torch.Tensor | None = None  # (evaluations, S, E) top-expert counts over training


def _run_job(job: _Job) -> _Outcome:
    """Train one approach for one seed and measure it on every held-out patient."""
    clinic, cfg = job.clinic, replace(job.config, seed=job.seed)
    d, c, e, f = clinic.d_in, clinic.num_diagnoses, job.num_experts, job.d_ff
    x, y, specialty = clinic.val.x, clinic.val.diagnosis, clinic.val.specialty
    task = ClassificationTask.from_clinic(clinic)
    tracker = None

    if job.approach == CARDIOLOGISTS:
        home_train, home_val = clinic.train.of_specialty(job.home), clinic.val.of_specialty(job.home)
        home_task = ClassificationTask(home_train.x, home_train.diagnosis, home_val.x, home_val.diagnosis)
        model = train_ensemble(lambda: FeedForward(d, f, d_out=c), home_task, cfg, e, device="cpu", progress=False)
        predict, params = model.probs, sum(count_parameters(m) for m in model.members)
    elif job.approach == ORACLE:
        torch.manual_seed(job.seed)
        model = train_specialists(clinic, d_ff=f, config=cfg, device="cpu", progress=False)
        predict, params = _own_specialist(model.specialists, specialty), sum(count_parameters(m) for m in model.specialists)
    else:
        torch.manual_seed(job.seed)
        if job.approach == GENERALIST:
            model = FeedForward(d, e * f, d_out=c)
        elif job.approach == DENSE:
            model = DenseMixture(DenseMixtureConfig(d, f, c, e))
        elif job.approach == TOP_1:
            model = RoutedMixture(RoutedMixtureConfig(d, f, c, e, top_k=1, router="switch", aux_loss_coef=job.aux_loss_coef))
        elif job.approach == TOP_2:
            model = RoutedMixture(RoutedMixtureConfig(d, f, c, e, top_k=2, router="top_k", aux_loss_coef=job.aux_loss_coef))
        else:
            raise ValueError(f"unknown approach {job.approach!r}; choose from {[*APPROACHES, ORACLE]}")
        if job.approach in GATED:
            tracker = SpecialisationTracker(x, specialty, clinic.num_specialties, d_context=clinic.d_context)
            cfg = replace(cfg, eval_every=job.track_every)
            tracker(0, model)  # where the GP sends patients before it has learned anything
        train(model, task, cfg, device="cpu", progress=False, callback=tracker)
        model = model.cpu().eval()
        params = count_parameters(model)
        predict = model if job.approach == GENERALIST else (lambda v: model(v).logits)

    with torch.no_grad():
        scores = predict(x)  # (N, classes): logits, or the ensemble's probabilities
    per_specialty = accuracy_by_group(scores, y, specialty, clinic.num_specialties)  # (S,)
    row = {
        "approach": job.approach,
        "seed": job.seed,
        "parameters": params,
        "FLOPs per patient": measure_flops_per_example(predict, x),
        "held-out accuracy": (scores.argmax(-1) == y).float().mean().item(),
        **{f"accuracy: {name}": float(a) for name, a in zip(clinic.specialties, per_specialty)},
        "specialisation": float("nan"),
        "context share": float("nan"),
    }
    if tracker is None:
        return _Outcome(row, model)
    with torch.no_grad():
        weights = model(x).router_probs  # (N, E)
    row["specialisation"] = specialisation_score(weights, specialty, clinic.num_specialties)
    row["context share"] = context_share(model.gate.proj.weight, x, clinic.d_context)
    return _Outcome(row, model, tracker.history, torch.stack(tracker.counts))


@dataclass
class FourApproaches:
    """The measurements, one row per (approach, seed), and what the gated models did while training."""

    table: (
        pd.DataFrame
    )  # approach, seed, parameters, FLOPs per patient, held-out accuracy, accuracy: <specialty>, specialisation, context share
    models: dict[tuple[str, int], Any] = field(default_factory=dict)  # (approach, seed) → trained model (on the CPU)
    histories: pd.DataFrame = field(default_factory=pd.DataFrame)  # gated approaches: approach, seed, step, score, context_share
    counts: dict[tuple[str, int], torch.Tensor] = field(
        default_factory=dict
    )  # (approach, seed) → (evaluations, S, E) top-expert counts

    def summary(self) -> pd.DataFrame:
        """One row per approach: parameters, FLOPs per patient, accuracy and specialisation as mean ± std over seeds.

        std is the standard deviation over the seeds (ddof=1: NaN for a single
        seed), worst and best the extreme seeds. Specialisation is NaN for the
        approaches without a gate.
        """
        grouped = self.table.groupby("approach", sort=False)
        out = grouped.agg(
            seeds=("seed", "count"),
            parameters=("parameters", "first"),
            flops=("FLOPs per patient", "mean"),
            accuracy=("held-out accuracy", "mean"),
            accuracy_std=("held-out accuracy", "std"),
            worst=("held-out accuracy", "min"),
            best=("held-out accuracy", "max"),
            specialisation=("specialisation", "mean"),
            specialisation_std=("specialisation", "std"),
        )
        return out.rename(
            columns={
                "flops": "FLOPs per patient",
                "accuracy": "accuracy (mean)",
                "accuracy_std": "accuracy (std)",
                "worst": "accuracy (worst seed)",
                "best": "accuracy (best seed)",
                "specialisation": "specialisation (mean)",
                "specialisation_std": "specialisation (std)",
            }
        )

    def report(self) -> pd.DataFrame:
        """``summary`` written for reading: mean ± std over seeds, worst and best seed, as text."""
        summary = self.summary()

        def pm(mean: float, std: float, fmt: str) -> str:
            if mean != mean:  # NaN: no gate to measure
                return "–"
            return f"{fmt.format(mean)} ± {fmt.format(std)}" if std == std else fmt.format(mean)

        return pd.DataFrame(
            {
                "seeds": summary["seeds"],
                "parameters": summary["parameters"].map("{:,}".format),
                "FLOPs per patient": summary["FLOPs per patient"].map("{:,.0f}".format),
                "held-out accuracy (mean ± std)": [
                    pm(m, s, "{:.1%}") for m, s in zip(summary["accuracy (mean)"], summary["accuracy (std)"])
                ],
                "worst seed": summary["accuracy (worst seed)"].map("{:.1%}".format),
                "best seed": summary["accuracy (best seed)"].map("{:.1%}".format),
                "specialisation (mean ± std)": [
                    pm(m, s, "{:.2f}") for m, s in zip(summary["specialisation (mean)"], summary["specialisation (std)"])
                ],
            },
            index=summary.index,
        )

    def seed_report(self, approach: str, early_step: int = 25) -> pd.DataFrame:
        """For one gated approach, one row per seed: what the GP did early, and where it ended.

        Columns: doctors in use (``effective_experts`` of the first-choice load)
        at the start and at ``early_step``; specialisation at ``early_step``,
        half-way and at the end, and its change over the second half of
        training; the context share (what the GP listens to) at the start and at
        the end; the held-out accuracy.
        """
        if approach not in GATED:
            raise ValueError(f"seed_report needs a gated approach {list(GATED)}, got {approach!r}")
        rows = []
        for seed, hist in self.histories[self.histories["approach"] == approach].groupby("seed"):
            steps = hist["step"].tolist()
            if early_step not in steps:
                raise ValueError(f"step {early_step} was not recorded; the recorded steps are {steps}")
            half = min(steps, key=lambda t: abs(t - steps[-1] / 2))  # the recorded step nearest the middle
            score = hist.set_index("step")["score"]
            share = hist.set_index("step")["context_share"]
            load = self.counts[(approach, seed)].sum(1)  # (evaluations, E): first choices per expert
            final = self.table[(self.table["approach"] == approach) & (self.table["seed"] == seed)].iloc[0]
            rows.append(
                {
                    "seed": seed,
                    "doctors in use: start": effective_experts(load[0]).item(),
                    f"doctors in use: step {early_step}": effective_experts(load[steps.index(early_step)]).item(),
                    f"specialisation: step {early_step}": score[early_step],
                    f"specialisation: step {half}": score[half],
                    "specialisation: end": score.iloc[-1],
                    "change in the second half": score.iloc[-1] - score[half],
                    "context share: start": share.iloc[0],
                    "context share: end": share.iloc[-1],
                    "held-out accuracy": final["held-out accuracy"],
                }
            )
        return pd.DataFrame(rows).set_index("seed")

    def by_specialty(self) -> pd.DataFrame:
        """Mean accuracy over seeds, one row per approach, one column per specialty."""
        columns = [c for c in self.table.columns if c.startswith("accuracy: ")]
        out = self.table.groupby("approach", sort=False)[columns].mean()
        return out.rename(columns=lambda c: c.removeprefix("accuracy: "))

    def pivot(self, column: str) -> pd.DataFrame:
        """One column of the table as seeds × approaches (e.g. "specialisation" or "held-out accuracy")."""
        if column not in self.table:
            raise ValueError(f"no column {column!r}; the table has {list(self.table.columns)}")
        return self.table.pivot(index="seed", columns="approach", values=column)[list(dict.fromkeys(self.table["approach"]))]


@dataclass(frozen=True)
class Comparison:
    """Approach a against approach b, seed by seed (the same seeds, so the difference is paired)."""

    a: str
    b: str
    column: str  # what was compared, e.g. "held-out accuracy"
    mean: float  # mean over seeds of a - b
    std: float  # standard deviation over seeds of a - b (ddof=1)
    ahead: int  # seeds where a is above b
    seeds: int

    @property
    def clear(self) -> bool:
        """True when the mean difference is more than two standard errors (2·std/√seeds) away from 0."""
        return self.seeds > 1 and abs(self.mean) > 2 * self.std / self.seeds**0.5

    def __str__(self) -> str:
        scale, unit = (100, " points") if "accuracy" in self.column else (1, "")
        verdict = "beyond the spread of the seeds" if self.clear else "within the spread of the seeds"
        return (
            f"{self.a} minus {self.b}: {scale * self.mean:+.{1 if scale == 100 else 2}f}{unit} of {self.column} "
            f"(std over seeds {scale * self.std:.{1 if scale == 100 else 2}f}{unit}), ahead in {self.ahead} of "
            f"{self.seeds} seeds: {verdict}"
        )


def paired_difference(table: pd.DataFrame, a: str, b: str, column: str = "held-out accuracy") -> Comparison:
    """Compare approaches a and b on ``column``, seed by seed, over the seeds both were trained with."""
    pivot = table.pivot(index="seed", columns="approach", values=column)
    for name in (a, b):
        if name not in pivot:
            raise ValueError(f"no approach {name!r} in the table; it has {list(pivot.columns)}")
    diff = (pivot[a] - pivot[b]).dropna()  # (seeds,)
    if diff.empty:
        raise ValueError(f"{a!r} and {b!r} have no seed with a {column!r} in common")
    std = float(diff.std()) if len(diff) > 1 else float("nan")
    return Comparison(a, b, column, float(diff.mean()), std, int((diff > 0).sum()), len(diff))


def median_seed(values: pd.Series) -> int:
    """The seed whose value is the median of a series indexed by seed (the lower of the two middle ones for an even count).

    Ties are broken by the smaller seed. Use it to pick a seed for a figure by a rule, not by its looks.
    """
    if len(values) == 0:
        raise ValueError("median_seed needs at least one value")
    if values.isna().any():
        raise ValueError(f"median_seed: the values of seeds {list(values.index[values.isna()])} are NaN")
    ordered = sorted(values.items(), key=lambda item: (item[1], item[0]))  # by value, then by seed
    return int(ordered[(len(ordered) - 1) // 2][0])


def four_approaches(
    clinic: Clinic,
    config: TrainConfig,
    *,
    num_experts: int = 4,
    d_ff: int = 16,
    seeds: Sequence[int] = (0, 1),
    aux_loss_coef: float = 1e-2,
    oracle: bool = True,
    home_specialty: int = 0,
    track_every: int = 25,
    workers: int = 2,
    progress: bool = True,
) -> FourApproaches:
    """Train the approaches (and the oracle) on ``clinic`` for every seed and measure them, on the CPU.

    Every model gets the same recipe ``config`` (its ``seed`` is replaced by
    each seed in turn). E = ``num_experts`` doctors of F = ``d_ff`` hidden units
    each; the generalist has E·F units; the second cardiologists are E doctors
    of F units trained on the patients of ``home_specialty`` only (0 is
    cardiology). The GPs are ``RoutedMixture``: top-1 with Switch's raw gate,
    and top-2 with renormalised gates, both with the load-balancing loss
    weighted by ``aux_loss_coef``. Accuracy and FLOPs are measured on
    ``clinic.val``; the gated models are watched at step 0 and every ``track_every`` steps.
    ``workers`` jobs (one per approach and seed) train at once, each in a
    one-thread process; ``workers=1`` trains them here, one after another.
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("four_approaches needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"four_approaches: the seeds must differ, got {seeds}")
    for name, value in (("num_experts", num_experts), ("d_ff", d_ff), ("track_every", track_every), ("workers", workers)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_experts < 2:
        raise ValueError(f"num_experts must be at least 2 (the top-2 GP sees two doctors), got {num_experts}")
    if (
        isinstance(home_specialty, bool)
        or not isinstance(home_specialty, int)
        or not 0 <= home_specialty < clinic.num_specialties
    ):
        raise ValueError(f"home_specialty must be a specialty id in [0, {clinic.num_specialties}), got {home_specialty!r}")
    names = [*APPROACHES, *([ORACLE] if oracle else [])]
    jobs = [
        _Job(name, seed, clinic, config, num_experts, d_ff, aux_loss_coef, home_specialty, track_every)
        for seed in seeds
        for name in names
    ]
    outcomes = run_in_workers(
        _run_job,
        jobs,
        workers=workers,
        progress=progress,
        desc="training the approaches",
        name=lambda j: f"{j.approach}, seed {j.seed}",
    )
    histories = [o.history.assign(approach=j.approach, seed=j.seed) for j, o in zip(jobs, outcomes) if o.history is not None]
    return FourApproaches(
        table=pd.DataFrame([o.row for o in outcomes]),
        models={(j.approach, j.seed): o.model for j, o in zip(jobs, outcomes)},
        histories=pd.concat(histories, ignore_index=True)[["approach", "seed", "step", "score", "context_share"]]
        if histories
        else pd.DataFrame(),
        counts={(j.approach, j.seed): o.counts for j, o in zip(jobs, outcomes) if o.counts is not None},
    )
