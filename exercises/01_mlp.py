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
# # Exercises 01 · The feed-forward block
#
# Four exercises on the block that every expert is made of. Replace each stub with your
# code, then run the collapsed check cell below it. Shape letters: **N** tokens,
# **D** model width, **F** hidden width.

# %%
import torch
import torch.nn.functional as F

# %% [markdown]
# ## Exercise 1.1 · The forward pass
#
# Write `feed_forward(x, w_in, b_in, w_out, b_out)` computing
#
# $$\mathrm{FFN}(x) = \mathrm{GELU}(x W_{in} + b_{in})\, W_{out} + b_{out}$$
#
# - `x`: (..., D), any number of leading dimensions (e.g. (N, D) or (B, T, D));
# - `w_in`: (D, F), `b_in`: (F,), `w_out`: (F, D), `b_out`: (D,);
# - return a tensor of the same shape as `x`.
#
# *Hint:* `@` multiplies the last dimension of its left side with the first of its right
# side, and broadcasting adds a bias to every token. GELU is `F.gelu`.

# %%
def feed_forward(x, w_in, b_in, w_out, b_out):
    """GELU(x W_in + b_in) W_out + b_out: (..., D) → (..., D)."""
    raise NotImplementedError("Exercise 1.1: compute GELU(x @ w_in + b_in) @ w_out + b_out")


# %% tags=["check"] jupyter={"source_hidden": true}
from moe_course.checks import check

check("1.1", feed_forward)

# %% [markdown]
# ## Exercise 1.2 · Counting parameters
#
# Write `ffn_param_count(d_model, d_ff)`: the number of scalar parameters of the block
# above, with both biases. Return an `int`.
#
# *Hint:* list every tensor in 1.1 with its shape and add up their sizes.

# %%
def ffn_param_count(d_model: int, d_ff: int) -> int:
    """Number of parameters of FeedForward(d_model, d_ff), biases included."""
    raise NotImplementedError("Exercise 1.2: count the weights and biases of both linear layers")


# %% tags=["check"] jupyter={"source_hidden": true}
from moe_course.checks import check

check("1.2", ffn_param_count)

# %% [markdown]
# ## Exercise 1.3 · Counting FLOPs
#
# Write `ffn_flops(num_tokens, d_model, d_ff)`: the FLOPs of the block on `num_tokens`
# tokens. Course convention: a multiply-add counts as **2 FLOPs**, and only the matrix
# multiplications count (biases and GELU are small next to them). Return an `int`.
#
# *Hint:* multiplying an (N, D) matrix by a (D, F) matrix takes N·D·F multiply-adds.

# %%
def ffn_flops(num_tokens: int, d_model: int, d_ff: int) -> int:
    """Matmul FLOPs of FeedForward(d_model, d_ff) on num_tokens tokens."""
    raise NotImplementedError("Exercise 1.3: count 2 FLOPs per multiply-add over both matmuls, for all tokens")


# %% tags=["check"] jupyter={"source_hidden": true}
from moe_course.checks import check

check("1.3", ffn_flops)

# %% [markdown]
# ## Exercise 1.4 · Accuracy per specialty
#
# Lesson 01 found the generalist's weak spots by measuring accuracy within each
# specialty. Write `accuracy_by_specialty(logits, diagnosis, specialty, num_specialties)`:
#
# - `logits`: (N, classes) scores; the prediction is the class with the highest score;
# - `diagnosis`: (N,) the true class; `specialty`: (N,) the specialty of each patient;
# - return a **float** tensor of shape (num_specialties,): the fraction of correct
#   predictions among the patients of each specialty;
# - a specialty with no patients has no accuracy: its entry must be `nan` (0 / 0).
#
# *Hint:* a boolean tensor of "correct" per patient, then count per specialty; or a loop
# over specialties with a mask.

# %%
def accuracy_by_specialty(logits, diagnosis, specialty, num_specialties):
    """Accuracy within each specialty: → (num_specialties,) float, nan where empty."""
    raise NotImplementedError("Exercise 1.4: the fraction of correct predictions within each specialty (nan if empty)")


# %% tags=["check"] jupyter={"source_hidden": true}
from moe_course.checks import check

check("1.4", accuracy_by_specialty)

# %% [markdown]
# That's the toolkit of lesson 01. Next, lesson 02: ensembles and generalists.
