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
# # Exercises 06 · Sort-based dispatch
#
# The fast way to run a clinic: line the patients up by doctor, let each doctor see one
# contiguous queue, then send every answer back to the right patient. Three small steps,
# three exercises. Shape letters: **N** tokens, **D** width, **E** experts, **M** expert
# outputs (M = N for top-1 without drops).

# %%
import torch

# %% [markdown]
# ## Exercise 6.1 · Line the tokens up by expert
#
# Write `sort_by_expert(expert_index, num_experts)`:
#
# - `expert_index`: int64 (N,), the expert chosen for each token (top-1);
# - return `order, counts`:
#   - `order` (N,): a permutation of the token indices such that `expert_index[order]` is
#     sorted (expert 0's tokens first). Within one expert, tokens must **keep their original
#     order** (earlier tokens first: that is how capacity decides who gets in);
#   - `counts` (num_experts,): how many tokens each expert gets, 0 for an idle expert.
#
# *Hint:* `torch.argsort` has a `stable` argument; `torch.bincount` has `minlength`.

# %%
def sort_by_expert(expert_index: torch.Tensor, num_experts: int):
    """expert_index (N,) → order (N,), counts (num_experts,)."""
    ### BEGIN SOLUTION 6.1: return a stable argsort of expert_index and the number of tokens per expert
    order = torch.argsort(expert_index, stable=True)
    counts = torch.bincount(expert_index, minlength=num_experts)
    return order, counts
    ### END SOLUTION


# %% tags=["check"] jupyter={"source_hidden": true}
from moe_course.checks import check

check("6.1", sort_by_expert)

# %% [markdown]
# ## Exercise 6.2 · Send every answer back to its patient
#
# After the experts ran on their sorted queues you hold `y_sorted` (M, D), one row per
# (token, expert) assignment, and `token` (M,), the token each row belongs to. Write
# `combine_rows(y_sorted, token, gates, num_tokens)` returning `out` (num_tokens, D) with
#
# $$\text{out}_n = \sum_{i:\ \text{token}_i = n} \text{gates}_i \cdot \text{y\_sorted}_i$$
#
# - each row goes back to **its own token** (this undoes the sort);
# - with top-2 a token appears twice: its two contributions **add up**;
# - a dropped token never appears: its row stays **zero** (it passes through the residual).
#
# *Hint:* start from zeros and use `Tensor.index_add` (plain assignment `out[token] = ...`
# keeps only one of two rows for the same token).

# %%
def combine_rows(y_sorted: torch.Tensor, token: torch.Tensor, gates: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """y_sorted (M, D), token (M,), gates (M,) → out (num_tokens, D)."""
    ### BEGIN SOLUTION 6.2: scale each row by its gate and add it into row token[i] of a zero (num_tokens, D) tensor
    weighted = y_sorted * gates[:, None]  # (M, D)
    out = torch.zeros(num_tokens, y_sorted.shape[1], dtype=y_sorted.dtype)
    return out.index_add(0, token, weighted)
    ### END SOLUTION


# %% tags=["check"] jupyter={"source_hidden": true}
from moe_course.checks import check

check("6.2", combine_rows)

# %% [markdown]
# ## Exercise 6.3 · Who is first in each queue?
#
# Padded and capacity-limited dispatch need each token's **slot**: its place in its
# expert's queue. Write `slot_positions(expert_index, num_experts)` returning an int64
# tensor (N,) where `position[n]` is the number of **earlier** tokens (index < n) sent to
# the same expert. The first token of each expert gets slot 0. With a capacity of C slots,
# exactly the tokens with `position >= C` are turned away.
#
# *Hint:* one-hot the experts, (N, E); a cumulative sum down the tokens counts, for every
# expert, the tokens so far.

# %%
def slot_positions(expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """expert_index (N,) → position (N,): earlier tokens of the same expert."""
    ### BEGIN SOLUTION 6.3: count, for each token, the earlier tokens that chose the same expert
    one_hot = torch.nn.functional.one_hot(expert_index, num_experts)  # (N, E)
    before = torch.cumsum(one_hot, dim=0) - one_hot  # (N, E)
    return before.gather(1, expert_index[:, None]).squeeze(1)
    ### END SOLUTION


# %% tags=["check"] jupyter={"source_hidden": true}
from moe_course.checks import check

check("6.3", slot_positions)

# %% [markdown]
# Those three steps are all of `moe_course.dispatch.grouped_mm` apart from the two grouped
# matrix multiplications in the middle. Lesson 07 moves on to attention.
