"""Adaptive computation: harder cases get more doctors, easy ones fewer (or none).

Legend: N tokens (patients), D model width, F expert width, E experts,
Z null experts, K the most choices a token can make.

Top-k gives every token the same K experts. Two routers that do not:

* ``top_p_routing`` (Huang et al. 2024, "Harder Tasks Need More Experts:
  Dynamic Routing in MoE Models", arXiv:2403.07652): a token takes its most
  probable experts until their probabilities add up to at least p. A
  confident router (one expert at 0.9) sends the token to one doctor; an
  unsure one (four experts near 0.25) to several. Their gate is the raw
  probability. Because flattening the probabilities buys more experts, the
  paper adds a loss that lowers the router's entropy (``router_entropy``).
* ``null_expert_routing`` (Zeng et al. 2024, "AdaMoE: Token-Adaptive Routing
  with Null Experts", arXiv:2406.13233): top-k over E real experts and Z
  "null" experts that do nothing and cost nothing. A token whose k choices
  include null experts gets fewer real ones, possibly none (its output is
  then 0: it rides the residual connection).

Expert choice (``moe_course.routing.expert_choice_routing``) is a third: each
expert picks its tokens, so a token may get 0, 1 or several experts.

Both routers return an ``AdaptiveRouting`` with a ``keep`` mask: (N, K) slots of
which each token uses ``experts_per_token`` (N,). ``AdaptiveMoE`` is a layer
built on them; ``ClinicAdaptiveMoE`` puts it in the clinic's classifier, and
``compute_by_group`` measures which patients get more; ``blur_referrals`` makes
patients whose referral letter points between two departments (measured: with
top-p at p = 0.8 on a 4-specialty clinic, such patients got more experts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.clinic import Clinic, Patients
from ..dispatch import dispatch
from ..experts import ACTIVATIONS, Experts

__all__ = [
    "AdaptiveRouting",
    "top_p_routing",
    "null_expert_routing",
    "router_entropy",
    "adaptive_balance_loss",
    "compute_by_group",
    "blur_referrals",
    "AdaptiveMoEConfig",
    "AdaptiveMoEOutput",
    "AdaptiveMoE",
    "ClinicAdaptiveMoE",
    "ClinicAdaptiveOutput",
    "ADAPTIVE_ROUTERS",
]

ADAPTIVE_ROUTERS = ("top_p", "null")


@dataclass(frozen=True)
class AdaptiveRouting:
    """Routing where tokens use different numbers of experts."""

    router_logits: torch.Tensor  # (N, E + Z) the logits the choice was made on (Z = 0 for top-p)
    router_probs: torch.Tensor  # (N, E + Z) float32 softmax over every expert, null ones included
    expert_index: torch.Tensor  # (N, K) int64 real expert of each used choice (best first); 0 where unused
    gates: torch.Tensor  # (N, K) float32 weight of each choice; 0 where unused
    keep: torch.Tensor  # (N, K) bool, True for the choices that run a real expert
    choice_index: torch.Tensor  # (N, K) int64 column of router_probs of every choice, used or not (null experts: >= E)

    @property
    def experts_per_token(self) -> torch.Tensor:
        """(N,) int64: how many real experts each token visits (its compute, in expert passes)."""
        return self.keep.sum(dim=-1)


def _check_logits(router_logits: torch.Tensor) -> None:
    if not isinstance(router_logits, torch.Tensor) or router_logits.ndim != 2 or not router_logits.is_floating_point():
        raise ValueError(
            f"router_logits must be a float tensor of shape (N, E), got {getattr(router_logits, 'dtype', type(router_logits).__name__)} "
            f"{tuple(getattr(router_logits, 'shape', ()))}"
        )


def top_p_routing(router_logits: torch.Tensor, p: float, *, max_k: int | None = None) -> AdaptiveRouting:
    """Each token takes its most probable experts until they cover probability p (Huang et al. 2024, eq. 2-3).

    probs = softmax(logits) (N, E), sorted descending; expert j (in that order)
    is used when the probability of the experts before it is still below p,
    so the expert that crosses p is included and every token gets at least one.
    At most ``max_k`` experts (default E). Gates are the raw probabilities (not
    renormalised), which is how the router learns. K = max_k columns.
    """
    _check_logits(router_logits)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
        raise ValueError(f"p must be a probability in (0, 1], got {p!r}")
    num_experts = router_logits.shape[-1]
    k = num_experts if max_k is None else max_k
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= num_experts:
        raise ValueError(f"max_k must be an int in [1, {num_experts}], got {max_k!r}")
    probs = F.softmax(router_logits.float(), dim=-1)  # (N, E)
    top, index = torch.topk(probs, k, dim=-1)  # (N, K) descending
    before = torch.cumsum(top, dim=-1) - top  # (N, K) probability of the better experts
    keep = before < p  # (N, K); column 0 always
    return AdaptiveRouting(router_logits, probs, torch.where(keep, index, 0), torch.where(keep, top, 0.0), keep, index)


def null_expert_routing(router_logits: torch.Tensor, k: int, num_null: int) -> AdaptiveRouting:
    """Top-k over E real and Z null experts; null choices run nothing (Zeng et al. 2024, AdaMoE).

    router_logits (N, E + Z): the last ``num_null`` columns are the null experts.
    Here the k gates are renormalised over all k choices, null ones included
    (softmax over all E + Z, top-k, divided by the chosen probabilities' sum);
    a null choice is kept out (keep False) and contributes 0, so a token's
    output shrinks with its null share, and a token with only null choices
    gets output 0.
    """
    _check_logits(router_logits)
    total = router_logits.shape[-1]
    if not isinstance(num_null, int) or isinstance(num_null, bool) or not 0 <= num_null < total:
        raise ValueError(f"num_null must be an int in [0, {total}) (there must be at least one real expert), got {num_null!r}")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= total:
        raise ValueError(f"k must be an int in [1, {total}], got {k!r}")
    num_real = total - num_null
    probs = F.softmax(router_logits.float(), dim=-1)  # (N, E + Z)
    top, index = torch.topk(probs, k, dim=-1)  # (N, K)
    gates = top / top.sum(dim=-1, keepdim=True)
    keep = index < num_real
    return AdaptiveRouting(router_logits, probs, torch.where(keep, index, 0), torch.where(keep, gates, 0.0), keep, index)


def router_entropy(router_probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the router's distribution, −Σ_i p_i log p_i, over tokens: (N, E) → ().

    Huang et al.'s "dynamic loss": minimising it keeps a top-p router from
    spreading its probability to buy every token more experts.
    """
    p = router_probs.float()
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()


def adaptive_balance_loss(routing: AdaptiveRouting, *, count_null: bool = False) -> torch.Tensor:
    """The Switch balance loss E'·Σ_i f_i·P_i over the used choices: 1.0 when perfectly even.

    f_i: share of the kept (token, choice) pairs that went to expert i; P_i: mean
    probability. count_null=True (the null-expert router) balances over all
    E + Z experts, null ones included, as AdaMoE does; otherwise over the
    columns of router_probs with the kept choices only (top-p).
    """
    probs = routing.router_probs
    total = probs.shape[-1]
    chosen = routing.choice_index.reshape(-1) if count_null else routing.choice_index[routing.keep]
    if chosen.numel() == 0:
        return probs.sum() * 0.0
    f = torch.bincount(chosen, minlength=total).float() / chosen.numel()  # (E',)
    return total * (f * probs.mean(0)).sum()


def compute_by_group(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Mean of ``values`` within each group: (N,), (N,) → (G,) float, NaN for an empty group.

    values: e.g. ``experts_per_token`` (compute per patient) or correct answers;
    groups: e.g. specialty, corpus domain, or the number of experts used.
    """
    if values.shape != groups.shape or values.ndim != 1:
        raise ValueError(f"values and groups must both be (N,), got {tuple(values.shape)} and {tuple(groups.shape)}")
    if groups.numel() and (groups.min() < 0 or groups.max() >= num_groups):
        raise ValueError(f"groups must lie in [0, {num_groups}), got values from {int(groups.min())} to {int(groups.max())}")
    sums = torch.zeros(num_groups).index_add_(0, groups.long().cpu(), values.float().cpu())
    counts = torch.bincount(groups.long().cpu(), minlength=num_groups).float()
    return torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, math.nan))


def blur_referrals(clinic: Clinic, patients: Patients, amount: float) -> torch.Tensor:
    """Patients whose referral letter is ambiguous: x (N, d_in) with the context moved toward another specialty.

    Each patient's context features c become (1 − amount)·c + amount·m, where m
    is the mean context of the next specialty ((s + 1) mod S) among ``patients``.
    amount 0 leaves x unchanged; 0.5 puts the letter halfway between two
    departments. The measurements, and so the diagnosis, are untouched.
    """
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0.0 <= amount <= 1.0:
        raise ValueError(f"amount must be in [0, 1], got {amount!r}")
    if clinic.d_context == 0:
        raise ValueError("this clinic records no context features to blur")
    context = clinic.context(patients.x)  # (N, d_context)
    S = clinic.num_specialties
    means = torch.stack([context[patients.specialty == s].mean(0) for s in range(S)])  # (S, d_context); NaN if absent
    target = means[(patients.specialty + 1) % S]  # (N, d_context)
    if torch.isnan(target).any():
        raise ValueError("blur_referrals needs patients of every specialty (to know where each department's letters point)")
    x = patients.x.clone()
    x[:, clinic.d_measure :] = (1.0 - amount) * context + amount * target
    return x


@dataclass(frozen=True)
class AdaptiveMoEConfig:
    d_model: int  # D
    d_ff: int  # F, each expert's hidden width
    num_experts: int  # E real experts
    router: str = "top_p"  # "top_p" (Huang et al. 2024) or "null" (AdaMoE: top-k over E real + Z null experts)
    top_p: float = 0.6  # p: probability the chosen experts must cover (router="top_p")
    max_k: int | None = None  # at most this many experts per token (router="top_p"; None: E)
    top_k: int = 2  # k choices over real and null experts (router="null")
    num_null: int = 2  # Z null experts (router="null")
    aux_loss_coef: float = 1e-2  # weight of the balance loss
    entropy_loss_coef: float = 0.0  # weight of router_entropy (Huang et al. used 1e-4 with a 0.01 balance loss)
    activation: str = "gelu"
    bias: bool = True
    init_scale: float | None = 0.1  # Switch init, as MoEConfig

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "num_experts", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"AdaptiveMoEConfig.{name} must be a positive int, got {value!r}")
        if self.router not in ADAPTIVE_ROUTERS:
            raise ValueError(f"AdaptiveMoEConfig.router: unknown router {self.router!r}; choose from {list(ADAPTIVE_ROUTERS)}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"AdaptiveMoEConfig.top_p must be in (0, 1], got {self.top_p!r}")
        if self.max_k is not None and (not isinstance(self.max_k, int) or not 1 <= self.max_k <= self.num_experts):
            raise ValueError(
                f"AdaptiveMoEConfig.max_k must be None or an int in [1, num_experts={self.num_experts}], got {self.max_k!r}"
            )
        if not isinstance(self.num_null, int) or isinstance(self.num_null, bool) or self.num_null < 0:
            raise ValueError(f"AdaptiveMoEConfig.num_null must be an int >= 0, got {self.num_null!r}")
        if self.router == "null" and self.top_k > self.num_experts + self.num_null:
            raise ValueError(
                f"AdaptiveMoEConfig.top_k={self.top_k} is more than the {self.num_experts} + {self.num_null} experts"
            )
        for name in ("aux_loss_coef", "entropy_loss_coef"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"AdaptiveMoEConfig.{name} must be a number >= 0, got {value!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"AdaptiveMoEConfig.activation: unknown activation {self.activation!r}; choose from {sorted(ACTIVATIONS)}"
            )

    @property
    def router_width(self) -> int:
        """Columns of the router: E, plus Z null experts for router="null"."""
        return self.num_experts + (self.num_null if self.router == "null" else 0)


@dataclass(frozen=True)
class AdaptiveMoEOutput:
    y: torch.Tensor  # (B, T, D) or (N, D) like the input
    router_loss: torch.Tensor  # () aux_loss_coef·aux_loss + entropy_loss_coef·entropy_loss: add to the training loss
    aux_loss: torch.Tensor  # () unweighted balance loss, 1.0 when perfectly even
    entropy_loss: torch.Tensor  # () unweighted mean router entropy
    routing: AdaptiveRouting  # router_logits, router_probs, expert_index, gates, keep: (N, ·)
    experts_per_token: torch.Tensor  # (N,) int64 real experts each token visited


class AdaptiveMoE(nn.Module):
    """An MoE layer whose tokens use different numbers of experts: (B, T, D) or (N, D) → AdaptiveMoEOutput.

    Router w_router (D, E + Z) (Switch init), float32 logits; routing by
    ``top_p_routing`` or ``null_expert_routing``; the experts run through the
    course's dispatch (``moe_course.dispatch``), unused choices masked out.
    """

    def __init__(self, config: AdaptiveMoEConfig) -> None:
        super().__init__()
        if not isinstance(config, AdaptiveMoEConfig):
            raise TypeError(f"AdaptiveMoE expects an AdaptiveMoEConfig, got {type(config).__name__}")
        self.config = config
        D = config.d_model
        self.w_router = nn.Parameter(torch.empty(D, config.router_width))
        std = math.sqrt((config.init_scale or 1.0) / D)
        nn.init.trunc_normal_(self.w_router, std=std, a=-2 * std, b=2 * std)
        self.experts = Experts(
            config.num_experts, D, config.d_ff, activation=config.activation, bias=config.bias, init_scale=config.init_scale
        )

    def route(self, tokens: torch.Tensor) -> AdaptiveRouting:
        """tokens (N, D) → AdaptiveRouting."""
        cfg = self.config
        logits = tokens.float() @ self.w_router.float()  # (N, E + Z)
        if cfg.router == "top_p":
            return top_p_routing(logits, cfg.top_p, max_k=cfg.max_k)
        return null_expert_routing(logits, cfg.top_k, cfg.num_null)

    def forward(self, x: torch.Tensor) -> AdaptiveMoEOutput:
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.ndim not in (2, 3) or x.shape[-1] != cfg.d_model:
            raise ValueError(
                f"AdaptiveMoE expects x of shape (B, T, {cfg.d_model}) or (N, {cfg.d_model}), got {tuple(getattr(x, 'shape', ()))}"
            )
        tokens = x.reshape(-1, cfg.d_model)  # (N, D)
        routing = self.route(tokens)
        y = dispatch(tokens, self.experts, routing.expert_index, routing.gates.to(tokens.dtype), routing.keep)  # (N, D)
        aux = adaptive_balance_loss(routing, count_null=cfg.router == "null")
        entropy = router_entropy(routing.router_probs)
        return AdaptiveMoEOutput(
            y=y.reshape(x.shape),
            router_loss=cfg.aux_loss_coef * aux + cfg.entropy_loss_coef * entropy,
            aux_loss=aux,
            entropy_loss=entropy,
            routing=routing,
            experts_per_token=routing.experts_per_token,
        )


@dataclass(frozen=True)
class ClinicAdaptiveOutput:
    logits: torch.Tensor  # (N, num_classes)
    router_loss: torch.Tensor  # () the layer's weighted losses (AdaptiveMoEOutput.router_loss): add this to the task loss
    moe: AdaptiveMoEOutput  # the layer's full result: experts_per_token, routing


class ClinicAdaptiveMoE(nn.Module):
    """``ClinicMoE`` with an ``AdaptiveMoE`` layer: embed → h + moe(h) → head (trains with ClassificationTask)."""

    def __init__(self, d_in: int, num_classes: int, config: AdaptiveMoEConfig) -> None:
        super().__init__()
        for name, value in (("d_in", d_in), ("num_classes", num_classes)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.embed = nn.Linear(d_in, config.d_model)
        self.moe = AdaptiveMoE(config)
        self.head = nn.Linear(config.d_model, num_classes)

    def forward(self, x: torch.Tensor) -> ClinicAdaptiveOutput:
        if x.ndim != 2 or x.shape[-1] != self.embed.in_features:
            raise ValueError(f"ClinicAdaptiveMoE expects patients of shape (N, {self.embed.in_features}), got {tuple(x.shape)}")
        h = self.embed(x)  # (N, D)
        out = self.moe(h)
        return ClinicAdaptiveOutput(self.head(h + out.y), out.router_loss, out)
