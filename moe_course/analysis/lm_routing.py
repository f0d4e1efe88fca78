"""Looking inside a Switch language model: which expert gets which tokens.

Shape legend (used across the package): B batch, T time, D model width,
F hidden width, E experts, K top-k, C capacity, N = B·T tokens; V vocabulary,
S domains.

``routing_report(model, batch, domains)`` runs the model on a batch (eval
mode, in chunks) and returns, for every Switch layer, a ``LayerRouting``:

* ``domain_expert`` (S, E): how many target characters of each domain the
  router sent to each expert (its first choice, before dropping);
* ``char_expert`` (V, E): the same by *input* character (what the router reads);
* ``tokens_per_expert`` (E,), ``dropped`` and ``tokens``: the load and the
  tokens no expert processed for lack of capacity;
* ``mean_gate``: the average router probability of the chosen expert, the
  factor the expert's output is multiplied by (about 1/E while the router is unsure);
* ``specialisation``: the normalised mutual information between domain and
  expert (``moe_course.analysis.specialisation.normalized_mutual_information``): 1 when
  every domain has its own expert(s), 0 when the expert says nothing about the domain.

``RoutingTracker`` is a ``train(..., callback=...)`` that records these
numbers at every evaluation, to plot the share of tokens per expert, the
dropped-token rate, the mean gate and the specialisation over training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from ..data.corpus import CharTokenizer, LMBatch
from ..training.loop import evaluating
from .specialisation import normalized_mutual_information

__all__ = ["LayerRouting", "routing_report", "RoutingTracker"]


@dataclass(frozen=True)
class LayerRouting:
    layer: int  # block index in the model
    domains: tuple[str, ...]  # row names of domain_expert
    domain_expert: torch.Tensor  # (S, E) int64 tokens of each domain per chosen expert
    char_expert: torch.Tensor  # (V, E) int64 tokens of each input character per chosen expert
    dropped: int  # tokens no expert processed (capacity)
    tokens: int  # tokens routed in total (N over all chunks)
    gate_sum: float = 0.0  # sum over tokens of the gate (router probability) of the chosen expert

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        """(E,) int64 tokens each expert was chosen for."""
        return self.domain_expert.sum(0)

    @property
    def dropped_rate(self) -> float:
        return self.dropped / self.tokens if self.tokens else float("nan")

    @property
    def mean_gate(self) -> float:
        """The average weight the router gives its chosen expert (1/E at a uniform start, 1 when sure):
        the expert's output is multiplied by it."""
        return self.gate_sum / self.tokens if self.tokens else float("nan")

    @property
    def specialisation(self) -> float:
        return normalized_mutual_information(self.domain_expert)

    def domain_table(self) -> pd.DataFrame:
        """Share of each domain's tokens sent to each expert: rows domains, columns experts, rows sum to 1."""
        counts = self.domain_expert.double()
        share = counts / counts.sum(1, keepdim=True).clamp_min(1)
        return pd.DataFrame(share.numpy(), index=list(self.domains), columns=[f"expert {e}" for e in range(counts.shape[1])])

    def preferred_chars(self, tokenizer: CharTokenizer, k: int = 5, min_count: int = 5) -> pd.DataFrame:
        """The k input characters each expert over-represents most (lift = P(char | expert) / P(char)).

        Columns: expert, char, count, share (of the expert's tokens), lift.
        Characters seen fewer than ``min_count`` times overall are skipped.
        """
        counts = self.char_expert.double()  # (V, E)
        total = counts.sum()
        p_char = counts.sum(1) / total  # (V,)
        rows = []
        for e in range(counts.shape[1]):
            n_e = counts[:, e].sum()
            if n_e == 0:
                continue
            share = counts[:, e] / n_e  # (V,)
            lift = share / p_char.clamp_min(1e-12)
            lift[counts.sum(1) < min_count] = float("-inf")
            for v in lift.argsort(descending=True)[:k].tolist():
                if lift[v] == float("-inf"):
                    break
                rows.append(
                    {
                        "expert": e,
                        "char": tokenizer.chars[v],
                        "count": int(counts[v, e]),
                        "share": float(share[v]),
                        "lift": float(lift[v]),
                    }
                )
        return pd.DataFrame(rows, columns=["expert", "char", "count", "share", "lift"])


def routing_report(model: nn.Module, batch: LMBatch, domains: tuple[str, ...], *, chunk: int = 32) -> list[LayerRouting]:
    """Routing statistics of every Switch layer of ``model`` on ``batch`` (``training.evaluating``, ``chunk`` rows per call)."""
    device = next(model.parameters()).device
    S, V = len(domains), model.config.vocab_size
    acc: dict[int, dict] = {}
    for start in range(0, len(batch), chunk):
        part = batch.rows(start, start + chunk).to(device)
        with evaluating(model):
            out = model(part.x)
        dom = part.domain.reshape(-1).cpu()  # (N,)
        char = part.x.reshape(-1).cpu()  # (N,)
        for layer, moe in out.moe_outputs:
            E = moe.router_logits.shape[-1]
            first = moe.expert_index[:, 0].cpu()  # (N,) top-1 choice
            a = acc.setdefault(
                layer,
                {
                    "de": torch.zeros(S * E, dtype=torch.int64),
                    "ce": torch.zeros(V * E, dtype=torch.int64),
                    "dropped": 0,
                    "tokens": 0,
                    "gates": 0.0,
                    "E": E,
                },
            )
            a["de"] += torch.bincount(dom * E + first, minlength=S * E)
            a["ce"] += torch.bincount(char * E + first, minlength=V * E)
            a["dropped"] += int(moe.num_dropped)
            a["tokens"] += first.numel()
            a["gates"] += float(moe.gates[:, 0].double().sum())
    return [
        LayerRouting(
            layer, tuple(domains), a["de"].reshape(S, a["E"]), a["ce"].reshape(V, a["E"]), a["dropped"], a["tokens"], a["gates"]
        )
        for layer, a in sorted(acc.items())
    ]


@dataclass
class RoutingTracker:
    """``train(..., callback=tracker)``: routing numbers of every Switch layer at every evaluation.

    ``history``: one row per (step, layer, expert) with the share of tokens
    the expert got; ``summary``: one row per (step, layer) with the dropped
    rate and the specialisation score; ``reports[step]``: the full ``LayerRouting`` list.
    """

    batch: LMBatch  # tokens to route, e.g. LMTask.held_out
    domains: tuple[str, ...]
    chunk: int = 32  # rows per forward call (match the training batch size)
    reports: dict[int, list[LayerRouting]] = field(default_factory=dict)

    def __call__(self, step: int, model: nn.Module) -> None:
        self.reports[step] = routing_report(model, self.batch, self.domains, chunk=self.chunk)

    @property
    def history(self) -> pd.DataFrame:
        rows = []
        for step, layers in self.reports.items():
            for lr in layers:
                load = lr.tokens_per_expert.double()
                for e, share in enumerate((load / load.sum()).tolist()):
                    rows.append({"step": step, "layer": lr.layer, "expert": e, "share": share})
        return pd.DataFrame(rows, columns=["step", "layer", "expert", "share"])

    @property
    def summary(self) -> pd.DataFrame:
        rows = [
            {
                "step": step,
                "layer": lr.layer,
                "dropped_rate": lr.dropped_rate,
                "specialisation": lr.specialisation,
                "mean_gate": lr.mean_gate,
            }
            for step, layers in self.reports.items()
            for lr in layers
        ]
        return pd.DataFrame(rows, columns=["step", "layer", "dropped_rate", "specialisation", "mean_gate"])
