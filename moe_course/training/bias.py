"""The training hook of auxiliary-loss-free balancing: move each sigmoid router's bias after a step (DeepSeek-V3).

Legend: E experts, N tokens, K choices per token.

The "sigmoid" router of ``moe_course.moe.MoELayer`` chooses each token's experts
by TopK(s_i + b_i) and weighs them by s_i alone (``routing.sigmoid_routing``):
the bias b (E,) decides *who* sees a token, never *how much* its answer counts,
and no gradient reaches it. The layer keeps b in a buffer and never changes
it in ``forward``; it reports the load (``MoEOutput.tokens_per_expert``). After
``optimizer.step()`` a training loop calls::

    update_expert_biases_(model, moe_outputs)   # b ← b + γ·sign(mean load − load), γ = bias_update_rate

which applies the pure rule ``routing.expert_bias_update`` to every sigmoid
layer with a rate. A loop that does not call it trains with a fixed bias.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..moe import MoELayer, MoEOutput
from ..routing import expert_bias_update

__all__ = ["update_expert_biases_"]


def _layers(model: nn.Module | Iterable[MoELayer]) -> list[MoELayer]:
    if isinstance(model, MoELayer):
        return [model]
    if isinstance(model, nn.Module):
        return [m for m in model.modules() if isinstance(m, MoELayer)]
    return list(model)


@torch.no_grad()
def update_expert_biases_(model: nn.Module | Iterable[MoELayer], loads: Sequence[MoEOutput | torch.Tensor]) -> int:
    """Move each sigmoid-routed layer's ``expert_bias`` by its load; returns how many layers moved.

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
        raise ValueError(
            f"update_expert_biases_: {len(layers)} MoE layer(s) but {len(loads)} load(s); give one per layer, in order"
        )
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
