"""Measuring models: accuracy per group (per specialty, per domain), and how groups' gradients agree."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["accuracy_by_group", "gradient_cosines", "gradient_agreement", "AgreementTracker"]


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


def gradient_agreement(
    model: torch.nn.Module,
    batches_a: list[tuple[torch.Tensor, torch.Tensor]],
    batches_b: list[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """How the loss gradients of G groups agree, with a control on the diagonal: → (G, G).

    batches_a, batches_b: two independent (x, y) batches per group (e.g. two
    halves of each specialty's held-out patients). Entry (i, j) is the mean of
    cos(g_a[i], g_b[j]) and cos(g_a[j], g_b[i]), so the matrix is symmetric.
    Off the diagonal it compares two groups, as ``gradient_cosines`` does; on
    the diagonal it compares two different batches of the *same* group, the
    positive control: how far two samples of one task agree, i.e. the highest
    agreement this batch size can show. Without it a diagonal of ones
    (a batch compared with itself) says nothing.
    """
    if len(batches_a) != len(batches_b) or not batches_a:
        raise ValueError(f"need the same number (>= 1) of batches on both sides, got {len(batches_a)} and {len(batches_b)}")
    cos = gradient_cosines(model, list(batches_a) + list(batches_b))  # (2G, 2G)
    g = len(batches_a)
    cross = cos[:g, g:]  # (G, G): a_i against b_j
    return (cross + cross.T) / 2


@dataclass
class AgreementTracker:
    """A ``train(..., callback=tracker)`` callback: ``gradient_agreement`` over training.

    Call ``tracker(0, model)`` before training to record the start. ``steps``
    and ``matrices`` grow by one entry per call; ``stacked()`` gives (calls, G, G).
    """

    batches_a: list[tuple[torch.Tensor, torch.Tensor]]
    batches_b: list[tuple[torch.Tensor, torch.Tensor]]
    steps: list[int] = field(default_factory=list)
    matrices: list[torch.Tensor] = field(default_factory=list)  # one (G, G) per call

    def __call__(self, step: int, model: torch.nn.Module) -> None:
        device = next(model.parameters()).device
        on = [[(x.to(device), y.to(device)) for x, y in side] for side in (self.batches_a, self.batches_b)]
        self.steps.append(step)
        self.matrices.append(gradient_agreement(model, *on).detach().cpu())

    def stacked(self) -> torch.Tensor:
        """(calls, G, G): the agreement at every recorded step."""
        return torch.stack(self.matrices)
