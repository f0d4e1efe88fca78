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
# # Exercises 05 · Keeping the clinic running
#
# Four exercises on the mechanics that keep a sparse MoE healthy: the load-balancing loss,
# the router z-loss, expert capacity with dropping, and expert-choice routing. Replace each
# stub with your code, then run the collapsed check cell below it.
#
# Shape letters: **N** tokens (patients), **E** experts, **C** capacity (slots per expert).

# %%
import torch

# %% [markdown]
# ## Exercise 5.1 · The load-balancing loss
#
# The Switch Transformer (arXiv:2101.03961, eq. 4–6) keeps every doctor busy with
#
# $$\text{loss} = E \cdot \sum_{i=1}^{E} f_i \cdot P_i$$
#
# - $f_i$: the **fraction of the tokens** whose chosen expert is $i$ (counted; no gradient);
# - $P_i$: the **mean router probability** of expert $i$ over the tokens (differentiable).
#
# Write `load_balancing_loss(router_probs, expert_index)`:
#
# - `router_probs`: (N, E) softmax probabilities; `expert_index`: (N,) each token's chosen
#   expert (top-1);
# - return the loss as a 0-dimensional tensor that keeps its gradient with respect to
#   `router_probs`;
# - under perfectly uniform routing it is exactly 1.0; some experts may receive no tokens.
#
# *Hint:* `torch.bincount(expert_index, minlength=E)` counts the tokens of every expert,
# including the idle ones.

# %%
def load_balancing_loss(router_probs, expert_index):
    """E · Σ_i f_i · P_i: (N, E) probabilities, (N,) chosen experts → () tensor."""
    ### BEGIN SOLUTION 5.1: f from the counts of expert_index, P the mean probability per expert, E times their dot product
    num_tokens, num_experts = router_probs.shape
    f = torch.bincount(expert_index, minlength=num_experts).float() / num_tokens  # (E,) no gradient
    p = router_probs.mean(dim=0)  # (E,) differentiable
    return num_experts * torch.sum(f * p)
    ### END SOLUTION


# %% tags=["check"] jupyter={"source_hidden": true}
from moe_course.checks import check

check("5.1", load_balancing_loss)

# %% [markdown]
# ## Exercise 5.2 · The router z-loss
#
# ST-MoE (Zoph et al. 2022, arXiv:2202.08906, eq. 5) keeps the router's logits small:
#
# $$L_z = \frac{1}{N} \sum_{n=1}^{N} \Big(\log \sum_{j=1}^{E} e^{x_{n,j}}\Big)^2$$
#
# Write `router_z_loss(router_logits)`: (N, E) logits → a 0-dimensional tensor. It must stay
# finite when the logits have grown large (say, around 100).
#
# *Hint:* `torch.logsumexp(t, dim=...)` computes $\log\sum e^{t}$ without overflowing.

# %%
def router_z_loss(router_logits):
    """Mean over tokens of logsumexp over experts, squared: (N, E) → () tensor."""
    ### BEGIN SOLUTION 5.2: logsumexp over the experts, square per token, mean over the tokens
    log_z = torch.logsumexp(router_logits, dim=-1)  # (N,)
    return (log_z**2).mean()
    ### END SOLUTION


# %% tags=["check"] jupyter={"source_hidden": true}
from moe_course.checks import check

check("5.2", router_z_loss)

# %% [markdown]
# ## Exercise 5.3 · Capacity: who gets a slot
#
# Every expert has room for `capacity` tokens per batch (its waiting room has C chairs).
# Tokens that do not fit are **dropped**: the layer skips them, and the residual connection
# carries them on unchanged. Which ones are dropped? First come, first served: each expert
# takes **its own tokens in token order** and keeps the first C of them.
#
# Write `capacity_keep(expert_index, num_experts, capacity)`:
#
# - `expert_index`: (N,) each token's chosen expert (top-1);
# - return `keep`: (N,) bool, True for the tokens that got a slot.
#
# Example: `expert_index = [0, 1, 0, 0, 1]` with capacity 2 keeps
# `[True, True, True, False, True]`: the third token of expert 0 is dropped.
#
# *Hint:* a loop over experts with `(expert_index == e).nonzero()` lists each expert's
# tokens in order; or a cumulative count with `torch.cumsum` over a one-hot matrix.

# %%
def capacity_keep(expert_index, num_experts, capacity):
    """(N,) chosen experts → (N,) bool: each expert keeps its first `capacity` tokens in token order."""
    ### BEGIN SOLUTION 5.3: for every expert, keep its first `capacity` tokens in token order and drop the rest
    keep = torch.zeros(len(expert_index), dtype=torch.bool)  # (N,)
    for e in range(num_experts):
        rows = (expert_index == e).nonzero(as_tuple=True)[0]  # expert e's tokens, in token order
        keep[rows[:capacity]] = True
    return keep
    ### END SOLUTION


# %% tags=["check"] jupyter={"source_hidden": true}
from moe_course.checks import check

check("5.3", capacity_keep)

# %% [markdown]
# ## Exercise 5.4 · Expert choice
#
# Turn the referral around (Zhou et al. 2022, arXiv:2202.09368): instead of every patient
# choosing doctors, every doctor chooses C patients. The scores are the usual router
# probabilities, $S = \mathrm{softmax}(\text{router\_logits})$ over the experts, shape
# (N, E); expert $e$ takes the C tokens with the highest score in its column $S_{:, e}$, and
# the gate of each pick is its score.
#
# Write `expert_choice(router_logits, capacity)`:
#
# - return `(token_index, gates)`, both (E, C): row e lists the C tokens expert e picked
#   (C different tokens) and their scores.
#
# *Hint:* `torch.topk` works along any dimension; `S.T` has one row per expert.

# %%
def expert_choice(router_logits, capacity):
    """(N, E) logits → token_index (E, C) and gates (E, C): each expert picks its top-C tokens."""
    ### BEGIN SOLUTION 5.4: S = softmax over the experts; each expert takes the C tokens with the highest score in its column
    scores = torch.softmax(router_logits, dim=-1)  # (N, E)
    gates, token_index = torch.topk(scores.T, capacity, dim=-1)  # (E, C), (E, C)
    return token_index, gates
    ### END SOLUTION


# %% tags=["check"] jupyter={"source_hidden": true}
from moe_course.checks import check

check("5.4", expert_choice)

# %% [markdown]
# That's lesson 05's toolkit: a balanced, stable router and a clinic that turns patients
# away gracefully when a waiting room is full. Lesson 06 makes the dispatch fast.
