"""Second opinions: ensembles of identically trained doctors, and what averaging buys.

Shape legend (used across the package): B batch, T time, D model width,
F hidden width, E experts, K top-k, C capacity, N = B·T tokens. Here a token
is a patient; this module adds one local letter, **R**, the members of an
ensemble (doctors trained the same way, differing only in their seed), and
writes the diagnosis classes as ``classes``.

Averaging probabilities
-----------------------
An ensemble predicts the mean of its members' probabilities,
p̄(y | x) = (1/R) Σ_r softmax(logits_r)(y). Averaging *probabilities* keeps
the result a distribution and is the mixture a dense MoE generalises (lesson
03: a mixture whose gate is stuck at 1/R). Averaging logits instead gives a
different, usually over-confident prediction.

Bias and variance, exactly, for classifiers
-------------------------------------------
We measure a prediction by its squared distance to the truth, the Brier
score (Brier 1950): for one patient with one-hot target y and predicted
probabilities p, ``||p - y||² = Σ_c (p_c - y_c)²``. For R members with
probabilities p_r and their mean p̄ the identity

    mean_r ||p_r - y||²  =  ||p̄ - y||²  +  mean_r ||p_r - p̄||²
          error               bias²            variance

holds exactly (expand the square around p̄; the cross term averages to
zero). *Bias* is how far the average doctor is from the truth: all members
are wrong in that same way. *Variance* is how much members disagree with
each other. An ensemble of M members is itself a predictor: its average over
many independent draws is still p̄ (averaging is linear), so its bias is the
same, while its variance shrinks roughly as 1/M. The clinic's diagnoses are
a deterministic function of the patient, so there is no noise term.

For the cross-entropy the matching fact is Jensen's inequality: the log loss
of the averaged probabilities is never above the members' average log loss;
the gap measures their diversity (``log_loss_gap``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..training.loop import Task, TrainConfig, model_logits, train

__all__ = [
    "Ensemble",
    "train_ensemble",
    "member_logits",
    "average_probs",
    "ensemble_log_loss",
    "log_loss_gap",
    "BiasVariance",
    "brier_decomposition",
    "disjoint_ensembles",
    "bias_variance_by_size",
]


def _check_members(logits: torch.Tensor, name: str = "member_logits") -> None:
    if logits.ndim != 3:
        raise ValueError(f"{name} must have shape (R, N, classes): R members, N patients; got {tuple(logits.shape)}")
    if logits.shape[0] == 0:
        raise ValueError(f"an ensemble needs at least one member ({name} has R = 0)")


def member_logits(models: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Every member's logits on the same patients: x (N, D) → (R, N, classes), no gradients."""
    if len(models) == 0:
        raise ValueError("an ensemble needs at least one member")
    with torch.no_grad():
        outs = []
        for model in models:
            model.eval()
            logits, _ = model_logits(model(x))  # (N, classes)
            outs.append(logits)
    return torch.stack(outs)  # (R, N, classes)


def average_probs(member_logits: torch.Tensor) -> torch.Tensor:
    """The ensemble's prediction: the mean of the members' probabilities, (R, N, classes) → (N, classes).

    Softmax over the classes (the last axis) for each member, then the mean over
    the members (the first axis). Rows sum to 1.
    """
    _check_members(member_logits)
    return torch.softmax(member_logits, dim=-1).mean(dim=0)  # (N, classes)


def ensemble_log_loss(member_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the averaged probabilities, -mean_n log p̄(y_n | x_n): (R, N, classes), (N,) → ().

    Computed in log space, log p̄ = logsumexp_r(log_softmax(logits_r)) - log R,
    so a confident member whose probability underflows to 0 does not give log 0.
    """
    _check_members(member_logits)
    if targets.shape != member_logits.shape[1:2]:
        raise ValueError(f"targets must have shape (N,) = ({member_logits.shape[1]},), got {tuple(targets.shape)}")
    log_probs = torch.log_softmax(member_logits, dim=-1)  # (R, N, classes)
    log_mean = torch.logsumexp(log_probs, dim=0) - math.log(member_logits.shape[0])  # (N, classes)
    return F.nll_loss(log_mean, targets)


def log_loss_gap(member_logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Members' mean cross-entropy, the ensemble's, and the gap between them (>= 0, Jensen).

    The gap is what the second opinions buy in log loss: zero if all members
    agree, larger the more they disagree on the probability of the truth.
    """
    _check_members(member_logits)
    r, n, c = member_logits.shape
    members = F.cross_entropy(member_logits.reshape(r * n, c), targets.repeat(r)).item()
    ensemble = ensemble_log_loss(member_logits, targets).item()
    return {"members": members, "ensemble": ensemble, "gap": members - ensemble}


@dataclass(frozen=True)
class BiasVariance:
    """The Brier decomposition error = bias + variance, per patient (N,) each."""

    error: torch.Tensor  # (N,) mean_r ||p_r - y||²: the average member's squared error
    bias: torch.Tensor  # (N,) ||p̄ - y||²: the error of the members' average prediction
    variance: torch.Tensor  # (N,) mean_r ||p_r - p̄||²: how much the members disagree

    def summary(self) -> dict[str, float]:
        """Means over the patients: {"error", "bias", "variance"}."""
        return {"error": self.error.mean().item(), "bias": self.bias.mean().item(), "variance": self.variance.mean().item()}


def brier_decomposition(member_probs: torch.Tensor, targets: torch.Tensor) -> BiasVariance:
    """Split the members' squared error into bias² and variance: (R, N, classes), (N,) → BiasVariance.

    member_probs are probabilities (each row sums to 1); targets are class ids.
    ``error = bias + variance`` holds for every patient, up to float rounding.
    """
    _check_members(member_probs, "member_probs")
    r, n, c = member_probs.shape
    if targets.shape != (n,):
        raise ValueError(f"targets must have shape (N,) = ({n},), got {tuple(targets.shape)}")
    if targets.numel() and (targets.min() < 0 or targets.max() >= c):
        raise ValueError(f"targets must be class ids in [0, {c}), got values in [{int(targets.min())}, {int(targets.max())}]")
    onehot = F.one_hot(targets, c).to(member_probs.dtype)  # (N, classes)
    mean = member_probs.mean(dim=0)  # (N, classes): the average doctor
    error = ((member_probs - onehot) ** 2).sum(-1).mean(0)  # (N,)
    bias = ((mean - onehot) ** 2).sum(-1)  # (N,)
    variance = ((member_probs - mean) ** 2).sum(-1).mean(0)  # (N,)
    return BiasVariance(error, bias, variance)


def disjoint_ensembles(member_probs: torch.Tensor, size: int) -> torch.Tensor:
    """Split R members into R // size ensembles of ``size`` members each and average each one.

    (R, N, classes) → (R // size, N, classes). Members r·size … (r+1)·size - 1
    form ensemble r; no member is in two ensembles, so the ensembles are
    independent draws; leftover members (R mod size) are not used.
    """
    _check_members(member_probs, "member_probs")
    r = member_probs.shape[0]
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= r:
        raise ValueError(f"size must be an int between 1 and the number of members R={r}, got {size!r}")
    groups = r // size
    return member_probs[: groups * size].reshape(groups, size, *member_probs.shape[1:]).mean(dim=1)


def bias_variance_by_size(member_probs: torch.Tensor, targets: torch.Tensor, sizes: Sequence[int]) -> pd.DataFrame:
    """Bias, variance and accuracy of ensembles of each size, one row per size.

    For each M in ``sizes`` the R members are split into R // M disjoint
    ensembles (``disjoint_ensembles``) and their error is decomposed around the
    ensembles' mean. Use sizes that divide R: then every size averages all R
    members in the end, its bias is the same number, and only the variance
    changes. Columns: size, ensembles, error, bias, variance, accuracy (mean
    accuracy of the ensembles).
    """
    rows = []
    for size in sizes:
        ensembles = disjoint_ensembles(member_probs, size)  # (R // M, N, classes)
        parts = brier_decomposition(ensembles, targets).summary()
        accuracy = (ensembles.argmax(-1) == targets).float().mean().item()
        rows.append({"size": size, "ensembles": ensembles.shape[0], **parts, "accuracy": accuracy})
    return pd.DataFrame(rows)


@dataclass
class Ensemble:
    """Members trained the same way with different seeds, and their training histories."""

    members: list[nn.Module]  # R models of the same configuration
    histories: list[pd.DataFrame]  # one per member

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The members' logits on x (N, D) → (R, N, classes)."""
        return member_logits(self.members, x)

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """The ensemble's prediction on x (N, D): averaged probabilities (N, classes)."""
        return average_probs(self(x))


def train_ensemble(
    make_model: Callable[[], nn.Module],
    task: Task,
    config: TrainConfig,
    num_members: int,
    *,
    device: torch.device | str | None = "cpu",
    progress: bool = True,
) -> Ensemble:
    """Train ``num_members`` models that differ only in their seed.

    Member r is built by ``make_model()`` after ``torch.manual_seed(seed_r)``
    and trained with ``config`` whose sampler seed is also seed_r, where
    seed_r = 1000·config.seed + r: a different initialisation and a different
    order of batches, everything else identical.
    """
    if isinstance(num_members, bool) or not isinstance(num_members, int) or num_members <= 0:
        raise ValueError(f"num_members must be a positive int, got {num_members!r}")
    members, histories = [], []
    for r in range(num_members):
        seed = 1000 * config.seed + r
        torch.manual_seed(seed)
        model = make_model()
        cfg = TrainConfig(**{**config.__dict__, "seed": seed})
        result = train(model, task, cfg, device=device, progress=progress)
        members.append(result.model.cpu())
        histories.append(result.history.assign(member=r))
    return Ensemble(members, histories)
