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
# # Exercises 09 · Referrals between hospitals, blended waiting rooms, and more care for harder cases
#
# Lesson 09 spread the doctors over several hospitals (processes, or **ranks**) and sent every
# patient to their doctor's hospital and the answer back, in two all-to-all exchanges. You
# write the bookkeeping of that exchange, its backward pass, Soft MoE's two sets of weights,
# and a router that gives unclear cases more doctors.
#
# Everything here runs in this one notebook, on one process: an exchange between W ranks is
# played with count tables and with `simulate_all_to_all`, which does in one process what the W
# processes would send each other. Shape letters: **W** ranks, **E** experts (rank q holds
# experts q·E/W … (q+1)·E/W − 1), **D** width, **B** sequences, **T** tokens per sequence,
# **S** slots, **N** tokens.
#
# Fill in each stub (replace the `raise NotImplementedError(...)` line), run the cell, then run
# the collapsed check cell below it.

# %%
import torch

from moe_course.distributed.exchange import simulate_all_to_all

# %% [markdown]
# ## Exercise 9.1 · Who sends how many rows to whom?
#
# Before the dropless exchange, every rank knows only its own routing: `counts[s, e]`, the
# number of rows rank s sends to expert e, is row s of a (W, E) table, and rank s holds row s.
# `torch.distributed.all_to_all_single` needs two lists of W ints from each rank r:
#
# - `input_splits[q]`: how many of r's rows go to rank q (r's rows are sorted by expert, so the
#   rows for rank q's experts are one block);
# - `output_splits[s]`: how many rows r receives from rank s: what s sends to r's experts.
#
# Write `split_sizes(counts, rank)` returning `(input_splits, output_splits)` for rank `rank`,
# as Python lists of ints. (In a real run rank r learns column r's numbers from the others in
# a first, tiny exchange of counts; here the whole table is given.)
#
# *Hint:* `counts.view(W, W, E // W)` groups the experts by the rank that holds them.

# %%
def split_sizes(counts: torch.Tensor, rank: int):
    """counts (W, E) int64 → (input_splits, output_splits): two lists of W ints for rank `rank`."""
    ### BEGIN SOLUTION 9.1: sum each rank's experts; this rank's row gives what it sends, its column what it receives
    W, E = counts.shape
    per_rank = counts.view(W, W, E // W).sum(-1)  # (W, W): rows rank s sends to rank q
    return per_rank[rank].tolist(), per_rank[:, rank].tolist()
    ### END SOLUTION


# %% tags=["check"] jupyter={"source_hidden": true}
from moe_course.checks import check

check("9.1", split_sizes)

# %% [markdown]
# ## Exercise 9.2 · The backward of the all-to-all
#
# Here is the exchange, played for W ranks in one process: `rows[s]` is what rank s sends
# (sorted by destination), `splits[s, q]` how many of those rows go to rank q, and the result
# is what each rank receives, in order of the sender:

# %%
splits = torch.tensor([[2, 1], [0, 3]])  # rank 0 sends 2 rows to itself and 1 to rank 1; rank 1 sends 3 to itself
rows = [torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[10.0], [20.0], [30.0]])]
[r.flatten().tolist() for r in simulate_all_to_all(rows, splits)]

# %% [markdown]
# A row that travelled to rank q was used there; the gradient of the loss with respect to it
# arrives at rank q. Training needs it back at the rank that sent the row.
#
# Write `all_to_all_backward(grad_received, splits)`: `grad_received[q]` (R_q, D) is the
# gradient with respect to the rows rank q received (in the order it received them); return a
# list of W tensors, entry s the gradient with respect to the rows rank s sent, (M_s, D), in
# the order it sent them. The check compares with autograd.
#
# *Hint:* it is an exchange too. Which rank sends how many rows to whom now?

# %%
def all_to_all_backward(grad_received: list[torch.Tensor], splits: torch.Tensor) -> list[torch.Tensor]:
    """grad_received: W tensors (R_q, D); splits (W, W) → W tensors (M_s, D)."""
    ### BEGIN SOLUTION 9.2: send every gradient back where its row came from: the same exchange with the splits swapped (transposed)
    return simulate_all_to_all(grad_received, splits.T)
    ### END SOLUTION


# %% tags=["check"] jupyter={"source_hidden": true}
from moe_course.checks import check

check("9.2", all_to_all_backward)

# %% [markdown]
# ## Exercise 9.3 · Soft MoE's dispatch and combine weights
#
# In Soft MoE nobody is sent anywhere. From logits (B, T, S), one number for every token t and
# slot s of every sequence, two sets of weights are made:
#
# - **dispatch** (B, T, S): slot s takes a weighted average of the tokens of its sequence, so
#   for each slot the weights over the **tokens** sum to 1;
# - **combine** (B, T, S): token t takes a weighted average of the slot outputs, so for each
#   token the weights over the **slots** sum to 1.
#
# Write `soft_moe_weights(logits)` returning `(dispatch, combine)`, both softmaxes of the same
# logits.

# %%
def soft_moe_weights(logits: torch.Tensor):
    """logits (B, T, S) → (dispatch, combine), both (B, T, S)."""
    ### BEGIN SOLUTION 9.3: dispatch = softmax over the tokens (dim 1), combine = softmax over the slots (dim 2)
    return torch.softmax(logits, dim=1), torch.softmax(logits, dim=2)
    ### END SOLUTION


# %% tags=["check"] jupyter={"source_hidden": true}
from moe_course.checks import check

check("9.3", soft_moe_weights)

# %% [markdown]
# ## Exercise 9.4 · Top-p: more doctors when the GP is unsure
#
# A top-p router (Huang et al. 2024, arXiv:2403.07652) sends each token to its most likely
# experts until their probabilities add up to at least p. A GP who is sure of one doctor
# (probability 0.9, with p = 0.6) sends the patient to that doctor alone; a GP torn between
# three sends the patient to two or three.
#
# Write `top_p_mask(router_probs, p)`: `router_probs` (N, E), each row sums to 1; return a
# bool mask (N, E), True where token n uses expert e. Take each token's experts from the most
# likely down, and keep an expert while the probability of the experts before it is still
# below p: the expert that makes the total reach p is used too, so every token gets at least
# one.
#
# *Hint:* `sort(descending=True)`, a `cumsum`, and `scatter` to put the mask back in expert
# order.

# %%
def top_p_mask(router_probs: torch.Tensor, p: float) -> torch.Tensor:
    """router_probs (N, E) → keep (N, E) bool."""
    ### BEGIN SOLUTION 9.4: sort each row descending; keep while the probability before each expert is below p; back to expert order
    top, index = router_probs.sort(dim=-1, descending=True)  # (N, E)
    before = top.cumsum(dim=-1) - top  # probability of the better experts
    return torch.zeros_like(router_probs, dtype=torch.bool).scatter(1, index, before < p)
    ### END SOLUTION


# %% tags=["check"] jupyter={"source_hidden": true}
from moe_course.checks import check

check("9.4", top_p_mask)

# %% [markdown]
# `mask.sum(-1)` is each patient's number of doctors: the compute the router chose to spend on
# them. Lesson 09 measured which patients get more. Lesson 10 moves on to modern MoE practice.
