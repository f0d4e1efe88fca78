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
# # 01 · One doctor for every ailment: the feed-forward block
#
# Before we hire a team of specialists we need to understand one doctor well. In a
# transformer that doctor is the **feed-forward block** (FFN, or MLP): the part of every
# layer that works on each token alone, and that holds most of the model's parameters.
# In a Mixture-of-Experts model, each expert *is* one of these blocks.
#
# **In this lesson you will**
#
# - read the feed-forward block and the shapes that flow through it;
# - count its parameters and its FLOPs per token, and see that in a dense model the two
#   always grow together;
# - train one MLP on the clinic, where each specialty has its own diagnosis rule;
# - measure **negative interference**: one MLP for all specialties does worse than a team
#   of specialists of the same total size, and see why in its gradients.
#
# Shape letters used throughout the course: **B** batch, **T** time (sequence position),
# **D** model width, **F** hidden width, **E** experts, **K** top-k, **C** capacity,
# **N** = B·T tokens.

# %%
import pandas as pd
import torch

from moe_course import get_device, seed_everything
from moe_course.plots import use_course_style

# ---- the one knob of this lesson -------------------------------------------
# 1 runs in well under a minute on a laptop CPU. Larger values train every model
# longer (SCALE × the steps): the generalist slowly closes part of the gap, but
# only part of it, and only by spending more compute.
SCALE = 1
# -----------------------------------------------------------------------------

device = get_device()
seed_everything(0)
use_course_style()

# %% [markdown]
# ## The feed-forward block
#
# For a token vector $x \in \mathbb{R}^D$ the block computes
#
# $$\mathrm{FFN}(x) = \mathrm{GELU}(x W_{in} + b_{in})\, W_{out} + b_{out},\qquad
#   W_{in} \in \mathbb{R}^{D\times F},\; W_{out} \in \mathbb{R}^{F\times D}$$
#
# (Vaswani et al. 2017, *Attention Is All You Need*, arXiv:1706.03762, eq. 2, with the
# GELU that GPT models use instead of ReLU). It widens each token to a hidden size $F$
# (usually $4D$), applies a non-linearity, and projects back to $D$. Here is the package's
# implementation, the one every later lesson reuses:

# %%
from moe_course.experts import FeedForward
from moe_course.show import show_source

show_source(FeedForward.forward)

# %% [markdown]
# The block treats every token independently: a batch of sequences (B, T, D) comes out
# with the same shape, and token $t$'s output depends only on token $t$'s input.

# %%
ffn = FeedForward(d_model=16, d_ff=64)
x = torch.randn(2, 5, 16)  # (B, T, D)
y = ffn(x)  # (B, T, D)
print("input", tuple(x.shape), "→ output", tuple(y.shape))

x_changed = x.clone()
x_changed[0, 3] += 1.0  # change one token
changed = (ffn(x_changed) - y).abs().sum(-1) > 0  # (B, T): which outputs moved?
print("outputs that changed when token (0, 3) changed:\n", changed)

# %% [markdown]
# ## What a doctor knows, and what a visit costs
#
# Two numbers describe a block:
#
# - **parameters** — the weights it stores: $2DF + F + D$. Loosely, *what it knows*.
# - **FLOPs per token** — the arithmetic it spends on each token. Counting a multiply-add
#   as 2 FLOPs and only the two matmuls: $2DF + 2FD = 4DF$. Loosely, *the effort of a visit*.
#
# Every weight is used exactly once per token (one multiply, one add), so FLOPs per token
# ≈ 2 × parameters, whatever the size. That is the tie a dense model cannot escape.

# %%
from moe_course.flops import count_parameters, ffn_flops, ffn_param_count

rows = []
for d_model in (64, 256, 768, 2048, 4096):
    d_ff = 4 * d_model
    params = ffn_param_count(d_model, d_ff)
    flops = ffn_flops(1, d_model, d_ff)
    rows.append({"D": d_model, "F": d_ff, "parameters": params, "FLOPs per token": flops,
                 "FLOPs / parameter": flops / params})
sizes = pd.DataFrame(rows)
assert sizes["parameters"][0] == count_parameters(FeedForward(64, 256))  # formula = real module
sizes.style.format({"parameters": "{:,}", "FLOPs per token": "{:,}", "FLOPs / parameter": "{:.3f}"})

# %%
import matplotlib.pyplot as plt

ax = plt.figure().gca()
ax.loglog(sizes["D"], sizes["parameters"], "o-", label="parameters (knowledge)")
ax.loglog(sizes["D"], sizes["FLOPs per token"], "s-", label="FLOPs per token (effort)")
ax.set(title="A dense FFN: knowledge and effort grow together", xlabel="model width D (F = 4D)",
       ylabel="count (log scale)")
ax.legend();

# %% [markdown]
# The two lines are parallel: to know more, a dense model must work harder on every
# single token. Lesson 04 will break that tie with a router. First, let us see why one
# doctor struggles when the patients are varied.
#
# ## One doctor for every specialty
#
# The clinic (lesson 00) has four specialties. Each one reads the same measurements with
# its own diagnosis rule, and the rules contradict each other. We train a single MLP, the
# **generalist**, on all patients: input the patient vector, output a score per
# diagnosis. It is the same `FeedForward` block, with an output width of the number of
# diagnoses.

# %%
from moe_course.clinic import make_clinic
from moe_course.training import ClassificationTask, TrainConfig, train

clinic = make_clinic(num_specialties=4, seed=0)
S, H = clinic.num_specialties, 16  # H: hidden units per specialist (see below)
config = TrainConfig(steps=600 * SCALE, batch_size=128, lr=3e-3, eval_every=50)

seed_everything(0)
generalist = FeedForward(clinic.d_in, S * H, d_out=clinic.num_diagnoses)
result = train(generalist, ClassificationTask.from_clinic(clinic), config, device=device)
print(f"generalist: {count_parameters(generalist):,} parameters, "
      f"held-out accuracy {result.final['val_acc']:.1%} (chance is {1 / clinic.num_diagnoses:.0%})")

# %% [markdown]
# Clearly better than chance, but far from perfect. Where does it go wrong? Accuracy per
# specialty tells us.

# %%
from moe_course.metrics import accuracy_by_group

with torch.no_grad():
    logits = generalist(clinic.val.x.to(device)).cpu()
acc_generalist = accuracy_by_group(logits, clinic.val.diagnosis, clinic.val.specialty, S)
pd.Series(acc_generalist.numpy(), index=clinic.specialties, name="generalist accuracy").map("{:.1%}".format)

# %% [markdown]
# ## A team of specialists, of the same total size
#
# Now the alternative: one small MLP per specialty, each with $H$ hidden units, so the
# team has $S \cdot H$ hidden units in total, exactly the generalist's width. Each
# specialist trains only on its own specialty's patients, with the same number of steps
# as the generalist. For now we cheat a little: every patient is sent to the right
# specialist because we *look at the specialty label*. That is a perfect GP, an
# **oracle**; lessons 03–04 will learn the GP instead.

# %%
from moe_course.specialists import train_specialists

team = train_specialists(clinic, d_ff=H, config=config, device=device)
team_params = sum(count_parameters(m) for m in team.specialists)
acc_team = accuracy_by_group(team(clinic.val.x, clinic.val.specialty), clinic.val.diagnosis, clinic.val.specialty, S)
overall_team = (team(clinic.val.x, clinic.val.specialty).argmax(-1) == clinic.val.diagnosis).float().mean()
print(f"generalist: {count_parameters(generalist):,} parameters, accuracy {result.final['val_acc']:.1%}")
print(f"specialists: {team_params:,} parameters in total, accuracy {overall_team:.1%}")

# %%
from moe_course.plots import grouped_bars

grouped_bars(
    {"one generalist (F = S·H)": acc_generalist, f"{S} specialists (F = H each), perfect GP": acc_team},
    clinic.specialties,
    title="Same size, different results: negative interference",
    ylabel="held-out accuracy",
    chance=1 / clinic.num_diagnoses,
).set_ylim(0, 1.12);

# %% [markdown]
# Same number of parameters, same number of training steps, and the team is far better in
# every specialty. The generalist is a *jack of all trades*: the rules interfere.
#
# ## Why: the specialties pull the weights in opposite directions
#
# Take the trained generalist and compute the gradient of the loss on a batch of each
# specialty. If two specialties' gradients point in opposite directions (negative cosine),
# a step that helps one hurts the other. Remember how the clinic was made: every second
# specialty is a "contradicting twin" of the one before, with the same measurements
# leading to different diagnoses.

# %%
from moe_course.metrics import gradient_cosines
from moe_course.plots import heatmap

batches = []
for s in range(S):
    own = clinic.val.of_specialty(s)
    batches.append((own.x[:512].to(device), own.diagnosis[:512].to(device)))
cosines = gradient_cosines(generalist, batches).cpu()
off_diagonal = cosines[~torch.eye(S, dtype=torch.bool)]
print(f"off-diagonal cosines: mean {off_diagonal.mean():.2f}, "
      f"{(off_diagonal < 0).float().mean():.0%} of them negative")
heatmap(cosines, rows=clinic.specialties, cols=clinic.specialties, fmt=".2f", cmap="vlag", vmin=-1, vmax=1,
        title="Gradient agreement between specialties (trained generalist)", xlabel="specialty", ylabel="specialty");

# %% [markdown]
# Read the off-diagonal cells: they are mostly negative. Wherever the generalist stands
# now, the step that would help cardiology makes some other specialty worse, so
# training settles into a compromise that serves nobody well. Each specialist, in
# contrast, gets gradients from one rule only and is never pulled two ways. This tug of
# war is exactly the situation a Mixture-of-Experts layer is made for.
#
# ## Recap
#
# - The feed-forward block maps each token $D \to F \to D$ on its own; its parameters are
#   $2DF + F + D$ and it costs $4DF$ FLOPs per token, so a dense model's knowledge and
#   effort grow together.
# - Trained on conflicting specialties, one MLP does worse than specialists of the same
#   total size: the specialties' gradients interfere.
# - A perfect GP plus specialists is the upper bound we want a learned router to reach.
#
# **Next:** lesson 02 tries the two cheap fixes from the story: more copies of the same
# doctor (an ensemble) and a bigger generalist.
#
# **Exercises:** `exercises/01_mlp.ipynb`: the FFN forward pass, its parameter and FLOP
# counts, and accuracy per specialty.
#
# **Read more:** Vaswani et al. 2017, *Attention Is All You Need*, arXiv:1706.03762;
# Jacobs, Jordan, Nowlan and Hinton 1991, *Adaptive Mixtures of Local Experts* (Neural
# Computation 3(1)), who motivate experts by exactly this interference; Yu et al. 2020,
# *Gradient Surgery for Multi-Task Learning*, arXiv:2001.06782, on conflicting gradients.
