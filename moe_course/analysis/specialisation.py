"""Did the experts specialise? Who the GP sends each specialty to, measured.

Shape legend (used across the package): B batch, T time, D model width,
F hidden width, E experts, K top-k, C capacity, N = B·T tokens. Here N counts
patients and S is the number of specialties (a clinic-only letter).

Two views of the same question:

* **Gate mass** (``gate_mass_by_specialty``): the average gate weight that
  the patients of each specialty give each expert, an (S, E) table whose rows
  sum to 1. Specialised experts show up as one bright cell per row, in a
  different column for every row.
* **Specialisation score** (``specialisation_score``): one number, the
  normalised mutual information between a patient's specialty and its *top*
  expert (the argmax of its gate weights)::

      NMI = 2 · I(S; X) / (H(S) + H(X))

  with I the mutual information and H the entropies of the empirical joint
  distribution of (specialty S, top expert X). It is 1 when every specialty
  has its own expert and nobody else's, and 0 when knowing the specialty says
  nothing about the expert (for example, when one expert takes everyone).
  Dividing by the arithmetic mean of the two entropies (the "NMI_sum" of
  Vinh, Epps and Bailey 2010, JMLR 11, and scikit-learn's default) also
  penalises a specialty split over several experts and two specialties
  sharing one, unlike dividing by the smaller entropy. The logarithm's base
  cancels out. Convention: if both entropies are 0 (a single specialty, a
  single expert) the score is 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch

from ..training.loop import evaluating

__all__ = [
    "gate_mass_by_specialty",
    "top_expert_counts",
    "seen_by_specialty",
    "normalized_mutual_information",
    "specialisation_score",
    "expert_accuracy_by_specialty",
    "context_share",
    "effective_experts",
    "SpecialisationTracker",
]


def _check(gate_weights: torch.Tensor, specialty: torch.Tensor, num_specialties: int) -> None:
    if gate_weights.ndim != 2 or specialty.shape != gate_weights.shape[:1]:
        raise ValueError(
            f"expected gate_weights (N, E) and specialty (N,); got {tuple(gate_weights.shape)} and {tuple(specialty.shape)}"
        )
    if gate_weights.shape[1] == 0:
        raise ValueError("there must be at least one expert (gate_weights has E = 0 columns)")
    if isinstance(num_specialties, bool) or not isinstance(num_specialties, int) or num_specialties <= 0:
        raise ValueError(f"num_specialties must be a positive int, got {num_specialties!r}")
    if specialty.numel() and (specialty.min() < 0 or specialty.max() >= num_specialties):
        raise ValueError(
            f"specialty ids must lie in [0, {num_specialties}), got values in [{int(specialty.min())}, {int(specialty.max())}]"
        )


def gate_mass_by_specialty(gate_weights: torch.Tensor, specialty: torch.Tensor, num_specialties: int) -> torch.Tensor:
    """Mean gate weight of every expert within each specialty: (N, E), (N,) → (S, E).

    Row s sums to 1; it is NaN for a specialty without patients.
    """
    _check(gate_weights, specialty, num_specialties)
    g = gate_weights.detach().float().cpu()
    s = specialty.cpu()
    total = torch.zeros(num_specialties, g.shape[1]).index_add_(0, s, g)  # (S, E)
    counts = torch.bincount(s, minlength=num_specialties).float()  # (S,)
    return total / counts[:, None]


def top_expert_counts(gate_weights: torch.Tensor, specialty: torch.Tensor, num_specialties: int) -> torch.Tensor:
    """How many patients of each specialty have each expert as their top expert: → (S, E) int64."""
    _check(gate_weights, specialty, num_specialties)
    e = gate_weights.shape[1]
    top = gate_weights.detach().argmax(dim=-1).cpu()  # (N,) the expert with the largest weight
    return torch.bincount(specialty.cpu() * e + top, minlength=num_specialties * e).reshape(num_specialties, e)


def seen_by_specialty(
    expert_index: torch.Tensor, specialty: torch.Tensor, num_specialties: int, num_experts: int
) -> torch.Tensor:
    """Share of each specialty's patients who see each expert: expert_index (N, K), specialty (N,) → (S, E).

    With top-k routing a patient sees K experts, so row s sums to K (each
    entry is at most 1); NaN for a specialty without patients.
    """
    if expert_index.ndim != 2 or specialty.shape != expert_index.shape[:1]:
        raise ValueError(
            f"expected expert_index (N, K) and specialty (N,); got {tuple(expert_index.shape)} and {tuple(specialty.shape)}"
        )
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if expert_index.numel() and (expert_index.min() < 0 or expert_index.max() >= num_experts):
        raise ValueError(
            f"expert ids must lie in [0, {num_experts}), got values in [{int(expert_index.min())}, {int(expert_index.max())}]"
        )
    sees = torch.zeros(expert_index.shape[0], num_experts).scatter_(1, expert_index.cpu(), 1.0)  # (N, E): 1 where seen
    return gate_mass_by_specialty(sees, specialty, num_specialties)


def normalized_mutual_information(counts: torch.Tensor) -> float:
    """2·I(row; column) / (H(row) + H(column)) of a contingency table of counts (S, E).

    Empty cells contribute 0 (the limit of p·log p as p → 0). Returns 1.0
    when both entropies are 0, and NaN for an all-zero table.
    """
    if counts.ndim != 2:
        raise ValueError(f"counts must be a 2-D table (S, E), got shape {tuple(counts.shape)}")
    if (counts < 0).any():
        raise ValueError("counts must be non-negative")
    joint = counts.double()
    total = joint.sum()
    if total == 0:
        return float("nan")
    joint = joint / total  # (S, E) joint distribution
    p_row, p_col = joint.sum(1), joint.sum(0)  # (S,), (E,)
    nz = joint > 0
    mutual = (joint[nz] * (joint[nz] / (p_row[:, None] * p_col[None, :])[nz]).log()).sum()
    h_row = -(p_row[p_row > 0] * p_row[p_row > 0].log()).sum()
    h_col = -(p_col[p_col > 0] * p_col[p_col > 0].log()).sum()
    if h_row + h_col == 0:
        return 1.0  # one specialty, one expert: trivially a perfect match
    return float((2 * mutual / (h_row + h_col)).clamp(0.0, 1.0))


def specialisation_score(gate_weights: torch.Tensor, specialty: torch.Tensor, num_specialties: int) -> float:
    """Normalised mutual information between specialty and top expert, in [0, 1]: (N, E), (N,) → float."""
    return normalized_mutual_information(top_expert_counts(gate_weights, specialty, num_specialties))


def expert_accuracy_by_specialty(
    expert_logits: torch.Tensor, targets: torch.Tensor, specialty: torch.Tensor, num_specialties: int
) -> torch.Tensor:
    """Accuracy of each expert *on its own*, within each specialty: (N, E, classes), (N,), (N,) → (S, E).

    Shows whether the expert the gate picks for a specialty is the one that
    knows that specialty's rule. NaN for a specialty without patients.
    """
    if expert_logits.ndim != 3 or targets.shape != expert_logits.shape[:1]:
        raise ValueError(
            f"expected expert_logits (N, E, classes) and targets (N,); got {tuple(expert_logits.shape)} and {tuple(targets.shape)}"
        )
    correct = (expert_logits.detach().argmax(-1) == targets[:, None]).float()  # (N, E)
    return gate_mass_by_specialty(correct, specialty, num_specialties)


def context_share(gate_weight: torch.Tensor, x: torch.Tensor, d_context: int) -> float:
    """What the GP listens to: the share of its decision that comes from the last ``d_context`` features.

    gate_weight (E, D) is the gate's W_g as ``nn.Linear`` stores it; x (N, D)
    are patients whose last d_context features are the context (the
    department's cue) and the others the measurements. The gate's logits split
    exactly into the two parts, h = x_m W_m + x_c W_c (+ bias, the same for
    everyone). A softmax ignores a shift shared by all experts, so each part is
    centred over the experts, then over the patients; the share is

        ||h_c||² / (||h_m||² + ||h_c||²)          in [0, 1]

    0: the referral depends on the measurements only (blood pressure decides
    the doctor); 1: on the department only. NaN if both parts are constant.
    """
    if gate_weight.ndim != 2 or x.ndim != 2 or x.shape[1] != gate_weight.shape[1]:
        raise ValueError(
            f"expected gate_weight (E, D) and x (N, D) with the same D; got {tuple(gate_weight.shape)} and {tuple(x.shape)}"
        )
    if isinstance(d_context, bool) or not isinstance(d_context, int) or not 0 < d_context < x.shape[1]:
        raise ValueError(f"d_context must be an int between 1 and D - 1 = {x.shape[1] - 1}, got {d_context!r}")
    w = gate_weight.detach().double().cpu()
    v = x.detach().double().cpu()
    cut = v.shape[1] - d_context

    def spread(part: torch.Tensor) -> float:
        part = part - part.mean(dim=1, keepdim=True)  # (N, E): a shift shared by all experts does not route
        part = part - part.mean(dim=0, keepdim=True)  # a shift shared by all patients does not route either
        return float((part**2).sum())

    measured = spread(v[:, :cut] @ w[:, :cut].T)  # (N, E) from the measurements
    context = spread(v[:, cut:] @ w[:, cut:].T)  # (N, E) from the context
    total = measured + context
    return context / total if total > 0 else float("nan")


def effective_experts(counts: torch.Tensor) -> torch.Tensor:
    """How many doctors the GP really uses: exp(entropy) of the share of patients per expert, (..., E) → (...).

    counts (..., E) are non-negative patient counts (or shares) per expert, e.g.
    ``top_expert_counts(...).sum(0)``. The result is E when every expert gets
    the same share, 1 when one expert takes everyone, and e.g. 2 when two
    experts share all patients equally (the "perplexity" of the load).
    """
    if counts.ndim < 1 or counts.shape[-1] == 0:
        raise ValueError(f"counts must have an expert axis (..., E) with E >= 1, got shape {tuple(counts.shape)}")
    if (counts < 0).any():
        raise ValueError("counts must be non-negative")
    c = counts.double()
    total = c.sum(-1, keepdim=True)
    if (total == 0).any():
        raise ValueError("every row of counts needs at least one patient")
    p = c / total  # (..., E)
    entropy = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)  # 0·log 0 = 0
    return entropy.exp()


@dataclass
class SpecialisationTracker:
    """A ``train(..., callback=tracker)`` callback that records specialisation during training.

    At every evaluation it runs the model on ``x`` (``training.evaluating``: eval
    mode, no gradients; the model must return a result with ``router_probs``
    (N, E)) and appends the step, the specialisation score, the gate-mass table
    and the top-expert counts. With ``d_context`` set (and the model's gate at
    ``model.gate.proj``, as in ``DenseMixture`` and ``RoutedMixture``) it also
    records ``context_share``.
    """

    x: torch.Tensor  # (N, D) patients to watch, e.g. the held-out set
    specialty: torch.Tensor  # (N,) their specialties
    num_specialties: int
    d_context: int | None = None  # the last d_context features of x are the context: also record context_share
    rows: list[dict[str, float]] = field(default_factory=list)
    gate_mass: list[torch.Tensor] = field(default_factory=list)  # one (S, E) table per evaluation
    counts: list[torch.Tensor] = field(default_factory=list)  # one (S, E) table of top-expert counts per evaluation

    def __call__(self, step: int, model: torch.nn.Module) -> None:
        device = next(model.parameters()).device
        with evaluating(model):
            out = model(self.x.to(device))
        weights = getattr(out, "router_probs", None)
        if weights is None:
            raise TypeError(f"SpecialisationTracker needs a model whose output has router_probs; got {type(out).__name__}")
        row = {"step": step, "score": specialisation_score(weights, self.specialty, self.num_specialties)}
        if self.d_context is not None:
            row["context_share"] = context_share(model.gate.proj.weight, self.x, self.d_context)
        self.rows.append(row)
        self.gate_mass.append(gate_mass_by_specialty(weights, self.specialty, self.num_specialties))
        self.counts.append(top_expert_counts(weights, self.specialty, self.num_specialties))

    @property
    def history(self) -> pd.DataFrame:
        """Columns step and score (and context_share with ``d_context``), one row per evaluation."""
        columns = ["step", "score"] + (["context_share"] if self.d_context is not None else [])
        return pd.DataFrame(self.rows, columns=columns)
