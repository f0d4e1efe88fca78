# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Exercises 10 · The modern hospital
#
# Five pieces of the MoE layers that 2024–2026 models use: Mixtral's gate, DeepSeek-V3's gate
# and the bias update that balances it without a loss, shared and routed experts together
# (DeepSeekMoE), and upcycling a trained dense FFN. Replace each stub with your code, then run
# the collapsed check cell below it.
#
# Shape letters: **N** tokens, **D** model width, **E** experts, **K** (or k) choices per token.

# %%
import torch

# %% [markdown]
# ## Exercise 10.1 · Mixtral's gate
#
# Mixtral (Jiang et al. 2024, arXiv:2401.04088) weighs each token's k chosen experts by a softmax
# over **the k chosen logits alone**:
#
# $$G(x) = \mathrm{softmax}\big(\mathrm{TopK}(x \cdot W_g)\big)$$
#
# where TopK keeps the k largest logits and drops the rest (sets them to $-\infty$).
#
# Write `mixtral_gate(router_logits, k)`:
#
# - `router_logits`: (N, E); return `(expert_index, gates)`, both (N, k): each token's k experts
#   with the largest logits, and their gates, which sum to 1 per token;
# - keep the gradient: the router learns through the gates.
#
# *Hint:* `torch.topk(t, k, dim=-1)` returns `(values, indices)`.

# %%
def mixtral_gate(router_logits, k):
    """(N, E) logits → expert_index (N, k) int64, gates (N, k): softmax over each token's k largest logits."""
    ### BEGIN SOLUTION 10.1: the k largest logits of each token, then a softmax over those k alone
    top_logits, expert_index = torch.topk(router_logits, k, dim=-1)  # (N, k), (N, k)
    gates = torch.softmax(top_logits, dim=-1)  # (N, k)
    return expert_index, gates
    ### END SOLUTION


# %% jupyter={"source_hidden": true} tags=["check"]
from moe_course.checks import check

check("10.1", mixtral_gate)

# %% [markdown]
# ## Exercise 10.2 · DeepSeek-V3's gate
#
# DeepSeek-V3 (arXiv:2412.19437, §2.1.2) scores each expert on its own with a sigmoid, and
# balances the load with a per-expert bias $b_i$ that changes **who is chosen, never how much
# their answer counts**:
#
# $$s_i = \sigma(\text{logit}_i), \qquad \text{chosen} = \mathrm{TopK}(s_i + b_i,\ k), \qquad
# g_i = \frac{s_i}{\sum_{j \in \text{chosen}} s_j} \ \text{ for } i \text{ chosen}$$
#
# Write `deepseek_gate(router_logits, bias, k)`:
#
# - `router_logits`: (N, E); `bias`: (E,); return `(expert_index, gates)`, both (N, k);
# - the gates use the scores $s$ only: no bias in them, and no gradient to the bias.

# %%
def deepseek_gate(router_logits, bias, k):
    """(N, E) logits, (E,) bias → expert_index (N, k), gates (N, k): chosen by s + b, weighed by s."""
    ### BEGIN SOLUTION 10.2: s = sigmoid(logits); choose the top k of s + b; gates = the chosen s, divided by their sum
    scores = torch.sigmoid(router_logits)  # (N, E)
    expert_index = torch.topk(scores + bias.detach(), k, dim=-1).indices  # (N, k) the bias moves the choice only
    chosen = scores.gather(-1, expert_index)  # (N, k)
    return expert_index, chosen / chosen.sum(dim=-1, keepdim=True)
    ### END SOLUTION


# %% jupyter={"source_hidden": true} tags=["check"]
from moe_course.checks import check

check("10.2", deepseek_gate)

# %% [markdown]
# ## Exercise 10.3 · The bias update
#
# After every optimiser step, DeepSeek-V3 moves each expert's bias by a fixed step γ, down for
# an expert busier than average, up for one below it:
#
# $$b_i \leftarrow b_i + \gamma \cdot \mathrm{sign}\big(\overline{\text{load}} - \text{load}_i\big)$$
#
# Write `bias_update(bias, load, gamma)`:
#
# - `bias`: (E,) float; `load`: (E,) the tokens each expert received this step (integer
#   counts); `gamma`: the step γ;
# - return the **new** bias as a new tensor (leave the input alone); an expert exactly at the
#   mean load keeps its bias.
#
# *Hint:* `torch.sign` gives −1, 0 or +1; integer counts need `.float()` before `.mean()`.

# %%
def bias_update(bias, load, gamma):
    """(E,) bias, (E,) load counts, step γ → the new (E,) bias: b + γ·sign(mean load − load)."""
    ### BEGIN SOLUTION 10.3: compare every load with the mean load, take the sign, step the bias by gamma times it
    load = load.float()
    return bias + gamma * torch.sign(load.mean() - load)
    ### END SOLUTION


# %% jupyter={"source_hidden": true} tags=["check"]
from moe_course.checks import check

check("10.3", bias_update)

# %% [markdown]
# ## Exercise 10.4 · Shared and routed experts
#
# DeepSeekMoE (Dai et al. 2024, arXiv:2401.06066) keeps $K_s$ **shared** experts that every token
# visits, ungated, next to the routed ones:
#
# $$y = \sum_{s=1}^{K_s} \mathrm{FFN}^{\text{shared}}_s(x) \;+\; \sum_{j=1}^{k} g_j \cdot \mathrm{FFN}^{\text{routed}}_{i_j}(x)$$
#
# Write `shared_and_routed(x, shared, routed, expert_index, gates)`:
#
# - `x`: (N, D) tokens; `shared`, `routed`: `moe_course.experts.Experts` (each has
#   `num_experts` and `expert_output(e, tokens)`, tokens (M, D) → (M, D));
# - `expert_index`, `gates`: (N, k), each token's routed experts and their gates;
# - return y (N, D), the experts' outputs only (the residual belongs to the block around).
#
# *Hint:* a loop over the k choices and, inside, over the routed experts; `index_add` (or
# boolean masks) puts each expert's rows back in place.

# %%
def shared_and_routed(x, shared, routed, expert_index, gates):
    """(N, D) tokens → (N, D): every shared expert on every token, plus each token's k routed experts weighed by their gates."""
    ### BEGIN SOLUTION 10.4: sum the shared experts over all tokens; add gate · routed expert for each token's k choices
    y = sum(shared.expert_output(s, x) for s in range(shared.num_experts))  # (N, D) ungated
    for j in range(expert_index.shape[1]):  # each token's j-th choice
        for e in range(routed.num_experts):
            rows = (expert_index[:, j] == e).nonzero(as_tuple=True)[0]  # the tokens whose j-th choice is e
            if rows.numel():
                y = y.index_add(0, rows, gates[rows, j, None] * routed.expert_output(e, x[rows]))
    return y
    ### END SOLUTION


# %% jupyter={"source_hidden": true} tags=["check"]
from moe_course.checks import check

check("10.4", shared_and_routed)

# %% [markdown]
# ## Exercise 10.5 · Upcycling a trained FFN
#
# Sparse upcycling (Komatsuzaki et al. 2022, arXiv:2212.05055) turns a trained dense FFN into an
# MoE layer: every expert starts as a copy of the FFN, the router is new. With gates that sum to
# 1, the new layer computes exactly what the dense one did, for every token, on its first step.
#
# Write `upcycle(ffn, num_experts, top_k)`:
#
# - `ffn`: a trained `moe_course.experts.FeedForward` (D → F → D, with biases, some activation);
# - return a `moe_course.moe.MoELayer` with `num_experts` experts of the FFN's widths and
#   activation, `top_k` choices per token with renormalised gates, no capacity limit (no token
#   dropped), every expert a copy of `ffn`, and its own freshly initialised router;
# - leave `ffn` as it was.
#
# *Hint:* `MoEConfig(d_model, d_ff, num_experts, top_k=..., router="top_k", capacity_factor=None,
# activation=...)`; `layer.experts.copy_feed_forward_(ffn)` copies the FFN into every expert.

# %%
from moe_course.moe import MoEConfig, MoELayer


def upcycle(ffn, num_experts, top_k):
    """A trained FeedForward → an MoELayer whose every expert is a copy of it, with a fresh renormalised top-k router."""
    ### BEGIN SOLUTION 10.5: an MoEConfig with the FFN's widths and activation, renormalised top-k, dropless; copy the FFN into every expert
    config = MoEConfig(ffn.d_model, ffn.d_ff, num_experts, top_k=top_k, router="top_k", capacity_factor=None, activation=ffn.activation)
    layer = MoELayer(config)
    layer.experts.copy_feed_forward_(ffn)
    return layer
    ### END SOLUTION


# %% jupyter={"source_hidden": true} tags=["check"]
from moe_course.checks import check

check("10.5", upcycle)

# %% [markdown]
# ## Done
#
# Back to [lesson 10](../notebooks/10_modern_moe.ipynb) for the experiments these pieces take part
# in. The package's own versions, to compare with yours: `moe_course.routing.mixtral_routing`,
# `moe_course.routing.sigmoid_routing`, `moe_course.routing.expert_bias_update`,
# `moe_course.moe.MoELayer.shared_output` and `moe_course.moe.upcycle`.
