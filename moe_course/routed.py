"""The GP in front of the doctors: a sparsely routed mixture for the clinic (approach 4).

Shape legend (used across the package): B batch, T time, D model width,
F hidden width, E experts, K top-k, C capacity, N = B·T tokens. Here a token
is a patient (N patients of width D = d_in) and the experts' outputs have one
score per diagnosis (``classes``).

``RoutedMixture`` has exactly the parameters of lesson 03's ``DenseMixture``:
a softmax gate over E experts, each the clinic MLP ``FeedForward(d_in, F,
d_out=classes)``. Only the visit changes. The gate scores every expert, the
router keeps the top k, and only those k experts run on the patient::

    p = softmax(x W_g + b_g)                      (N, E)  the GP's opinion of every doctor
    expert_index, gates = route(gate logits)      (N, K)  whom to see, and how much to trust them
    logits = Σ_j gates[:, j] · expert_{expert_index[:, j]}(x)      (N, classes)

The chosen experts' outputs are added up, weighted by their gates, the way an
MoE layer in a transformer combines its experts (``moe_course.moe``). Routers
(``moe_course.routing``):

    "switch"  top-1 with the raw gate p_i (Switch Transformer): the gate is how
              the router learns, since a top-1 gate renormalised to 1 carries no gradient
    "top_k"   top-k with the k gates renormalised to sum to 1 (GShard, Mixtral)

Training adds ``aux_loss_coef`` × the Switch load-balancing loss (and
optionally ``z_loss_coef`` × the router z-loss), returned in
``RoutedOutput.router_loss``, which ``moe_course.training`` adds to the cross-entropy.

Cost: a patient pays for the gate and k experts, whatever E is
(``routed_mixture_flops``); the dense mixture pays for all E.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .flops import moe_layer_flops, moe_layer_param_count, routed_mixture_flops  # counted in the accounting module
from .losses import load_balancing_loss, router_z_loss
from .mixture import gate_and_experts
from .routing import Routing, switch_routing, top_k_routing

__all__ = [
    "ROUTED_ROUTERS",
    "RoutedMixtureConfig",
    "RoutedOutput",
    "RoutedMixture",
    "routed_mixture_flops",
    "moe_layer_param_count",
    "moe_layer_flops",
]

ROUTED_ROUTERS = ("switch", "top_k")


@dataclass(frozen=True)
class RoutedMixtureConfig:
    d_in: int  # width of a patient vector (D)
    d_ff: int  # hidden width of each expert (F)
    num_classes: int  # diagnoses: each expert outputs one score per class
    num_experts: int  # E, the doctors on the staff
    top_k: int = 1  # K, doctors each patient sees
    router: str = "switch"  # "switch" (top-1, raw gate) or "top_k" (renormalised gates)
    aux_loss_coef: float = 1e-2  # α, weight of the Switch load-balancing loss
    z_loss_coef: float = 0.0  # weight of the router z-loss (ST-MoE used 1e-3)

    def __post_init__(self) -> None:
        for name in ("d_in", "d_ff", "num_classes", "num_experts", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"RoutedMixtureConfig.{name} must be a positive int, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"RoutedMixtureConfig.top_k={self.top_k} is more than num_experts={self.num_experts}: a patient cannot see more doctors than there are")
        if self.router not in ROUTED_ROUTERS:
            raise ValueError(f"RoutedMixtureConfig.router: unknown router type {self.router!r}; choose from {list(ROUTED_ROUTERS)}")
        if self.router == "switch" and self.top_k != 1:
            raise ValueError(f"RoutedMixtureConfig.router='switch' sends each patient to one doctor, but top_k={self.top_k}; use router='top_k'")
        for name in ("aux_loss_coef", "z_loss_coef"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"RoutedMixtureConfig.{name} must be a number >= 0, got {value!r}")


@dataclass(frozen=True)
class RoutedOutput:
    """Everything the routed mixture computed for N patients."""

    logits: torch.Tensor  # (N, classes) Σ_j gates_j · expert_{e_j}(x): the diagnosis scores
    router_loss: torch.Tensor  # () aux_loss_coef·aux_loss + z_loss_coef·z_loss: add this to the task loss
    aux_loss: torch.Tensor  # () unweighted Switch load-balancing loss, 1.0 when perfectly balanced
    z_loss: torch.Tensor  # () unweighted router z-loss
    router_logits: torch.Tensor  # (N, E) the gate's raw scores
    router_probs: torch.Tensor  # (N, E) float32 softmax over the experts: the GP's opinion of every doctor
    expert_index: torch.Tensor  # (N, K) int64, the doctors each patient sees, best first
    gates: torch.Tensor  # (N, K) float32, the weight of each chosen doctor's answer

    def tokens_per_expert(self) -> torch.Tensor:
        """(E,) int64: how many patients each doctor saw (all K choices counted)."""
        return torch.bincount(self.expert_index.reshape(-1), minlength=self.router_logits.shape[-1])


class RoutedMixture(nn.Module):
    """A gate and E ``FeedForward`` experts; each patient sees only its top-k experts.

    x (N, d_in) → RoutedOutput. The parameters are those of
    ``DenseMixture`` with the same config (same gate, same experts).
    """

    def __init__(self, config: RoutedMixtureConfig) -> None:
        super().__init__()
        if not isinstance(config, RoutedMixtureConfig):
            raise TypeError(f"RoutedMixture expects a RoutedMixtureConfig, got {type(config).__name__}")
        self.config = config
        self.gate, self.experts = gate_and_experts(config.d_in, config.d_ff, config.num_classes, config.num_experts)  # DenseMixture's staff

    def route(self, router_logits: torch.Tensor) -> Routing:
        """The GP's referral: the gate's logits (N, E) → Routing with expert_index and gates (N, K)."""
        if self.config.router == "switch":
            return switch_routing(router_logits)
        return top_k_routing(router_logits, self.config.top_k)

    def forward(self, x: torch.Tensor) -> RoutedOutput:
        cfg = self.config
        if x.ndim != 2 or x.shape[-1] != cfg.d_in:
            raise ValueError(f"RoutedMixture expects patients of shape (N, {cfg.d_in}), got {tuple(x.shape)}")
        router_logits = self.gate(x).router_logits  # (N, E)
        routing = self.route(router_logits)
        logits = x.new_zeros(x.shape[0], cfg.num_classes)  # (N, classes)
        for e, expert in enumerate(self.experts):
            token, choice = (routing.expert_index == e).nonzero(as_tuple=True)  # the patients who see doctor e
            if token.numel() == 0:
                continue  # an idle doctor costs nothing
            gate = routing.gates[token, choice].to(x.dtype)[:, None]  # (M, 1)
            logits = logits.index_add(0, token, gate * expert(x[token]))  # (N, classes)
        aux = load_balancing_loss(routing.router_probs, routing.expert_index)
        z = router_z_loss(router_logits)
        return RoutedOutput(
            logits=logits,
            router_loss=cfg.aux_loss_coef * aux + cfg.z_loss_coef * z,
            aux_loss=aux,
            z_loss=z,
            router_logits=router_logits,
            router_probs=routing.router_probs,
            expert_index=routing.expert_index,
            gates=routing.gates,
        )

    def extra_repr(self) -> str:
        c = self.config
        return f"router={c.router!r}, num_experts={c.num_experts}, top_k={c.top_k}"


