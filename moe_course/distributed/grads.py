"""Gradients across ranks: which to sum, which to leave alone.

Two kinds of parameters in an expert-parallel model:

* **replicated**: the router, attention, norms, embeddings: a copy on every
  rank, each rank seeing only its own tokens. Each rank's gradient is its
  part; their sum is the gradient of the global batch
  (``all_reduce_replicated_grads``).
* **experts**: each lives on one rank only. The backward exchange already
  sent every rank's contribution home, so their gradients are complete:
  summing them again would be wrong.

This holds when each rank's loss is its part of a loss summed over the
global batch and divided by the global token count (the convention of
``ExpertParallelMoE``). With DDP's convention instead (each rank's mean,
gradients averaged), expert gradients would need dividing by W, as
DeepSpeed does.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .group import explain_collective_errors, require_process_group, same_on_every_rank
from .layer import expert_parallel_layers

__all__ = ["split_parameters", "all_reduce_replicated_grads", "clip_grad_norm_", "check_replicas_in_sync"]


def split_parameters(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(replicated, expert) lists of (name, parameter), in ``named_parameters`` order (the same on every rank)."""
    local = {id(p) for layer in expert_parallel_layers(model) for p in layer.experts.parameters()}
    replicated, experts = [], []
    for name, p in model.named_parameters():
        (experts if id(p) in local else replicated).append((name, p))
    return replicated, experts


def all_reduce_replicated_grads(model: nn.Module, *, group: Any = None) -> None:
    """Sum the replicated parameters' gradients over the ranks (one all-reduce of one flat buffer).

    A parameter without a gradient on this rank counts as zero there (and gets
    a zero gradient), so every rank reduces the same buffer. Expert gradients
    are left as they are.
    """
    require_process_group(group, "all_reduce_replicated_grads")
    params = [p for _, p in split_parameters(model)[0] if p.requires_grad]
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    with explain_collective_errors("summing the replicated gradients (all_reduce)", group):
        dist.all_reduce(flat, group=group)
    start = 0
    for p in params:
        g = flat[start : start + p.numel()].view_as(p)
        start += p.numel()
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


def clip_grad_norm_(model: nn.Module, max_norm: float, *, group: Any = None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole distributed model: → the total norm before clipping.

    Call after ``all_reduce_replicated_grads``: the replicated gradients are
    then the same on every rank and count once; the expert gradients differ
    per rank and their squared norms are summed over ranks.
    """
    require_process_group(group, "clip_grad_norm_")
    replicated, experts = split_parameters(model)
    grads_r = [p.grad for _, p in replicated if p.grad is not None]
    grads_e = [p.grad for _, p in experts if p.grad is not None]
    device = next(model.parameters()).device
    sq_r = sum((g.detach().float().norm() ** 2 for g in grads_r), torch.zeros((), device=device))
    sq_e = sum((g.detach().float().norm() ** 2 for g in grads_e), torch.zeros((), device=device))
    with explain_collective_errors("summing the expert gradient norms (all_reduce)", group):
        dist.all_reduce(sq_e, group=group)
    total = (sq_r + sq_e).sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # the same rule as torch.nn.utils.clip_grad_norm_
    for g in grads_r + grads_e:
        g.mul_(coef.to(g.dtype))
    return total


def check_replicas_in_sync(model: nn.Module, *, group: Any = None) -> None:
    """Raise the same ``ValueError`` on every rank unless the replicated parameters are identical everywhere.

    The usual cause: the model was built from different seeds on different
    ranks. Expert parameters are not compared (they are meant to differ).
    """
    digest = {
        name: hashlib.sha256(p.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:12]
        for name, p in split_parameters(model)[0]
    }
    try:
        same_on_every_rank(digest, "replicated parameters (checksums)", group)
    except ValueError:
        raise ValueError(
            "the replicated parameters (router, attention, embeddings, ...) differ between ranks: build the "
            "model from the same seed on every rank before sharding it"
        ) from None
