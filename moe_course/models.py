"""Small models built from the package's blocks, for the clinic lessons.

``ClinicMoE``: patient features (N, d_in) → embed (N, D) → h + MoELayer(h) → head → logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .moe import MoEConfig, MoELayer, MoEOutput

__all__ = ["ClinicMoE", "ClinicMoEOutput"]


@dataclass(frozen=True)
class ClinicMoEOutput:
    logits: torch.Tensor  # (N, num_classes)
    router_loss: torch.Tensor  # () the MoE layer's weighted losses (MoEOutput.router_loss): add this to the task loss
    moe: MoEOutput  # the MoE layer's full result, for inspecting the routing

    # the routing vocabulary of every result type, read from the MoE layer's result
    router_logits = property(lambda self: self.moe.router_logits, doc="(N, E) the MoE layer's router logits")
    router_probs = property(lambda self: self.moe.router_probs, doc="(N, E) their softmax")
    aux_loss = property(lambda self: self.moe.aux_loss, doc="() the unweighted load-balancing loss")
    z_loss = property(lambda self: self.moe.z_loss, doc="() the unweighted router z-loss")


class ClinicMoE(nn.Module):
    """A one-layer MoE classifier: Linear d_in → D, an MoE layer, Linear D → classes.

    With ``residual=True`` (the default) the MoE layer sits in a residual
    connection, h + moe(h), as in a transformer: a patient every expert
    dropped keeps its embedding. ``moe_course.training.ClassificationTask``
    adds ``router_loss`` to the cross-entropy.
    """

    def __init__(self, d_in: int, num_classes: int, config: MoEConfig, *, residual: bool = True) -> None:
        super().__init__()
        for name, value in (("d_in", d_in), ("num_classes", num_classes)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.residual = residual
        self.embed = nn.Linear(d_in, config.d_model)
        self.moe = MoELayer(config)
        self.head = nn.Linear(config.d_model, num_classes)

    def forward(self, x: torch.Tensor) -> ClinicMoEOutput:
        if x.ndim != 2 or x.shape[-1] != self.embed.in_features:
            raise ValueError(f"ClinicMoE expects patients of shape (N, {self.embed.in_features}), got {tuple(x.shape)}")
        h = self.embed(x)  # (N, D)
        out = self.moe(h)
        h = h + out.y if self.residual else out.y  # (N, D)
        return ClinicMoEOutput(self.head(h), out.router_loss, out)
