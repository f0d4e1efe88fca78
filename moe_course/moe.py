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

Options of modern MoE models (lesson 10), all in ``MoEConfig``:

    activation="swiglu"        gated experts (Mixtral, DeepSeek, Qwen, OLMoE)
    router="mixtral"           softmax over the top-k logits (Mixtral)
    router="sigmoid"           sigmoid scores, a selection-only bias ``expert_bias`` (DeepSeek-V3),
                               moved after each step by ``moe_course.training.bias``
    renormalize=False          raw top-k gates (DeepSeekMoE, OLMoE, Qwen2-MoE)
    num_shared_experts=K_s     experts every token visits (DeepSeekMoE); ``shared_expert_gate`` (Qwen2-MoE)
    MoEConfig.fine_grained(m)  m times as many experts, 1/m as wide, m·k of them active (DeepSeekMoE)
    balance_scope="sequence"   balance measured per sequence (DeepSeek-V3's sequence-wise loss)
    upcycle(ffn, config)       every expert a copy of a trained dense FFN (sparse upcycling)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from . import fast
from .dispatch import METHODS, dispatch
from .experts import Experts, FeedForward, check_activation, init_linear_
from .fast import one_thread_when_busy, router_matmul
from .losses import load_balancing_loss, router_z_loss
from .routing import (
    Routing,
    capacity_mask,
    expert_capacity,
    mixtral_routing,
    noisy_top_k_routing,
    sigmoid_routing,
    switch_routing,
    top_k_routing,
)

__all__ = ["MoEConfig", "MoEOutput", "MoELayer", "ROUTERS", "BALANCE_SCOPES", "upcycle"]

ROUTERS = ("switch", "top_k", "noisy_top_k", "mixtral", "sigmoid")
BALANCE_SCOPES = ("batch", "sequence")


@dataclass(frozen=True)
class MoEConfig:
    d_model: int  # D, the token width
    d_ff: int  # F, the hidden width of each expert
    num_experts: int  # E
    top_k: int = 1  # K, experts per token
    capacity_factor: float | None = None  # slots per expert = ceil(K·N/E · factor); None: dropless
    min_capacity: int = 1  # at least this many slots per expert when capacity_factor is set
    router: str = "switch"  # "switch" (top-1, raw gate), "top_k" (softmax, top-k), "noisy_top_k" (Shazeer 2017), "mixtral", "sigmoid" (DeepSeek-V3)
    renormalize: bool = True  # "top_k", "sigmoid": gates / their sum over the k chosen; False: raw scores (DeepSeekMoE, OLMoE)
    num_shared_experts: int = 0  # K_s experts of width d_ff that every token visits, ungated (DeepSeekMoE)
    shared_expert_gate: bool = False  # scale the shared experts' sum by sigmoid(x · w_shared_gate) (Qwen2-MoE)
    bias_update_rate: float = 0.0  # γ: "sigmoid" router's bias b ← b + γ·sign(mean load − load) per step (DeepSeek-V3: 1e-3)
    balance_scope: str = "batch"  # the balance loss's statistics: over the whole call ("batch") or per sequence ("sequence")
    aux_loss_coef: float = 1e-2  # α, weight of the load-balancing loss in MoEOutput.router_loss
    z_loss_coef: float = 1e-3  # weight of the router z-loss in MoEOutput.router_loss
    router_jitter: float = 0.0  # ε: router input times U[1-ε, 1+ε] in training (Switch used 1e-2)
    init_scale: float | None = 0.1  # Switch init std = sqrt(scale/fan_in) for experts and router; None: PyTorch default
    activation: str = "gelu"  # the experts' non-linearity: "gelu", "relu", or "swiglu" (gated, three matrices)
    bias: bool = True  # whether the experts have biases (T5/Switch/Mixtral experts have none)
    dispatch: str | None = None  # how tokens reach experts (moe_course.dispatch.METHODS); None: the fastest

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "num_experts", "top_k", "min_capacity"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MoEConfig.{name} must be a positive int, got {value!r}")
        if (
            not isinstance(self.num_shared_experts, int)
            or isinstance(self.num_shared_experts, bool)
            or self.num_shared_experts < 0
        ):
            raise ValueError(f"MoEConfig.num_shared_experts must be an int >= 0, got {self.num_shared_experts!r}")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"MoEConfig.top_k={self.top_k} is more than num_experts={self.num_experts}: a token cannot pick more experts than there are"
            )
        if self.router not in ROUTERS:
            raise ValueError(f"MoEConfig.router: unknown router type {self.router!r}; choose from {list(ROUTERS)}")
        if self.router == "switch" and self.top_k != 1:
            raise ValueError(
                f"MoEConfig.router='switch' routes each token to one expert, but top_k={self.top_k}; use router='top_k' (or 'noisy_top_k') for top-{self.top_k}"
            )
        for name in ("renormalize", "shared_expert_gate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MoEConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if not self.renormalize and self.router in ("mixtral", "noisy_top_k"):
            raise ValueError(
                f"MoEConfig.renormalize=False: router {self.router!r} takes a softmax over the k chosen logits, so its gates always sum to 1; "
                "use router='top_k' for raw softmax gates"
            )
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise ValueError("MoEConfig.shared_expert_gate=True needs shared experts to gate: set num_shared_experts >= 1")
        if (
            isinstance(self.bias_update_rate, bool)
            or not isinstance(self.bias_update_rate, (int, float))
            or not math.isfinite(self.bias_update_rate)
            or self.bias_update_rate < 0
        ):
            raise ValueError(f"MoEConfig.bias_update_rate must be a number >= 0, got {self.bias_update_rate!r}")
        if self.bias_update_rate > 0 and self.router != "sigmoid":
            raise ValueError(
                f"MoEConfig.bias_update_rate={self.bias_update_rate}: the selection bias belongs to router='sigmoid' (DeepSeek-V3), "
                f"but router={self.router!r}"
            )
        if self.balance_scope not in BALANCE_SCOPES:
            raise ValueError(f"MoEConfig.balance_scope must be one of {list(BALANCE_SCOPES)}, got {self.balance_scope!r}")
        if self.capacity_factor is not None and (
            isinstance(self.capacity_factor, bool)
            or not isinstance(self.capacity_factor, (int, float))
            or not math.isfinite(self.capacity_factor)
            or self.capacity_factor <= 0
        ):
            raise ValueError(
                f"MoEConfig.capacity_factor must be > 0 (or None for no capacity limit), got {self.capacity_factor!r}"
            )
        for name in ("aux_loss_coef", "z_loss_coef"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"MoEConfig.{name} must be a number >= 0, got {value!r}")
        if not isinstance(self.router_jitter, (int, float)) or not 0.0 <= self.router_jitter < 1.0:
            raise ValueError(f"MoEConfig.router_jitter must be in [0, 1), got {self.router_jitter!r}")
        if self.init_scale is not None and (
            not isinstance(self.init_scale, (int, float)) or not math.isfinite(self.init_scale) or self.init_scale <= 0
        ):
            raise ValueError(f"MoEConfig.init_scale must be > 0 or None, got {self.init_scale!r}")
        if self.dispatch is not None and self.dispatch not in METHODS:
            raise ValueError(
                f"MoEConfig.dispatch: unknown dispatch method {self.dispatch!r}; choose from {sorted(METHODS)} or None"
            )
        check_activation(self.activation, "MoEConfig.activation")

    def fine_grained(self, segments: int, num_shared_experts: int = 0) -> MoEConfig:
        """This layer with each expert cut into ``segments`` = m narrower ones, K_s of them shared (DeepSeekMoE).

        DeepSeekMoE (Dai et al. 2024, arXiv:2401.06066, sec. 3.1-3.2): m·E experts of
        width F/m, m·K of them active per token, of which K_s are shared (always on,
        ungated) and m·K − K_s routed out of m·E − K_s. The expert weight matrices
        and the expert FLOPs per token stay those of this layer (E experts of width F,
        K active); the router grows (D·E parameters, 2·D·E FLOPs) and so do the
        experts' biases (one output bias per expert). What grows most is the number
        of ways to combine experts, from C(E, K) to C(m·E − K_s, m·K − K_s). A Switch router (top-1, raw gate) becomes "top_k"
        with raw gates (renormalize=False), DeepSeekMoE's own gate.
        """
        m, shared = segments, num_shared_experts
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"fine_grained: segments must be a positive int, got {m!r}")
        if isinstance(shared, bool) or not isinstance(shared, int) or shared < 0:
            raise ValueError(f"fine_grained: num_shared_experts must be an int >= 0, got {shared!r}")
        if self.d_ff % m:
            raise ValueError(f"fine_grained: d_ff={self.d_ff} cannot be cut into {m} equal segments")
        if self.num_shared_experts:
            raise ValueError("fine_grained: this config already has shared experts; start from a plain one")
        if shared >= m * self.top_k:
            raise ValueError(
                f"fine_grained: {shared} shared experts leave none of the m·K = {m * self.top_k} active experts to route"
            )
        top_k = m * self.top_k - shared
        router, renormalize = self.router, self.renormalize
        if router == "switch" and top_k > 1:
            router, renormalize = "top_k", False
        return replace(
            self,
            d_ff=self.d_ff // m,
            num_experts=m * self.num_experts - shared,
            top_k=top_k,
            num_shared_experts=shared,
            router=router,
            renormalize=renormalize,
        )


@dataclass(frozen=True)
class MoEOutput:
    y: torch.Tensor  # (B, T, D) or (N, D) like the input: the layer's output (add the residual outside)
    router_loss: torch.Tensor  # () aux_loss_coef·aux_loss + z_loss_coef·z_loss: add this to the task loss
    aux_loss: torch.Tensor  # () unweighted load-balancing loss, 1.0 when perfectly balanced
    z_loss: torch.Tensor  # () unweighted router z-loss
    router_logits: torch.Tensor  # (N, E) float32, the clean router logits, router(x)
    router_probs: torch.Tensor  # (N, E) float32 softmax of router_logits (sigmoid router: the scores normalised, s / Σ s)
    expert_index: torch.Tensor  # (N, K) int64, the chosen experts, best first (noisy router: chosen on noisy logits)
    gates: torch.Tensor  # (N, K) float32 weight of each choice
    keep: torch.Tensor  # (N, K) bool, False where the choice was dropped for lack of capacity
    num_dropped: torch.Tensor  # () int64, tokens with no expert at all (y = 0 for them)
    tokens_per_expert: (
        torch.Tensor
    )  # (E,) int64 assignments routed to each expert, before dropping (the load a bias update reads)
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
    what the router chose, before dropping; with balance_scope="sequence" per
    sequence of a (B, T, D) input, averaged); z_loss = router_z_loss(router_logits),
    both from the clean logits, unweighted; ``router_loss`` weights them by the
    config's coefficients and is what a training loop adds to the task loss.

    Shared experts (``num_shared_experts`` = K_s > 0; DeepSeekMoE, arXiv:2401.06066, sec. 3.2)::

        y = Σ_{s ≤ K_s} FFN_s(x)  +  Σ_{i chosen} g_i · FFN_i(x)

    with Qwen2-MoE's ``shared_expert_gate`` the first sum is scaled by
    sigmoid(x · w_shared_gate), one number per token. The "sigmoid" router keeps
    its selection bias in the buffer ``expert_bias`` (E,): forward only reads it;
    ``moe_course.training.bias.update_expert_biases_`` moves it between steps
    from ``MoEOutput.tokens_per_expert``.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"MoELayer expects a MoEConfig, got {type(config).__name__}")
        self.config = config
        self._make_parameters(config.num_experts)

    def _make_parameters(self, num_routed: int) -> None:
        """The router, ``num_routed`` routed experts (all E here; a rank's share in expert parallelism), the rest."""
        config = self.config
        D, E = config.d_model, config.num_experts
        self.w_router = nn.Parameter(torch.empty(D, E))
        if config.router == "noisy_top_k":
            self.w_noise = nn.Parameter(torch.zeros(D, E))
        else:
            self.register_parameter("w_noise", None)
        self.experts = Experts(
            num_routed, D, config.d_ff, activation=config.activation, bias=config.bias, init_scale=config.init_scale
        )
        # made after the routed experts, so a layer without them draws the same weights as before they existed
        self.shared_experts = None
        if config.num_shared_experts:
            self.shared_experts = Experts(
                config.num_shared_experts,
                D,
                config.d_ff,
                activation=config.activation,
                bias=config.bias,
                init_scale=config.init_scale,
            )
        self.w_shared_gate = nn.Parameter(torch.empty(D, 1)) if config.shared_expert_gate else None  # (D, 1)
        # a buffer, not a parameter: no gradient moves it, and it travels with the state dict
        self.register_buffer("expert_bias", torch.zeros(E) if config.router == "sigmoid" else None)  # (E,) selection only
        self.reset_router()

    @torch.no_grad()
    def reset_router(self) -> None:
        init_linear_(self.w_router, None, self.config.d_model, self.config.init_scale)
        if self.w_noise is not None:
            self.w_noise.zero_()
        if self.w_shared_gate is not None:
            init_linear_(self.w_shared_gate, None, self.config.d_model, self.config.init_scale)
        if self.expert_bias is not None:
            self.expert_bias.zero_()

    def _check_tokens(self, x: torch.Tensor, what: str) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[-1] != self.config.d_model:
            raise ValueError(f"{what} expects tokens of shape (N, {self.config.d_model}), got {tuple(getattr(x, 'shape', ()))}")

    def _check_input(self, x: torch.Tensor) -> None:
        D = self.config.d_model
        if not isinstance(x, torch.Tensor) or x.ndim not in (2, 3) or x.shape[-1] != D:
            raise ValueError(f"MoELayer expects x of shape (B, T, {D}) or (N, {D}), got {tuple(getattr(x, 'shape', ()))}")
        weights = next(self.experts.parameters(), self.w_router).dtype  # the experts' dtype (any ExpertBank)
        if not x.is_floating_point() or (x.dtype != weights and not torch.is_autocast_enabled(x.device.type)):
            raise TypeError(
                f"MoELayer's experts hold {weights} weights but x is {x.dtype}: convert one to the other, "
                f"e.g. x.to({weights}) (or layer.to({x.dtype}) to run the experts in {x.dtype})".replace("torch.", "")
            )
        # one reduction: a NaN or inf anywhere makes the sum NaN or inf (the full check runs only then)
        if not math.isfinite(x.detach().sum()) and not torch.isfinite(x).all():
            n, d = (~torch.isfinite(x.reshape(-1, D))).nonzero()[0].tolist()
            raise ValueError(
                f"MoELayer got NaN or inf in its input x (first at token {n}, feature {d}): the problem is "
                "upstream of this layer (the data, the layer before it, or a learning rate that is too high)"
            )

    def _float32_matmul(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return router_matmul(x.float(), w.float())  # x @ w (N, E), in the shape a CPU is quickest at (moe_course.fast)

    def router(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits in float32: x (N, D) → (N, E). No jitter, no noise."""
        self._check_tokens(x, "router")
        return self._float32_matmul(x, self.w_router)  # (N, E)

    def expert_output(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Routed expert e alone on x (N, D) → (N, D), ungated."""
        return self.experts.expert_output(e, x)

    def shared_output(self, x: torch.Tensor) -> torch.Tensor:
        """What the shared experts add for tokens x (N, D) → (N, D): their sum, times sigmoid(x · w_shared_gate) if gated.

        Zero when the layer has no shared experts.
        """
        self._check_tokens(x, "shared_output")
        if self.shared_experts is None:
            return torch.zeros_like(x)
        y = self.shared_experts(x).sum(0)  # (K_s, N, D) → (N, D): every shared expert on every token
        if self.w_shared_gate is not None:
            y = y * torch.sigmoid(x @ self.w_shared_gate.to(x.dtype))  # (N, 1) one gate per token
        return y

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
            return top_k_routing(logits, cfg.top_k, renormalize=cfg.renormalize)
        if cfg.router == "mixtral":
            return mixtral_routing(logits, cfg.top_k)
        if cfg.router == "sigmoid":
            return sigmoid_routing(logits, cfg.top_k, bias=self.expert_bias, renormalize=cfg.renormalize)
        noise_logits = self._float32_matmul(router_in, self.w_noise)  # (N, E), the learned noise scale
        return noisy_top_k_routing(logits, noise_logits, cfg.top_k, training=self.training)

    def slots(self, num_tokens: int) -> int | None:
        """C, the slots per expert in a call on num_tokens tokens; None when dropless."""
        cfg = self.config
        if cfg.capacity_factor is None:
            return None
        return expert_capacity(num_tokens, cfg.num_experts, cfg.capacity_factor, top_k=cfg.top_k, min_capacity=cfg.min_capacity)

    def capacity(self, expert_index: torch.Tensor) -> tuple[int | None, torch.Tensor | None]:
        """Slots per expert C for this call and which assignments (N, K) fit; (None, None) when dropless."""
        capacity = self.slots(expert_index.shape[0])
        if capacity is None:
            return None, None
        return capacity, capacity_mask(expert_index, self.config.num_experts, capacity).keep  # C, (N, K)

    @one_thread_when_busy  # on a busy machine, one thread for this layer (moe_course.fast.shared_cores)
    def forward(self, x: torch.Tensor) -> MoEOutput:
        cfg = self.config
        self._check_input(x)
        tokens = x.reshape(-1, cfg.d_model)  # (N, D)
        # for speed, the five steps below as one op where it applies (moe_course.fast.fused_switch)
        if fast.switch_layer_applies(self, tokens, MoELayer):
            return MoEOutput(**fast.switch_layer(self, tokens, self.slots(tokens.shape[0]), x.shape))

        # 1. The router (the GP) scores every expert for every token, in float32.
        router_in = self.jitter(tokens)  # (N, D); the experts still see the clean tokens
        logits = self.router(router_in)  # (N, E)

        # 2. Routing: each token's K experts, best first, and the weight of each one's answer.
        routing = self.route(logits, router_in)  # expert_index, gates (N, K)
        # each token's distribution over experts from the clean logits (the noisy router chose on noisy ones)
        probs = F.softmax(logits, dim=-1) if cfg.router == "noisy_top_k" else routing.router_probs  # (N, E)

        # 3. Capacity: with a capacity factor, assignments beyond an expert's C slots are dropped.
        capacity, keep = self.capacity(routing.expert_index)  # keep (N, K), None when dropless

        # 4. Dispatch: every expert on its tokens, outputs weighted by the gates and summed per token.
        y = dispatch(tokens, self.experts, routing.expert_index, routing.gates, keep, method=cfg.dispatch)  # (N, D)
        if self.shared_experts is not None:  # the shared experts see every token, whatever the router said
            y = y + self.shared_output(tokens)  # (N, D)

        # 5. The router's losses, from the clean logits; f counts what the router chose, before dropping.
        group = x.shape[1] if cfg.balance_scope == "sequence" and x.ndim == 3 else None  # per sequence of T tokens
        aux = load_balancing_loss(probs, routing.expert_index, group_size=group)
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
        shared = f", num_shared_experts={c.num_shared_experts}" if c.num_shared_experts else ""
        return f"router={c.router!r}, num_experts={c.num_experts}, top_k={c.top_k}, capacity_factor={c.capacity_factor}{shared}"


def upcycle(ffn: FeedForward, config: MoEConfig) -> MoELayer:
    """Sparse upcycling (Komatsuzaki et al. 2022, arXiv:2212.05055): an MoE layer whose experts are all copies of ``ffn``.

    The router is new (initialised as ``config`` says); every routed expert is
    the trained dense FFN (``Experts.copy_feed_forward_``). At the start,
    for every token x:

    * gates that sum to 1 (renormalised top-k, "mixtral", "sigmoid" with
      renormalize): y = Σ g_i · FFN(x) = FFN(x), exactly the dense output;
    * Switch's raw top-1 gate: y = p_max(x) · FFN(x), the dense output shrunk
      by the router's top probability (about 1/E for a fresh router), which is
      why upcycled Switch models start worse than the model they came from.

    Training then lets the copies drift apart. ``config`` must have the FFN's
    widths and activation, and no shared experts (they would add a second copy).
    """
    if not isinstance(ffn, FeedForward):
        raise TypeError(f"upcycle expects a trained FeedForward, got {type(ffn).__name__}")
    if not isinstance(config, MoEConfig):
        raise TypeError(f"upcycle expects a MoEConfig, got {type(config).__name__}")
    if config.num_shared_experts:
        raise ValueError(
            "upcycle: the shared experts would add a second copy of the dense FFN on top of the routed ones; use num_shared_experts=0"
        )
    layer = MoELayer(config)
    layer.experts.copy_feed_forward_(ffn)  # the one home of dense-to-experts copying; it checks widths, biases and activation
    return layer
