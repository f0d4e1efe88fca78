"""Measuring models: accuracy per group (per specialty, per domain)."""

from __future__ import annotations

import torch

__all__ = ["accuracy_by_group", "gradient_cosines"]


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


def gradient_cosines(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Cosine similarity between the loss gradients of several batches: → (G, G).

    batches: one (x, y) batch per group (e.g. per specialty). A negative entry
    means one group's update makes the other group's loss worse: the two tasks
    pull the shared weights in opposite directions (negative interference;
    cf. Yu et al. 2020, "Gradient Surgery for Multi-Task Learning", arXiv:2001.06782).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for x, y in batches:
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        g = torch.autograd.grad(loss, params)
        grads.append(torch.cat([t.reshape(-1) for t in g]))
    stacked = torch.nn.functional.normalize(torch.stack(grads), dim=1)  # (G, P)
    return stacked @ stacked.T  # (G, G)
