"""A small decoder-only transformer (GPT) whose feed-forward blocks may be Switch layers.

Shape legend (used across the package): B batch, T time, D model width,
F hidden width, E experts, K top-k, C capacity, N = B·T tokens; V vocabulary.

    idx (B, T) → token embedding (+ position embedding)   (B, T, D)
              → n_layers × Block:
                    x = x + attn(ln_1(x))                  tokens talk to each other
                    x = x + ffn(ln_2(x))                   each token thinks alone
              → ln_f → head (tied to the token embedding)  (B, T, V) logits

"Pre-norm" blocks (the layer norm sits inside the residual branch, GPT-2
style) keep a clean residual path from the embedding to the head. In a
Switch model (Fedus et al. 2021, arXiv:2101.03961) ``ffn`` is a ``MoELayer``
with the Switch router (top-1, raw gate; ``router`` and ``top_k`` choose
another routing, e.g. top-2), a capacity factor and the balance and
z-losses; every expert has the dense FFN's width F, so with top-1 one token
costs the same FLOPs in both models (plus the router's 2·D·E), while the
Switch model holds E times the FFN parameters. With ``router="hash"`` the
expert layers are ``HashLayer``s instead: each token goes to the expert a
fixed table assigns to its token id (Roller et al. 2021, arXiv:2106.04426),
with nothing about the routing to learn; ``GPT.forward`` passes the token ids
to every block for them.

``GPT.forward`` returns a ``GPTOutput``: the logits, ``router_loss`` (the sum
over Switch layers of their weighted ``MoEOutput.router_loss``, to add to the
cross-entropy), the unweighted ``aux_loss`` and ``z_loss`` summed over Switch
layers, and every layer's ``MoEOutput`` (None for dense layers) to look inside
the routing.

Modern options (lesson 10): ``activation="swiglu"`` (gated FFNs in dense
and MoE blocks), ``expert_segments`` and ``num_shared_experts`` (DeepSeekMoE's
fine-grained and shared experts; ``GPTConfig.fine_grained``),
``router="mixtral"`` or ``router="sigmoid"`` with ``bias_update_rate``
(DeepSeek-V3's loss-free balancing, moved by
``moe_course.training.bias.update_expert_biases_``), ``balance_scope``, and
``upcycle_gpt`` (a trained dense GPT into an MoE GPT).

``param_count(config)`` and ``flops_per_token(config)`` count what a model
knows and what a token costs, by formula (checked against PyTorch's FLOP
counter in the tests).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CausalSelfAttention
from .dispatch import dispatch
from .experts import Experts, FeedForward, init_linear_
from .flops import FlopCount, ParamCount, flops_per_token, param_count  # counted in the accounting module
from .moe import ROUTERS, MoEConfig, MoELayer, MoEOutput

__all__ = [
    "FFN_KINDS",
    "GPT_ROUTERS",
    "HashLayer",
    "GPTConfig",
    "GPTOutput",
    "BlockOutput",
    "Block",
    "GPT",
    "ParamCount",
    "FlopCount",
    "param_count",
    "flops_per_token",
    "copy_dense_into_switch",
    "upcycle_gpt",
]

FFN_KINDS = ("dense", "switch")
GPT_ROUTERS = ROUTERS + ("hash",)  # the MoE layer's learned routers, and the hash layer's fixed one
POSITIONS = ("rope", "learned", "both")


def _positive_int(owner: str, name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int  # V, the tokenizer's number of characters (Corpus.vocab_size)
    block_size: int = 64  # T, the longest context the model reads (position embeddings)
    d_model: int = 64  # D, the width of every token's vector
    n_layers: int = 2  # transformer blocks
    n_heads: int = 4  # attention heads per block; D must be divisible by it
    d_ff: int = 256  # F, hidden width of the dense FFN and of each expert
    ffn: str = "dense"  # "dense": a FeedForward in every block; "switch": MoELayers (routed by ``router``)
    num_experts: int = 1  # E, experts per Switch layer (1 for a dense model)
    router: str = "switch"  # GPT_ROUTERS: "switch" (top-1, raw gate), "top_k", "noisy_top_k", "mixtral", "sigmoid", "hash" (fixed, by token id)
    top_k: int = 1  # K, experts per token ("switch" needs 1); a token then costs K experts' FLOPs
    activation: str = "gelu"  # the FFNs' and experts' non-linearity: "gelu", "relu", or "swiglu" (gated, three matrices)
    expert_segments: int = 1  # m: each expert is d_ff / m wide (DeepSeekMoE's fine-grained experts; see fine_grained)
    num_shared_experts: int = 0  # K_s experts (width d_ff / m) every token visits in each MoE block (DeepSeekMoE)
    shared_expert_gate: bool = False  # a sigmoid gate on the shared experts' sum (Qwen2-MoE)
    renormalize: bool = True  # "top_k" and "sigmoid" routers: gates divided by their sum over the k chosen
    bias_update_rate: float = 0.0  # γ of the "sigmoid" router's loss-free balancing bias (DeepSeek-V3: 1e-3)
    balance_scope: str = "batch"  # balance loss statistics over the whole batch, or per "sequence"
    moe_every: int = 1  # every moe_every-th block is a Switch block, the others dense (the Switch paper used 2)
    capacity_factor: float | None = 1.25  # slots per expert = ceil(N/E · factor), N per forward call; None: dropless
    aux_loss_coef: float = 1e-2  # α, weight of the load-balancing loss
    z_loss_coef: float = 1e-3  # weight of the router z-loss
    router_jitter: float = 0.0  # ε of the router's multiplicative input jitter (training only)
    init_scale: float | None = 0.1  # Switch init: truncated normal, std sqrt(s / fan_in); None: PyTorch default
    dropout: float = 0.0  # dropout on attention weights and residual branches
    bias: bool = True  # biases in linear layers and FFNs
    tie_embeddings: bool = True  # the head reuses the token embedding matrix (V, D)
    position: str = "rope"  # "rope": rotary (relative) in attention; "learned": a (T, D) table added to the input; "both"
    fast_attention: bool = True  # F.scaled_dot_product_attention (same function as the explicit one)
    dispatch: str | None = None  # MoE dispatch method (moe_course.dispatch.METHODS); None: the fastest

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "block_size",
            "d_model",
            "n_layers",
            "n_heads",
            "d_ff",
            "num_experts",
            "moe_every",
            "top_k",
            "expert_segments",
        ):
            _positive_int("GPTConfig", name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(f"GPTConfig.d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"GPTConfig.ffn must be one of {list(FFN_KINDS)}, got {self.ffn!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"GPTConfig.position must be one of {list(POSITIONS)}, got {self.position!r}")
        if self.position != "learned" and self.d_head % 2:
            raise ValueError(f"GPTConfig: rotary position embeddings need an even head width; d_model / n_heads = {self.d_head}")
        if self.ffn == "dense" and self.num_experts != 1:
            raise ValueError(
                f"GPTConfig: a dense model has no experts, but num_experts={self.num_experts}; use ffn='switch' for experts"
            )
        if self.router not in GPT_ROUTERS:
            raise ValueError(f"GPTConfig.router: unknown router type {self.router!r}; choose from {list(GPT_ROUTERS)}")
        if self.router == "hash" and self.top_k != 1:
            raise ValueError(f"GPTConfig: a hash layer sends each token to one expert, but top_k={self.top_k}")
        if self.router == "hash" and self.ffn == "switch" and self.capacity_factor is not None:
            raise ValueError(f"GPTConfig: a hash layer drops no tokens; set capacity_factor=None (got {self.capacity_factor})")
        if self.ffn == "dense" and self.top_k != 1:
            raise ValueError(
                f"GPTConfig: a dense model routes nothing, but top_k={self.top_k}; use ffn='switch' (with router='top_k') for top-k routing"
            )
        if self.ffn == "dense" and (self.expert_segments != 1 or self.num_shared_experts):
            raise ValueError(
                f"GPTConfig: a dense model routes nothing, but expert_segments={self.expert_segments}, "
                f"num_shared_experts={self.num_shared_experts}; use ffn='switch' for routed experts"
            )
        if self.d_ff % self.expert_segments:
            raise ValueError(
                f"GPTConfig: d_ff={self.d_ff} cannot be cut into expert_segments={self.expert_segments} equal experts"
            )
        if self.router == "hash" and (self.expert_segments != 1 or self.num_shared_experts or self.activation != "gelu"):
            raise ValueError(
                "GPTConfig: a hash layer has plain GELU experts of width d_ff; expert_segments, num_shared_experts and activation "
                "are MoELayer options"
            )
        if self.ffn == "switch" and self.moe_every > self.n_layers:
            raise ValueError(
                f"GPTConfig.moe_every={self.moe_every} > n_layers={self.n_layers}: the model would have no Switch block"
            )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init_scale is not None and (
            not isinstance(self.init_scale, (int, float)) or not math.isfinite(self.init_scale) or self.init_scale <= 0
        ):
            raise ValueError(f"GPTConfig.init_scale must be > 0 or None, got {self.init_scale!r}")
        try:  # the MoE fields (and the activation) are checked by MoEConfig itself, with its own messages
            self.moe_config()
        except ValueError as err:
            raise ValueError(f"GPTConfig: {err}") from None

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block ``layer`` (0-based) holds a Switch layer: the moe_every-th, 2·moe_every-th, ... blocks."""
        return self.ffn == "switch" and (layer + 1) % self.moe_every == 0

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n_layers) if self.is_moe_layer(i))

    def moe_config(self) -> MoEConfig:
        """The MoEConfig of every MoE block, experts d_ff / expert_segments wide (for a hash layer: its experts' settings; it has no router)."""
        return MoEConfig(
            d_model=self.d_model,
            d_ff=self.d_ff // self.expert_segments,
            num_experts=self.num_experts,
            top_k=self.top_k,
            capacity_factor=self.capacity_factor,
            router="switch" if self.router == "hash" else self.router,
            renormalize=self.renormalize,
            num_shared_experts=self.num_shared_experts,
            shared_expert_gate=self.shared_expert_gate,
            bias_update_rate=self.bias_update_rate,
            balance_scope=self.balance_scope,
            aux_loss_coef=self.aux_loss_coef,
            z_loss_coef=self.z_loss_coef,
            router_jitter=self.router_jitter,
            init_scale=self.init_scale,
            activation=self.activation,
            bias=self.bias,
            dispatch=self.dispatch,
        )

    def dense_twin(self) -> GPTConfig:
        """The same model with a dense FFN in every block: equal FLOPs per token (but the router's) for a top-1 model of
        full-width experts, or a fine-grained one with m·K = 1 (``fine_grained``)."""
        return replace(
            self,
            ffn="dense",
            num_experts=1,
            router="switch",
            top_k=1,
            expert_segments=1,
            num_shared_experts=0,
            shared_expert_gate=False,
            renormalize=True,
            bias_update_rate=0.0,
        )

    def fine_grained(self, segments: int, num_shared_experts: int = 0) -> GPTConfig:
        """This MoE model with DeepSeekMoE's experts (arXiv:2401.06066): m = ``segments`` times as many, each 1/m as wide,
        m·K active of which K_s = ``num_shared_experts`` are shared. Same expert weights and FLOPs per token (the routers and
        the experts' biases grow); see ``MoEConfig.fine_grained``."""
        if self.ffn != "switch" or self.router == "hash":
            raise ValueError(
                "GPTConfig.fine_grained: start from an MoE model with a learned router (ffn='switch', router not 'hash')"
            )
        if self.expert_segments != 1 or self.num_shared_experts:
            raise ValueError("GPTConfig.fine_grained: this config is fine-grained already; start from a plain one")
        fine = self.moe_config().fine_grained(segments, num_shared_experts)
        return replace(
            self,
            expert_segments=segments,
            num_experts=fine.num_experts,
            top_k=fine.top_k,
            num_shared_experts=fine.num_shared_experts,
            router=fine.router,
            renormalize=fine.renormalize,
        )

    def switch_twin(self, num_experts: int) -> GPTConfig:
        """The same model with Switch layers of ``num_experts`` experts of width d_ff."""
        return replace(self, ffn="switch", num_experts=num_experts)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BlockOutput:
    x: torch.Tensor  # (B, T, D) the residual stream after the block
    moe: MoEOutput | None  # the Switch layer's result (None for a dense block)


@dataclass(frozen=True)
class GPTOutput:
    logits: torch.Tensor  # (B, T, V) scores of the next character at every position
    router_loss: (
        torch.Tensor
    )  # () sum over Switch layers of MoEOutput.router_loss (weighted): add this to the task loss; 0 for dense
    aux_loss: torch.Tensor  # () sum over Switch layers of the unweighted load-balancing losses; 0 for dense
    z_loss: torch.Tensor  # () sum over Switch layers of the unweighted router z-losses; 0 for dense
    moe: tuple[MoEOutput | None, ...]  # one entry per block: its MoEOutput, or None (dense block)

    @property
    def moe_outputs(self) -> list[tuple[int, MoEOutput]]:
        """(layer, MoEOutput) for every block that routed."""
        return [(i, m) for i, m in enumerate(self.moe) if m is not None]


class HashLayer(nn.Module):
    """E experts, each token sent to one of them by a fixed hash of its token id: x (N, D) or (B, T, D), ids → MoEOutput.

    Hash layers (Roller et al. 2021, "Hash Layers For Large Sparse Models",
    arXiv:2106.04426): nothing is learned about the routing. ``expert_of``
    (V,) assigns every vocabulary entry to an expert once, at random from a
    fixed seed and balanced (each expert gets V/E entries, give or take one);
    the gate is 1 and training adds no auxiliary loss. The routing never
    changes during training, and it depends on what the token *is*, not on
    what the context has made of its vector. The result has the fields of a
    Switch layer's ``MoEOutput``: ``router_probs`` is one-hot on the hashed
    expert, ``aux_loss`` the balance measure E·Σ f·P of that routing (for the
    record; ``router_loss`` is 0), nothing is dropped.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        V, E = config.vocab_size, config.num_experts
        self.num_experts, self.dispatch = E, config.dispatch
        self.experts = Experts(E, config.d_model, config.d_ff, bias=config.bias, init_scale=config.init_scale)
        order = torch.randperm(V, generator=torch.Generator().manual_seed(0))
        table = torch.empty(V, dtype=torch.int64)
        table[order] = torch.arange(V) % E  # a random, balanced assignment of the vocabulary
        self.register_buffer("expert_of", table)  # (V,)

    def expert_output(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e alone on x (N, D) → (N, D)."""
        return self.experts.expert_output(e, x)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None) -> MoEOutput:
        if token_ids is None:
            raise ValueError("a hash layer routes by token id: call it (and its Block) with token_ids")
        tokens = x.reshape(-1, x.shape[-1])  # (N, D)
        ids = token_ids.reshape(-1)  # (N,)
        if ids.shape[0] != tokens.shape[0]:
            raise ValueError(f"token_ids {tuple(token_ids.shape)} must give one id per token of x {tuple(x.shape)}")
        index = self.expert_of[ids][:, None]  # (N, 1)
        gates = torch.ones(index.shape, dtype=torch.float32, device=x.device)  # (N, 1)
        y = dispatch(tokens, self.experts, index, gates, None, method=self.dispatch)  # (N, D)
        probs = F.one_hot(index[:, 0], self.num_experts).float()  # (N, E)
        load = torch.bincount(index[:, 0], minlength=self.num_experts)  # (E,)
        share = load.float() / len(ids)
        zero = tokens.new_zeros((), dtype=torch.float32)
        return MoEOutput(
            y=y.reshape(x.shape),
            router_loss=zero,
            aux_loss=self.num_experts * (share * share).sum(),
            z_loss=zero,
            router_logits=probs.log(),
            router_probs=probs,
            expert_index=index,
            gates=gates,
            keep=torch.ones_like(index, dtype=torch.bool),
            num_dropped=torch.zeros((), dtype=torch.int64, device=x.device),
            tokens_per_expert=load,
            capacity=None,
        )


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + ffn(ln_2(x)); (B, T, D) → BlockOutput."""

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        D = config.d_model
        self.layer = layer
        self.ln_1 = nn.LayerNorm(D)
        self.attn = CausalSelfAttention(
            D,
            config.n_heads,
            bias=config.bias,
            dropout=config.dropout,
            fast=config.fast_attention,
            rope=config.position != "learned",
        )
        self.ln_2 = nn.LayerNorm(D)
        if config.is_moe_layer(layer):
            self.ffn: nn.Module = HashLayer(config) if config.router == "hash" else MoELayer(config.moe_config())
        else:
            self.ffn = FeedForward(D, config.d_ff, bias=config.bias, activation=config.activation)
            if config.init_scale is not None:  # the Switch initialisation, as the experts have it
                for linear in (self.ffn.fc_in, self.ffn.fc_out, self.ffn.fc_gate):
                    if linear is not None:
                        init_linear_(linear.weight, linear.bias, linear.in_features, config.init_scale)
        self.ffn_dropout = nn.Dropout(config.dropout)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, (MoELayer, HashLayer))

    @property
    def is_hash(self) -> bool:
        return isinstance(self.ffn, HashLayer)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> BlockOutput:
        x = x + self.attn(self.ln_1(x))  # (B, T, D) communication: tokens talk to each other
        h = self.ln_2(x)  # (B, T, D)
        if self.is_moe:  # computation, routed: a dropped token gets y = 0 and rides the residual
            moe = self.ffn(h, token_ids) if self.is_hash else self.ffn(h)  # a hash layer routes by token id
            return BlockOutput(x + self.ffn_dropout(moe.y), moe)
        return BlockOutput(x + self.ffn_dropout(self.ffn(h)), None)  # computation, one token at a time


class GPT(nn.Module):
    """A character-level GPT, dense or Switch: idx (B, T) int64 → GPTOutput.

    Initialisation: embeddings and attention weights ~ N(0, 0.02), the
    attention output projection scaled by 1/sqrt(2·n_layers) (GPT-2), FFNs and
    experts with the Switch initialisation (``init_scale``), router as in
    ``MoELayer``, biases zero.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT expects a GPTConfig, got {type(config).__name__}")
        self.config = config
        V, T, D = config.vocab_size, config.block_size, config.d_model
        self.tok_emb = nn.Embedding(V, D)  # (V, D)
        self.pos_emb = nn.Embedding(T, D) if config.position != "rope" else None  # (T, D)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, V, bias=False)  # (V, D) weight
        for module in (self.tok_emb, self.pos_emb):
            if module is not None:
                nn.init.normal_(module.weight, std=0.02)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=0.02)
            nn.init.normal_(block.attn.proj.weight, std=0.02 / math.sqrt(2 * config.n_layers))
            for lin in (block.attn.qkv, block.attn.proj):
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
        if config.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        else:
            nn.init.normal_(self.head.weight, std=0.02)

    @property
    def moe_layers(self) -> list[MoELayer | HashLayer]:
        return [b.ffn for b in self.blocks if b.is_moe]

    def _check_ids(self, idx: torch.Tensor) -> None:
        if not isinstance(idx, torch.Tensor) or idx.ndim != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"GPT expects token ids of shape (B, T) and integer dtype, got {getattr(idx, 'dtype', type(idx).__name__)} {tuple(getattr(idx, 'shape', ()))}"
            )
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(
                f"sequence of length {T} is longer than block_size={self.config.block_size}; crop it to the last {self.config.block_size} tokens"
            )
        if T == 0:
            raise ValueError("GPT needs at least one token per sequence")

    def forward(self, idx: torch.Tensor) -> GPTOutput:
        self._check_ids(idx)
        x = self.tok_emb(idx)  # (B, T, D)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))  # (T, D) broadcast over B
        x = self.drop(x)
        moes: list[MoEOutput | None] = []
        for block in self.blocks:
            out = block(x, idx)
            x = out.x
            moes.append(out.moe)
        logits = self.head(self.ln_f(x))  # (B, T, V)
        routed = [m for m in moes if m is not None]
        zero = x.new_zeros(())
        return GPTOutput(
            logits=logits,
            router_loss=sum((m.router_loss for m in routed), zero),
            aux_loss=sum((m.aux_loss for m in routed), zero),
            z_loss=sum((m.z_loss for m in routed), zero),
            moe=tuple(moes),
        )

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        stop_token: int | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` characters after ``idx`` (B, T0) → (B, T0 + n).

        temperature 0 picks the most likely character (greedy); top_k keeps
        only the k most likely. The context is cropped to the last block_size
        tokens. With ``stop_token``, generation stops once every row has produced it.
        """
        if idx.ndim != 2:
            raise ValueError(f"generate expects idx of shape (B, T0), got {tuple(idx.shape)}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        was_training = self.training
        self.eval()
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size :]  # (B, <= T)
            logits = self(context).logits[:, -1, :].float()  # (B, V)
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)  # (B, V)
                nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(idx.device)  # (B, 1)
            idx = torch.cat([idx, nxt], dim=1)
            if stop_token is not None:
                done |= nxt[:, 0] == stop_token
                if bool(done.all()):
                    break
        self.train(was_training)
        return idx


@torch.no_grad()
def copy_dense_into_switch(dense: GPT, switch: GPT) -> GPT:
    """Copy a dense GPT's weights into a Switch GPT of the same shape; every expert gets the dense FFN.

    Attention, norms, embeddings and head are copied as they are; each
    Switch layer's experts all become copies of the dense block's FFN
    (upcycling, Komatsuzaki et al. 2022, arXiv:2212.05055); routers keep
    their own weights. With E = 1 the two models then compute the same
    function: a softmax over one expert is exactly 1; with gates that sum to
    1 (renormalised top-k) they do for every E (see ``moe.upcycle``).
    """
    dc, sc = dense.config, switch.config
    if dc.ffn != "dense" or sc.ffn != "switch":
        raise ValueError("copy_dense_into_switch(dense, switch) needs a dense GPT and a Switch GPT, in that order")
    if sc.expert_segments != 1 or sc.num_shared_experts:
        raise ValueError(
            "copy_dense_into_switch: experts are whole copies of the dense FFN, so the MoE model needs expert_segments=1 "
            "and no shared experts"
        )
    shape = (
        "vocab_size",
        "block_size",
        "d_model",
        "n_layers",
        "n_heads",
        "d_ff",
        "bias",
        "tie_embeddings",
        "activation",
        "position",
    )
    differ = [f"{k}: {getattr(dc, k)} vs {getattr(sc, k)}" for k in shape if getattr(dc, k) != getattr(sc, k)]
    if differ:
        raise ValueError(f"copy_dense_into_switch: the models differ in shape ({'; '.join(differ)})")
    state = dense.state_dict()
    own = switch.state_dict()
    for name in own:
        if name in state and own[name].shape == state[name].shape:
            own[name].copy_(state[name])
    for block, dense_block in zip(switch.blocks, dense.blocks):
        if block.is_moe:
            block.ffn.experts.copy_feed_forward_(dense_block.ffn)
    return switch


def upcycle_gpt(dense: GPT, num_experts: int, **moe_options) -> GPT:
    """Sparse upcycling of a trained dense GPT (Komatsuzaki et al. 2022, arXiv:2212.05055) → a new MoE GPT.

    The MoE model has the dense model's config with ``ffn="switch"``,
    ``num_experts`` and any other ``moe_options`` (e.g. ``router="top_k",
    top_k=2``); its weights are the dense model's (``copy_dense_into_switch``),
    every expert a copy of its block's FFN, the routers fresh. The dense model
    is left as it is.
    """
    if not isinstance(dense, GPT) or dense.config.ffn != "dense":
        raise ValueError("upcycle_gpt expects a trained dense GPT (ffn='dense')")
    config = replace(dense.config, ffn="switch", num_experts=num_experts, **moe_options)
    return copy_dense_into_switch(dense, GPT(config).to(next(dense.parameters()).device))
