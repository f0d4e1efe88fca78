"""The clinic's mixtures of experts: the dense one asks every specialist (lesson 03), the routed one only the top k (lesson 04).

Shape legend (used across the package): B batch, T time, D model width,
F hidden width, E experts, K top-k, C capacity, N = B·T tokens. Here a token
is a patient (N patients of width D = d_in), and the classifiers' outputs
have one entry per diagnosis class (written ``classes`` below, to keep C for
capacity).

The model (Jacobs, Jordan, Nowlan and Hinton 1991, "Adaptive Mixtures of
Local Experts", Neural Computation 3(1)): every expert e gives a probability
for each diagnosis, the gate gives every expert a weight, and the mixture's
prediction is the gate-weighted average of the experts' *probabilities*::

    p(y | x) = Σ_e g_e(x) · p_e(y | x)          g(x) = softmax(x W_g + b_g)

Training minimises -log p(y | x), the negative log-likelihood of the mixture,
which is the "competitive" error function of the paper: the gradient of a
patient's loss reaches each expert in proportion to how much that expert's
answer explains the patient (its posterior responsibility), so an expert that
is already good at a patient gets most of that patient's gradient and the
others are left alone. Experts *compete* for patients, and specialise.
Blending the experts' outputs linearly instead (one prediction from
Σ_e g_e · output_e, as the paper's first, "cooperative" error function does)
couples the experts on every patient; the paper argues that this makes them
cooperate rather than specialise.

Why probabilities, in this course: averaging probabilities is what an
ensemble does (lesson 02), so an ensemble is exactly a dense mixture whose
gate is stuck at 1/E for everyone. The mixture adds one thing, a gate that
listens to the patient. Every expert still runs on every patient, so the cost
grows linearly with E (``dense_mixture_flops``); lesson 04's sparse router
consults only the top-k.

The routed mixture (approach 4 of lesson 04): the GP in front of the doctors.

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

from .experts import FeedForward
from .flops import (  # counted in the accounting module
    dense_mixture_flops,
    dense_mixture_param_count,
    moe_layer_flops,
    moe_layer_param_count,
    routed_mixture_flops,
)
from .gating import SoftmaxGate
from .losses import load_balancing_loss, router_z_loss
from .routing import Routing, switch_routing, top_k_routing

__all__ = [
    "mixture_probs",
    "mixture_log_probs",
    "DenseMixtureConfig",
    "MixtureOutput",
    "DenseMixture",
    "dense_mixture_flops",
    "dense_mixture_param_count",
    "gate_and_experts",
    "ROUTED_ROUTERS",
    "RoutedMixtureConfig",
    "RoutedOutput",
    "RoutedMixture",
    "routed_mixture_flops",
    "moe_layer_param_count",
    "moe_layer_flops",
]


def _check_pair(expert_logits: torch.Tensor, gate: torch.Tensor, gate_name: str) -> None:
    if expert_logits.ndim != 3 or gate.ndim != 2 or expert_logits.shape[:2] != gate.shape:
        raise ValueError(
            f"expected expert_logits (N, E, classes) and {gate_name} (N, E) with the same N and E; "
            f"got {tuple(expert_logits.shape)} and {tuple(gate.shape)}"
        )
    if gate.shape[1] == 0:
        raise ValueError("a mixture needs at least one expert (E = 0)")


def mixture_probs(expert_logits: torch.Tensor, gate_weights: torch.Tensor) -> torch.Tensor:
    """The mixture's prediction Σ_e g_e · softmax(logits_e): (N, E, classes), (N, E) → (N, classes).

    Each expert's logits become probabilities over the classes first (softmax
    over the last axis); the gate then weighs the E distributions. Rows sum to 1
    whenever the gate's rows do. An ensemble is the special case g_e = 1/E.
    """
    _check_pair(expert_logits, gate_weights, "gate_weights")
    probs = torch.softmax(expert_logits, dim=-1)  # (N, E, classes)
    return torch.einsum("ne,nec->nc", gate_weights, probs)  # (N, classes)


def mixture_log_probs(expert_logits: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    """log Σ_e g_e · p_e, computed stably: (N, E, classes), gate logits (N, E) → (N, classes).

    Works in log space, log p = logsumexp_e(log_softmax(gate)_e + log_softmax(logits_e)),
    so a confident expert (a probability of 1e-40) does not underflow to log 0.
    ``F.cross_entropy`` on the result is the mixture's negative log-likelihood,
    -log p(y | x): the rows are already normalised, so its own log-softmax changes nothing.
    """
    _check_pair(expert_logits, gate_logits, "gate_logits")
    log_gate = torch.log_softmax(gate_logits, dim=-1)  # (N, E)
    log_probs = torch.log_softmax(expert_logits, dim=-1)  # (N, E, classes)
    return torch.logsumexp(log_gate[:, :, None] + log_probs, dim=1)  # (N, classes)


@dataclass(frozen=True)
class DenseMixtureConfig:
    d_in: int  # width of a patient vector (D)
    d_ff: int  # hidden width of each expert (F); the team has E·F hidden units
    num_classes: int  # diagnoses: each expert outputs one score per class
    num_experts: int  # E, every one of them runs on every patient

    def __post_init__(self) -> None:
        for name in ("d_in", "d_ff", "num_classes", "num_experts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"DenseMixtureConfig.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class MixtureOutput:
    """Everything the dense mixture computed for N patients."""

    logits: torch.Tensor  # (N, classes) log p(y | x), the mixture's log-probabilities (rows already normalised)
    router_logits: torch.Tensor  # (N, E) the gate's raw scores
    router_probs: torch.Tensor  # (N, E) softmax of router_logits: the weight of every expert
    expert_logits: torch.Tensor  # (N, E, classes) every expert's own scores

    @property
    def probs(self) -> torch.Tensor:
        """The mixture's probabilities over the classes: (N, classes)."""
        return torch.softmax(self.logits, dim=-1)

    @property
    def expert_probs(self) -> torch.Tensor:
        """Each expert's own probabilities: (N, E, classes)."""
        return torch.softmax(self.expert_logits, dim=-1)


def gate_and_experts(d_in: int, d_ff: int, num_classes: int, num_experts: int) -> tuple[SoftmaxGate, nn.ModuleList]:
    """The staff of both clinic mixtures: a softmax gate over E experts, each the clinic MLP ``FeedForward(d_in, d_ff, d_out=classes)``."""
    experts = nn.ModuleList(FeedForward(d_in, d_ff, d_out=num_classes) for _ in range(num_experts))
    return SoftmaxGate(d_in, num_experts), experts


class DenseMixture(nn.Module):
    """A softmax gate over E ``FeedForward`` experts, all of which see every patient.

    x (N, d_in) → MixtureOutput. Each expert is the clinic MLP of lesson 01,
    ``FeedForward(d_in, d_ff, d_out=num_classes)``. ``moe_course.training``
    trains it with cross-entropy on ``.logits``, which is the mixture's
    negative log-likelihood -log Σ_e g_e p_e(y | x).
    """

    def __init__(self, config: DenseMixtureConfig) -> None:
        super().__init__()
        if not isinstance(config, DenseMixtureConfig):
            raise TypeError(f"DenseMixture expects a DenseMixtureConfig, got {type(config).__name__}")
        self.config = config
        self.gate, self.experts = gate_and_experts(config.d_in, config.d_ff, config.num_classes, config.num_experts)

    def forward(self, x: torch.Tensor) -> MixtureOutput:
        if x.ndim != 2 or x.shape[-1] != self.config.d_in:
            raise ValueError(f"DenseMixture expects patients of shape (N, {self.config.d_in}), got {tuple(x.shape)}")
        gate = self.gate(x)  # weights (N, E)
        expert_logits = torch.stack([expert(x) for expert in self.experts], dim=1)  # (N, E, classes): every doctor, every patient
        logits = mixture_log_probs(expert_logits, gate.router_logits)  # (N, classes): log Σ_e g_e p_e
        return MixtureOutput(logits, gate.router_logits, gate.router_probs, expert_logits)

    def extra_repr(self) -> str:
        return f"num_experts={self.config.num_experts}"


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
            raise ValueError(
                f"RoutedMixtureConfig.top_k={self.top_k} is more than num_experts={self.num_experts}: a patient cannot see more doctors than there are"
            )
        if self.router not in ROUTED_ROUTERS:
            raise ValueError(
                f"RoutedMixtureConfig.router: unknown router type {self.router!r}; choose from {list(ROUTED_ROUTERS)}"
            )
        if self.router == "switch" and self.top_k != 1:
            raise ValueError(
                f"RoutedMixtureConfig.router='switch' sends each patient to one doctor, but top_k={self.top_k}; use router='top_k'"
            )
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
        self.gate, self.experts = gate_and_experts(
            config.d_in, config.d_ff, config.num_classes, config.num_experts
        )  # DenseMixture's staff

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
