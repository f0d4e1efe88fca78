"""Does the distributed layer compute what one process computes? Measured, every gradient.

``compare_with_one_process(rank, world_size, cases)`` runs on every rank
(``launch.run_on_processes`` starts it): each rank builds the same seeded
``MoELayer`` and the same global batch, computes the one-process reference
itself, then its share with ``ExpertParallelMoE`` and compares outputs, input
gradients, the router's gradient (after the all-reduce) and its own experts'
gradients. It returns the largest absolute differences; the tests and lesson
09 print them.

``failure_messages`` provokes the errors a user can meet (a world size that
does not divide E, configs that differ between ranks, a rank that skips a
forward) and returns what each rank saw, and how long the missed exchange
took to fail.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..losses import load_balancing_loss, router_z_loss
from ..moe import MoEConfig, MoELayer
from .grads import all_reduce_replicated_grads
from .layer import ExpertParallelMoE

__all__ = ["EquivalenceCase", "compare_with_one_process", "failure_messages"]


@dataclass(frozen=True)
class EquivalenceCase:
    router: str = "switch"  # any MoEConfig.router: "switch" (top-1), "top_k", "mixtral", "sigmoid", ...
    top_k: int = 1  # K
    capacity_factor: float | None = None  # None: dropless; a number: capacity-padded (capacity per rank)
    idle_rank: bool = False  # the last rank's experts receive no token at all
    tokens_per_rank: int = 24  # N on each rank
    uneven: bool = False  # rank r has tokens_per_rank + 3·r tokens (dropless only)
    experts_per_rank: int = 2  # E = experts_per_rank · W
    d_model: int = 16  # D (a multiple of 4 floats: the grouped-matmul path works too)
    d_ff: int = 32  # F
    num_shared_experts: int = 0  # replicated experts every token visits (DeepSeekMoE)
    shared_expert_gate: bool = False  # Qwen2-MoE's sigmoid gate on the shared experts
    seed: int = 0

    def config(self, world_size: int) -> MoEConfig:
        return MoEConfig(
            d_model=self.d_model,
            d_ff=self.d_ff,
            num_experts=self.experts_per_rank * world_size,
            top_k=self.top_k,
            capacity_factor=self.capacity_factor,
            router=self.router,
            num_shared_experts=self.num_shared_experts,
            shared_expert_gate=self.shared_expert_gate,
        )


def _rows(case: EquivalenceCase, world_size: int) -> list[int]:
    return [case.tokens_per_rank + (3 * r if case.uneven else 0) for r in range(world_size)]


def _reference(layer: MoELayer, x: torch.Tensor, upstream: torch.Tensor, sizes: list[int], per_call: bool):
    """One process: y (N_g, D), the losses and every gradient, for loss = Σ y·upstream + the weighted router losses."""
    x = x.clone().requires_grad_(True)
    cfg = layer.config
    if per_call:  # capacity counted per rank's tokens: one call per rank's chunk, the losses over the global batch
        outs = [layer(chunk) for chunk in torch.split(x, sizes)]
        y = torch.cat([o.y for o in outs])
        aux = load_balancing_loss(torch.cat([o.router_probs for o in outs]), torch.cat([o.expert_index for o in outs]))
        z = router_z_loss(torch.cat([o.router_logits for o in outs]))
        dropped = [int(o.num_dropped) for o in outs]
    else:
        out = layer(x)
        y, aux, z, dropped = out.y, out.aux_loss, out.z_loss, None
    loss = (y * upstream).sum() + cfg.aux_loss_coef * aux + cfg.z_loss_coef * z
    loss.backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    return y.detach(), x.grad, grads, aux.item(), z.item(), dropped


def compare_with_one_process(rank: int, world_size: int, cases: list[EquivalenceCase]) -> list[dict]:
    """For each case: the largest |difference| between this rank's ``ExpertParallelMoE`` and one ``MoELayer``.

    Returns one dict per case: the case's settings, ``max_diff`` (name → float:
    y, dx, router, each expert parameter, aux_loss, z_loss), whether every
    local expert got a gradient (zeros, not None, even when idle), the rows
    this rank received and the tokens it dropped (with the reference's count).
    """
    results = []
    for case in cases:
        cfg = case.config(world_size)
        if case.uneven and cfg.capacity_factor is not None:
            raise ValueError(
                "capacity-padded expert parallelism needs the same number of tokens on every rank; use uneven only when dropless"
            )
        torch.manual_seed(case.seed)
        ref = MoELayer(cfg)
        sizes = _rows(case, world_size)
        g = torch.Generator().manual_seed(case.seed + 1)
        x = torch.randn(sum(sizes), cfg.d_model, generator=g)  # (N_g, D) the global batch, rank 0's tokens first
        upstream = torch.randn(sum(sizes), cfg.d_model, generator=g)  # (N_g, D) dL/dy, fixed
        if case.idle_rank:  # a constant feature, and the last rank's experts strongly disliked on it
            x[:, 0] = 3.0
            with torch.no_grad():
                ref.w_router[0, cfg.num_experts - case.experts_per_rank :] = -30.0
        ep = ExpertParallelMoE.from_layer(ref, group=None)
        y_ref, dx_ref, grads_ref, aux_ref, z_ref, dropped_ref = _reference(
            ref, x, upstream, sizes, per_call=cfg.capacity_factor is not None
        )

        start = sum(sizes[:rank])
        mine = slice(start, start + sizes[rank])
        x_local = x[mine].clone().requires_grad_(True)
        out = ep(x_local)
        loss = (out.y * upstream[mine]).sum() + out.router_loss
        loss.backward()
        all_reduce_replicated_grads(ep)

        experts = slice(ep.first_expert, ep.first_expert + ep.num_local_experts)
        diff = {
            "y": (out.y.detach() - y_ref[mine]).abs().max().item(),
            "dx": (x_local.grad - dx_ref[mine]).abs().max().item(),
            "router": (ep.w_router.grad - grads_ref["w_router"]).abs().max().item(),
            "aux_loss": abs(out.aux_loss.item() - aux_ref),
            "z_loss": abs(out.z_loss.item() - z_ref),
        }
        for name, p in ep.named_parameters():  # the shared experts and their gate: replicated, gradients summed over ranks
            if name.startswith("shared_experts.") or name == "w_shared_gate":
                diff[name] = (p.grad - grads_ref[name]).abs().max().item()
        complete = True
        for name, p in ep.experts.named_parameters():
            if p.grad is None:
                complete = False
                continue
            diff[f"experts.{name}"] = (p.grad - grads_ref[f"experts.{name}"][experts]).abs().max().item()
        results.append(
            {
                "case": asdict(case),
                "rank": rank,
                "world_size": world_size,
                "max_diff": diff,
                "expert_grads_present": complete,
                "received_rows": int(out.received.sum()),
                "sent_tokens": out.sent_tokens.tolist(),
                "dropped": int(out.num_dropped),
                "dropped_reference": None if dropped_ref is None else dropped_ref[rank],
                "aux_loss": out.aux_loss.item(),
            }
        )
    return results


def failure_messages(rank: int, world_size: int, wait_seconds: float = 3.0) -> dict:
    """Provoke each error a user can meet and return the messages this rank saw (→ dict of name → message).

    ``missed_exchange``: rank 0 runs a forward that the other ranks skip (they
    wait instead), in a group whose collectives time out after ``wait_seconds``;
    ``missed_exchange_seconds`` is how long rank 0 waited before its error.
    """
    seen: dict = {}
    E = 2 * world_size
    try:
        ExpertParallelMoE(MoEConfig(d_model=8, d_ff=16, num_experts=E + 1))
    except ValueError as err:
        seen["indivisible"] = str(err)
    try:
        ExpertParallelMoE(MoEConfig(d_model=8, d_ff=16 if rank == 0 else 32, num_experts=E))
    except ValueError as err:
        seen["mismatched_config"] = str(err)
    short = dist.new_group(timeout=timedelta(seconds=wait_seconds))
    layer = ExpertParallelMoE(MoEConfig(d_model=8, d_ff=16, num_experts=E), group=short)
    if rank == 0:
        t0 = time.perf_counter()
        try:
            layer(torch.randn(6, 8))
        except RuntimeError as err:
            seen["missed_exchange"] = str(err)
        seen["missed_exchange_seconds"] = time.perf_counter() - t0
    else:
        time.sleep(wait_seconds + 2.0)  # alive, but never joining the exchange
    return seen
