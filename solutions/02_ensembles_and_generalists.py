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
# # Exercises 02 · Second opinions
#
# Three exercises on ensembles: doctors trained the same way, whose answers we average.
# Replace each stub with your code, then run the collapsed check cell below it.
#
# Shape letters: **R** members of the ensemble (doctors), **N** patients, and `classes`
# for the diagnoses. All three functions receive the members' outputs stacked into one
# tensor, member first: `member_logits[r, n]` holds member r's scores for patient n.

# %%
import math

import torch
import torch.nn.functional as F

# %% [markdown]
# ## Exercise 2.1 · Averaging the doctors
#
# Write `average_probs(member_logits)`:
#
# - `member_logits`: (R, N, classes), every member's raw scores (logits) for every patient;
# - return the ensemble's prediction, (N, classes): for each patient, the **mean over the
#   members of their probabilities** (each member's softmax over the diagnoses).
#
# Average *probabilities*, not logits: each member's opinion is a distribution over the
# diagnoses, and the ensemble's opinion is their average, which is again a distribution.
#
# *Hint:* `torch.softmax(t, dim=...)` and `t.mean(dim=...)`. Which axis holds the
# diagnoses, and which the members?

# %%
def average_probs(member_logits):
    """Mean of the members' probabilities: (R, N, classes) → (N, classes)."""
    ### BEGIN SOLUTION 2.1: softmax each member's logits over the classes, then average over the members
    probs = torch.softmax(member_logits, dim=-1)  # (R, N, classes)
    return probs.mean(dim=0)  # (N, classes)
    ### END SOLUTION


# %% tags=["check"] jupyter={"source_hidden": true}
from moe_course.checks import check

check("2.1", average_probs)

# %% [markdown]
# ## Exercise 2.2 · Bias and variance
#
# For one patient with true diagnosis $y$ (as a one-hot vector) and a member's
# probabilities $p_r$, measure the member's error by the squared distance
# $\lVert p_r - y\rVert^2 = \sum_c (p_{r,c} - y_c)^2$ (the Brier score). With
# $\bar p = \frac1R \sum_r p_r$, the members' average prediction, this identity holds exactly:
#
# $$\underbrace{\frac1R \sum_r \lVert p_r - y\rVert^2}_{\text{error}}
#   = \underbrace{\lVert \bar p - y\rVert^2}_{\text{bias}^2}
#   + \underbrace{\frac1R \sum_r \lVert p_r - \bar p\rVert^2}_{\text{variance}}$$
#
# Write `bias_variance(member_probs, targets)`:
#
# - `member_probs`: (R, N, classes), every member's probabilities (rows sum to 1);
# - `targets`: (N,) int64, the true diagnosis of each patient;
# - return a tuple of three numbers `(error, bias, variance)`, each the **mean over the
#   patients** of the per-patient quantity above (floats or 0-d tensors).
#
# *Hint:* `F.one_hot(targets, num_classes)` gives the one-hot vectors; convert it to float.
# Check your result: `error` should equal `bias + variance`.

# %%
def bias_variance(member_probs, targets):
    """Brier error of the members, split into bias² and variance (means over patients)."""
    ### BEGIN SOLUTION 2.2: return (error, bias, variance), each averaged over the patients
    onehot = F.one_hot(targets, member_probs.shape[-1]).to(member_probs.dtype)  # (N, classes)
    mean = member_probs.mean(dim=0)  # (N, classes): the average doctor
    error = ((member_probs - onehot) ** 2).sum(dim=-1).mean()  # over members and patients
    bias = ((mean - onehot) ** 2).sum(dim=-1).mean()
    variance = ((member_probs - mean) ** 2).sum(dim=-1).mean()
    return error, bias, variance
    ### END SOLUTION


# %% tags=["check"] jupyter={"source_hidden": true}
from moe_course.checks import check

check("2.2", bias_variance)

# %% [markdown]
# ## Exercise 2.3 · The ensemble's cross-entropy
#
# Models are trained on cross-entropy, so let us measure the ensemble that way too. The
# ensemble gives patient $n$'s true diagnosis $y_n$ the probability
# $\bar p(y_n) = \frac1R \sum_r p_r(y_n)$, and its loss is $-\frac1N \sum_n \log \bar p(y_n)$.
#
# Write `ensemble_log_loss(member_logits, targets)`:
#
# - `member_logits`: (R, N, classes), `targets`: (N,) int64;
# - return the loss, one number (a float or a 0-d tensor).
#
# It must stay finite when the members are very sure the truth is impossible: then every
# $p_r(y_n)$ underflows to 0 in float32 and a naive `log` gives infinity. Work in log space:
#
# $$\log \bar p = \log \sum_r e^{\log p_r} - \log R$$
#
# *Hint:* `torch.log_softmax` gives $\log p_r$ safely, `torch.logsumexp(t, dim=...)` computes
# $\log \sum e^{t}$ safely, and `F.nll_loss(log_probs, targets)` averages $-\log p(y_n)$.
# This is the loss a dense mixture of experts (lesson 03) minimises, with every gate weight
# equal to $1/R$.

# %%
def ensemble_log_loss(member_logits, targets):
    """Cross-entropy of the averaged probabilities: (R, N, classes), (N,) → one number."""
    ### BEGIN SOLUTION 2.3: -mean over patients of log(mean over members of p_r(y)), in log space
    log_probs = torch.log_softmax(member_logits, dim=-1)  # (R, N, classes)
    log_mean = torch.logsumexp(log_probs, dim=0) - math.log(member_logits.shape[0])  # (N, classes)
    return F.nll_loss(log_mean, targets)
    ### END SOLUTION


# %% tags=["check"] jupyter={"source_hidden": true}
from moe_course.checks import check

check("2.3", ensemble_log_loss)

# %% [markdown]
# That's lesson 02's toolkit. Next, lesson 03: a GP who weighs every specialist's answer.
