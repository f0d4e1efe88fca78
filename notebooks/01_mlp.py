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
# - measure **negative interference**: compare one MLP for all specialties with a team of
#   specialists of the same total size, over five seeds, and look for the reason in its
#   gradients while it learns.
#
# Shape letters used throughout the course: **B** batch, **T** time (sequence position),
# **D** model width, **F** hidden width, **E** experts, **K** top-k, **C** capacity,
# **N** = B·T tokens.

# %%
import dataclasses

import pandas as pd
import torch

from moe_course import get_device, seed_everything
from moe_course.figures.plots import use_course_style

# ---- the one knob of this lesson -------------------------------------------
# 1 runs in well under a minute on a laptop CPU. Larger values train every model
# longer (SCALE × the steps); the comparison of the generalist with the team then
# shows how much of the gap more training closes.
SCALE = 1
# -----------------------------------------------------------------------------

device = get_device()
seed_everything(0)
use_course_style()
# The clinic's models are tiny: on a CPU one thread runs them fastest (too little work
# per step to share out, and no waiting for a busy second core).
torch.set_num_threads(1)

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
# diagnoses. Every clinic lesson trains with the same recipe and the same learning rate,
# `CLINIC_LR`, so a model trained here and in lesson 03 gives the same result.
#
# A single training run can be lucky or unlucky, so we train **five generalists**, from five
# seeds (the seed sets the starting weights and the order of the batches), and report the
# mean and the spread. While each one trains, an `AgreementTracker` takes a measurement
# every 10 steps that we need at the end of the lesson; ignore it for now.

# %%
from moe_course.analysis.metrics import AgreementTracker
from moe_course.data.clinic import make_clinic
from moe_course.training import CLINIC_LR, ClassificationTask, TrainConfig, train

clinic = make_clinic(num_specialties=4, seed=0)
S, H = clinic.num_specialties, 16  # H: hidden units per specialist (see below)
SEEDS = range(5)
config = TrainConfig(steps=600 * SCALE, batch_size=128, lr=CLINIC_LR, eval_every=10)
task = ClassificationTask.from_clinic(clinic)

# two separate batches of each specialty's held-out patients (the tracker compares them)
halves_a = [(clinic.val.of_specialty(s).x[:256], clinic.val.of_specialty(s).diagnosis[:256]) for s in range(S)]
halves_b = [(clinic.val.of_specialty(s).x[256:512], clinic.val.of_specialty(s).diagnosis[256:512]) for s in range(S)]

generalists, trackers = [], []
for seed in SEEDS:
    seed_everything(seed)
    generalist = FeedForward(clinic.d_in, S * H, d_out=clinic.num_diagnoses)
    tracker = AgreementTracker(halves_a, halves_b)
    tracker(0, generalist)  # before the first step
    train(generalist, task, dataclasses.replace(config, seed=seed), device=device, callback=tracker)
    generalists.append(generalist.cpu())
    trackers.append(tracker)

with torch.no_grad():
    generalist_logits = [g(clinic.val.x) for g in generalists]  # one (N, classes) per seed
acc_generalist = torch.tensor([(lg.argmax(-1) == clinic.val.diagnosis).float().mean().item() for lg in generalist_logits])
print(f"generalist: {count_parameters(generalists[0]):,} parameters, held-out accuracy {acc_generalist.mean():.1%} "
      f"(seeds from {acc_generalist.min():.1%} to {acc_generalist.max():.1%}; chance is {1 / clinic.num_diagnoses:.0%})")

# %% [markdown]
# Better than chance, but is it good? Accuracy per specialty tells us where it goes wrong
# (mean over the five seeds; the spread in brackets is the lowest and highest seed).

# %%
from moe_course.analysis.metrics import accuracy_by_group


def per_specialty(logits_per_seed):
    """(seeds, S): held-out accuracy of each seed's model in each specialty."""
    return torch.stack([accuracy_by_group(lg, clinic.val.diagnosis, clinic.val.specialty, S) for lg in logits_per_seed])


def mean_and_range(acc):
    return [f"{m:.1%} ({lo:.1%}–{hi:.1%})" for m, lo, hi in zip(acc.mean(0), acc.min(0).values, acc.max(0).values)]


generalist_by_specialty = per_specialty(generalist_logits)
pd.Series(mean_and_range(generalist_by_specialty), index=clinic.specialties, name="generalist accuracy")

# %% [markdown]
# ## A team of specialists, of the same total size
#
# Now the alternative: one small MLP per specialty, each with $H$ hidden units, so the
# team has $S \cdot H$ hidden units in total, exactly the generalist's width. Each
# specialist trains only on its own specialty's patients, with the same recipe and number
# of steps as the generalist, and again from five seeds. For now we cheat a little: every
# patient is sent to the right specialist because we *look at the specialty label*. That is
# a perfect GP, an **oracle**; lessons 03–04 will learn the GP instead.

# %%
from moe_course.experiments.specialists import train_specialists

teams = [train_specialists(clinic, d_ff=H, config=dataclasses.replace(config, seed=seed, eval_every=config.steps),
                           device=device, progress=False) for seed in SEEDS]
team_logits = [team(clinic.val.x, clinic.val.specialty) for team in teams]
acc_team = torch.tensor([(lg.argmax(-1) == clinic.val.diagnosis).float().mean().item() for lg in team_logits])
team_params = sum(count_parameters(m) for m in teams[0].specialists)
for name, params, acc in (("one generalist", count_parameters(generalists[0]), acc_generalist),
                          (f"{S} specialists", team_params, acc_team)):
    print(f"{name:>15}: {params:,} parameters, held-out accuracy {acc.mean():.1%} "
          f"(seeds from {acc.min():.1%} to {acc.max():.1%})")
gap = acc_team - acc_generalist  # paired by seed
print(f"the team's lead: {100 * gap.mean():+.1f} percentage points (seeds from {100 * gap.min():+.1f} to {100 * gap.max():+.1f}); "
      + ("it is ahead for every seed." if gap.min() > 0 else "not ahead for every seed."))

# %%
from moe_course.figures.plots import grouped_bars

team_by_specialty = per_specialty(team_logits)
ax = grouped_bars(
    {"one generalist (F = S·H)": generalist_by_specialty.mean(0),
     f"{S} specialists (F = H each), perfect GP": team_by_specialty.mean(0)},
    clinic.specialties,
    title=f"Same size, different results: negative interference (mean of {len(SEEDS)} seeds)",
    ylabel="held-out accuracy",
    chance=1 / clinic.num_diagnoses,
)
ax.set_ylim(0, 1.12)
ahead = (team_by_specialty.min(0).values > generalist_by_specialty.max(0).values).tolist()
print("specialties where every team beats every generalist:",
      ", ".join(name for name, a in zip(clinic.specialties, ahead) if a) or "none")

# %% [markdown]
# Nearly the same number of parameters (printed above), the same number of training steps.
# Where the team's worst seed beats the generalist's best seed (the specialties listed
# above), the difference is not luck. Is the generalist a *jack of all trades* whose rules
# get in each other's way? Its gradients can tell.
#
# ## Why: the specialties pull the weights in opposite directions
#
# Look at the gradient: the direction in which one training step moves the weights. Take
# the loss on a batch of cardiology patients and compute its gradient $g_1$; do the same
# for neurology and get $g_2$. Their cosine, $\cos(g_1, g_2) = g_1 \cdot g_2 / (|g_1|\,|g_2|)$,
# says how the two specialties get along:
#
# - near $+1$: a step that helps cardiology helps neurology too;
# - near $0$: the two do not care about each other;
# - negative: a step that helps one **hurts** the other (negative interference).
#
# Remember how the clinic was made: every second specialty is a "contradicting twin" of
# the one before (cardiology and ophthalmology, neurology and dermatology), with the same
# measurements leading to different diagnoses. If interference is real, the twins'
# gradients should point against each other.
#
# We need a **control** too. Two batches of the *same* specialty never agree perfectly,
# because every batch holds different patients. So the tracker split each specialty's
# held-out patients into two halves and compared every specialty's first half with every
# specialty's second half (`gradient_agreement`). On the diagonal of its matrix it compares
# a specialty with itself, on different patients: that is the most agreement we can hope
# to see. It did this every 10 steps of training, for each of the five generalists.

# %%
from moe_course.analysis.metrics import gradient_agreement
from moe_course.show import show_source

show_source(gradient_agreement)

# %%
from moe_course.figures.plots import heatmap

steps = torch.tensor(trackers[0].steps)
agreement = torch.stack([t.stacked() for t in trackers])  # (seeds, measurements, S, S)

same = torch.eye(S, dtype=torch.bool)  # a specialty against itself, on other patients: the control
twins = torch.zeros(S, S, dtype=torch.bool)
twins[torch.arange(S), torch.arange(S) ^ 1] = True  # 0 and 1 are twins, 2 and 3 are twins
others = ~same & ~twins
pairs = {"same specialty, two halves (control)": same, "contradicting twins": twins, "other specialties": others}
curves = {name: agreement[:, :, mask].mean(-1) for name, mask in pairs.items()}  # (seeds, measurements) each

ax = plt.figure(figsize=(8, 4.2)).gca()
for name, c in curves.items():
    ax.plot(steps, c.mean(0), lw=2, label=name)
    ax.fill_between(steps, c.min(0).values, c.max(0).values, alpha=0.25)
ax.axhline(0, color="black", lw=0.8)
ax.set(title=f"How the specialties' gradients agree while the generalist learns ({len(SEEDS)} seeds)",
       xlabel="training step", ylabel="cosine of the gradients", ylim=(-1, 1))
ax.legend(title="line: mean; band: lowest to highest seed", fontsize=9, title_fontsize=9);

# %% [markdown]
# Two moments deserve a closer look: the step where the twins disagree most (mean over
# the seeds), and the end of training. The heatmaps show the whole matrix at those two
# steps, averaged over the five seeds; the printout gives the spread.

# %%
early = int(curves["contradicting twins"].mean(0).argmin())  # the step where the twins disagree most
late = len(steps) - 1

fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
for ax, i, when in ((axes[0], early, "where the twins disagree most"), (axes[1], late, "end of training")):
    heatmap(agreement[:, i].mean(0), rows=clinic.specialties, cols=clinic.specialties, fmt="+.2f", cmap="vlag",
            vmin=-1, vmax=1, ax=ax, title=f"step {int(steps[i])}: {when}",
            xlabel="specialty (second half of its patients)", ylabel="specialty (first half)")
fig.suptitle("Gradient agreement between specialties (mean of the seeds; diagonal: the control)", fontweight="bold")
fig.tight_layout()

for name, c in curves.items():
    print(f"{name:>37}: step {int(steps[early]):>3}: {c[:, early].mean():+.2f} (seeds {c[:, early].min():+.2f} to "
          f"{c[:, early].max():+.2f});  step {int(steps[late])}: {c[:, late].mean():+.2f} "
          f"(seeds {c[:, late].min():+.2f} to {c[:, late].max():+.2f})")

# %% [markdown]
# What the run says, in words (this cell reads the numbers above and writes the verdict):

# %%
control, twin, other = (curves[name] for name in pairs)
if (twin[:, early] < 0).all() and (control[:, early] > 0).all():
    print(f"At step {int(steps[early])}, for every seed, the twins' gradients point against each other while two "
          "halves of one specialty agree: a step that helps a specialty hurts its twin. That is negative interference.")
else:
    print(f"At step {int(steps[early])} the twins' gradients do not point against each other for every seed: "
          "this run does not show the designed conflict clearly.")
if other[:, early].abs().mean() < twin[:, early].abs().mean() / 2:
    print("Specialties that are not twins get along far better: their gradients are closer to unrelated (cosine near 0).")
if control[:, late].mean() < control[:, early].mean() and twin[:, late].abs().mean() < twin[:, early].abs().mean():
    print(f"By step {int(steps[late])} even the control has fallen (two halves of one specialty agree less), and "
          "the twins' disagreement has faded with it.")

# %% [markdown]
# Why would the conflict fade at the end? Early on, each specialty's gradient says what the
# whole specialty needs, so two batches of it agree and the twins openly pull in opposite
# directions. As the generalist settles into its compromise, the part of the gradient every
# patient of a specialty shares shrinks, and what remains is mostly the particular mistakes
# of the patients in the batch. If the control falls, that is what happened, and every
# cosine shrinks towards zero with it. So a gradient measured on the *trained* model can hide
# the conflict that shaped it; the time to look is while the compromise is being made.
#
# Each specialist, in contrast, gets gradients from one rule only and is never pulled two
# ways. This tug of war is exactly the situation a Mixture-of-Experts layer is made for.
#
# ## Recap
#
# - The feed-forward block maps each token $D \to F \to D$ on its own; its parameters are
#   $2DF + F + D$ and it costs $4DF$ FLOPs per token, so a dense model's knowledge and
#   effort grow together.
# - Trained on conflicting specialties, one MLP is compared with specialists of the same
#   total size over five seeds; the gradient agreement, measured while it learns against a
#   within-specialty control, shows where the specialties pull against each other.
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
