"""An MoE layer whose experts live on W processes: each rank holds E/W of them.

Legend: N tokens on this rank, N_g on all ranks, D model width, F expert
width, E experts, E_l = E/W experts per rank, K choices per token, C capacity,
M assignments this rank sends, R rows it receives.

Referrals between hospitals: every rank has the whole GP (the router, a copy
of the same weights on every rank) but only its own doctors. A forward pass::

    tokens (N, D) → router, routing: expert_index, gates (N, K)      every rank, on its own tokens
      → sort the N·K assignments by expert (sort_by_expert)           rows for rank q are one block
      → [dropless] exchange counts: who sends how many to whom       (W, E_l) numbers
      → all_to_all #1: each row travels to its expert's rank          (M, D) → (R, D)
      → the local experts run on what arrived                         (R, D) → (R, D)
      → all_to_all #2: each output travels back                       (R, D) → (M, D)
      → combine_rows: weigh by the gates, add up per token            → y (N, D)

Two variants (``MoEConfig.capacity_factor``):

* None, **dropless** (the default; MegaBlocks, torchtitan, Megatron-Core): every
  assignment travels, so split sizes are uneven and must be exchanged first.
  Equals one ``MoELayer`` on the global batch (all ranks' tokens, rank 0's first).
* a number, **capacity-padded** (GShard, DeepSpeed-MoE, Tutel): every rank
  packs its tokens into an (E, C, D) buffer with C = ceil(K·N/E·factor) slots
  per expert, counted on this rank's N tokens; full or empty, every slot
  travels, so all splits are equal and no counts are exchanged. Over-capacity
  assignments are dropped as ``MoELayer`` drops them. Equals one ``MoELayer``
  run on each rank's tokens as a separate call (capacity counted per call),
  with the losses of the global batch. Needs the same N on every rank.

Losses and gradients (the convention that makes training equal one process):
the global loss is a sum over the global batch divided by N_g, and each
rank's part is the sum over its own tokens divided by N_g. Every rank calls
backward on its part; then the expert gradients are already complete (the
backward exchange brings every rank's contribution home) and the replicated
parameters' gradients are summed over ranks (``grads.all_reduce_replicated_grads``).
The result's ``aux_loss`` and ``z_loss`` have the global batch's value (what one
process would report) and this rank's part as gradient; ``loss`` (the weighted
sum a training loop adds) is this rank's part, value and gradient, so the
parts of all ranks add up to the one-process loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..dispatch import combine_rows, dispatch, sort_by_expert, sort_dispatch
from ..moe import MoEConfig, MoELayer, MoEOutput
from ..routing import capacity_mask, expert_capacity
from .exchange import all_to_all, exchange_counts
from .group import explain_collective_errors, group_rank_zero, require_process_group, same_on_every_rank

__all__ = ["ExpertParallelMoE", "ExpertParallelOutput", "shard_moe_layers", "expert_parallel_layers", "gather_full_state_dict"]


@dataclass(frozen=True)
class ExpertParallelOutput(MoEOutput):
    """``MoEOutput`` for this rank's tokens, plus what the exchange moved.

    Per rank: y, expert_index, gates, keep, num_dropped, tokens_per_expert and
    the router tensors are this rank's N tokens. Global: aux_loss and z_loss
    (values of the whole batch; see the module docstring for their gradients).
    """

    tokens_per_rank: torch.Tensor  # (W,) int64 assignments routed to each rank's experts, over all ranks (before dropping)
    sent: torch.Tensor  # (W,) int64 rows this rank sent to each rank (capacity-padded: full and empty slots)
    sent_tokens: torch.Tensor  # (W,) int64 token rows among them (kept assignments); equals `sent` when dropless
    received: torch.Tensor  # (W,) int64 rows this rank received from each rank (padded: full and empty slots)
    exchange_seconds: float  # wall time of this forward's collectives: counts, both all-to-alls, loss statistics
    expert_seconds: float  # wall time of the local experts on the rows that arrived (forward)


class ExpertParallelMoE(MoELayer):
    """``MoELayer`` with its experts spread over the ranks of ``group``: (B, T, D) or (N, D) → ExpertParallelOutput.

    Holds the router (replicated: broadcast from the group's first rank at
    construction) and experts rank·E_l … (rank+1)·E_l − 1 as ``Experts(E_l, ...)``.
    ``from_layer(layer)`` copies a single-process ``MoELayer``'s weights (every
    rank must pass the same layer). Every rank must call forward (and backward)
    the same number of times: these are collectives.
    """

    def __init__(self, config: MoEConfig, *, group: Any = None) -> None:
        if not isinstance(config, MoEConfig):
            raise TypeError(f"ExpertParallelMoE expects a MoEConfig, got {type(config).__name__}")
        unsupported = {"balance_scope": (config.balance_scope, "batch"), "bias_update_rate": (config.bias_update_rate, 0.0)}
        for name, (value, plain) in unsupported.items():
            if value != plain:
                raise ValueError(
                    f"ExpertParallelMoE does not support MoEConfig.{name}={value!r} (its losses and loads are summed over "
                    f"the global batch); use {name}={plain!r}, or a single-process MoELayer"
                )
        rank, world = require_process_group(group, "ExpertParallelMoE")
        if config.num_experts % world:
            divisors = [w for w in range(1, config.num_experts + 1) if config.num_experts % w == 0]
            raise ValueError(
                f"ExpertParallelMoE: {config.num_experts} experts cannot be shared evenly by {world} processes; "
                f"use a world size that divides the number of experts ({divisors}), or change num_experts"
            )
        same_on_every_rank(config, "MoEConfig of ExpertParallelMoE", group)
        nn.Module.__init__(self)  # not MoELayer.__init__: this rank holds only its own experts
        self.config, self.group, self.rank, self.world_size = config, group, rank, world
        self.num_local_experts = config.num_experts // world  # E_l
        self.first_expert = rank * self.num_local_experts
        # the router, shared experts and selection bias are replicated; the routed experts, only this rank's share
        self._make_parameters(self.num_local_experts)
        with torch.no_grad(), explain_collective_errors("broadcasting the router weights", group):
            for p in _replicated_of(self):
                dist.broadcast(p.data, src=group_rank_zero(group), group=group)

    @classmethod
    def from_layer(cls, layer: MoELayer, *, group: Any = None) -> ExpertParallelMoE:
        """This rank's share of ``layer``: its router and experts rank·E_l … (rank+1)·E_l − 1 (copies)."""
        if not isinstance(layer, MoELayer) or isinstance(layer, ExpertParallelMoE):
            raise TypeError(f"from_layer expects a single-process MoELayer, got {type(layer).__name__}")
        ep = cls(layer.config, group=group)
        mine = slice(ep.first_expert, ep.first_expert + ep.num_local_experts)
        with torch.no_grad():
            for mine_t, theirs in zip(_replicated_of(ep), _replicated_of(layer)):
                mine_t.copy_(theirs)
            for name, p in ep.experts.named_parameters():
                p.copy_(getattr(layer.experts, name)[mine])
        return ep.to(layer.w_router.device)

    @property
    def capacity_padded(self) -> bool:
        """True when every (rank, expert) pair exchanges C slots (a capacity factor is set); False: dropless."""
        return self.config.capacity_factor is not None

    def expert_output(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e alone on x (N, D) → (N, D); e is a global expert index and must live on this rank."""
        if not (isinstance(e, int) and self.first_expert <= e < self.first_expert + self.num_local_experts):
            owner = e // self.num_local_experts if isinstance(e, int) and 0 <= e < self.config.num_experts else None
            raise ValueError(
                f"expert {e!r} does not live on rank {self.rank} (it holds experts {self.first_expert}..."
                f"{self.first_expert + self.num_local_experts - 1}"
                + (f"; expert {e} is on rank {owner})" if owner is not None else ")")
            )
        return self.experts.expert_output(e - self.first_expert, x)

    # -- the forward pass ---------------------------------------------------

    def _route(self, tokens: torch.Tensor):
        """The same routing as ``MoELayer.forward``: (router_logits (N, E), Routing)."""
        router_in = self.jitter(tokens)  # (N, D)
        logits = self.router(router_in)  # (N, E) float32
        return logits, self.route(logits, router_in)

    def _local_experts(self, rows: torch.Tensor, local_expert: torch.Tensor) -> torch.Tensor:
        """This rank's experts on the rows that arrived: rows (R, D), local_expert (R,) → (R, D), ungated.

        The receiving rank is itself a small MoE whose routing is already decided,
        so lesson 06's dispatch runs it. With no rows at all, every local expert
        still runs (on nothing): its gradient is then zero rather than None, and
        the backward still reaches the first exchange, which every rank must join.
        """
        ones = rows.new_ones(rows.shape[0], 1)  # gates are applied at home, by the combine
        if rows.shape[0] == 0:
            return sort_dispatch(rows, self.experts, local_expert[:, None], ones)
        return dispatch(rows, self.experts, local_expert[:, None], ones, method=self.config.dispatch)

    def _dropless(self, tokens, expert_index, gates):
        W, E_l, E = self.world_size, self.num_local_experts, self.config.num_experts
        num_tokens, k = expert_index.shape
        order, counts = sort_by_expert(expert_index.reshape(-1), E)  # (N·K,), (E,) assignments by expert
        token, gate = order // k, gates.reshape(-1)[order]  # (M,) each, M = N·K
        t0 = time.perf_counter()
        received = exchange_counts(counts, self.group)  # (W, E_l): rows rank s sends to my j-th expert
        send = counts.view(W, E_l).sum(1)  # (W,) rows for each rank
        send_list, recv_list = send.tolist(), received.sum(1).tolist()  # split sizes: Python ints (a host sync on GPUs)
        rows = all_to_all(tokens.index_select(0, token), recv_list, send_list, self.group)  # (R, D) by source rank, then expert
        t1 = time.perf_counter()
        local = torch.arange(E_l, device=tokens.device).repeat(W).repeat_interleave(received.reshape(-1))  # (R,)
        out = self._local_experts(rows, local)  # (R, D)
        t2 = time.perf_counter()
        back = all_to_all(out, send_list, recv_list, self.group)  # (M, D) in the order it was sent
        t3 = time.perf_counter()
        y = combine_rows(back, token, gate, num_tokens)  # (N, D)
        traffic = dict(sent=send, sent_tokens=send, received=received.sum(1))
        return y, traffic, (t1 - t0) + (t3 - t2), t2 - t1

    def _padded(self, tokens, expert_index, gates, position, keep, capacity):
        W, E_l, E = self.world_size, self.num_local_experts, self.config.num_experts
        D, C = tokens.shape[1], capacity
        n_idx, j_idx = keep.nonzero(as_tuple=True)  # kept assignments (n, j), in token order
        expert = expert_index[n_idx, j_idx]  # (M,)
        slot = expert * C + position[n_idx, j_idx]  # (M,) row in the (E·C) buffer: expert-major, so rank-major too
        buffer = tokens.new_zeros(E * C, D).index_copy(0, slot, tokens.index_select(0, n_idx))  # (E·C, D)
        t0 = time.perf_counter()
        with explain_collective_errors("checking that every rank has the same capacity", self.group):
            both = torch.tensor([C, -C], device=tokens.device)
            dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        if int(both[0]) != C or int(-both[1]) != C:
            raise ValueError(
                f"capacity-padded expert parallelism needs the same capacity on every rank (the same number of "
                f"tokens per call): rank {self.rank} has C={C}, others range from {int(-both[1])} to {int(both[0])}"
            )
        equal = [E_l * C] * W
        rows = all_to_all(buffer, equal, equal, self.group)  # (W·E_l·C, D): [source rank][local expert][slot]
        t1 = time.perf_counter()
        local = torch.arange(E_l, device=tokens.device).repeat_interleave(C).repeat(W)  # (W·E_l·C,)
        out = self._local_experts(rows, local)  # empty slots are computed too: the price of equal splits
        t2 = time.perf_counter()
        back = all_to_all(out, equal, equal, self.group)  # (E·C, D)
        t3 = time.perf_counter()
        y = combine_rows(back.index_select(0, slot), n_idx, gates[n_idx, j_idx], tokens.shape[0])  # (N, D)
        full = torch.full((W,), E_l * C, dtype=torch.int64, device=tokens.device)
        traffic = dict(sent=full, sent_tokens=torch.bincount(expert // E_l, minlength=W), received=full.clone())
        return y, traffic, (t1 - t0) + (t3 - t2), t2 - t1

    def _global_losses(self, logits, probs, expert_index):
        """aux and z of the global batch, each as (value with this rank's gradient, this rank's part)."""
        E, k = self.config.num_experts, expert_index.shape[1]
        log_z = torch.logsumexp(logits, dim=-1)  # (N,)
        counts = torch.bincount(expert_index.reshape(-1), minlength=E)  # (E,) what the router chose, before dropping
        stats = torch.cat(
            [
                counts.double(),
                probs.detach().sum(0).double(),
                (log_z.detach() ** 2).sum().double()[None],
                torch.tensor([float(logits.shape[0])], dtype=torch.float64, device=logits.device),
            ]
        )  # (2E + 2,)
        with explain_collective_errors("summing the router statistics over ranks (all_reduce)", self.group):
            dist.all_reduce(stats, group=self.group)
        counts_g, probs_g, z_sum_g, n_g = stats[:E], stats[E : 2 * E], stats[2 * E], stats[2 * E + 1]
        f = (counts_g / (n_g * k)).float()  # (E,) share of all assignments, as in load_balancing_loss
        aux_part = E * (f * probs.sum(0)).sum() / n_g.float()  # this rank's Σ over its tokens, / N_g
        z_part = (log_z**2).sum() / n_g.float()
        aux_value = (E * (f.double() * probs_g).sum() / n_g).float()
        z_value = (z_sum_g / n_g).float()
        # value of the global batch, gradient of this rank's part: the ranks' gradients add up to the global one
        aux = aux_part + (aux_value - aux_part).detach()
        z = z_part + (z_value - z_part).detach()
        return aux, z, aux_part, z_part, counts_g.long()

    def forward(self, x: torch.Tensor) -> ExpertParallelOutput:
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.ndim not in (2, 3) or x.shape[-1] != cfg.d_model:
            raise ValueError(
                f"ExpertParallelMoE expects x of shape (B, T, {cfg.d_model}) or (N, {cfg.d_model}), got {tuple(getattr(x, 'shape', ()))}"
            )
        tokens = x.reshape(-1, cfg.d_model)  # (N, D)
        logits, routing = self._route(tokens)
        probs = routing.router_probs if cfg.router == "sigmoid" else F.softmax(logits, dim=-1)  # (N, E), as MoELayer
        expert_index, gates = routing.expert_index, routing.gates  # (N, K)
        if cfg.capacity_factor is None:
            capacity = None
            keep = torch.ones_like(expert_index, dtype=torch.bool)
            y, traffic, exchange_s, expert_s = self._dropless(tokens, expert_index, gates)
        else:
            capacity = expert_capacity(
                tokens.shape[0], cfg.num_experts, cfg.capacity_factor, top_k=cfg.top_k, min_capacity=cfg.min_capacity
            )
            assignment = capacity_mask(expert_index, cfg.num_experts, capacity)
            keep = assignment.keep
            y, traffic, exchange_s, expert_s = self._padded(tokens, expert_index, gates, assignment.position, keep, capacity)
        if self.shared_experts is not None:  # replicated: no exchange, every rank's own tokens
            y = y + self.shared_output(tokens)
        t0 = time.perf_counter()
        aux, z, aux_part, z_part, counts_g = self._global_losses(logits, probs, expert_index)
        exchange_s += time.perf_counter() - t0
        weighted = {"router_loss": cfg.aux_loss_coef * aux_part + cfg.z_loss_coef * z_part}
        return ExpertParallelOutput(
            y=y.reshape(x.shape),
            **weighted,
            aux_loss=aux,
            z_loss=z,
            router_logits=logits,
            router_probs=probs,
            expert_index=expert_index,
            gates=gates,
            keep=keep,
            num_dropped=(~keep.any(dim=-1)).sum(),
            tokens_per_expert=routing.tokens_per_expert(),
            capacity=capacity,
            tokens_per_rank=counts_g.view(self.world_size, -1).sum(1),
            exchange_seconds=exchange_s,
            expert_seconds=expert_s,
            **traffic,
        )

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"rank={self.rank}/{self.world_size}, experts {self.first_expert}..{self.first_expert + self.num_local_experts - 1} "
            f"of {c.num_experts}, router={c.router!r}, top_k={c.top_k}, "
            + ("dropless" if c.capacity_factor is None else f"capacity-padded, capacity_factor={c.capacity_factor}")
        )


def _replicated_of(layer: MoELayer) -> list[torch.Tensor]:
    """The tensors every rank holds a copy of: router, noise, shared experts and their gate, the selection bias."""
    shared = list(layer.shared_experts.parameters()) if layer.shared_experts is not None else []
    return [t for t in (layer.w_router, layer.w_noise, layer.w_shared_gate, *shared, layer.expert_bias) if t is not None]


def shard_moe_layers(model: nn.Module, *, group: Any = None) -> nn.Module:
    """Replace every ``MoELayer`` inside ``model`` by this rank's ``ExpertParallelMoE`` share of it (in place).

    Build the model with the same seed on every rank first: the shares are
    copies of the full layers, so the replicated parameters must agree
    (``grads.check_replicas_in_sync`` verifies it). Returns ``model``.
    """
    require_process_group(group, "shard_moe_layers")
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, MoELayer) and not isinstance(child, ExpertParallelMoE)
    ]
    if isinstance(model, MoELayer):
        raise TypeError(
            "shard_moe_layers expects a model that contains MoELayers; for a layer itself use ExpertParallelMoE.from_layer"
        )
    for parent, name, child in targets:
        setattr(parent, name, ExpertParallelMoE.from_layer(child, group=group))
    return model


def expert_parallel_layers(model: nn.Module) -> list[ExpertParallelMoE]:
    """Every ``ExpertParallelMoE`` inside ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, ExpertParallelMoE)]


def gather_full_state_dict(model: nn.Module, *, group: Any = None) -> dict[str, torch.Tensor]:
    """The state dict of the whole model, every expert included, as one process would hold it (a collective).

    Each ``ExpertParallelMoE``'s expert tensors are gathered from all ranks and
    concatenated in rank order (rank q holds experts q·E_l …), so the result
    loads into the single-process model the sharded one was made from.
    """
    _, world = require_process_group(group, "gather_full_state_dict")
    state = model.state_dict()
    for prefix, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, ExpertParallelMoE)):
        for name, p in layer.experts.named_parameters():
            parts = [torch.empty_like(p) for _ in range(world)]
            with explain_collective_errors("gathering the experts (all_gather)", group):
                dist.all_gather(parts, p.detach().contiguous(), group=group)
            state[f"{prefix}.experts.{name}" if prefix else f"experts.{name}"] = torch.cat(parts)
    return state
