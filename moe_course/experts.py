"""The feed-forward block: one doctor.

Shape legend (used across the package): B batch, T time, D model width,
F hidden width, E experts, K top-k, C capacity, N = B·T tokens.

A transformer block alternates attention (tokens talk to each other) with a
position-wise feed-forward network (each token thinks alone)::

    FFN(x) = act(x W_in + b_in) W_out + b_out          (Vaswani et al. 2017, eq. 2)

Modern models (Mixtral, DeepSeek, Qwen, OLMoE) use a gated FFN instead, SwiGLU
(Shazeer 2020, "GLU Variants Improve Transformer", arXiv:2002.05202, eq. 6)::

    FFN_SwiGLU(x) = (SiLU(x W_gate + b_gate) ⊙ (x W_in + b_in)) W_out + b_out

three matrices instead of two: the gate decides, unit by unit, how much of the
"up" projection x W_in passes. ``activation="swiglu"`` selects it everywhere
(``FeedForward``, ``Experts``, the MoE configs); at equal width F it has 1.5
times the parameters and FLOPs of the plain FFN, so papers shrink F by 2/3.

Mixture-of-Experts layers replace this one FFN by many of them, the experts.
``Experts`` keeps E of them with their weights stacked into one tensor per
kind, ``w_in (E, D, F)`` and so on, so that dispatch code can run all experts
with grouped matmuls.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FeedForward",
    "feed_forward",
    "Experts",
    "ACTIVATIONS",
    "GLU_ACTIVATIONS",
    "is_gated",
    "check_activation",
    "hidden_activation",
    "init_linear_",
]

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}  # element-wise: h = act(x W_in + b_in)
# Gated linear units (Shazeer 2020, arXiv:2002.05202): h = act(x W_gate + b_gate) ⊙ (x W_in + b_in); name → the gate's act.
GLU_ACTIVATIONS = {"swiglu": F.silu}


def is_gated(activation: str) -> bool:
    """Whether ``activation`` names a gated linear unit (a third weight matrix W_gate)."""
    return activation in GLU_ACTIVATIONS


def check_activation(activation: str, owner: str = "activation") -> None:
    """Raise a clear ValueError unless ``activation`` is one an FFN accepts (a key of ACTIVATIONS or GLU_ACTIVATIONS)."""
    if activation not in ACTIVATIONS and activation not in GLU_ACTIVATIONS:
        raise ValueError(f"{owner}: unknown activation {activation!r}; choose from {sorted([*ACTIVATIONS, *GLU_ACTIVATIONS])}")


def hidden_activation(activation: str, pre: torch.Tensor, gate_pre: torch.Tensor | None = None) -> torch.Tensor:
    """The hidden layer h (..., F) from the pre-activations: act(pre), or for a GLU act(gate_pre) ⊙ pre.

    pre = x W_in + b_in (..., F); gate_pre = x W_gate + b_gate (..., F), needed
    exactly when ``activation`` is gated (SwiGLU: SiLU(gate_pre) ⊙ pre).
    """
    if activation in GLU_ACTIVATIONS:
        if gate_pre is None:
            raise ValueError(f"a gated activation ({activation!r}) needs the gate's pre-activation x W_gate")
        return GLU_ACTIVATIONS[activation](gate_pre) * pre
    if gate_pre is not None:
        raise ValueError(f"activation {activation!r} is not gated, but a gate pre-activation was given")
    return ACTIVATIONS[activation](pre)


@torch.no_grad()
def init_linear_(weight: torch.Tensor, bias: torch.Tensor | None, fan_in: int, init_scale: float | None) -> None:
    """Initialise one linear map's weight (and bias) in place; the course's one initialisation rule.

    init_scale None: PyTorch's ``nn.Linear`` default, U(±1/sqrt(fan_in)) for the
    weight and the bias. A number s: the Switch Transformer initialisation
    (Fedus et al. 2021, arXiv:2101.03961, sec. 2.3), the weight from a normal
    with std = sqrt(s / fan_in) truncated at two standard deviations, the bias zero.
    """
    if init_scale is None:
        bound = 1.0 / math.sqrt(fan_in)
        weight.uniform_(-bound, bound)
        if bias is not None:
            bias.uniform_(-bound, bound)
        return
    std = math.sqrt(init_scale / fan_in)
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)
    if bias is not None:
        bias.zero_()


def feed_forward(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor | None,
    w_out: torch.Tensor,
    b_out: torch.Tensor | None,
    activation: str = "gelu",
    w_gate: torch.Tensor | None = None,
    b_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """The FFN as a pure function: (..., D) → (..., D).

    w_in (D, F), b_in (F,), w_out (F, D), b_out (D,); biases may be None.
    A gated ``activation`` ("swiglu") also takes w_gate (D, F) and b_gate (F,):
    h = SiLU(x w_gate + b_gate) ⊙ (x w_in + b_in).
    """
    h = x @ w_in  # (..., F)
    if b_in is not None:
        h = h + b_in
    g = None
    if w_gate is not None:
        g = x @ w_gate  # (..., F)
        if b_gate is not None:
            g = g + b_gate
    h = hidden_activation(activation, h, g)
    y = h @ w_out  # (..., D)
    if b_out is not None:
        y = y + b_out
    return y


class FeedForward(nn.Module):
    """Position-wise feed-forward block, (..., D) → (..., D).

    Two linear maps with a non-linearity between them: D → F → D. In a
    transformer F is usually 4·D; this is where most parameters live. With
    ``activation="swiglu"`` a third map ``fc_gate`` (D → F) gates the hidden
    layer: h = SiLU(fc_gate(x)) ⊙ fc_in(x).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        activation: str = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
        d_out: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("d_ff", d_ff)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if d_out is not None and (not isinstance(d_out, int) or d_out <= 0):
            raise ValueError(f"d_out must be a positive int or None, got {d_out!r}")
        check_activation(activation, "FeedForward")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.d_model, self.d_ff = d_model, d_ff
        self.d_out = d_out or d_model
        self.activation = activation
        self.fc_in = nn.Linear(d_model, d_ff, bias=bias)  # W_in stored as (F, D)
        self.fc_out = nn.Linear(d_ff, self.d_out, bias=bias)  # W_out stored as (D, F)
        # made after the other two, so a plain FFN draws the same initial weights as before gating existed
        self.fc_gate = nn.Linear(d_model, d_ff, bias=bias) if is_gated(activation) else None  # W_gate stored as (F, D)
        self.dropout = nn.Dropout(dropout)

    @property
    def gated(self) -> bool:
        return self.fc_gate is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"FeedForward expects inputs of width d_model={self.d_model}, got shape {tuple(x.shape)}")
        gate_pre = self.fc_gate(x) if self.fc_gate is not None else None  # (..., F)
        h = hidden_activation(self.activation, self.fc_in(x), gate_pre)  # (..., F)
        return self.fc_out(self.dropout(h))  # (..., D)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class Experts(nn.Module):
    """E feed-forward experts (the doctors) with stacked parameters.

    Expert e computes ``act(x w_in[e] + b_in[e]) w_out[e] + b_out[e]``, the same
    FFN as ``FeedForward``. Parameters (this layout is fixed; dispatch code
    relies on it)::

        w_in  (E, D, F)    b_in  (E, F)
        w_out (E, F, D)    b_out (E, D)
        w_gate (E, D, F)   b_gate (E, F)     only for a gated activation ("swiglu"), else None

    init_scale: None gives PyTorch's ``nn.Linear`` default, U(±1/sqrt(fan_in))
        for weights and biases. A number s gives the Switch Transformer
        initialisation (Fedus et al. 2021, arXiv:2101.03961, sec. 2.3): weights
        from a normal with std = sqrt(s / fan_in), truncated at two standard
        deviations, biases zero. s = 0.1 is the paper's choice (one tenth of the
        usual scale), which markedly stabilised their training.
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        *,
        activation: str = "gelu",
        bias: bool = True,
        init_scale: float | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_experts", num_experts), ("d_model", d_model), ("d_ff", d_ff)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_activation(activation, "Experts")
        if init_scale is not None and not (isinstance(init_scale, (int, float)) and math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"init_scale must be a positive number or None (PyTorch's default), got {init_scale!r}")
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.activation, self.bias, self.init_scale = activation, bias, init_scale
        E, D, F_ = num_experts, d_model, d_ff
        self.w_in = nn.Parameter(torch.empty(E, D, F_))
        self.w_out = nn.Parameter(torch.empty(E, F_, D))
        if bias:
            self.b_in = nn.Parameter(torch.empty(E, F_))
            self.b_out = nn.Parameter(torch.empty(E, D))
        else:
            self.register_parameter("b_in", None)
            self.register_parameter("b_out", None)
        # the gate comes last (in the parameter order and in the initialisation), so plain experts are drawn as before
        self.w_gate = nn.Parameter(torch.empty(E, D, F_)) if is_gated(activation) else None
        self.b_gate = nn.Parameter(torch.empty(E, F_)) if is_gated(activation) and bias else None
        self.reset_parameters()

    @property
    def gated(self) -> bool:
        return self.w_gate is not None

    def reset_parameters(self) -> None:
        init_linear_(self.w_in, self.b_in, self.d_model, self.init_scale)
        init_linear_(self.w_out, self.b_out, self.d_ff, self.init_scale)
        if self.w_gate is not None:
            init_linear_(self.w_gate, self.b_gate, self.d_model, self.init_scale)

    @classmethod
    def from_feed_forward(cls, ffn: FeedForward, num_experts: int) -> Experts:
        """E copies of one dense FFN ("upcycling": Komatsuzaki et al. 2022, arXiv:2212.05055).

        Every expert starts equal to ``ffn``; training makes them diverge.
        """
        if not isinstance(ffn, FeedForward):
            raise TypeError(f"from_feed_forward expects a FeedForward, got {type(ffn).__name__}")
        if ffn.d_out != ffn.d_model:
            raise ValueError(f"experts map D → D; this FeedForward maps {ffn.d_model} → {ffn.d_out}")
        experts = cls(num_experts, ffn.d_model, ffn.d_ff, activation=ffn.activation, bias=ffn.fc_in.bias is not None)
        return experts.copy_feed_forward_(ffn)

    @torch.no_grad()
    def copy_feed_forward_(self, ffn: FeedForward) -> Experts:
        """Make every expert a copy of the dense ``ffn`` (same widths, biases and activation), in place; returns self.

        The one home of dense-to-experts copying (sparse upcycling, Komatsuzaki et
        al. 2022, arXiv:2212.05055): ``moe.upcycle`` and ``transformer.copy_dense_into_switch`` call it.
        """
        if not isinstance(ffn, FeedForward):
            raise TypeError(f"copy_feed_forward_ expects a FeedForward, got {type(ffn).__name__}")
        if (ffn.d_model, ffn.d_ff, ffn.d_out) != (self.d_model, self.d_ff, self.d_model) or (
            ffn.fc_in.bias is not None
        ) != self.bias:
            raise ValueError(
                f"a FeedForward {ffn.d_model} → {ffn.d_ff} → {ffn.d_out} (bias={ffn.fc_in.bias is not None}) does not fit "
                f"experts {self.d_model} → {self.d_ff} → {self.d_model} (bias={self.bias})"
            )
        if ffn.activation != self.activation:
            raise ValueError(
                f"a FeedForward with activation {ffn.activation!r} cannot be copied into experts with activation {self.activation!r}"
            )
        self.w_in.copy_(ffn.fc_in.weight.T.expand_as(self.w_in))  # (E, D, F)
        self.w_out.copy_(ffn.fc_out.weight.T.expand_as(self.w_out))  # (E, F, D)
        if self.bias:
            self.b_in.copy_(ffn.fc_in.bias.expand_as(self.b_in))  # (E, F)
            self.b_out.copy_(ffn.fc_out.bias.expand_as(self.b_out))  # (E, D)
        if self.w_gate is not None:
            self.w_gate.copy_(ffn.fc_gate.weight.T.expand_as(self.w_gate))  # (E, D, F)
            if self.b_gate is not None:
                self.b_gate.copy_(ffn.fc_gate.bias.expand_as(self.b_gate))  # (E, F)
        return self

    def expert_output(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` alone on tokens x (N, D) → (N, D)."""
        if isinstance(e, torch.Tensor) and e.numel() == 1:
            e = int(e.item())
        if not isinstance(e, int) or isinstance(e, bool) or not 0 <= e < self.num_experts:
            raise ValueError(f"expert index must be an int in [0, {self.num_experts}), got {e!r}")
        if x.ndim != 2 or x.shape[-1] != self.d_model:
            raise ValueError(f"expert_output expects tokens of shape (N, {self.d_model}), got {tuple(x.shape)}")
        b_in = None if self.b_in is None else self.b_in[e]
        b_out = None if self.b_out is None else self.b_out[e]
        w_gate = None if self.w_gate is None else self.w_gate[e]
        b_gate = None if self.b_gate is None else self.b_gate[e]
        return feed_forward(x, self.w_in[e], b_in, self.w_out[e], b_out, self.activation, w_gate, b_gate)  # (N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every token (the dense mixture's view): x (N, D) → (E, N, D)."""
        if x.ndim != 2 or x.shape[-1] != self.d_model:
            raise ValueError(f"Experts expects tokens of shape (N, {self.d_model}), got {tuple(x.shape)}")
        h = torch.einsum("nd,edf->enf", x, self.w_in)  # (E, N, F)
        if self.b_in is not None:
            h = h + self.b_in[:, None, :]
        g = None
        if self.w_gate is not None:
            g = torch.einsum("nd,edf->enf", x, self.w_gate)  # (E, N, F)
            if self.b_gate is not None:
                g = g + self.b_gate[:, None, :]
        h = hidden_activation(self.activation, h, g)
        y = torch.einsum("enf,efd->end", h, self.w_out)  # (E, N, D)
        if self.b_out is not None:
            y = y + self.b_out[:, None, :]
        return y

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
            f"activation={self.activation!r}, bias={self.bias}, init_scale={self.init_scale}"
        )
