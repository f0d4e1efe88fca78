"""Routing: the GP decides which doctors see each patient.

Pure functions from router logits to typed routing results. Legend: N tokens,
E experts, K choices per token (top-k), C capacity (slots per expert).

Token choice (each token picks K experts)::

    top_k_routing          softmax, top-k, renormalise the k weights (GShard; raw: DeepSeekMoE, OLMoE, Qwen)
    switch_routing         top-1, gate = the raw probability (Switch Transformer)
    noisy_top_k_routing    noise before top-k, softmax over the k kept (Shazeer et al. 2017)
    mixtral_routing        top-k of the logits, softmax over the k kept (Mixtral; = top_k_routing's gates)
    sigmoid_routing        sigmoid scores, a bias that only selects, normalised gates (DeepSeek-V3)
    expert_bias_update     the rule that moves that bias between steps: b + γ·sign(mean load − load)

Expert choice (each expert picks C tokens)::

    expert_choice_routing  perfect balance by construction (Zhou et al. 2022)

Capacity (how many tokens an expert may take)::

    expert_capacity        C = ceil(K · N / E · capacity_factor), at least min_capacity
    capacity_mask          which (token, choice) assignments fit; the rest are dropped

Softmaxes run in float32 whatever the logits' dtype: the Switch paper's
"selective precision" (a bf16 router diverged in their experiments).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .fast import softmax  # F.softmax(logits, dim=-1), in the layout a CPU is quick at for few experts

__all__ = [
    "Routing",
    "ExpertChoiceRouting",
    "CapacityAssignment",
    "top_k_routing",
    "switch_routing",
    "noisy_top_k_routing",
    "mixtral_routing",
    "sigmoid_routing",
    "expert_bias_update",
    "expert_choice_routing",
    "expert_capacity",
    "capacity_mask",
]


@dataclass(frozen=True)
class Routing:
    """Token-choice routing: every token picks K experts."""

    router_logits: torch.Tensor  # (N, E) the logits the choice was made on (noisy top-k: the noisy H)
    router_probs: (
        torch.Tensor
    )  # (N, E) float32 each token's distribution over experts: softmax of router_logits (sigmoid router: s / Σ s)
    expert_index: torch.Tensor  # (N, K) int64, chosen experts, best first
    gates: torch.Tensor  # (N, K) float32 weight of each choice when outputs are combined

    @property
    def num_experts(self) -> int:
        return self.router_logits.shape[-1]

    @property
    def top_k(self) -> int:
        return self.expert_index.shape[-1]

    def tokens_per_expert(self) -> torch.Tensor:
        """(E,) int64: how many (token, choice) assignments each expert received."""
        return torch.bincount(self.expert_index.reshape(-1), minlength=self.num_experts)

    def gate_matrix(self) -> torch.Tensor:
        """(N, E) gates scattered into a dense matrix: zero for experts not chosen."""
        dense = torch.zeros_like(self.router_probs, dtype=self.gates.dtype)
        return dense.scatter(-1, self.expert_index, self.gates)  # (N, E)


@dataclass(frozen=True)
class ExpertChoiceRouting:
    """Expert-choice routing: every expert picks C tokens."""

    router_logits: torch.Tensor  # (N, E) raw router scores
    router_probs: torch.Tensor  # (N, E) float32 softmax over experts, the paper's S
    token_index: torch.Tensor  # (E, C) int64, the tokens each expert picked, best first
    gates: torch.Tensor  # (E, C) float32, S[token, expert] for each pick
    experts_per_token: torch.Tensor  # (N,) int64, how many experts picked each token (0 means dropped)


@dataclass(frozen=True)
class CapacityAssignment:
    """Which (token, choice) assignments fit in their expert's buffer of C slots."""

    keep: torch.Tensor  # (N, K) bool, True where the assignment fits
    position: torch.Tensor  # (N, K) int64, arrival order at its expert; the buffer slot where keep is True
    capacity: int  # C, the slots per expert


def _check_logits(router_logits: torch.Tensor, name: str = "router_logits") -> None:
    if not isinstance(router_logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(router_logits).__name__}")
    if router_logits.ndim != 2:
        raise ValueError(f"{name} must have shape (N, E) (tokens, experts), got {tuple(router_logits.shape)}")
    if not router_logits.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {router_logits.dtype}")
    if router_logits.shape[-1] < 1:
        raise ValueError(f"{name} needs at least one expert, got shape {tuple(router_logits.shape)}")


def _check_k(k: int, num_experts: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool):
        raise ValueError(f"k must be an int, got {k!r}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if k > num_experts:
        raise ValueError(f"k={k} is more than the number of experts E={num_experts}")


def top_k_routing(router_logits: torch.Tensor, k: int, *, renormalize: bool = True) -> Routing:
    """Each token picks its k most probable experts (GShard, arXiv:2006.16668; Mixtral).

    p = softmax(logits) in float32, (N, E); the k largest p_i are the choices.
    With ``renormalize`` the k weights are divided by their sum, so each
    token's gates sum to 1 (g_j = p_j / Σ_top-k p); otherwise gates = p_j.
    Note that top-1 with renormalisation gives every gate 1.0, and then the
    router gets no gradient through the gates: Switch keeps the raw p instead.
    """
    _check_logits(router_logits)
    _check_k(k, router_logits.shape[-1])
    probs = softmax(router_logits.float())  # (N, E)
    top_probs, expert_index = torch.topk(probs, k, dim=-1)  # (N, K), (N, K)
    gates = top_probs / top_probs.sum(dim=-1, keepdim=True) if renormalize else top_probs
    return Routing(router_logits, probs, expert_index, gates)


def switch_routing(router_logits: torch.Tensor) -> Routing:
    """Top-1 routing with the raw gate (Switch Transformer, arXiv:2101.03961, eq. 1-2).

    Token x goes to i = argmax_j p_j(x), and the expert's output is scaled by
    gate = p_i(x), NOT renormalised (which would make it 1.0): the raw gate is
    how the router receives a gradient. expert_index (N, 1), gates (N, 1).
    """
    _check_logits(router_logits)
    probs = softmax(router_logits.float())  # (N, E)
    gate, index = probs.max(dim=-1, keepdim=True)  # (N, 1), (N, 1)
    return Routing(router_logits, probs, index, gate)


def noisy_top_k_routing(
    clean_logits: torch.Tensor,
    noise_logits: torch.Tensor,
    k: int,
    *,
    training: bool,
    generator: torch.Generator | None = None,
) -> Routing:
    """Noisy top-k gating (Shazeer et al. 2017, arXiv:1701.06538, eq. 3-5).

    H(x)_i = (x W_g)_i + ε_i · softplus((x W_noise)_i), ε_i ~ N(0, 1)   (training only)
    G(x) = softmax(KeepTopK(H(x), k)),  KeepTopK sets all but the k largest to -inf.

    clean_logits = x W_g (N, E); noise_logits = x W_noise (N, E), which learns a
    per-token, per-expert noise scale. In evaluation (``training=False``) H is
    the clean logits. The result's router_logits is H and router_probs is
    softmax(H) over all experts; gates (N, K) are G at the chosen experts,
    which equals renormalised top-k of softmax(H).
    """
    _check_logits(clean_logits, "clean_logits")
    _check_logits(noise_logits, "noise_logits")
    if noise_logits.shape != clean_logits.shape:
        raise ValueError(
            f"noise_logits {tuple(noise_logits.shape)} must have the shape of clean_logits {tuple(clean_logits.shape)}"
        )
    _check_k(k, clean_logits.shape[-1])
    clean = clean_logits.float()
    if training:
        eps = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)  # (N, E)
        noisy = clean + eps * F.softplus(noise_logits.float())  # (N, E)
    else:
        noisy = clean
    top_values, expert_index = torch.topk(noisy, k, dim=-1)  # (N, K)
    kept = torch.full_like(noisy, float("-inf")).scatter(-1, expert_index, top_values)  # (N, E)
    gates = F.softmax(kept, dim=-1).gather(-1, expert_index)  # (N, K)
    return Routing(noisy, F.softmax(noisy, dim=-1), expert_index, gates)


def mixtral_routing(router_logits: torch.Tensor, k: int) -> Routing:
    """Mixtral's gate (Jiang et al. 2024, arXiv:2401.04088, sec. 2.1): softmax over the top-k logits only.

        G(x) = Softmax(TopK(x · W_g))        TopK sets all but the k largest logits to -inf

    The k chosen experts are those with the k largest logits (= the k largest
    softmax probabilities, since softmax keeps the order), and their gates are
    exp(l_j) / Σ_top-k exp(l) — exactly what softmax over all E, top-k and
    renormalising gives (``top_k_routing``): the softmax's denominator cancels.
    Hugging Face's Mixtral computes it that second way. router_probs is the
    softmax over all E (what the balance loss reads). With k = 1 every gate is
    1.0 and the router gets no gradient through the gates.
    """
    _check_logits(router_logits)
    _check_k(k, router_logits.shape[-1])
    logits = router_logits.float()
    top_logits, expert_index = torch.topk(logits, k, dim=-1)  # (N, K), (N, K)
    gates = F.softmax(top_logits, dim=-1)  # (N, K) softmax over the chosen k alone
    return Routing(router_logits, F.softmax(logits, dim=-1), expert_index, gates)


def sigmoid_routing(
    router_logits: torch.Tensor,
    k: int,
    *,
    bias: torch.Tensor | None = None,
    renormalize: bool = True,
) -> Routing:
    """DeepSeek-V3's gate (arXiv:2412.19437, §2.1.2): sigmoid scores, a bias that only selects.

        s_i = sigmoid(u · e_i)                         (N, E) affinity of the token to expert i
        chosen = TopK(s_i + b_i, k)                    the bias b (E,) moves the choice ...
        g_i = s_i / Σ_{j chosen} s_j  for i chosen     ... but never the weight: gates use s alone

    Each score is a yes/no of its own (no softmax competition between experts).
    ``bias`` (E,) is the auxiliary-loss-free balancing bias (updated outside the
    layer, see ``moe_course.loss_free``); it is not differentiated through and
    it does not appear in the gates. ``renormalize=False`` keeps g_i = s_i.
    router_probs = s / Σ_all s (N, E), the normalised affinities s' of the
    sequence-wise balance loss; expert_index is ordered best first by s + b.
    """
    _check_logits(router_logits)
    num_experts = router_logits.shape[-1]
    _check_k(k, num_experts)
    scores = torch.sigmoid(router_logits.float())  # (N, E)
    choice = scores
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (num_experts,):
            raise ValueError(f"bias must be a tensor of shape (E,) = ({num_experts},), got {tuple(getattr(bias, 'shape', ()))}")
        choice = scores + bias.detach().float()  # (N, E) selection only
    expert_index = torch.topk(choice, k, dim=-1).indices  # (N, K)
    gates = scores.gather(-1, expert_index)  # (N, K) the scores, without the bias
    if renormalize:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return Routing(router_logits, scores / scores.sum(dim=-1, keepdim=True), expert_index, gates)


def expert_bias_update(bias: torch.Tensor, load: torch.Tensor, rate: float) -> torch.Tensor:
    """Auxiliary-loss-free balancing, one step: b + γ · sign(mean(load) − load), a new (E,) tensor.

    DeepSeek-V3 (arXiv:2412.19437, §2.1.2; Wang et al. 2024, arXiv:2408.15664):
    after every optimiser step, each expert's selection bias (``sigmoid_routing``'s
    ``bias``) moves by the same fixed step γ = ``rate``, down for an expert that
    received more than the mean load, up for one that received less; an expert
    exactly at the mean keeps its bias (sign 0). The GP keeps its judgement (the
    scores); a receptionist nudges the queues. bias (E,) float; load (E,) the
    tokens (or assignments) each expert received in the step, counts or shares;
    rate γ >= 0 (DeepSeek-V3: 0.001). ``moe_course.training.bias.update_expert_biases_``
    applies it to a model's layers.
    """
    if not isinstance(bias, torch.Tensor) or bias.ndim != 1 or not bias.is_floating_point():
        raise ValueError(
            f"bias must be a float tensor of shape (E,), got {getattr(bias, 'dtype', type(bias).__name__)} {tuple(getattr(bias, 'shape', ()))}"
        )
    if not isinstance(load, torch.Tensor) or load.shape != bias.shape:
        raise ValueError(
            f"load must be a tensor of the bias's shape {tuple(bias.shape)}, got {tuple(getattr(load, 'shape', ()))}"
        )
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate >= 0:
        raise ValueError(f"rate γ must be a number >= 0, got {rate!r}")
    load = load.detach().to(bias.device, torch.float32)
    return bias + rate * torch.sign(load.mean() - load).to(bias.dtype)  # (E,)


def expert_choice_routing(router_logits: torch.Tensor, capacity: int) -> ExpertChoiceRouting:
    """Expert choice: each expert picks its top-C tokens (Zhou et al. 2022, arXiv:2202.09368, sec. 3.2).

    S = softmax(logits) over experts (N, E); for each expert e, I[e] = top-C
    tokens of S[:, e] and G[e] = their scores. Every expert gets exactly C
    tokens (perfect balance), while a token may get 0, 1 or several experts.
    The paper sets C = N · c / E with capacity factor c (``expert_capacity``).
    It looks at the whole batch at once, so it is not causal: as it stands it
    cannot route one token at a time during autoregressive decoding.
    """
    _check_logits(router_logits)
    num_tokens = router_logits.shape[0]
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity <= 0:
        raise ValueError(f"capacity must be a positive int, got {capacity!r}")
    if capacity > num_tokens:
        raise ValueError(
            f"capacity={capacity} is more than the number of tokens N={num_tokens}: an expert cannot pick a token twice"
        )
    probs = F.softmax(router_logits.float(), dim=-1)  # (N, E)
    gates, token_index = torch.topk(probs.T, capacity, dim=-1)  # (E, C), (E, C)
    counts = torch.bincount(token_index.reshape(-1), minlength=num_tokens)  # (N,)
    return ExpertChoiceRouting(router_logits, probs, token_index, gates, counts)


def expert_capacity(
    num_tokens: int,
    num_experts: int,
    capacity_factor: float,
    *,
    top_k: int = 1,
    min_capacity: int = 1,
) -> int:
    """Slots per expert: C = max(min_capacity, ceil(top_k · N / E · capacity_factor)).

    (Switch Transformer, arXiv:2101.03961, eq. 3, with top_k assignments per
    token as in GShard.) Rounding is up, so capacity_factor = 1.0 gives every
    expert room for at least its fair share; floating-point dust is ignored
    (8 tokens · 1.1 = 8.8000000001 is 9, and 10 · 1.1 / 1 is 11, not 12).
    ``min_capacity`` keeps small batches from getting 0 slots (DeepSpeed uses 4).
    """
    for name, value, low in (
        ("num_tokens", num_tokens, 0),
        ("num_experts", num_experts, 1),
        ("top_k", top_k, 1),
        ("min_capacity", min_capacity, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} is more than the number of experts E={num_experts}")
    if (
        isinstance(capacity_factor, bool)
        or not isinstance(capacity_factor, (int, float))
        or not math.isfinite(capacity_factor)
        or capacity_factor <= 0
    ):
        raise ValueError(f"capacity_factor must be a positive number, got {capacity_factor!r}")
    raw = top_k * num_tokens * capacity_factor / num_experts
    return max(min_capacity, math.ceil(round(raw, 9)))


def capacity_mask(expert_index: torch.Tensor, num_experts: int, capacity: int) -> CapacityAssignment:
    """Which (token, choice) assignments fit when each expert has ``capacity`` slots.

    expert_index (N, K) (or (N,) for top-1, treated as (N, 1)). Each expert
    fills its C slots in priority order and drops what comes after:

    1. all first choices before any second choice (then all second choices
       before any third, ...), so a token's best expert outranks another
       token's fallback;
    2. within one choice level, earlier tokens first (first come, first
       served, in token order), as the Switch and GShard implementations do.

    ``position[n, j]`` is the arrival order of assignment (n, j) at its expert
    (0-based), so ``keep = position < capacity``; where kept it is the slot in
    the expert's buffer. A token whose assignments are all dropped is not
    processed by the layer at all: in a residual block it passes through unchanged.
    """
    if not isinstance(expert_index, torch.Tensor):
        raise TypeError(f"expert_index must be a torch.Tensor, got {type(expert_index).__name__}")
    if expert_index.is_floating_point() or expert_index.dtype == torch.bool:
        raise ValueError(f"expert_index must hold integer expert ids, got dtype {expert_index.dtype}")
    if expert_index.ndim == 1:
        expert_index = expert_index[:, None]
    if expert_index.ndim != 2:
        raise ValueError(f"expert_index must have shape (N, K) or (N,), got {tuple(expert_index.shape)}")
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity <= 0:
        raise ValueError(f"capacity must be a positive int, got {capacity!r}")
    expert_index = expert_index.long()
    if expert_index.numel() and (expert_index.min() < 0 or expert_index.max() >= num_experts):
        raise ValueError(
            f"expert_index values must be in [0, {num_experts}), got values from {int(expert_index.min())} to {int(expert_index.max())}"
        )
    num_tokens, k = expert_index.shape
    # Priority order = choice-major: choice 0 of tokens 0..N-1, then choice 1, ...
    by_priority = expert_index.T.reshape(-1)  # (K·N,)
    order = torch.argsort(by_priority, stable=True)  # groups by expert, keeps priority order inside a group
    counts = torch.bincount(by_priority, minlength=num_experts)  # (E,)
    group_start = torch.cumsum(counts, 0) - counts  # (E,) where each expert's group begins in `order`
    rank = torch.arange(by_priority.numel(), device=expert_index.device) - group_start[by_priority[order]]
    position = torch.empty_like(by_priority).scatter(0, order, rank)  # (K·N,)
    position = position.reshape(k, num_tokens).T  # (N, K)
    return CapacityAssignment(position < capacity, position, capacity)
