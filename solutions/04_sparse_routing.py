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
# # Exercises 04 · The GP: sparse routing
#
# Three exercises on the router, the GP who decides which doctors see each patient: top-k
# routing with renormalised gates, noisy top-k gating, and a whole Switch layer that runs
# each expert on its own tokens only. Replace each stub with your code, then run the
# collapsed check cell below it.
#
# Shape letters: **N** tokens (patients), **D** token width, **E** experts, **K** choices
# per token (the k of top-k).

# %%
import torch
import torch.nn.functional as F

# %% [markdown]
# ## Exercise 4.1 · Top-k routing with renormalised gates
#
# The router scores every expert for every token: `router_logits`, shape (N, E). Each token
# then sees only its k most probable experts, and their answers are mixed with weights
# (*gates*) that sum to 1:
#
# $$p = \mathrm{softmax}(\text{router\_logits}) \text{ over the experts}, \qquad
#   g_j = \frac{p_{e_j}}{\sum_{j'=1}^{k} p_{e_{j'}}} \quad\text{for the k largest } p_{e_1}, \dots, p_{e_k}$$
#
# (GShard, arXiv:2006.16668; Mixtral). Write `top_k_routing(router_logits, k)`:
#
# - return a pair `(expert_index, gates)`, both of shape (N, k);
# - `expert_index`: the integer ids of each token's k chosen experts (k different experts);
# - `gates`: their renormalised weights, each row summing to 1.
#
# *Hint:* `torch.topk(t, k, dim=...)` returns `(values, indices)`. Which axis holds the
# experts?

# %%
def top_k_routing(router_logits, k):
    """(N, E) logits → expert_index (N, k) int64 and gates (N, k) that sum to 1 per token."""
    ### BEGIN SOLUTION 4.1: softmax over the experts, keep the top k, divide their probabilities by their sum
    probs = torch.softmax(router_logits, dim=-1)  # (N, E)
    top_probs, expert_index = torch.topk(probs, k, dim=-1)  # (N, K), (N, K)
    gates = top_probs / top_probs.sum(dim=-1, keepdim=True)  # (N, K): each row sums to 1
    return expert_index, gates
    ### END SOLUTION


# %% tags=["check"] jupyter={"source_hidden": true}
from moe_course.checks import check

check("4.1", top_k_routing)

# %% [markdown]
# ## Exercise 4.2 · Noisy top-k gating
#
# A GP who always sends a patient to the same doctor never finds out whether another one
# would do better. Shazeer et al. (2017, arXiv:1701.06538, eq. 3–5) add noise to the scores
# *before* choosing, with a scale the router learns per token and expert:
#
# $$H = \text{clean\_logits} + \varepsilon \cdot \mathrm{softplus}(\text{noise\_logits}),
#   \qquad \varepsilon \sim \mathcal{N}(0, 1)$$
#
# $$G = \mathrm{softmax}(\mathrm{KeepTopK}(H, k)),\qquad \mathrm{KeepTopK}\text{ sets every score outside the top k to } -\infty$$
#
# Write `noisy_top_k(clean_logits, noise_logits, noise, k)`:
#
# - `clean_logits` = $x W_g$ and `noise_logits` = $x W_{noise}$, both (N, E);
# - `noise`: the draws ε, (N, E), given to you so that the check is repeatable (in training
#   you would draw them with `torch.randn_like(clean_logits)`);
# - return `(expert_index, gates)`, both (N, k): the top k of H, and G at those experts.
#
# *Hint:* the softmax over the k kept scores is the same as the softmax over all E scores
# after setting the others to $-\infty$.

# %%
def noisy_top_k(clean_logits, noise_logits, noise, k):
    """Noisy scores H, their top k, and the softmax over the k kept: → (N, k) ids and (N, k) gates."""
    ### BEGIN SOLUTION 4.2: H = clean + noise·softplus(noise_logits); top k of H; softmax over the k kept scores
    h = clean_logits + noise * F.softplus(noise_logits)  # (N, E): noisy scores
    top_scores, expert_index = torch.topk(h, k, dim=-1)  # (N, K)
    gates = torch.softmax(top_scores, dim=-1)  # (N, K): softmax over the k kept
    return expert_index, gates
    ### END SOLUTION


# %% tags=["check"] jupyter={"source_hidden": true}
from moe_course.checks import check

check("4.2", noisy_top_k)

# %% [markdown]
# ## Exercise 4.3 · A Switch layer
#
# Now the whole visit, top-1 as in the Switch Transformer (arXiv:2101.03961, eq. 1–2):
#
# $$p = \mathrm{softmax}(x W_r) \text{ over the experts}, \qquad i(x) = \arg\max_e p_e, \qquad
#   y = p_{i(x)} \cdot \text{expert}_{i(x)}(x)$$
#
# Write `switch_layer(x, w_router, experts)`:
#
# - `x`: (N, D) tokens; `w_router`: (D, E); `experts`: a list of E modules, each mapping
#   (M, D) → (M, D) for any number of tokens M;
# - return y, (N, D);
# - **run each expert only on the tokens routed to it** (that is the whole point: a token
#   costs one expert, not E);
# - multiply each output by its gate $p_{i(x)}$, the *raw* probability: that is how the
#   router gets a gradient (the check makes sure it does);
# - an expert may receive no tokens at all.
#
# *Hint:* `probs.max(dim=-1)` gives the largest probability and its index; a boolean mask
# `index == e` picks expert e's tokens, and `y[mask] = ...` writes their outputs.

# %%
def switch_layer(x, w_router, experts):
    """Top-1 routing with the raw gate: each token through its best expert, scaled by p_i. (N, D) → (N, D)."""
    ### BEGIN SOLUTION 4.3: route each token to its argmax expert, run each expert on its own tokens, scale by the gate
    probs = torch.softmax(x @ w_router, dim=-1)  # (N, E)
    gate, index = probs.max(dim=-1)  # (N,), (N,)
    y = torch.zeros_like(x)  # (N, D)
    for e, expert in enumerate(experts):
        mask = index == e  # (N,): the tokens of expert e
        if mask.any():
            y[mask] = gate[mask, None] * expert(x[mask])  # (M, D)
    return y
    ### END SOLUTION


# %% tags=["check"] jupyter={"source_hidden": true}
from moe_course.checks import check

check("4.3", switch_layer)

# %% [markdown]
# That's the GP of lesson 04. Next, lesson 05: what happens when the GP sends everyone to the
# same few doctors, and how a busy clinic keeps running.
