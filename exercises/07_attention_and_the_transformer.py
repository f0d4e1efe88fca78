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
# # Exercises 07 · Attention and the transformer block
#
# Two exercises, the two halves of the ward round: first the meeting where every patient's
# notes may be read by those who come after (causal self-attention), then the whole block
# that alternates the meeting with each doctor's own examination (a pre-norm transformer
# block). Shape letters: **B** batch, **H** heads, **T** positions (time), **d** width of
# one head, **D** model width.

# %%
import math

import torch

# %% [markdown]
# ## Exercise 7.1 · Causal self-attention
#
# Write `causal_attention(q, k, v)` for queries, keys and values of shape (B, H, T, d),
# returning (B, H, T, d):
#
# 1. **scores**: every query against every key, $q\,k^\top / \sqrt{d}$, shape (B, H, T, T);
# 2. **causal mask**: query $i$ may look at keys $j \le i$ (itself and the past, never the
#    future). Set the scores of the future keys ($j > i$) to `-inf`;
# 3. **softmax over the keys** (the last axis): each query's weights sum to 1;
# 4. **weighted sum of the values**: weights @ v.
#
# *Hints:* `k.transpose(-2, -1)` turns (…, T, d) into (…, d, T);
# `torch.ones(T, T, dtype=torch.bool).triu(1)` is True exactly above the diagonal;
# `Tensor.masked_fill(mask, float("-inf"))` writes `-inf` where the mask is True.
# (`torch.nn.functional.scaled_dot_product_attention` does all of this in one call; write
# it out yourself here.)

# %%
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v (B, H, T, d) → (B, H, T, d): softmax(q kᵀ / sqrt(d), causally masked) v."""
    raise NotImplementedError("Exercise 7.1: mask the future scores of q·kᵀ/sqrt(d) with -inf, softmax over the keys, weigh the values")


# %% tags=["check"] jupyter={"source_hidden": true}
from moe_course.checks import check

check("7.1", causal_attention)

# %% [markdown]
# ## Exercise 7.2 · A pre-norm transformer block
#
# A block does two things, each added to the **residual stream** `x` rather than replacing
# it: first the tokens talk (attention), then each token thinks alone (the FFN). Each
# branch reads a **normalised copy** of the stream ("pre-norm", as in GPT-2):
#
# $$x \leftarrow x + \mathrm{attn}(\mathrm{ln}_1(x)) \qquad\qquad x \leftarrow x + \mathrm{ffn}(\mathrm{ln}_2(x))$$
#
# Write `block_forward(block, x)`: `block` is a `moe_course.transformer.Block` of a dense
# GPT with the parts `block.ln_1`, `block.attn`, `block.ln_2` and `block.ffn` (each maps
# (B, T, D) → (B, T, D)); `x` is (B, T, D). Return the stream after the block, (B, T, D).
# Build it from the four parts (calling `block(x)` itself would be cheating, and the check
# notices).

# %%
def block_forward(block, x: torch.Tensor) -> torch.Tensor:
    """x (B, T, D) → (B, T, D): x + attn(ln_1(x)), then x + ffn(ln_2(x))."""
    raise NotImplementedError("Exercise 7.2: add attn(ln_1(x)) to x, then add ffn(ln_2(x)) of the new x")


# %% tags=["check"] jupyter={"source_hidden": true}
from moe_course.checks import check

check("7.2", block_forward)

# %% [markdown]
# These two functions are the whole of `moe_course.transformer.Block` for a dense model
# (the package's attention adds several heads and rotary position embeddings around the
# same core). In lesson 08 the `ffn` inside the block becomes a Switch layer: the same
# residual, the same norm, a GP and a room full of specialists behind it.
