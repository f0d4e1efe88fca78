"""Where the fast dispatch methods register themselves: name → method(x, experts, expert_index, gates, keep)."""

from __future__ import annotations

from collections.abc import Callable

import torch

METHODS: dict[str, Callable[..., torch.Tensor]] = {}


def method(name: str) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """``@method("sort_split")`` adds the decorated function to ``METHODS`` under that name."""

    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in METHODS:
            raise ValueError(f"a fast dispatch method {name!r} is already registered")
        METHODS[name] = fn
        return fn

    return register
