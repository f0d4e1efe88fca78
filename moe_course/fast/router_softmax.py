"""Softmax over the experts, p = softmax(logits) along E for logits (N, E), in the layout a CPU is quick at.

With few experts (fewer than ``FEW_EXPERTS``) PyTorch's CPU softmax along the
last dimension can be several times slower than along the first: its kernel
walks the rows one short row at a time. (Compare, e.g. with
``torch.utils.benchmark.Timer``, ``torch.softmax(l, -1)`` against
``torch.softmax(l.t(), 0).t()`` for l of shape (1024, 8).) So it runs on the
(E, N) transpose and returns the transpose back: the same values to the last
bit or two of float32 (the two kernels round differently), and a view with
strides (1, N). ``router_matmul`` already gives the logits in that layout, so
no copy is made.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .flag import applies
from .router_matmul import FEW_EXPERTS


def softmax(logits: torch.Tensor) -> torch.Tensor:
    """softmax(logits, dim=-1) for router logits (N, E) → (N, E); the same values (to float rounding) and gradient."""
    if logits.ndim == 2 and logits.shape[-1] < FEW_EXPERTS and logits.device.type == "cpu" and applies(logits):
        return torch.softmax(logits.t(), dim=0).t()
    return F.softmax(logits, dim=-1)
