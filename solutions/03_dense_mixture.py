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
# # Exercises 03 · See every specialist: the dense mixture
#
# Four exercises on the dense mixture of experts: the gate (the GP), the mixture itself,
# a score for whether the experts specialised, and what it all costs. Replace each stub
# with your code, then run the collapsed check cell below it.
#
# Shape letters: **N** patients, **D** patient width, **E** experts, **F** an expert's
# hidden width, and `classes` for the diagnoses.

# %%
import torch

# %% [markdown]
# ## Exercise 3.1 · The softmax gate
#
# The GP reads a patient $x$ and gives every expert a weight:
#
# $$g(x) = \mathrm{softmax}(x W_g), \qquad W_g \in \mathbb{R}^{D \times E}$$
#
# Write `softmax_gate(x, w_gate)`:
#
# - `x`: (N, D) patients, `w_gate`: (D, E);
# - return the weights, (N, E): for every patient, positive weights over the experts that
#   **sum to 1 over the experts**.
#
# It must also work for a very sure GP, whose scores are in the hundreds.
#
# *Hint:* `torch.softmax(t, dim=...)` is numerically stable (it subtracts each row's maximum
# before exponentiating). Which axis holds the experts?

# %%
def softmax_gate(x, w_gate):
    """Gate weights softmax(x W_g) over the experts: (N, D), (D, E) → (N, E)."""
    ### BEGIN SOLUTION 3.1: score every expert with x @ w_gate, then softmax over the experts
    scores = x @ w_gate  # (N, E)
    return torch.softmax(scores, dim=-1)  # (N, E): each row sums to 1
    ### END SOLUTION


# %% tags=["check"] jupyter={"source_hidden": true}
from moe_course.checks import check

check("3.1", softmax_gate)

# %% [markdown]
# ## Exercise 3.2 · The dense mixture
#
# Every expert $e$ gives its probabilities over the diagnoses, $p_e(y \mid x) =
# \mathrm{softmax}(\text{expert}_e(x))$, and the gate weighs them:
#
# $$p(y \mid x) = \sum_{e=1}^{E} g_e(x)\, p_e(y \mid x)$$
#
# (Jacobs, Jordan, Nowlan and Hinton 1991). Write `dense_mixture(x, gate, experts)`:
#
# - `x`: (N, D) patients;
# - `gate`: an `nn.Linear(D, E)`; `gate(x)` gives the gate's raw scores (N, E);
# - `experts`: a list of E modules; `experts[e](x)` gives expert e's logits (N, classes);
# - return the mixture's **probabilities**, (N, classes): each row sums to 1.
#
# *Hint:* `torch.stack([...], dim=1)` turns E tensors of shape (N, classes) into one
# (N, E, classes). Then weigh with the gate, shaped (N, E, 1) by `[:, :, None]`, and sum
# over the experts, or use `torch.einsum("ne,nec->nc", ...)`.

# %%
def dense_mixture(x, gate, experts):
    """Σ_e softmax(gate(x))_e · softmax(experts[e](x)): (N, D) → (N, classes) probabilities."""
    ### BEGIN SOLUTION 3.2: weigh every expert's probabilities by the softmax gate and add them up
    weights = torch.softmax(gate(x), dim=-1)  # (N, E)
    probs = torch.stack([torch.softmax(expert(x), dim=-1) for expert in experts], dim=1)  # (N, E, classes)
    return torch.einsum("ne,nec->nc", weights, probs)  # (N, classes)
    ### END SOLUTION


# %% tags=["check"] jupyter={"source_hidden": true}
from moe_course.checks import check

check("3.2", dense_mixture)

# %% [markdown]
# ## Exercise 3.3 · Did the experts specialise?
#
# Take each patient's **top expert**, the one with the largest gate weight. If the experts
# specialised, a patient's specialty tells you its top expert. The *normalised mutual
# information* measures exactly that, on a scale from 0 (the specialty says nothing about
# the expert) to 1 (every specialty has its own expert):
#
# $$\text{score} = \frac{2\, I(S; X)}{H(S) + H(X)}, \qquad
#   I(S; X) = \sum_{s, x} p(s, x) \log \frac{p(s, x)}{p(s)\, p(x)}, \qquad
#   H(S) = -\sum_s p(s) \log p(s)$$
#
# where $p(s, x)$ is the fraction of patients of specialty $s$ whose top expert is $x$,
# and $p(s)$, $p(x)$ are its row and column sums.
#
# Write `specialisation_score(gate_weights, specialty, num_specialties)`:
#
# - `gate_weights`: (N, E), `specialty`: (N,) int64 in `[0, num_specialties)`;
# - return the score, one float.
#
# Careful: experts that no patient prefers (and specialties without patients) give
# probabilities of 0, and `0 * log(0)` is NaN in floating point. By convention such terms
# count as 0: leave those cells out of the sums.
#
# *Hint:* count a table `joint[s, x]` of shape (num_specialties, E), e.g. with
# `joint.index_put_((specialty, top), ones, accumulate=True)` or a loop, and divide it by N.

# %%
def specialisation_score(gate_weights, specialty, num_specialties):
    """Normalised mutual information between specialty and top expert, a float in [0, 1]."""
    ### BEGIN SOLUTION 3.3: 2·I(specialty; top expert) / (H(specialty) + H(top expert)), empty cells count 0
    num_experts = gate_weights.shape[1]
    top = gate_weights.argmax(dim=-1)  # (N,) each patient's top expert
    joint = torch.zeros(num_specialties, num_experts, dtype=torch.float64)
    joint.index_put_((specialty, top), torch.ones(len(top), dtype=torch.float64), accumulate=True)
    joint = joint / joint.sum()  # p(s, x)
    p_s, p_x = joint.sum(dim=1), joint.sum(dim=0)  # (S,), (E,)
    mutual = 0.0
    for s in range(num_specialties):
        for x in range(num_experts):
            if joint[s, x] > 0:
                mutual += joint[s, x] * torch.log(joint[s, x] / (p_s[s] * p_x[x]))
    h_s = -sum(p * torch.log(p) for p in p_s if p > 0)
    h_x = -sum(p * torch.log(p) for p in p_x if p > 0)
    if h_s + h_x == 0:
        return 1.0  # one specialty and one expert: trivially a perfect match
    return float(2 * mutual / (h_s + h_x))
    ### END SOLUTION


# %% tags=["check"] jupyter={"source_hidden": true}
from moe_course.checks import check

check("3.3", specialisation_score)

# %% [markdown]
# ## Exercise 3.4 · What seeing every specialist costs
#
# Write `dense_mixture_flops(num_tokens, d_in, d_ff, num_classes, num_experts)`: the matmul
# FLOPs of a dense mixture on `num_tokens` patients, with the course's convention (a
# multiply-add is **2 FLOPs**, only matrix multiplications count). The mixture has
#
# - one gate, a (D, E) matrix applied to every patient;
# - E experts, each the clinic MLP of lesson 01: D → F (matrix D × F), then F → classes;
#   and in a *dense* mixture every patient goes through every expert.
#
# Return an `int`. The edge case $E = 1$ must work too.

# %%
def dense_mixture_flops(num_tokens: int, d_in: int, d_ff: int, num_classes: int, num_experts: int) -> int:
    """Matmul FLOPs of the gate plus all E experts on num_tokens patients."""
    ### BEGIN SOLUTION 3.4: the gate (D × E) plus E experts (D × F, then F × classes), 2 FLOPs per multiply-add
    gate = 2 * num_tokens * d_in * num_experts
    one_expert = 2 * num_tokens * d_in * d_ff + 2 * num_tokens * d_ff * num_classes
    return gate + num_experts * one_expert
    ### END SOLUTION


# %% tags=["check"] jupyter={"source_hidden": true}
from moe_course.checks import check

check("3.4", dense_mixture_flops)

# %% [markdown]
# That's lesson 03's toolkit. The cost grows with every expert you hire, even the ones a
# patient does not need; lesson 04's GP consults only the top few.
