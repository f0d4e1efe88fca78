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
# # 07 · Attention and the transformer block: talking, then thinking
#
# So far every doctor examined one patient at a time, with no idea who else was in the
# waiting room. That is exactly what a feed-forward block does: it looks at one token's
# vector and nothing else. A language model needs more. To guess the ward of
# `patient 48: ` the model at the position after the colon has to know that the digits a
# few places back were `4` and `8`. Something must carry information **between** tokens.
# That something is attention, and a transformer block is attention and a feed-forward
# block taking turns.
#
# **In this lesson you will**
#
# - see the causal mask and the attention weights it produces, as pictures;
# - watch the difference between the two halves of a block: change one token and see
#   which outputs move under attention and which under the FFN;
# - read the package's attention and its pre-norm `Block`, and count where a small GPT
#   keeps its parameters and spends its FLOPs;
# - train a small dense GPT on the clinic's library, measure its held-out loss per domain,
#   look at what its attention heads read, and let it write.
#
# **Where this sits in the story.** Think of a ward round. First the team meets at the
# whiteboard: each patient's notes are put up in the order they arrived, and anyone may
# read the notes of patients who came *earlier*, never of those who have not arrived yet.
# That meeting is **attention**: the tokens exchange information. Then everyone goes back
# to their own patient and examines them alone, using what they picked up at the meeting.
# That is the **feed-forward block**: each token thinks on its own. A transformer repeats
# meeting, examination, meeting, examination. In lesson 08 the examination room gets the
# specialists and the GP; the meeting stays as it is.

# %%
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import torch

from moe_course import seed_everything
from moe_course.figures.plots import use_course_style

# ---- the one knob of this lesson -------------------------------------------
# 1 trains a 2-block GPT of width 64 on 48 characters of context for 300 steps, in
# well under a minute on a laptop CPU. 4 (meant for a GPU; on a CPU it takes many
# minutes) trains a 4-block GPT of width 128 on 64 characters for 1200 steps at a
# lower learning rate; the loss curves, the table per domain and the samples then
# show what the bigger, longer-trained model learns.
SCALE = 1
# -----------------------------------------------------------------------------

torch.set_num_threads(1)  # one thread: the same numbers and timings on every laptop
seed_everything(0)
use_course_style()

# %% [markdown]
# ## The rule of the meeting: only look back
#
# A language model reads text left to right and predicts the next character at every
# position. If position 3 could read position 4, it would simply copy the answer. So
# position *i* may read positions 0 … *i* (itself included) and nothing later. This rule is
# the **causal mask**, a lower-triangular matrix: row = the reader (the query), column =
# the position being read (the key).
#
# Attention then works in three steps. Every position sends out a **query** ("what am I
# looking for?"), offers a **key** ("what do I hold?") and a **value** ("what I will tell
# you"). The score of query *i* against key *j* is their dot product divided by
# $\sqrt{d}$; masked scores become $-\infty$; a softmax over the keys turns each row into
# weights that sum to 1; the output of position *i* is the weighted average of the values.

# %%
from moe_course.attention import attention_weights, causal_mask

chars = list("rev dog=")  # eight positions of a reversal prompt
T, d = len(chars), 16
torch.manual_seed(0)
q, k = torch.randn(T, d), torch.randn(T, d)  # random queries and keys: an untrained head
weights = attention_weights(q, k, causal_mask(T))  # (T, T)

labels = ["␣" if c == " " else c for c in chars]
fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
sns.heatmap(causal_mask(T).int(), annot=True, fmt="d", cmap="Greys", vmin=0, vmax=1.6, cbar=False,
            xticklabels=labels, yticklabels=labels, ax=axes[0])
axes[0].set(title="The causal mask: 1 = may read", xlabel="key: the position being read", ylabel="query: the reader")
sns.heatmap(weights, annot=True, fmt=".2f", cmap="viridis", vmin=0, vmax=1, xticklabels=labels, yticklabels=labels,
            ax=axes[1], cbar_kws={"label": "attention weight"})
axes[1].set(title="Attention weights of a random head", xlabel="key: the position being read", ylabel="query: the reader")
for ax in axes:
    ax.tick_params(axis="y", labelrotation=0)
fig.tight_layout()

# %%
print("each row sums to:", weights.sum(-1).round(decimals=4).tolist())
print("largest weight on a future position:", weights.triu(1).max().item())

# %% [markdown]
# Look at the right panel: everything above the diagonal is exactly 0 (the future is
# invisible), every row sums to 1, and the first position can only read itself, so its
# weight is exactly 1. An untrained head spreads its weight almost at random; training will
# shape these rows into "look two characters back" or "look at the digits".
#
# Here is the package's code. `attention_weights` is the formula above, line by line;
# `CausalSelfAttention` runs several heads side by side, each on its own slice of the
# model width, and rotates queries and keys by their position (RoPE), so that a head can
# say "two places back" the same way at every position.

# %%
from moe_course import attention
from moe_course.show import show_source

show_source(attention.attention_weights)

# %%
show_source(attention.CausalSelfAttention.forward)

# %% [markdown]
# ## Talking versus thinking, measured
#
# The claim of this lesson in one experiment. Take a sequence of 12 token vectors, run it
# through an attention layer and through a feed-forward block, then **change token 5
# only** and run both again. For every position, how much did the output move?

# %%
from moe_course.attention import CausalSelfAttention
from moe_course.experts import FeedForward

torch.manual_seed(0)
D, T_demo, changed = 32, 12, 5
talk, think = CausalSelfAttention(D, n_heads=4).eval(), FeedForward(D, 4 * D).eval()
x = torch.randn(1, T_demo, D)  # (B, T, D)
x_edit = x.clone()
x_edit[0, changed] = torch.randn(D)  # a different token at position 5, nothing else changed

with torch.no_grad():
    moved = pd.DataFrame({
        "position": list(range(T_demo)) * 2,
        "block": ["attention (talk)"] * T_demo + ["feed-forward (think)"] * T_demo,
        "change": torch.cat([(talk(x_edit) - talk(x)).norm(dim=-1)[0], (think(x_edit) - think(x)).norm(dim=-1)[0]]).tolist(),
    })

ax = sns.barplot(moved, x="position", y="change", hue="block")
ax.axvline(changed, color="gray", ls="--", lw=1)
ax.set(title=f"Token {changed} changed: which outputs move?", xlabel="token position",
       ylabel="change of the output (vector norm)")
ax.legend(title=None);

# %%
moved.pivot(index="block", columns="position", values="change").round(3)

# %% [markdown]
# The feed-forward block moves **only** position 5: each token is examined alone, and no
# other token can ever learn what happened there. Attention moves position 5 **and every
# later position**, because they all may read token 5; the earlier positions stay exactly
# unchanged (a change of zero), because the mask forbids them to look ahead. Communication happens in
# attention and nowhere else; computation per token happens in the FFN.
#
# ## The block: a meeting, then an examination, both added to the notes
#
# A transformer block wraps the two in **residual connections**: each half *adds* its
# result to the token's running vector (the residual stream) instead of replacing it, like
# a doctor appending to a patient's notes rather than rewriting them. Each half reads a
# **layer-normalised** copy of the stream. Placing the norm inside the branch, before
# attention and before the FFN ("pre-norm", GPT-2's choice), leaves a clean path from the
# first layer to the last, which keeps deep stacks easy to train.

# %%
from moe_course.transformer import GPT, Block, GPTConfig, flops_per_token, param_count

show_source(Block.forward)

# %% [markdown]
# For a dense model `self.is_moe` is False and the FFN line is simply `y = self.ffn(h)`.
# The two `MoE` branches are what lesson 08 switches on.
#
# ## A small GPT, and where its parameters sit
#
# The whole model: a token embedding, a stack of blocks, a final norm and a head that
# turns every position's vector into scores for the next character (the head shares its
# weights with the embedding). Here is the one we will train.

# %%
from moe_course.data.corpus import Corpus, CorpusConfig

corpus = Corpus(CorpusConfig())  # the clinic's library: records and skills, made from a seed
STEPS = 300 * SCALE
config = GPTConfig(
    vocab_size=corpus.vocab_size,  # V = 96 characters
    block_size=48 if SCALE == 1 else 64,  # T, characters of context
    d_model=64 if SCALE == 1 else 128,  # D
    n_layers=2 if SCALE == 1 else 4,
    n_heads=4,
    d_ff=256 if SCALE == 1 else 512,  # F = 4·D
    init_scale=None,  # PyTorch's default initialisation; the Switch paper's smaller one matters for lesson 08
)
seed_everything(0)
model = GPT(config)
config

# %%
params, flops = param_count(config), flops_per_token(config)
accounting = pd.DataFrame({
    "parameters": [params.embedding, params.attention, params.ffn, params.norms, params.head],
    "forward FLOPs per token": [0, flops.attention_proj + flops.attention_mix, flops.ffn, 0, flops.head],
}, index=["token embedding", "attention (all blocks)", "feed-forward (all blocks)", "layer norms", "head (tied)"])
accounting["share of parameters"] = (accounting["parameters"] / params.total).map("{:.0%}".format)
accounting["share of FLOPs"] = (accounting["forward FLOPs per token"] / flops.total).map("{:.0%}".format)
accounting.loc["total"] = [params.total, flops.total, "100%", "100%"]
print("param_count agrees with PyTorch's count:", params.total == sum(p.numel() for p in model.parameters()))
accounting

# %% [markdown]
# Read the table per block: attention holds 4·D² weights (queries, keys, values, output
# projection) and the FFN 2·D·F = 8·D² with F = 4·D. So **two thirds of every block's
# parameters sit in the feed-forward block**, and it also does the larger share of the
# block's arithmetic. The FLOPs of attention include 4·T·D per token for the scores and
# the weighted sum, which grow with the context T; the FFN's cost does not depend on T.
# (The embedding is a table lookup: no multiplications.)
#
# Keep this in mind for lesson 08: the FFN is the biggest room in the building, so it is
# where the specialists will sit.
#
# ## Training it on the clinic's library
#
# The corpus mixes the clinic's **records** (facts to memorise: which ward each patient
# belongs to) with **skills** (arithmetic, reversal, sorting, closing brackets, and a small
# grammar). A few samples of each:

# %%
import random

rng = random.Random(1)
pd.DataFrame([{"domain": dom, "sample": corpus.sample(dom, rng=rng).text.strip()} for dom in corpus.domains for _ in range(2)])

# %% [markdown]
# We train with the course's training loop on fresh batches from the stream, and every 50
# steps measure the loss on a fixed **held-out** set (fresh samples, the same records), per
# domain. Loss is the cross-entropy of the next character in nats: $\ln V$ means guessing
# uniformly among the V characters of the vocabulary, 0 means always certain and right.

# %%
import math

from moe_course.training import TrainConfig, train
from moe_course.training.lm import LMTask, complete

task = LMTask(corpus, block_size=config.block_size, eval_rows=64, eval_chunk=32)
untrained = {"step": 0, **task.evaluate(model, "cpu")}  # where we start: about ln 96
run = train(model, task, TrainConfig(steps=STEPS, batch_size=32, lr=1e-2 if SCALE == 1 else 3e-3,
                                     warmup_steps=STEPS // 10, lr_min_ratio=0.1, eval_every=50 * SCALE),
            device="cpu", progress=False)
history = pd.concat([pd.DataFrame([untrained]), run.history], ignore_index=True)
print(f"a uniform guess over the {corpus.vocab_size} characters: ln {corpus.vocab_size} = "
      f"{math.log(corpus.vocab_size):.2f} nats; the untrained model: {untrained['val_loss']:.2f} nats")
print(f"trained {STEPS} steps in {run.seconds:.0f} s")

# %%
domains = list(corpus.domains)
fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
axes[0].plot(history["step"], history["train_loss"], marker="o", ms=3, label="training batches (mean since the last point)")
axes[0].plot(history["step"], history["val_loss"], marker="o", ms=3, label="held-out")
axes[0].set(title="Loss over training", xlabel="training step", ylabel="cross-entropy (nats per character)")
axes[0].legend()
for dom in domains:
    axes[1].plot(history["step"], history[f"val_loss_{dom}"], marker="o", ms=3, label=dom)
axes[1].set(title="Held-out loss per domain", xlabel="training step", ylabel="cross-entropy (nats per character)")
axes[1].legend(ncol=2, fontsize=9)
fig.tight_layout()

# %%
final = history.iloc[-1]
per_domain = pd.DataFrame({
    "held-out loss (nats/char)": [final[f"val_loss_{dom}"] for dom in domains],
    "answers fully right": [final.get(f"val_exact_{dom}", float("nan")) for dom in domains],
}, index=domains)
print(f"held-out loss, all domains: {final['val_loss']:.3f} nats per character")
print("domains from the lowest to the highest loss per character:",
      ", ".join(per_domain["held-out loss (nats/char)"].sort_values().index))
per_domain["answers fully right"] = per_domain["answers fully right"].map(lambda v: "no answers" if pd.isna(v) else f"{v:.0%}")
per_domain.round(3)

# %% [markdown]
# What to look at. At step 0 the untrained model sits near a uniform guess (the printout
# compares the two); the loss then falls fast while the model learns which characters occur
# at all and then the formats (`patient `, `rev `, the shape of a sentence), and more slowly
# after that. Then compare the domains, with two things in mind. Per character, a domain
# whose text is mostly fixed comes out cheap: most of a record (`patient `, the colon) is
# the same every time, and a sentence follows a few rules. Per *answer*, the records are
# another matter: the ward itself is pure memory (16 wards are 4 bits per patient to store),
# and the table shows what share of held-out records the model names completely right.
# Reversal and sorting need a head that reads exactly the right earlier character, so if
# they sit near the top of the ranking, that skill is what this small model has not learned
# yet in a few hundred steps.
#
# ## What the heads read
#
# Now the trained model's attention weights on one record it recalls correctly. We catch the normalised stream
# that enters each block's attention (a forward hook on `ln_1`) and ask the block's
# attention for its weights: one map per layer and head.

# %%
def attention_maps(model, idx):
    """The attention weights of every block and head of a GPT on idx (B, T) → (B, L, H, T, T)."""
    caught = []
    hooks = [b.ln_1.register_forward_hook(lambda mod, inp, out: caught.append(out)) for b in model.blocks]
    try:
        with torch.no_grad():
            model(idx)
            return torch.stack([b.attn.weights(h) for b, h in zip(model.blocks, caught)], dim=1)
    finally:
        for hook in hooks:
            hook.remove()


recalled = [(p, w) for p, w in corpus.facts.items() if complete(model, corpus, f"patient {p}: ").strip() == w]
patient, ward = recalled[0] if recalled else next(iter(corpus.facts.items()))  # a record the model gets right
record = f"patient {patient}: {ward}"
print(f"the model names the right ward for {len(recalled)} of the {len(corpus.facts)} patients; we look at {record!r}")
maps = attention_maps(model, corpus.encode("\n" + record)[None])[0]  # (L, H, T, T); rows start after a newline

# %%
tick = ["⏎"] + ["␣" if c == " " else c for c in record]
L, H = maps.shape[:2]
fig, axes = plt.subplots(L, H, figsize=(3.4 * H, 3.4 * L), squeeze=False)
for layer in range(L):
    for head in range(H):
        ax = axes[layer, head]
        ax.imshow(maps[layer, head], cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(tick)), labels=tick)
        ax.set_yticks(range(len(tick)), labels=tick)
        ax.tick_params(labelsize=7, length=0)
        ax.grid(False)
        ax.set_title(f"layer {layer + 1}, head {head + 1}", fontsize=10)
        ax.set(xlabel="key (read)" if layer == L - 1 else "", ylabel="query (reader)" if head == 0 else "")
fig.suptitle(f"Attention weights of the trained GPT on the record {record!r} (bright = weight near 1)", fontweight="bold")
fig.tight_layout()

# %% [markdown]
# Each small map is one head: rows are the readers, columns what they read, and nothing
# lies above the diagonal. Look for heads with a bright **stripe just below the diagonal**
# (every position reads the character one or two places back: the same offset everywhere,
# which rotary embeddings make easy) and for **bright columns** under the digits (many
# later positions reading the patient number).
#
# One record could be luck. So we measure on every record at once: take each patient's
# prompt `patient NN: `, and for the position of the space after the colon (it has to
# predict the ward's first letter) sum the weight each head puts on the two digits.

# %%
prompts = torch.stack([corpus.encode(f"\npatient {p}: ") for p in corpus.facts])  # (90, 13), all the same length
reader = prompts.shape[1] - 1  # the space after the colon
digits = [i for i, c in enumerate(corpus.decode(prompts[0])) if c.isdigit()]  # where the patient number sits
all_maps = attention_maps(model, prompts)  # (90, L, H, T, T)
digit_weight = all_maps[:, :, :, reader, digits].sum(-1).mean(0)  # (L, H)

ax = plt.figure(figsize=(6.5, 2.2 + 0.5 * L)).gca()
sns.heatmap(digit_weight, annot=True, fmt=".2f", cmap="viridis", vmin=0, vmax=1, ax=ax,
            xticklabels=[f"head {h + 1}" for h in range(H)], yticklabels=[f"layer {i + 1}" for i in range(L)],
            cbar_kws={"label": "weight on the digits"})
ax.tick_params(axis="y", labelrotation=0)
ax.set(title=f"Before naming the ward: attention on the patient number\n(mean over all {len(prompts)} records)",
       xlabel="attention head", ylabel="block");

# %%
best = divmod(int(digit_weight.argmax()), H)
print(f"the head that reads the patient number most: layer {best[0] + 1}, head {best[1] + 1}, "
      f"{digit_weight.max():.0%} of its weight on the two digits "
      f"(spread evenly over the {reader + 1} visible positions it would be {len(digits) / (reader + 1):.0%})")
first, second = all_maps[:, best[0], best[1], reader, digits].mean(0).tolist()
print(f"  of which on the first digit: {first:.0%}, on the second: {second:.0%}")
second_reads_first = all_maps[:, 0, :, digits[1], digits[0]].mean(0)  # (H,) layer 1, second digit → first
print(f"layer 1, weight of the second digit on the first digit, per head: "
      f"{[round(v, 2) for v in second_reads_first.tolist()]} (an even share would be {1 / (digits[1] + 1):.2f})")
if second > first and second_reads_first.max() > 1 / (digits[1] + 1):
    print("this run: the head reads mostly the SECOND digit, and in layer 1 the second digit had already read the "
          "first more than an even share: one position can carry the whole number")
else:
    print("this run: the number is not passed along through the second digit (see the weights above)")

# %% [markdown]
# A head well above the even share is looking the patient number up. Read the last lines
# together. If the head mostly reads the *second* digit while, in layer 1, the second digit
# had already read the first, then that one position carries the whole number: two
# meetings in a row pass the number along. Attention brings it to the position that must
# answer, and the FFNs, working on that one position alone, have to turn number into
# ward. That last step is pure memory, 90 records of 4 bits each, and memory is what
# lesson 08 gives more room. (With another seed or at a larger SCALE, other heads may do
# the job; the measurement above finds them.)
#
# ## Let it write
#
# `complete` continues a prompt greedily (the most likely character each time) until the
# end of the line. Here are held-out prompts of every domain with an answer, next to the
# right answer.

# %%
rng = random.Random(7)
rows = []
for dom in ("facts", "arithmetic", "reversal", "sorting", "brackets"):
    for _ in range(3):
        sample = corpus.sample(dom, rng=rng, held_out=True)
        said = complete(model, corpus, sample.prompt).strip()
        rows.append({"domain": dom, "prompt": sample.prompt, "model says": said, "right answer": sample.answer.strip(),
                     "right?": "✓" if said == sample.answer.strip() else "✗"})
pd.DataFrame(rows)

# %% [markdown]
# And free writing with `GPT.generate`: start from a newline and sample each next
# character from the model's probabilities (temperature 0.8: a little bolder than greedy).
# Every line is a new sample of whatever domain the model decides to write.

# %%
start = corpus.encode("\n")[None]  # (1, 1)
written = model.generate(start, 300, temperature=0.8, generator=torch.Generator().manual_seed(0))
print(corpus.decode(written[0, 1:]))

# %% [markdown]
# Compare form and content. For the form, look at the shapes: do records look like
# `patient NN: ward`, sums like `a+b=c`, and do sentences have a subject, a verb and an
# object? For the content, check a few wards against the table above (the "right?" column),
# and the sums. If the form is right far more often than the content, the model knows *how*
# the clinic's notes are written better than *what* is in them.
#
# ## Recap
#
# - Attention is where tokens talk: each position reads earlier positions (never later
#   ones), with weights from a softmax over scaled query–key scores; the FFN thinks about
#   each token alone.
# - A pre-norm block adds both to the residual stream: x + attn(ln₁(x)), then
#   x + ffn(ln₂(x)); the FFN holds two thirds of a block's parameters.
# - A 2-block GPT trained for a few hundred steps: its loss per domain, the share of
#   records it names right and its samples show what it has learned of the formats and
#   what of the records.
#
# **Next:** lesson 08 keeps the meeting (attention) and turns the examination room into a
# hospital: every FFN becomes a Switch layer, a GP with a room of specialists, at the same
# FLOPs per token. We will see whether the extra memory helps where this model struggles,
# the records.
#
# **Exercises:** `exercises/07_attention_and_the_transformer.ipynb`: write causal
# self-attention (scores, scale, mask, softmax, weighted sum) and the pre-norm block.
#
# **Read more:** Vaswani et al. 2017, *Attention Is All You Need*, arXiv:1706.03762
# (scaled dot-product attention, eq. 1); Radford et al. 2019, *Language Models are
# Unsupervised Multitask Learners* (the GPT-2 report: pre-norm blocks); Xiong et al. 2020,
# *On Layer Normalization in the Transformer Architecture*, arXiv:2002.04745 (why pre-norm
# trains more easily); Su et al. 2021, *RoFormer: Enhanced Transformer with Rotary Position
# Embedding*, arXiv:2104.09864 (RoPE).
