"""Soft MoE: every expert sees a few blended "slots" instead of chosen tokens (Puigcerver et al. 2023, arXiv:2308.00951).

Legend: B sequences (groups), T tokens per sequence, D model width, F expert
width, E experts, P slots per expert, S = E·P slots.

No token is sent anywhere. Each expert owns P slots; each slot is a weighted
average of ALL the tokens of the sequence, and each token's output is a
weighted average of ALL the slot outputs::

    logits   = X Φ                          (B, T, S)   Φ (D, S): one learned vector per slot
    dispatch = softmax over tokens (axis T)  (B, T, S)   column s: how slot s mixes the tokens
    combine  = softmax over slots  (axis S)  (B, T, S)   row t: how token t mixes the slot outputs
    slots_in = dispatchᵀ X                  (B, S, D)
    slots_out[:, e·P:(e+1)·P] = expert_e(slots_in[:, e·P:(e+1)·P])
    Y        = combine · slots_out          (B, T, D)

Nothing is discrete, so there is no dropping, no balance loss and every
weight gets a gradient. The price for a language model: a slot mixes the
whole sequence, future tokens included, so token t's output depends on
tokens after t: Soft MoE is not causal (``influence_matrix`` shows it). As
in the paper's code (vmoe), X and Φ may be L2-normalised over D with a learned
scale, which keeps the logits' size under control as D grows.

Cost per token: the experts run on S slots per sequence, not on T tokens, so
the expert FLOPs per token are S/T expert passes (``soft_moe_flops_per_token``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..experts import ACTIVATIONS, Experts

__all__ = [
    "SoftMoEConfig",
    "SoftMoEOutput",
    "SoftMoE",
    "soft_moe_logits",
    "soft_moe_weights",
    "soft_moe",
    "soft_moe_flops_per_token",
    "influence_matrix",
    "ClinicSoftMoE",
    "ClinicSoftMoEOutput",
]


def soft_moe_logits(x: torch.Tensor, phi: torch.Tensor, scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """Token-slot logits: x (B, T, D), phi (D, S) → (B, T, S).

    scale None: plain X Φ (the paper's eq. 1). A number or tensor: X and the
    columns of Φ are first L2-normalised over D and the product multiplied by
    ``scale`` (the paper's normalisation, sec. 2.3).
    """
    if x.ndim != 3 or phi.ndim != 2 or x.shape[-1] != phi.shape[0]:
        raise ValueError(f"expected x (B, T, D) and phi (D, S) with the same D, got {tuple(x.shape)} and {tuple(phi.shape)}")
    if scale is None:
        return torch.einsum("btd,ds->bts", x, phi)
    return scale * torch.einsum("btd,ds->bts", F.normalize(x, dim=-1), F.normalize(phi, dim=0))


def soft_moe_weights(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dispatch, combine) from logits (B, T, S), both (B, T, S), in float32.

    dispatch = softmax over the tokens (dim 1): each slot's column sums to 1.
    combine = softmax over the slots (dim 2): each token's row sums to 1.
    The same logits, normalised along the two other axes.
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must have shape (B, T, S), got {tuple(logits.shape)}")
    logits = logits.float()
    return F.softmax(logits, dim=1), F.softmax(logits, dim=2)


def soft_moe(x: torch.Tensor, dispatch: torch.Tensor, combine: torch.Tensor, experts: Experts) -> torch.Tensor:
    """Y = combine · experts(dispatchᵀ X): x (B, T, D), dispatch and combine (B, T, S) → (B, T, D).

    S must be a multiple of E; expert e takes slots e·P … (e+1)·P − 1 of every
    sequence, with P = S / E.
    """
    B, T, S = dispatch.shape
    if x.shape[:2] != (B, T) or combine.shape != dispatch.shape:
        raise ValueError(
            f"x (B, T, D) and dispatch, combine (B, T, S) must agree, got {tuple(x.shape)}, {tuple(dispatch.shape)}, {tuple(combine.shape)}"
        )
    E = experts.num_experts
    if S % E:
        raise ValueError(f"{S} slots cannot be shared by {E} experts: S must be a multiple of E")
    P = S // E
    slots_in = torch.einsum("bts,btd->bsd", dispatch.to(x.dtype), x)  # (B, S, D) each slot a weighted average of all tokens
    per_expert = slots_in.view(B, E, P, -1).transpose(0, 1).reshape(E, B * P, -1)  # (E, B·P, D)
    slots_out = torch.stack([experts.expert_output(e, per_expert[e]) for e in range(E)])  # (E, B·P, D)
    slots_out = slots_out.view(E, B, P, -1).transpose(0, 1).reshape(B, S, -1)  # (B, S, D)
    return torch.einsum("bts,bsd->btd", combine.to(slots_out.dtype), slots_out)  # (B, T, D)


@dataclass(frozen=True)
class SoftMoEConfig:
    d_model: int  # D
    d_ff: int  # F, each expert's hidden width
    num_experts: int  # E
    slots_per_expert: int = 1  # P; S = E·P slots per sequence
    normalize: bool = True  # L2-normalise X and Φ with a learned scale (paper sec. 2.3); False: logits = X Φ
    activation: str = "gelu"  # the experts' non-linearity
    bias: bool = True  # whether the experts have biases
    init_scale: float | None = 0.1  # experts' Switch init scale (as MoEConfig); None: PyTorch default

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "num_experts", "slots_per_expert"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"SoftMoEConfig.{name} must be a positive int, got {value!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"SoftMoEConfig.activation: unknown activation {self.activation!r}; choose from {sorted(ACTIVATIONS)}"
            )

    @property
    def num_slots(self) -> int:
        return self.num_experts * self.slots_per_expert


@dataclass(frozen=True)
class SoftMoEOutput:
    y: torch.Tensor  # (B, T, D) or (N, D) like the input
    router_logits: torch.Tensor  # (B, T, S) token-slot logits
    dispatch: torch.Tensor  # (B, T, S) float32, softmax over T: how each slot mixes the tokens
    combine: torch.Tensor  # (B, T, S) float32, softmax over S: how each token mixes the slot outputs


class SoftMoE(nn.Module):
    """A Soft MoE layer: (B, T, D) → SoftMoEOutput; an (N, D) input is one sequence of N tokens.

    Parameters: phi (D, S) (init N(0, 1/D), as the paper's LeCun normal),
    ``scale`` () (init 1, when normalize), and ``experts`` = Experts(E, D, F).
    Every slot mixes the whole sequence, so the layer is not causal.
    """

    def __init__(self, config: SoftMoEConfig) -> None:
        super().__init__()
        if not isinstance(config, SoftMoEConfig):
            raise TypeError(f"SoftMoE expects a SoftMoEConfig, got {type(config).__name__}")
        self.config = config
        D = config.d_model
        self.phi = nn.Parameter(torch.randn(D, config.num_slots) / math.sqrt(D))  # (D, S)
        self.scale = nn.Parameter(torch.ones(())) if config.normalize else None
        self.experts = Experts(
            config.num_experts, D, config.d_ff, activation=config.activation, bias=config.bias, init_scale=config.init_scale
        )

    def forward(self, x: torch.Tensor) -> SoftMoEOutput:
        D = self.config.d_model
        if not isinstance(x, torch.Tensor) or x.ndim not in (2, 3) or x.shape[-1] != D:
            raise ValueError(f"SoftMoE expects x of shape (B, T, {D}) or (N, {D}), got {tuple(getattr(x, 'shape', ()))}")
        seqs = x if x.ndim == 3 else x[None]  # (B, T, D)
        logits = soft_moe_logits(seqs, self.phi, self.scale)  # (B, T, S)
        dispatch, combine = soft_moe_weights(logits)
        y = soft_moe(seqs, dispatch, combine, self.experts)  # (B, T, D)
        return SoftMoEOutput(y.reshape(x.shape), logits, dispatch, combine)


def soft_moe_flops_per_token(d_model: int, d_ff: int, num_experts: int, slots_per_expert: int, tokens: int) -> dict[str, float]:
    """Forward FLOPs per token of a Soft MoE layer on sequences of ``tokens`` tokens (matmuls only).

    logits 2·D·S, dispatch 2·D·S (its share of dispatchᵀ X), combine 2·D·S, and
    the experts 4·D·F per slot shared by the T tokens: 4·D·F·S / T.
    Compare a top-1 MoE: 2·D·E for the router and 4·D·F for one expert.
    """
    for name, value in (
        ("d_model", d_model),
        ("d_ff", d_ff),
        ("num_experts", num_experts),
        ("slots_per_expert", slots_per_expert),
        ("tokens", tokens),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    S = num_experts * slots_per_expert
    mixing = 3 * 2 * d_model * S
    experts = 4 * d_model * d_ff * S / tokens
    return {"mixing": float(mixing), "experts": experts, "total": mixing + experts}


@torch.no_grad()
def influence_matrix(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Which tokens' outputs move when one token changes: x (T, D) or (1, T, D) → (T, T).

    I[i, j] = max |y_i(x with token j shifted by eps) − y_i(x)| over D, for
    ``fn`` mapping (1, T, D) → (1, T, D) (a layer's output, e.g.
    ``lambda x: layer(x).y``). A causal layer gives a lower-triangular I
    (i ≥ j: outputs depend on earlier tokens only), a token-wise FFN or
    token-choice MoE a diagonal one; anything above the diagonal is a future
    token changing the past.
    """
    seqs = x if x.ndim == 3 else x[None]
    if seqs.ndim != 3 or seqs.shape[0] != 1:
        raise ValueError(f"influence_matrix expects one sequence, x (T, D) or (1, T, D), got {tuple(x.shape)}")
    base = fn(seqs)
    T = seqs.shape[1]
    out = torch.zeros(T, T)
    for j in range(T):
        moved = seqs.clone()
        moved[0, j] += eps
        out[:, j] = (fn(moved) - base)[0].abs().amax(dim=-1).float()
    return out


@dataclass(frozen=True)
class ClinicSoftMoEOutput:
    logits: torch.Tensor  # (N, num_classes)
    router_loss: torch.Tensor  # () always 0: Soft MoE needs no balance loss (ClassificationTask adds it anyway)
    moe: SoftMoEOutput  # the layer's result, on (N / group_size, group_size, D)


class ClinicSoftMoE(nn.Module):
    """The clinic's classifier with a Soft MoE layer: embed → h + softmoe(h) → head; (N, d_in) → ClinicSoftMoEOutput.

    Patients have no sequence, so each run of ``group_size`` consecutive
    patients is one group: a slot blends the patients of its group, and a
    patient's diagnosis then depends on who else is in the waiting room. N
    must be a multiple of group_size.
    """

    def __init__(self, d_in: int, num_classes: int, config: SoftMoEConfig, *, group_size: int = 32) -> None:
        super().__init__()
        for name, value in (("d_in", d_in), ("num_classes", num_classes), ("group_size", group_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.group_size = group_size
        self.embed = nn.Linear(d_in, config.d_model)
        self.moe = SoftMoE(config)
        self.head = nn.Linear(config.d_model, num_classes)

    def forward(self, x: torch.Tensor) -> ClinicSoftMoEOutput:
        if x.ndim != 2 or x.shape[-1] != self.embed.in_features:
            raise ValueError(f"ClinicSoftMoE expects patients of shape (N, {self.embed.in_features}), got {tuple(x.shape)}")
        if x.shape[0] % self.group_size:
            raise ValueError(
                f"ClinicSoftMoE groups patients {self.group_size} at a time; {x.shape[0]} patients is not a multiple of it"
            )
        h = self.embed(x)  # (N, D)
        out = self.moe(h.view(-1, self.group_size, h.shape[-1]))  # groups (N/G, G, D)
        return ClinicSoftMoEOutput(self.head(h + out.y.reshape(h.shape)), h.new_zeros(()), out)
