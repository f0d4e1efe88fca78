"""The Mixture-of-Experts layer: a GP (the router) in front of E doctors (the experts).

Legend: B batch, T time, D model width, F expert hidden width, E experts,
K choices per token, C capacity, N = B·T tokens.

    x (B, T, D) → tokens (N, D) → router logits (N, E), in float32
                → routing: expert_index (N, K), gates (N, K)
                → capacity: keep (N, K)          (capacity_factor=None: keep all)
                → experts on their tokens, weighted by the gates, summed → y (B, T, D)

The layer returns the FFN's replacement output y, not x + y: the residual
connection belongs to the block around it. A token every expert dropped gets
y = 0, so x + y = x: it passes through unchanged (Switch Transformer, sec. 2.2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import METHODS, dispatch
from .experts import ACTIVATIONS, Experts, init_linear_
from .fast import router_matmul
from .losses import load_balancing_loss, router_z_loss
from .routing import Routing, capacity_mask, expert_capacity, noisy_top_k_routing, switch_routing, top_k_routing

__all__ = ["MoEConfig", "MoEOutput", "MoELayer", "ROUTERS"]

ROUTERS = ("switch", "top_k", "noisy_top_k")


@dataclass(frozen=True)
class MoEConfig:
    d_model: int  # D, the token width
    d_ff: int  # F, the hidden width of each expert
    num_experts: int  # E
    top_k: int = 1  # K, experts per token
    capacity_factor: float | None = None  # slots per expert = ceil(K·N/E · factor); None: dropless
    min_capacity: int = 1  # at least this many slots per expert when capacity_factor is set
    router: str = "switch"  # "switch" (top-1, raw gate), "top_k" (renormalised), "noisy_top_k" (Shazeer 2017)
    aux_loss_coef: float = 1e-2  # α, weight of the load-balancing loss in MoEOutput.router_loss
    z_loss_coef: float = 1e-3  # weight of the router z-loss in MoEOutput.router_loss
    router_jitter: float = 0.0  # ε: router input times U[1-ε, 1+ε] in training (Switch used 1e-2)
    init_scale: float | None = 0.1  # Switch init std = sqrt(scale/fan_in) for experts and router; None: PyTorch default
    activation: str = "gelu"  # the experts' non-linearity
    bias: bool = True  # whether the experts have biases (T5/Switch/Mixtral experts have none)
    dispatch: str | None = None  # how tokens reach experts (moe_course.dispatch.METHODS); None: the fastest

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "num_experts", "top_k", "min_capacity"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MoEConfig.{name} must be a positive int, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"MoEConfig.top_k={self.top_k} is more than num_experts={self.num_experts}: a token cannot pick more experts than there are")
        if self.router not in ROUTERS:
            raise ValueError(f"MoEConfig.router: unknown router type {self.router!r}; choose from {list(ROUTERS)}")
        if self.router == "switch" and self.top_k != 1:
            raise ValueError(f"MoEConfig.router='switch' routes each token to one expert, but top_k={self.top_k}; use router='top_k' (or 'noisy_top_k') for top-{self.top_k}")
        if self.capacity_factor is not None and (isinstance(self.capacity_factor, bool) or not isinstance(self.capacity_factor, (int, float)) or not math.isfinite(self.capacity_factor) or self.capacity_factor <= 0):
            raise ValueError(f"MoEConfig.capacity_factor must be > 0 (or None for no capacity limit), got {self.capacity_factor!r}")
        for name in ("aux_loss_coef", "z_loss_coef"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"MoEConfig.{name} must be a number >= 0, got {value!r}")
        if not isinstance(self.router_jitter, (int, float)) or not 0.0 <= self.router_jitter < 1.0:
            raise ValueError(f"MoEConfig.router_jitter must be in [0, 1), got {self.router_jitter!r}")
        if self.init_scale is not None and (not isinstance(self.init_scale, (int, float)) or not math.isfinite(self.init_scale) or self.init_scale <= 0):
            raise ValueError(f"MoEConfig.init_scale must be > 0 or None, got {self.init_scale!r}")
        if self.dispatch is not None and self.dispatch not in METHODS:
            raise ValueError(f"MoEConfig.dispatch: unknown dispatch method {self.dispatch!r}; choose from {sorted(METHODS)} or None")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"MoEConfig.activation: unknown activation {self.activation!r}; choose from {sorted(ACTIVATIONS)}")


@dataclass(frozen=True)
class MoEOutput:
    y: torch.Tensor  # (B, T, D) or (N, D) like the input: the layer's output (add the residual outside)
    router_loss: torch.Tensor  # () aux_loss_coef·aux_loss + z_loss_coef·z_loss: add this to the task loss
    aux_loss: torch.Tensor  # () unweighted load-balancing loss, 1.0 when perfectly balanced
    z_loss: torch.Tensor  # () unweighted router z-loss
    router_logits: torch.Tensor  # (N, E) float32, the clean router logits, router(x)
    router_probs: torch.Tensor  # (N, E) float32 softmax of router_logits
    expert_index: torch.Tensor  # (N, K) int64, the chosen experts, best first (noisy router: chosen on noisy logits)
    gates: torch.Tensor  # (N, K) float32 weight of each choice
    keep: torch.Tensor  # (N, K) bool, False where the choice was dropped for lack of capacity
    num_dropped: torch.Tensor  # () int64, tokens with no expert at all (y = 0 for them)
    tokens_per_expert: torch.Tensor  # (E,) int64 assignments routed to each expert, before dropping
    capacity: int | None  # C, slots per expert in this call (None: dropless)


class MoELayer(nn.Module):
    """A sparse Mixture-of-Experts feed-forward layer: (B, T, D) or (N, D) → MoEOutput.

    Router: logits = x W_r with W_r (D, E), computed in float32 even under
    ``torch.autocast`` (Switch's selective precision); with ``router_jitter``
    ε > 0 its input is multiplied by U[1-ε, 1+ε] in training only. The
    "noisy_top_k" router also has W_noise (D, E), initialised to zero as in
    Shazeer et al. (noise std softplus(0) ≈ 0.69 at the start).

    Routing per config.router (``moe_course.routing``); with a capacity factor,
    over-capacity assignments are dropped by ``capacity_mask`` (first choices
    before second choices, earlier tokens first; capacity counts all N tokens
    of the call). Gates are not renormalised after dropping.

    Losses: aux_loss = load_balancing_loss(router_probs, expert_index) (f counts
    what the router chose, before dropping); z_loss = router_z_loss(router_logits),
    both from the clean logits, unweighted; ``router_loss`` weights them by the
config's coefficients and is what a training loop adds to the task loss.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"MoELayer expects a MoEConfig, got {type(config).__name__}")
        self.config = config
        D, E = config.d_model, config.num_experts
        self.w_router = nn.Parameter(torch.empty(D, E))
        if config.router == "noisy_top_k":
            self.w_noise = nn.Parameter(torch.zeros(D, E))
        else:
            self.register_parameter("w_noise", None)
        self.experts = Experts(E, D, config.d_ff, activation=config.activation, bias=config.bias, init_scale=config.init_scale)
        self.reset_router()

    @torch.no_grad()
    def reset_router(self) -> None:
        init_linear_(self.w_router, None, self.config.d_model, self.config.init_scale)
        if self.w_noise is not None:
            self.w_noise.zero_()

    def _check_tokens(self, x: torch.Tensor, what: str) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[-1] != self.config.d_model:
            raise ValueError(f"{what} expects tokens of shape (N, {self.config.d_model}), got {tuple(getattr(x, 'shape', ()))}")

    def _check_input(self, x: torch.Tensor) -> None:
        D = self.config.d_model
        if not isinstance(x, torch.Tensor) or x.ndim not in (2, 3) or x.shape[-1] != D:
            raise ValueError(f"MoELayer expects x of shape (B, T, {D}) or (N, {D}), got {tuple(getattr(x, 'shape', ()))}")
        weights = next(self.experts.parameters(), self.w_router).dtype  # the experts' dtype (any ExpertBank)
        if not x.is_floating_point() or (x.dtype != weights and not torch.is_autocast_enabled(x.device.type)):
            raise TypeError(f"MoELayer's experts hold {weights} weights but x is {x.dtype}: convert one to the other, "
                            f"e.g. x.to({weights}) (or layer.to({x.dtype}) to run the experts in {x.dtype})".replace("torch.", ""))
        if not torch.isfinite(x).all():
            n, d = (~torch.isfinite(x.reshape(-1, D))).nonzero()[0].tolist()
            raise ValueError(f"MoELayer got NaN or inf in its input x (first at token {n}, feature {d}): the problem is "
                             "upstream of this layer (the data, the layer before it, or a learning rate that is too high)")

    def _float32_matmul(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return router_matmul(x.float(), w.float())  # x @ w (N, E), in the shape a CPU is quickest at (moe_course.fast)

    def router(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits in float32: x (N, D) → (N, E). No jitter, no noise."""
        self._check_tokens(x, "router")
        return self._float32_matmul(x, self.w_router)  # (N, E)

    def expert_output(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e alone on x (N, D) → (N, D), ungated."""
        return self.experts.expert_output(e, x)

    def jitter(self, tokens: torch.Tensor) -> torch.Tensor:
        """What the router reads: in training with ``router_jitter`` ε > 0, tokens (N, D) times U[1-ε, 1+ε]."""
        eps = self.config.router_jitter
        if not (self.training and eps > 0):
            return tokens
        return tokens.float() * torch.empty_like(tokens, dtype=torch.float32).uniform_(1.0 - eps, 1.0 + eps)  # (N, D)

    def route(self, logits: torch.Tensor, router_in: torch.Tensor) -> Routing:
        """The config's routing function on the router logits (N, E) → Routing with expert_index, gates (N, K)."""
        cfg = self.config
        if cfg.router == "switch":
            return switch_routing(logits)
        if cfg.router == "top_k":
            return top_k_routing(logits, cfg.top_k)
        noise_logits = self._float32_matmul(router_in, self.w_noise)  # (N, E), the learned noise scale
        return noisy_top_k_routing(logits, noise_logits, cfg.top_k, training=self.training)

    def capacity(self, expert_index: torch.Tensor) -> tuple[int | None, torch.Tensor | None]:
        """Slots per expert C for this call and which assignments (N, K) fit; (None, None) when dropless."""
        cfg = self.config
        if cfg.capacity_factor is None:
            return None, None
        capacity = expert_capacity(expert_index.shape[0], cfg.num_experts, cfg.capacity_factor, top_k=cfg.top_k, min_capacity=cfg.min_capacity)
        return capacity, capacity_mask(expert_index, cfg.num_experts, capacity).keep  # C, (N, K)

    def forward(self, x: torch.Tensor) -> MoEOutput:
        cfg = self.config
        self._check_input(x)
        tokens = x.reshape(-1, cfg.d_model)  # (N, D)

        # 1. The router (the GP) scores every expert for every token, in float32.
        router_in = self.jitter(tokens)  # (N, D); the experts still see the clean tokens
        logits = self.router(router_in)  # (N, E)
        probs = F.softmax(logits, dim=-1)  # (N, E)

        # 2. Routing: each token's K experts, best first, and the weight of each one's answer.
        routing = self.route(logits, router_in)  # expert_index, gates (N, K)

        # 3. Capacity: with a capacity factor, assignments beyond an expert's C slots are dropped.
        capacity, keep = self.capacity(routing.expert_index)  # keep (N, K), None when dropless

        # 4. Dispatch: every expert on its tokens, outputs weighted by the gates and summed per token.
        y = dispatch(tokens, self.experts, routing.expert_index, routing.gates, keep, method=cfg.dispatch)  # (N, D)

        # 5. The router's losses, from the clean logits; f counts what the router chose, before dropping.
        aux = load_balancing_loss(probs, routing.expert_index)
        z = router_z_loss(logits)
        keep = torch.ones_like(routing.expert_index, dtype=torch.bool) if keep is None else keep  # (N, K)
        return MoEOutput(
            y=y.reshape(x.shape),
            router_loss=cfg.aux_loss_coef * aux + cfg.z_loss_coef * z,
            aux_loss=aux,
            z_loss=z,
            router_logits=logits,
            router_probs=probs,
            expert_index=routing.expert_index,
            gates=routing.gates,
            keep=keep,
            num_dropped=(~keep.any(dim=-1)).sum(),
            tokens_per_expert=routing.tokens_per_expert(),
            capacity=capacity,
        )

    def extra_repr(self) -> str:
        c = self.config
        return f"router={c.router!r}, num_experts={c.num_experts}, top_k={c.top_k}, capacity_factor={c.capacity_factor}"
