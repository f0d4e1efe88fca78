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
# # Exercises 08 · The Switch Transformer
#
# Two exercises about the whole hospital: one floor of it (a Switch block), and the
# hospital's books (what the model holds and what a token costs). Shape letters: **B**
# batch, **T** time, **D** width, **F** hidden width of the FFN and of each expert, **E**
# experts, **V** vocabulary.

# %%
import torch

from moe_course.transformer import Block, GPTConfig

# %% [markdown]
# ## Exercise 8.1 · One floor of the hospital: the Switch block
#
# A `Block` of a Switch model has four parts: `block.ln_1`, `block.attn` (causal
# self-attention), `block.ln_2` and `block.ffn`, a `MoELayer`. Calling the MoE layer on a
# (B, T, D) tensor returns a `MoEOutput` with, among others:
#
# - `y` (B, T, D): the experts' answers, each weighted by its gate (0 for a dropped token);
# - `router_loss` (a 0-dim tensor): the weighted load-balancing loss plus the weighted router
#   z-loss, ready to add to the training loss.
#
# Write `switch_block_forward(block, x)` for x (B, T, D), returning `(x_out, router_loss)`:
#
# 1. the ward meeting: x = x + attention of the *normalised* stream (`ln_1`);
# 2. the examination: run the MoE layer on `ln_2` of that updated stream, add its `y` to
#    the stream;
# 3. return the new stream and the layer's router loss.
#
# Build it from the parts; calling `block(x)` itself is not allowed (that is the
# package's answer).
#
# *Hints.* Each step is one line. `block.ffn(h)` returns a `MoEOutput`, not a tensor: the
# experts' answer is its `.y` (the same shape as `h`) and the loss to return is its
# `.router_loss` (already weighted; not `.aux_loss`, which is the unweighted balance loss). Both halves of a
# pre-norm block read a *normalised copy* of the stream and add their result to the stream
# itself. If the check says the stream is wrong, compare your two norms: `ln_1` belongs to
# attention, `ln_2` to the Switch layer.

# %%
def switch_block_forward(block: Block, x: torch.Tensor):
    """x (B, T, D) → (x_out (B, T, D), router_loss ())."""
    ### BEGIN SOLUTION 8.1: attention with its residual, then the MoE layer on ln_2 of the stream with its residual; return the stream and moe.router_loss
    x = x + block.attn(block.ln_1(x))  # (B, T, D) tokens talk
    moe = block.ffn(block.ln_2(x))  # MoEOutput; moe.y (B, T, D)
    return x + moe.y, moe.router_loss
    ### END SOLUTION


# %% tags=["check"] jupyter={"source_hidden": true}
from moe_course.checks import check

check("8.1", switch_block_forward)

# %% [markdown]
# ## Exercise 8.2 · The hospital's books
#
# Write `lm_accounting(config)` for a `GPTConfig` and return a dict with three ints:
#
# - `"params_total"`: every parameter of the model;
# - `"params_active"`: the parameters one token uses (top-1: one expert per Switch layer);
# - `"flops_per_token"`: forward FLOPs per token, counting matrix multiplications only,
#   one multiply-add = 2 FLOPs, attention over T = `config.block_size` keys.
#
# The models here all have biases, rotary position embeddings (no position table) and a
# head tied to the token embedding. Their parts:
#
# | part | parameters | forward FLOPs per token |
# |---|---|---|
# | token embedding (V, D), shared with the head | V·D | head: 2·D·V |
# | attention, per block: q, k, v and output projections with biases | 4·D² + 4·D | 8·D² for the projections, 4·T·D for scores and weighted values |
# | layer norms: 2 per block and a final one, each a weight and a bias | 2·D each | – |
# | FFN (dense block) or one expert: D → F → D with biases | 2·D·F + F + D | 4·D·F |
# | router of a Switch block: (D, E), no bias | D·E | 2·D·E |
#
# `config.n_layers` blocks; `config.moe_layers` lists the Switch blocks (with
# `moe_every=2` only every second block is one); `config.num_experts` is E.
#
# *Hints.* Count the parts that every block has (attention, two norms) once per block, the
# embedding and the final norm once; then the feed-forward parts: a dense block holds one FFN,
# a Switch block E of them plus its router. For the active count a Switch block contributes
# one expert and its router. FLOPs: every block pays attention and one FFN (a token visits one
# expert); Switch blocks add the router's `2·D·E`; the head pays `2·D·V`. You can check your
# parameter total yourself: it must equal `sum(p.numel() for p in GPT(config).parameters())`
# (with `from moe_course.transformer import GPT`).

# %%
def lm_accounting(config: GPTConfig) -> dict:
    """→ {"params_total": int, "params_active": int, "flops_per_token": int}."""
    ### BEGIN SOLUTION 8.2: add up the parts of the table: all experts for the total, one per Switch block for the active count and the FLOPs
    V, T, D, F, L, E = config.vocab_size, config.block_size, config.d_model, config.d_ff, config.n_layers, config.num_experts
    n_moe = len(config.moe_layers)  # Switch blocks
    ffn = 2 * D * F + F + D  # one FFN or one expert
    shared = V * D + L * (4 * D * D + 4 * D) + (2 * L + 1) * 2 * D + n_moe * D * E  # embedding, attention, norms, routers
    total = shared + (L - n_moe) * ffn + n_moe * E * ffn
    active = shared + L * ffn
    flops = L * (8 * D * D + 4 * T * D + 4 * D * F) + n_moe * 2 * D * E + 2 * D * V
    return {"params_total": total, "params_active": active, "flops_per_token": flops}
    ### END SOLUTION


# %% tags=["check"] jupyter={"source_hidden": true}
from moe_course.checks import check

check("8.2", lm_accounting)
