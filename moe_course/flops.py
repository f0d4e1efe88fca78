"""Counting parameters and FLOPs: what a model knows versus what it costs. The course's one accounting module.

Convention used throughout the course: one multiply-add is 2 FLOPs, and we
count only matrix multiplications (biases, activations and softmaxes are
small next to them). A matmul of (N, D) by (D, F) costs 2·N·D·F FLOPs.

    count_parameters, measure_flops_per_example   counted on a real module / a real forward pass
    matmul_flops, ffn_param_count, ffn_flops      one matmul, one FFN (lesson 01)
    dense_mixture_*, routed_mixture_*             the clinic mixtures (lessons 03-04)
    moe_layer_param_count, moe_layer_flops        one MoELayer (lesson 04; SwiGLU, shared experts: lesson 10)
    param_count, flops_per_token                  a whole GPT, dense or MoE (lessons 07-08, 10)

A gated FFN (``activation="swiglu"``) has three matrices, so it costs 3/2 of
the plain FFN at the same width F: 3·D·F parameters and 6·D·F FLOPs per token.

Every formula is checked against the real module (``count_parameters``) or
PyTorch's FLOP counter in the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .experts import check_activation, is_gated

__all__ = [
    "count_parameters",
    "phone_book_params",
    "phone_book_flops",
    "measure_flops_per_example",
    "matmul_flops",
    "ffn_param_count",
    "ffn_flops",
    "dense_mixture_flops",
    "dense_mixture_param_count",
    "routed_mixture_flops",
    "moe_layer_param_count",
    "moe_layer_flops",
    "ParamCount",
    "FlopCount",
    "param_count",
    "flops_per_token",
]


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _non_negative(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def matmul_flops(n: int, d_in: int, d_out: int) -> int:
    """FLOPs of (n, d_in) @ (d_in, d_out): 2·n·d_in·d_out."""
    _non_negative(n=n, d_in=d_in, d_out=d_out)
    return 2 * n * d_in * d_out


def ffn_param_count(d_model: int, d_ff: int, bias: bool = True, activation: str = "gelu") -> int:
    """Parameters of FeedForward(D, F): 2·D·F weights (+ F + D biases); gated ("swiglu"): 3·D·F (+ 2·F + D)."""
    _non_negative(d_model=d_model, d_ff=d_ff)
    check_activation(activation)
    n_in = 2 if is_gated(activation) else 1  # W_in, and W_gate for a GLU
    return (n_in + 1) * d_model * d_ff + ((n_in * d_ff + d_model) if bias else 0)


def ffn_flops(num_tokens: int, d_model: int, d_ff: int, activation: str = "gelu") -> int:
    """Matmul FLOPs of FeedForward(D, F) on N tokens: two matmuls, 4·N·D·F; gated ("swiglu"): three, 6·N·D·F."""
    _non_negative(num_tokens=num_tokens, d_model=d_model, d_ff=d_ff)
    check_activation(activation)
    n_in = 2 if is_gated(activation) else 1
    return n_in * matmul_flops(num_tokens, d_model, d_ff) + matmul_flops(num_tokens, d_ff, d_model)


def measure_flops_per_example(forward: Callable[[torch.Tensor], Any], x: torch.Tensor) -> float:
    """Matmul FLOPs that ``forward(x)`` runs, per row of x (N, D), counted by PyTorch's FLOP counter.

    Runs under ``torch.no_grad()``; only matrix multiplications are counted
    (2 FLOPs per multiply-add), as everywhere in the course.
    """
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch (N, D), got shape {tuple(x.shape)}")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        forward(x)
    return counter.get_total_flops() / x.shape[0]


# --- the clinic mixtures (lessons 03-04) ----------------------------------------------


def dense_mixture_flops(num_tokens: int, d_in: int, d_ff: int, num_classes: int, num_experts: int) -> int:
    """Matmul FLOPs of DenseMixture on N patients: the gate plus all E experts.

    gate 2·N·D·E, each expert 2·N·D·F + 2·N·F·classes, so the total grows
    linearly with E: every patient sees every doctor.
    """
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    gate = matmul_flops(num_tokens, d_in, num_experts)
    expert = matmul_flops(num_tokens, d_in, d_ff) + matmul_flops(num_tokens, d_ff, num_classes)
    return gate + num_experts * expert


def dense_mixture_param_count(d_in: int, d_ff: int, num_classes: int, num_experts: int) -> int:
    """Parameters of DenseMixture: the gate (D·E + E) plus E experts (D·F + F + F·classes + classes each)."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    expert = d_in * d_ff + d_ff + d_ff * num_classes + num_classes
    return (d_in * num_experts + num_experts) + num_experts * expert


def _positive_int(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def routed_mixture_flops(num_tokens: int, d_in: int, d_ff: int, num_classes: int, num_experts: int, top_k: int = 1) -> int:
    """Matmul FLOPs of RoutedMixture on N patients: the gate (2·N·D·E) plus k experts per patient.

    Each patient pays for k experts, 2·D·F + 2·F·classes each, whatever E is.
    """
    _positive_int(num_experts=num_experts, top_k=top_k)
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} is more than num_experts={num_experts}")
    gate = matmul_flops(num_tokens, d_in, num_experts)
    expert = matmul_flops(num_tokens, d_in, d_ff) + matmul_flops(num_tokens, d_ff, num_classes)
    return gate + top_k * expert


def moe_layer_param_count(
    d_model: int,
    d_ff: int,
    num_experts: int,
    *,
    bias: bool = True,
    noisy: bool = False,
    activation: str = "gelu",
    num_shared_experts: int = 0,
    shared_expert_gate: bool = False,
) -> int:
    """Parameters of ``MoELayer``: the router W_r (D, E) plus E routed and K_s shared experts (D → F → D).

    ``noisy``: the noisy top-k router also has W_noise (D, E). Each expert is an
    FFN of width F (``ffn_param_count``, with its activation: SwiGLU has three
    matrices); ``shared_expert_gate`` adds w_shared_gate (D, 1). The sigmoid
    router's ``expert_bias`` is a buffer, not a parameter.
    """
    _positive_int(d_model=d_model, d_ff=d_ff, num_experts=num_experts)
    _non_negative(num_shared_experts=num_shared_experts)
    expert = ffn_param_count(d_model, d_ff, bias, activation)
    router = d_model * num_experts * (2 if noisy else 1) + (d_model if shared_expert_gate else 0)
    return router + (num_experts + num_shared_experts) * expert


def phone_book_params(d_model: int, d_ff: int, num_experts: int, num_wards: int) -> int:
    """Parameters of lesson 08's ``PhoneBookModel``: E FFNs (2·D·F + F + D each), the router (D·E, when E > 1), the head (D·W + W)."""
    D, F_, E, W = d_model, d_ff, num_experts, num_wards
    return E * ffn_param_count(D, F_) + (D * E if E > 1 else 0) + D * W + W


def phone_book_flops(d_model: int, d_ff: int, num_experts: int, num_wards: int) -> int:
    """Forward FLOPs per patient of ``PhoneBookModel``: one FFN 4·D·F, the router 2·D·E (E > 1), the head 2·D·W."""
    D, F_, E, W = d_model, d_ff, num_experts, num_wards
    return ffn_flops(1, D, F_) + (matmul_flops(1, D, E) if E > 1 else 0) + matmul_flops(1, D, W)


def moe_layer_flops(
    num_tokens: int,
    d_model: int,
    d_ff: int,
    num_experts: int,
    top_k: int = 1,
    *,
    activation: str = "gelu",
    num_shared_experts: int = 0,
    shared_expert_gate: bool = False,
) -> int:
    """Matmul FLOPs of ``MoELayer`` on N tokens: the router 2·N·D·E plus k routed and K_s shared experts per token.

    Each expert costs ``ffn_flops``: 4·D·F per token, 6·D·F for SwiGLU. The
    shared gate adds 2·D per token. (Without dropping: with a capacity factor,
    dropped assignments cost nothing.)
    """
    _positive_int(d_model=d_model, d_ff=d_ff, num_experts=num_experts, top_k=top_k)
    _non_negative(num_shared_experts=num_shared_experts)
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} is more than num_experts={num_experts}")
    router = matmul_flops(num_tokens, d_model, num_experts) + (matmul_flops(num_tokens, d_model, 1) if shared_expert_gate else 0)
    return router + (top_k + num_shared_experts) * ffn_flops(num_tokens, d_model, d_ff, activation)


# --- a whole GPT, dense or Switch (lessons 07-08) -------------------------------------


@dataclass(frozen=True)
class ParamCount:
    """Parameters of a GPT, by part. ``active``: those one token uses."""

    embedding: int  # token V·D (+ position T·D when learned)
    attention: int  # n_layers · (4·D² + 4·D biases)
    norms: int  # (2 per block + the final one) · 2·D
    ffn: int  # all FFN and expert parameters: dense blocks 2·D·F (+F+D; SwiGLU 3·D·F), MoE blocks E routed + K_s shared experts
    ffn_active: int  # the FFN parameters one token uses: the dense FFNs, and top_k routed + K_s shared experts per MoE block
    router: (
        int  # D·E per MoE block (twice that with the noisy router's W_noise; none for a hash layer; + D for a shared-expert gate)
    )
    head: int  # 0 when tied to the token embedding, else V·D

    @property
    def total(self) -> int:
        return self.embedding + self.attention + self.norms + self.ffn + self.router + self.head

    @property
    def active(self) -> int:
        return self.total - self.ffn + self.ffn_active


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs per token (one multiply-add = 2 FLOPs; matmuls only, as in ``moe_course.flops``)."""

    attention_proj: int  # n_layers · 8·D²: q, k, v (2·D·3D) and the output projection (2·D·D)
    attention_mix: int  # n_layers · 4·T·D: scores q·kᵀ (2·T·D) and the weighted sum of values (2·T·D)
    ffn: int  # per block 4·D·F (SwiGLU 6·D·F): the dense FFN, or the top_k routed + K_s shared experts a token visits
    router: int  # 2·D·E per MoE block (twice for the noisy router's second matmul; none for a hash layer; + 2·D for a shared-expert gate)
    head: int  # 2·D·V, the logits

    @property
    def total(self) -> int:
        return self.attention_proj + self.attention_mix + self.ffn + self.router + self.head

    @property
    def training(self) -> int:
        """Forward + backward ≈ 3 × forward (the backward pass costs about twice the forward)."""
        return 3 * self.total


# Router matrices (D, E) per routed block: W_r; the noisy router adds W_noise; a hash layer learns none.
_ROUTER_MATRICES = {"noisy_top_k": 2, "hash": 0}


def param_count(config: Any) -> ParamCount:
    """Count a GPT's parameters from its ``GPTConfig`` (equals ``count_parameters(GPT(config))``).

    Dense blocks hold one FFN of width F; MoE blocks hold the experts of
    ``config.moe_config()``: E routed and K_s shared, each of width F / m
    (m = ``expert_segments``, fine-grained experts), of which a token uses
    top_k routed and all K_s shared.
    """
    V, T, D, L = config.vocab_size, config.block_size, config.d_model, config.n_layers
    b = int(config.bias)
    ffn_one = ffn_param_count(D, config.d_ff, bool(b), getattr(config, "activation", "gelu"))
    n_moe = len(config.moe_layers)
    n_dense = L - n_moe
    ffn = ffn_active = n_dense * ffn_one
    router = 0
    if n_moe:
        moe = config.moe_config()
        expert = ffn_param_count(D, moe.d_ff, moe.bias, moe.activation)
        ffn += n_moe * (moe.num_experts + moe.num_shared_experts) * expert
        ffn_active += n_moe * (moe.top_k + moe.num_shared_experts) * expert
        router = n_moe * (_ROUTER_MATRICES.get(config.router, 1) * D * moe.num_experts + (D if moe.shared_expert_gate else 0))
    return ParamCount(
        embedding=V * D + (T * D if config.position != "rope" else 0),
        attention=L * (4 * D * D + b * 4 * D),
        norms=(2 * L + 1) * 2 * D,
        ffn=ffn,
        ffn_active=ffn_active,
        router=router,
        head=0 if config.tie_embeddings else V * D,
    )


def flops_per_token(config: Any, context: int | None = None) -> FlopCount:
    """Forward FLOPs per token, for sequences of ``context`` tokens (default block_size).

    Attention scores are counted for all T keys, as the explicit masked
    attention computes them (a causal kernel could skip the masked half).
    Dropped tokens (over capacity) would cost less; this counts every token.
    """
    T = config.block_size if context is None else context
    if not isinstance(T, int) or T <= 0:
        raise ValueError(f"context must be a positive int, got {T!r}")
    D, L, V = config.d_model, config.n_layers, config.vocab_size
    n_moe = len(config.moe_layers)
    ffn = (L - n_moe) * ffn_flops(1, D, config.d_ff, getattr(config, "activation", "gelu"))
    router = 0
    if n_moe:
        moe = config.moe_config()
        ffn += n_moe * (moe.top_k + moe.num_shared_experts) * ffn_flops(1, D, moe.d_ff, moe.activation)
        router = n_moe * (
            _ROUTER_MATRICES.get(config.router, 1) * 2 * D * moe.num_experts + (2 * D if moe.shared_expert_gate else 0)
        )
    return FlopCount(
        attention_proj=L * 8 * D * D,
        attention_mix=L * 4 * T * D,
        ffn=ffn,
        router=router,
        head=2 * D * V,
    )
