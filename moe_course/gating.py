"""The softmax gate: the GP who weighs every specialist's opinion.

Shape legend (used across the package): B batch, T time, D model width,
F hidden width, E experts, K top-k, C capacity, N = B·T tokens. Here a token
is a patient, so N counts patients.

A gate reads a patient and gives every expert a weight::

    g(x) = softmax(x W_g + b_g)          W_g (D, E), b_g (E,)

(Jacobs, Jordan, Nowlan and Hinton 1991, "Adaptive Mixtures of Local
Experts", Neural Computation 3(1), their gating network).
The weights of one patient are positive and sum to 1 over the experts: they
say how much the GP trusts each doctor *for this patient*. The softmax runs
over the expert axis (the last one), never over the patients.

In a dense mixture (lesson 03) every expert is consulted and the gate only
weighs their answers; in a sparse layer (lesson 04) the gate's scores also
decide whom to consult at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["softmax_gate", "GateOutput", "SoftmaxGate"]


def softmax_gate(x: torch.Tensor, w_gate: torch.Tensor, b_gate: torch.Tensor | None = None) -> torch.Tensor:
    """Gate weights g(x) = softmax(x W_g + b_g) over the experts: x (N, D), W_g (D, E) → (N, E).

    Every row is positive and sums to 1. ``torch.softmax`` subtracts each row's
    maximum before exponentiating, so large logits do not overflow.
    """
    if x.ndim < 1 or w_gate.ndim != 2 or x.shape[-1] != w_gate.shape[0]:
        raise ValueError(f"softmax_gate expects x (..., D) and w_gate (D, E); got {tuple(x.shape)} and {tuple(w_gate.shape)}")
    if w_gate.shape[1] == 0:
        raise ValueError("softmax_gate needs at least one expert (w_gate has 0 columns)")
    logits = x @ w_gate  # (N, E)
    if b_gate is not None:
        logits = logits + b_gate
    return torch.softmax(logits, dim=-1)  # (N, E)


@dataclass(frozen=True)
class GateOutput:
    """What the gate says about N patients."""

    router_logits: torch.Tensor  # (N, E) raw scores x W_g + b_g
    router_probs: torch.Tensor  # (N, E) softmax over experts: each row sums to 1, the weight of every expert


class SoftmaxGate(nn.Module):
    """A linear gate over ``num_experts`` experts: x (N, D) → GateOutput with (N, E) logits and probabilities."""

    def __init__(self, d_in: int, num_experts: int) -> None:
        super().__init__()
        for name, value in (("d_in", d_in), ("num_experts", num_experts)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.d_in, self.num_experts = d_in, num_experts
        self.proj = nn.Linear(d_in, num_experts)  # W_g stored as (E, D), as nn.Linear does

    def forward(self, x: torch.Tensor) -> GateOutput:
        if x.shape[-1] != self.d_in:
            raise ValueError(f"SoftmaxGate expects inputs of width d_in={self.d_in}, got shape {tuple(x.shape)}")
        logits = self.proj(x)  # (N, E)
        return GateOutput(logits, torch.softmax(logits, dim=-1))

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, num_experts={self.num_experts}"
