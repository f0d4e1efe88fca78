"""The feed-forward block: one doctor.

Shape legend (used across the package): B batch, T time, D model width,
F hidden width, E experts, K top-k, C capacity, N = B·T tokens.

A transformer block alternates attention (tokens talk to each other) with a
position-wise feed-forward network (each token thinks alone)::

    FFN(x) = act(x W_in + b_in) W_out + b_out          (Vaswani et al. 2017, eq. 2)

Mixture-of-Experts layers replace this one FFN by many of them, the experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FeedForward", "feed_forward", "ACTIVATIONS"]

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


def feed_forward(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor | None,
    w_out: torch.Tensor,
    b_out: torch.Tensor | None,
    activation: str = "gelu",
) -> torch.Tensor:
    """The FFN as a pure function: (..., D) → (..., D).

    w_in (D, F), b_in (F,), w_out (F, D), b_out (D,); biases may be None.
    """
    h = x @ w_in  # (..., F)
    if b_in is not None:
        h = h + b_in
    h = ACTIVATIONS[activation](h)
    y = h @ w_out  # (..., D)
    if b_out is not None:
        y = y + b_out
    return y


class FeedForward(nn.Module):
    """Position-wise feed-forward block, (..., D) → (..., D).

    Two linear maps with a non-linearity between them: D → F → D. In a
    transformer F is usually 4·D; this is where most parameters live.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        activation: str = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
        d_out: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("d_ff", d_ff)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if d_out is not None and (not isinstance(d_out, int) or d_out <= 0):
            raise ValueError(f"d_out must be a positive int or None, got {d_out!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.d_model, self.d_ff = d_model, d_ff
        self.d_out = d_out or d_model
        self.activation = activation
        self.fc_in = nn.Linear(d_model, d_ff, bias=bias)  # W_in stored as (F, D)
        self.fc_out = nn.Linear(d_ff, self.d_out, bias=bias)  # W_out stored as (D, F)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"FeedForward expects inputs of width d_model={self.d_model}, got shape {tuple(x.shape)}")
        h = ACTIVATIONS[self.activation](self.fc_in(x))  # (..., F)
        return self.fc_out(self.dropout(h))  # (..., D)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
