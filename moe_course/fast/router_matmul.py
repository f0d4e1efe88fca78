"""The router's product x (N, D) @ w (D, E), in the shapes a CPU matmul is quick at when E is small.

The same value and gradients as ``x @ w``. With few columns a CPU matmul
library can be much slower at the shape autograd picks for the weight
gradient, x^T·dlogits, than at (dlogits^T·x)^T, and at reading w as it is than
as the transpose of a contiguous (E, D) copy. Lesson 06 times the two shapes
side by side ("The GP's own paperwork"); ``python -m moe_course.bench`` times
whole layers. What it saves is small next to the experts' work, which is why
it lives here and not in ``moe.py``.
"""

from __future__ import annotations

import torch

from .flag import applies

# Below this many experts the product and its weight gradient take the quicker shapes.
FEW_EXPERTS = 16


class _RouterMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return (w.t().contiguous() @ x.t()).t()  # (N, E) as the transpose of (E, N): the same product as x @ w

    @staticmethod
    def backward(ctx, dlogits):
        x, w = ctx.saved_tensors
        dx = dlogits @ w.t() if ctx.needs_input_grad[0] else None  # (N, D)
        dw = (dlogits.t() @ x).t() if ctx.needs_input_grad[1] else None  # (D, E)
        return dx, dw


def router_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Router logits x (N, D) @ w (D, E) → (N, E); the same value and gradients as ``x @ w``."""
    if w.shape[-1] < FEW_EXPERTS and x.ndim == 2 and w.ndim == 2 and x.device.type == "cpu" and applies(x, w):
        return _RouterMatmul.apply(x, w)
    return x @ w
