"""Auxiliary losses that keep the clinic running: no idle doctors, no crowded ones.

Legend: N tokens, E experts, K choices per token. All three are unweighted:
multiply by their coefficient (α = 1e-2 for balance, 1e-3 for z) before adding
them to the training loss.

    load_balancing_loss   Switch Transformer: E · Σ_i f_i · P_i, 1.0 when perfectly balanced
                          (group_size: the same per sequence or micro-batch, averaged; DeepSeek-V3's sequence-wise loss)
    load_balancing_loss_from_counts   f from counts gathered elsewhere: the global batch (Qwen, arXiv:2501.11873)
    router_z_loss         ST-MoE: mean over tokens of logsumexp(logits)²
    importance_loss       Shazeer et al. 2017: CV(importance)², 0 when balanced

Where the balance is measured matters as much as the formula. Over a whole
batch of many sequences, an expert may take all of one domain's tokens as long
as the domains add up to an even load; measured per sequence (or per small
micro-batch of one domain) the loss asks every expert to take a share of every
sequence, which works against specialising by domain (Qiu et al. 2025,
"Demons in the Detail", arXiv:2501.11873).
"""

from __future__ import annotations

import torch

__all__ = ["load_balancing_loss", "load_balancing_loss_from_counts", "router_z_loss", "importance_loss", "expert_fraction"]


def expert_fraction(expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """f (E,): the share of all (token, choice) assignments that went to each expert.

    expert_index (N,) or (N, K). Counts, not probabilities: f is not
    differentiable. It sums to 1 (each of the N·K assignments counts 1/(N·K)).
    """
    if expert_index.is_floating_point() or expert_index.dtype == torch.bool:
        raise ValueError(f"expert_index must hold integer expert ids, got dtype {expert_index.dtype}")
    flat = expert_index.reshape(-1).long()
    if flat.numel() == 0:
        raise ValueError("expert_index is empty: no tokens to balance")
    if flat.min() < 0 or flat.max() >= num_experts:
        raise ValueError(
            f"expert_index values must be in [0, {num_experts}), got values from {int(flat.min())} to {int(flat.max())}"
        )
    return torch.bincount(flat, minlength=num_experts).float() / flat.numel()  # (E,)


def load_balancing_loss(router_probs: torch.Tensor, expert_index: torch.Tensor, *, group_size: int | None = None) -> torch.Tensor:
    """The Switch Transformer's auxiliary load-balancing loss (arXiv:2101.03961, eq. 4-6), unweighted.

        loss = E · Σ_i f_i · P_i

    router_probs (N, E): softmax probabilities; expert_index (N,) or (N, K): the
    chosen experts. f_i = share of assignments routed to expert i (from counts,
    no gradient); P_i = mean router probability of expert i (differentiable).
    Minimising it pushes probability away from experts that already get many
    tokens. Under perfectly uniform routing f_i = P_i = 1/E and the loss is 1.0;
    if every token goes to one expert with probability 1 it is E.

    Top-K convention: f counts all K choices and divides by N·K, so f sums to 1
    and the loss is 1.0 under uniform routing for every K. Hugging Face's
    Mixtral ``load_balancing_loss_func`` divides the counts by N only, so its f
    sums to K and its value is K times ours (its minimum is K, not 1).
    Count what the router chose (before any capacity dropping).

    ``group_size`` G: split the N tokens into N/G groups of G consecutive tokens
    (a sequence, or a micro-batch), compute the loss on each group and average:
    E · mean_g Σ_i f_gi · P_gi. With G = T this is DeepSeek-V3's sequence-wise
    balance loss (arXiv:2412.19437, §2.1.2) and Hugging Face's Switch loss over
    (G, T, E) groups; it asks for balance inside every group, which is stricter
    than balance over the batch. None: one group, all N tokens.
    """
    if not isinstance(router_probs, torch.Tensor) or router_probs.ndim != 2:
        raise ValueError(f"router_probs must have shape (N, E), got {getattr(router_probs, 'shape', router_probs)!r}")
    if expert_index.ndim not in (1, 2) or expert_index.shape[0] != router_probs.shape[0]:
        raise ValueError(
            f"expert_index must have shape (N,) or (N, K) with N={router_probs.shape[0]}, got {tuple(expert_index.shape)}"
        )
    num_tokens, num_experts = router_probs.shape
    if group_size is None or group_size == num_tokens:
        f = expert_fraction(expert_index, num_experts).to(router_probs.device)  # (E,), no gradient
        p = router_probs.float().mean(dim=0)  # (E,)
        return num_experts * torch.sum(f * p)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or num_tokens % group_size:
        raise ValueError(f"group_size must be a positive int that divides the N={num_tokens} tokens, got {group_size!r}")
    expert_fraction(expert_index, num_experts)  # the same checks on the indices
    index = expert_index.reshape(num_tokens, -1).long()  # (N, K)
    groups, k = num_tokens // group_size, index.shape[1]
    one_hot = torch.zeros(num_tokens, num_experts, device=router_probs.device).scatter_add_(
        1, index.to(router_probs.device), torch.ones(index.shape, device=router_probs.device)
    )  # (N, E) choices per token
    f = one_hot.view(groups, group_size, num_experts).sum(1) / (group_size * k)  # (G, E), each row sums to 1
    p = router_probs.float().view(groups, group_size, num_experts).mean(1)  # (G, E)
    return num_experts * (f * p).sum(-1).mean()


def load_balancing_loss_from_counts(router_probs: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """The load-balancing loss with f taken from counts gathered outside this batch, unweighted.

        loss = E · Σ_i f_i · P_i,    f_i = c_i / Σ_j c_j  (from counts, no gradient),   P_i = mean of router_probs[:, i]

    router_probs (N, E): this micro-batch's probabilities (differentiable);
    tokens_per_expert (E,): assignments per expert counted over the *global*
    batch, e.g. summed over every micro-batch of a gradient-accumulation step
    and over data-parallel ranks (Qiu et al. 2025, arXiv:2501.11873: "global-batch"
    balance). With this micro-batch's own counts it is ``load_balancing_loss``.
    """
    if not isinstance(router_probs, torch.Tensor) or router_probs.ndim != 2:
        raise ValueError(f"router_probs must have shape (N, E), got {getattr(router_probs, 'shape', router_probs)!r}")
    num_experts = router_probs.shape[-1]
    if not isinstance(tokens_per_expert, torch.Tensor) or tokens_per_expert.shape != (num_experts,):
        raise ValueError(
            f"tokens_per_expert must be a tensor of shape (E,) = ({num_experts},), got {tuple(getattr(tokens_per_expert, 'shape', ()))}"
        )
    counts = tokens_per_expert.detach().float().to(router_probs.device)  # (E,)
    if (counts < 0).any() or counts.sum() <= 0:
        raise ValueError(f"tokens_per_expert must be counts >= 0 with a positive total, got {tokens_per_expert.tolist()}")
    f = counts / counts.sum()  # (E,)
    p = router_probs.float().mean(dim=0)  # (E,)
    return num_experts * torch.sum(f * p)


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """The router z-loss of ST-MoE (Zoph et al. 2022, arXiv:2202.08906, eq. 5), unweighted.

        L_z = (1/N) Σ_tokens (log Σ_j exp(x_j))²

    router_logits (N, E) (leading dimensions, e.g. (B, T, E), are all tokens).
    It penalises large logits, which keeps the router's softmax out of the
    range where float round-off hurts, and so stabilises training.
    """
    if not isinstance(router_logits, torch.Tensor) or router_logits.ndim < 2:
        raise ValueError(f"router_logits must have shape (N, E), got {getattr(router_logits, 'shape', router_logits)!r}")
    log_z = torch.logsumexp(router_logits.float(), dim=-1)  # (N,)
    return (log_z**2).mean()


def importance_loss(router_probs_or_gates: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Shazeer et al.'s importance loss (arXiv:1701.06538, eq. 6-7), unweighted: CV(Importance)².

    Importance_i = Σ_tokens G_i(x) (E,), the total gate weight expert i gets.
    CV = standard deviation / mean over experts (population std, as in their
    code), so the loss is 0 when every expert gets the same total weight.
    Input (N, E): gates (zero for experts not chosen; see ``Routing.gate_matrix``)
    or probabilities. ``eps`` guards an all-zero importance.
    """
    if not isinstance(router_probs_or_gates, torch.Tensor) or router_probs_or_gates.ndim != 2:
        raise ValueError(
            f"expected gates or probabilities of shape (N, E), got {getattr(router_probs_or_gates, 'shape', router_probs_or_gates)!r}"
        )
    importance = router_probs_or_gates.float().sum(dim=0)  # (E,)
    if importance.numel() == 1:
        return importance.sum() * 0.0  # one expert is always balanced
    mean = importance.mean()
    variance = ((importance - mean) ** 2).mean()
    return variance / (mean**2 + eps)
