"""Balancing without an auxiliary loss: a per-expert bias that the load moves between steps (DeepSeek-V3).

Legend: E experts, N tokens, K choices per token.

The "sigmoid" router of ``moe_course.moe.MoELayer`` chooses each token's experts
by TopK(s_i + b_i) and weighs them by s_i alone (``routing.sigmoid_routing``):
the bias b (E,) decides *who* sees a token, never *how much* its answer counts,
and no gradient reaches it. Instead, after every optimiser step (Wang et al.
2024, arXiv:2408.15664; DeepSeek-V3, arXiv:2412.19437, §2.1.2)::

    b_i ← b_i + γ · sign(mean_j load_j − load_i)

an overloaded expert becomes a little less attractive, an idle one a little
more, by the same fixed step γ (DeepSeek-V3: 0.001). The GP keeps its clinical
judgement (the scores); the receptionist nudges the queue.

Two pieces, kept apart on purpose:

    expert_bias_update      the rule, a pure function: (bias, load, γ) → new bias
    update_expert_biases_   the training hook: after ``optimizer.step()``, moves every
                            sigmoid-routed layer's ``expert_bias`` buffer by the loads
                            its ``MoEOutput.tokens_per_expert`` reported

The layer never changes its own state in ``forward``; a loop that does not call
the hook trains with a fixed bias (zero, unless loaded).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .moe import MoELayer, MoEOutput

__all__ = ["expert_bias_update", "update_expert_biases_", "max_over_mean_load"]


def expert_bias_update(bias: torch.Tensor, load: torch.Tensor, rate: float) -> torch.Tensor:
    """One step of the loss-free balancing rule: b + γ · sign(mean(load) − load), a new (E,) tensor.

    bias (E,) float; load (E,) tokens (or assignments) each expert received in
    the step, counts or shares; rate γ >= 0. An expert exactly at the mean load
    keeps its bias (sign 0).
    """
    if not isinstance(bias, torch.Tensor) or bias.ndim != 1 or not bias.is_floating_point():
        raise ValueError(f"bias must be a float tensor of shape (E,), got {getattr(bias, 'dtype', type(bias).__name__)} {tuple(getattr(bias, 'shape', ()))}")
    if not isinstance(load, torch.Tensor) or load.shape != bias.shape:
        raise ValueError(f"load must be a tensor of the bias's shape {tuple(bias.shape)}, got {tuple(getattr(load, 'shape', ()))}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate >= 0:
        raise ValueError(f"rate γ must be a number >= 0, got {rate!r}")
    load = load.detach().to(bias.device, torch.float32)
    return bias + rate * torch.sign(load.mean() - load).to(bias.dtype)  # (E,)


def _layers(model: nn.Module | Iterable[MoELayer]) -> list[MoELayer]:
    if isinstance(model, MoELayer):
        return [model]
    if isinstance(model, nn.Module):
        return [m for m in model.modules() if isinstance(m, MoELayer)]
    return list(model)


@torch.no_grad()
def update_expert_biases_(model: nn.Module | Iterable[MoELayer], loads: Sequence[MoEOutput | torch.Tensor]) -> int:
    """The training hook: move each sigmoid-routed layer's ``expert_bias`` by its load; returns how many layers moved.

    model: an MoELayer, a model holding MoE layers (in the order ``modules()``
    visits them, which for a GPT is block order), or a list of layers.
    loads: one entry per MoE layer, in the same order: its ``MoEOutput`` (the
    ``tokens_per_expert`` it reported) or an (E,) load tensor, e.g. summed over
    the micro-batches of one optimiser step. For a GPT:
    ``update_expert_biases_(gpt, [m for _, m in out.moe_outputs])``.
    Layers without a bias, or with ``bias_update_rate`` 0, are left alone.
    """
    layers = _layers(model)
    loads = list(loads)
    if len(loads) != len(layers):
        raise ValueError(f"update_expert_biases_: {len(layers)} MoE layer(s) but {len(loads)} load(s); give one per layer, in order")
    moved = 0
    for layer, load in zip(layers, loads):
        if isinstance(load, MoEOutput):
            load = load.tokens_per_expert
        rate = layer.config.bias_update_rate
        if layer.expert_bias is None or rate == 0:
            continue
        layer.expert_bias.copy_(expert_bias_update(layer.expert_bias, load, rate))
        moved += 1
    return moved


def max_over_mean_load(load: torch.Tensor) -> float:
    """How uneven a load is: the busiest expert's load over the mean load (1.0 = perfectly even, E = one expert takes all).

    DeepSeek's "maximal violation" is this minus 1 (Wang et al. 2024, arXiv:2408.15664).
    """
    if not isinstance(load, torch.Tensor) or load.ndim != 1 or load.numel() == 0:
        raise ValueError(f"load must be a non-empty (E,) tensor, got {tuple(getattr(load, 'shape', ()))}")
    load = load.float()
    if load.sum() <= 0:
        raise ValueError("load must have a positive total")
    return float(load.max() / load.mean())
