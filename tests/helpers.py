"""Helpers several test modules share: the per-token loop every dispatch must equal, and a router bypass."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def randn(*shape: int, seed: int = 1) -> torch.Tensor:
    """A seeded standard-normal tensor that leaves the global generator alone."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def small_layer(seed: int = 0, **overrides):
    """A seeded ``MoELayer`` with D=8, F=16, E=4 unless overridden."""
    from moe_course.moe import MoEConfig, MoELayer

    torch.manual_seed(seed)
    kwargs = dict(d_model=8, d_ff=16, num_experts=4)
    kwargs.update(overrides)
    return MoELayer(MoEConfig(**kwargs))


def outputs_and_grads(method, x, experts, expert_index, gates, keep) -> list:
    """A dispatch method's y and the gradients of a fixed weighting of y for x, the gates and every expert parameter."""
    x = x.detach().clone().requires_grad_()
    gates = gates.detach().clone().requires_grad_()
    experts.zero_grad(set_to_none=True)
    y = method(x, experts, expert_index, gates, keep)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    return [y.detach(), x.grad, gates.grad] + [p.grad for p in experts.parameters()]


def loop_reference(
    x: torch.Tensor, experts, expert_index: torch.Tensor, gates: torch.Tensor, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Token by token: y_n = Σ_j keep[n, j] · gates[n, j] · expert_{expert_index[n, j]}(x_n); x (N, D) → (N, D).

    ``experts``: anything with ``expert_output(e, x)`` (``Experts``, ``MoELayer``).
    """
    y = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(expert_index.shape[1]):
            if keep is None or keep[n, j]:
                e = int(expert_index[n, j])
                y[n] += gates[n, j] * experts.expert_output(e, x[n : n + 1])[0]
    return y


class _OneExpert(nn.Module):
    """A Switch layer's expert e on every token with gate 1: (B, T, D) → (B, T, D), no router, no capacity, no losses."""

    def __init__(self, layer: nn.Module, expert: int) -> None:
        super().__init__()
        self.layer, self.expert = layer, expert

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.layer.expert_output(self.expert, h.reshape(-1, h.shape[-1])).reshape(h.shape)


@contextmanager
def forced_expert(model: nn.Module, expert: int) -> Iterator[nn.Module]:
    """``with forced_expert(gpt, e):`` every Switch block's router is bypassed: each token goes to expert e with gate 1.

    The block then treats its FFN as dense (its ``BlockOutput.moe`` is None).
    """
    swapped = [(block, block.ffn) for block in model.blocks if block.is_moe]
    if not swapped:
        raise ValueError("forced_expert needs a model with Switch blocks")
    for block, layer in swapped:
        if not 0 <= expert < layer.config.num_experts:
            raise ValueError(f"expert must be in [0, {layer.config.num_experts}), got {expert}")
        block.ffn = _OneExpert(layer, expert)
    try:
        yield model
    finally:
        for block, layer in swapped:
            block.ffn = layer
