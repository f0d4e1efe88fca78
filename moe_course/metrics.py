"""Measuring models: accuracy per group (per specialty, per domain)."""

from __future__ import annotations

import torch

__all__ = ["accuracy_by_group"]


def accuracy_by_group(logits: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Accuracy of ``logits.argmax(-1)`` within each group; NaN for an empty group.

    logits (N, classes), targets (N,), groups (N,) in [0, num_groups) → (num_groups,) float32.
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1] or groups.shape != targets.shape:
        raise ValueError(
            f"expected logits (N, classes), targets (N,), groups (N,); got {tuple(logits.shape)}, "
            f"{tuple(targets.shape)}, {tuple(groups.shape)}"
        )
    correct = (logits.argmax(-1) == targets).float()  # (N,)
    hits = torch.zeros(num_groups).index_add_(0, groups, correct)
    counts = torch.bincount(groups, minlength=num_groups).float()
    return hits / counts  # 0/0 → NaN for an empty group, on purpose
