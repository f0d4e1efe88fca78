"""Counting parameters and FLOPs: what a model knows versus what it costs.

Convention used throughout the course: one multiply-add is 2 FLOPs, and we
count only matrix multiplications (biases, activations and softmaxes are
small next to them). A matmul of (N, D) by (D, F) costs 2·N·D·F FLOPs.
"""

from __future__ import annotations

from torch import nn

__all__ = ["count_parameters", "ffn_param_count", "ffn_flops", "matmul_flops"]


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def matmul_flops(n: int, d_in: int, d_out: int) -> int:
    """FLOPs of (n, d_in) @ (d_in, d_out): 2·n·d_in·d_out."""
    _positive(n=n, d_in=d_in, d_out=d_out)
    return 2 * n * d_in * d_out


def ffn_param_count(d_model: int, d_ff: int, bias: bool = True) -> int:
    """Parameters of FeedForward(D, F): 2·D·F weights (+ F + D biases)."""
    _positive(d_model=d_model, d_ff=d_ff)
    return 2 * d_model * d_ff + ((d_ff + d_model) if bias else 0)


def ffn_flops(num_tokens: int, d_model: int, d_ff: int) -> int:
    """Matmul FLOPs of FeedForward(D, F) on N tokens: two matmuls, 4·N·D·F."""
    _positive(num_tokens=num_tokens, d_model=d_model, d_ff=d_ff)
    return matmul_flops(num_tokens, d_model, d_ff) + matmul_flops(num_tokens, d_ff, d_model)
