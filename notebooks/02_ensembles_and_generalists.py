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
# # 02 · A second cardiologist, or a generalist?
#
# Lesson 01 ended with one doctor who had to serve every specialty and did it badly. Before
# we build a GP, let us try the two cheap fixes from the story of lesson 00:
#
# 1. **A second opinion.** Ask more doctors *trained exactly like the first* and average
#    what they say.
# 2. **A generalist.** One doctor who has seen patients of every specialty.
#
# **In this lesson you will**
#
# - train 16 identical doctors that differ only in their random seed, and average their
#   probabilities (an *ensemble*);
# - split their error exactly into **bias** (all doctors wrong the same way) and
#   **variance** (doctors disagreeing), and watch averaging shrink the variance and leave
#   the bias alone;
# - see a generalist the size of one specialist underfit the clinic, and a specialist fail
#   outside its own specialty;
# - see how an ensemble turns into a mixture of experts once the weights may depend on
#   the patient.
#
# Shape letters: **N** patients, **D** patient width, **F** hidden width; in this lesson
# **R** counts the members of an ensemble and **M** the size of a smaller ensemble.

# %%
import pandas as pd
import torch

from moe_course import get_device, seed_everything
from moe_course.plots import use_course_style

# ---- the one knob of this lesson -------------------------------------------
# 1 runs in well under a minute on a laptop CPU. Larger values train every doctor
# longer (SCALE × the steps): every doctor gets a little better, the generalists
# stay well behind the specialists.
SCALE = 1
# -----------------------------------------------------------------------------

device = get_device()
seed_everything(0)
use_course_style()
# The clinic's doctors are tiny networks: on a CPU one thread runs them fastest, since
# there is too little work per step to share out (and a busy machine makes sharing slow).
torch.set_num_threads(1)

# %% [markdown]
# The clinic of lessons 00–01: four specialties, each with its own diagnosis rule, and
# every odd specialty a "contradicting twin" of the one before it (same measurements,
# every diagnosis renamed). All doctors in this lesson are the clinic MLP of lesson 01,
# `FeedForward(d_in, F, d_out=diagnoses)`, with **F = 16 hidden units: the size of one
# specialist**, and all train with the same recipe.

# %%
from moe_course.clinic import make_clinic
from moe_course.training import ClassificationTask, TrainConfig

clinic = make_clinic(num_specialties=4, seed=0)
task = ClassificationTask.from_clinic(clinic)
S, H = clinic.num_specialties, 16  # specialties; hidden units of one doctor
R = 16  # doctors in the ensemble
CONFIG = TrainConfig(steps=600 * SCALE, batch_size=128, lr=1e-2, eval_every=50)
x_val, y_val = clinic.val.x, clinic.val.diagnosis
print(f"{len(clinic.train)} training patients, {len(clinic.val)} held-out; chance accuracy {1 / clinic.num_diagnoses:.0%}")

# %% [markdown]
# ## Approach 1: a second opinion from a doctor trained the same way
#
# Two doctors with the same education still disagree on some patients: they started
# with different first impressions and saw cases in a different order. For a network,
# both come from the **seed**: the random initial weights and the random order of the
# training batches. `train_ensemble` trains R models that differ in nothing else:

# %%
from moe_course.ensembles import train_ensemble
from moe_course.show import show_source

show_source(train_ensemble)

# %%
from moe_course.experts import FeedForward

ensemble = train_ensemble(lambda: FeedForward(clinic.d_in, H, d_out=clinic.num_diagnoses), task, CONFIG,
                          num_members=R, device=device)
member_logits = ensemble(x_val)  # (R, N, diagnoses)
member_acc = (member_logits.argmax(-1) == y_val).float().mean(dim=1)  # (R,)
print(f"{R} doctors trained; held-out accuracy of one doctor: from {member_acc.min():.1%} to {member_acc.max():.1%} "
      f"(mean {member_acc.mean():.1%})")

# %% [markdown]
# How often do they disagree? For each patient, compare every doctor's top diagnosis with
# the majority's.

# %%
votes = member_logits.argmax(-1)  # (R, N): each doctor's diagnosis
majority = votes.mode(dim=0).values  # (N,)
unanimous = (votes == majority).all(dim=0).float().mean()
print(f"all {R} doctors give the same diagnosis for {unanimous:.1%} of the patients; "
      f"on the other {1 - unanimous:.1%} at least one of them disagrees")

# %% [markdown]
# ### Averaging the doctors
#
# The ensemble's opinion is the average of the doctors' **probabilities** (not of their raw
# scores, the logits): each doctor's opinion is a distribution over the diagnoses, and so is
# their average. This is exercise 2.1:

# %%
from moe_course.ensembles import average_probs

show_source(average_probs)

# %%
ensemble_probs = average_probs(member_logits)  # (N, diagnoses)
ensemble_acc = (ensemble_probs.argmax(-1) == y_val).float().mean()
print(f"one doctor: {member_acc.mean():.1%} on average; all {R} averaged: {ensemble_acc:.1%}")

# %% [markdown]
# Sixteen times the compute for a few points of accuracy. Why so little? Because of *what
# kind* of error averaging can remove.
#
# ## Bias and variance, exactly
#
# Measure a doctor's answer $p$ (a probability for each diagnosis) against the truth $y$
# (one-hot) by the squared distance $\lVert p - y\rVert^2 = \sum_c (p_c - y_c)^2$, the
# **Brier score**. Let $\bar p$ be the average of the R doctors' answers. Then, for every
# single patient,
#
# $$\underbrace{\frac1R \sum_r \lVert p_r - y\rVert^2}_{\text{error of a typical doctor}}
#   = \underbrace{\lVert \bar p - y\rVert^2}_{\text{bias}^2:\ \text{wrong the same way}}
#   + \underbrace{\frac1R \sum_r \lVert p_r - \bar p\rVert^2}_{\text{variance: disagreement}}$$
#
# (expand the square around $\bar p$; the cross term averages to zero). The clinic's rules
# are deterministic, so there is no third, "noise" term. Exercise 2.2 asks you to write it:

# %%
from moe_course.ensembles import brier_decomposition

show_source(brier_decomposition)

# %%
member_probs = torch.softmax(member_logits, dim=-1)  # (R, N, diagnoses)
parts = brier_decomposition(member_probs, y_val)
gap = (parts.error - parts.bias - parts.variance).abs().max()
summary = parts.summary()
print("mean over patients: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
print(f"largest |error - bias - variance| over the {len(y_val)} patients: {gap:.1e} (float rounding)")
print(f"share of the error that is bias: {summary['bias'] / summary['error']:.0%}")

# %% [markdown]
# Most of a typical doctor's error is bias: the doctors mostly agree with each other and
# are wrong *together*.
#
# ## What averaging M doctors buys
#
# Split the 16 doctors into ensembles of M = 1, 2, 4 and 8 (16 ensembles of one, 8 of two,
# ...; no doctor in two ensembles) and decompose the error of those ensembles the same way.
# Averaging is linear, so the ensembles' average prediction is the same $\bar p$ for every
# M: the bias cannot move. Only the variance can shrink.

# %%
from moe_course.ensembles import bias_variance_by_size

sizes = [1, 2, 4, 8]
by_size = bias_variance_by_size(member_probs, y_val, sizes)
by_size["variance / variance of one doctor"] = by_size["variance"] / by_size["variance"].iloc[0]
by_size["1 / M"] = 1 / by_size["size"]
by_size[f"1 / M, for {R} doctors in all"] = (1 / by_size["size"] - 1 / R) / (1 - 1 / R)
by_size.style.format({"error": "{:.4f}", "bias": "{:.4f}", "variance": "{:.4f}", "accuracy": "{:.1%}",
                      "variance / variance of one doctor": "{:.3f}", "1 / M": "{:.3f}",
                      f"1 / M, for {R} doctors in all": "{:.3f}"}).hide(axis="index")

# %%
import matplotlib.pyplot as plt

from moe_course.plots import bias_variance_bars

fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
bias_variance_bars(by_size, title="Averaging shrinks the variance, not the bias", ax=axes[0])
axes[1].plot(by_size["size"], by_size["accuracy"], "o-", label="ensembles of M doctors (mean)")
axes[1].axhline(member_acc.max().item(), ls=":", color="gray", lw=1)
axes[1].annotate("best single doctor", (by_size["size"].iloc[0], member_acc.max().item()), xytext=(0, 4),
                 textcoords="offset points", color="gray", fontsize=8)
axes[1].set_xscale("log", base=2)
axes[1].set(title="Held-out accuracy of the ensembles", xlabel="ensemble size M (doctors averaged, log scale)",
            ylabel="held-out accuracy", xticks=sizes, xticklabels=[str(m) for m in sizes])
axes[1].xaxis.set_minor_locator(plt.NullLocator())
axes[1].set_ylim(0.7, 1.0)  # a 30-point window, so that small gains look small
axes[1].yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
axes[1].legend(loc="lower right")
fig.tight_layout()

# %% [markdown]
# Read the left panel from left to right: the blue part (bias) is the same height in every
# bar; the orange part (variance) falls, and it was small to begin with. The table puts the
# measured fall next to the 1/M law for independent doctors. With only 16 doctors in all,
# the ensembles of 8 are compared with an average made of just two of them, so their spread
# looks smaller still; the last column is the 1/M law corrected for that,
# $(1/M - 1/R)/(1 - 1/R)$, and the measured ratios follow it closely.
#
# Averaging more doctors quickly runs out of error to remove: what is left is the bias, the
# part that identical training makes every doctor share. *All the cardiologists are wrong
# the same way.*
#
# The same holds for the cross-entropy the doctors were trained on: the loss of the
# averaged probabilities is never above the doctors' average loss (Jensen's inequality),
# and the gap is what disagreement buys. Exercise 2.3 computes the ensemble's loss:

# %%
from moe_course.ensembles import log_loss_gap

losses = pd.DataFrame([{"ensemble size M": m, **log_loss_gap(member_logits[:m], y_val)} for m in sizes])
losses.columns = ["ensemble size M", "doctors' mean cross-entropy", "ensemble's cross-entropy", "gap (what averaging buys)"]
losses.style.format(precision=3).hide(axis="index")

# %% [markdown]
# ## Approach 2: a generalist the size of one specialist
#
# Each doctor above *is* a generalist: 16 hidden units, trained on patients of every
# specialty. For comparison we train a team of specialists of the same size, each on its
# own specialty's patients only, with the same recipe. The first of them is our
# **cardiologist**. The team, with a perfect GP that reads the specialty label (the oracle
# of lesson 01), is the upper bound.

# %%
from moe_course.metrics import accuracy_by_group
from moe_course.specialists import train_specialists

team = train_specialists(clinic, d_ff=H, config=CONFIG, device=device)
cardiologist, generalist = team.specialists[0], ensemble.members[0]
with torch.no_grad():
    accuracy = {
        "one cardiologist (F = 16)": accuracy_by_group(cardiologist(x_val), y_val, clinic.val.specialty, S),
        "one generalist (F = 16)": accuracy_by_group(generalist(x_val), y_val, clinic.val.specialty, S),
        f"{R} generalists averaged": accuracy_by_group(ensemble_probs, y_val, clinic.val.specialty, S),
        f"{S} specialists (F = 16 each), perfect GP": accuracy_by_group(team(x_val, clinic.val.specialty), y_val,
                                                                         clinic.val.specialty, S),
    }
pd.DataFrame({k: v.numpy() for k, v in accuracy.items()}, index=clinic.specialties).T.style.format("{:.1%}")

# %%
from moe_course.plots import grouped_bars

ax = grouped_bars(accuracy, clinic.specialties, title="Who gets which specialty right?",
                  ylabel="held-out accuracy", chance=1 / clinic.num_diagnoses)
ax.figure.set_size_inches(10, 4.4)
ax.set_ylim(0, 1.12);

# %% [markdown]
# Three different failures in one picture:
#
# - **The cardiologist** is excellent on cardiology and useless everywhere else. On
#   ophthalmology, cardiology's contradicting twin, it is worse than chance: it confidently
#   applies the cardiology rule, and the twin renamed every diagnosis. Asking a second
#   cardiologist would not help: they share the blind spot (that is bias).
# - **The generalist** has seen every specialty and is mediocre in all of them.
# - **Averaging 16 generalists** lifts every specialty a little and fixes none of them. The
#   specialists with a GP stay far ahead, in every specialty.
#
# ## Underfitting, not overfitting
#
# Is the generalist short of data, or short of capacity? Compare its accuracy on the
# patients it trained on with its accuracy on new ones, and its training loss with the
# specialists'.

# %%
with torch.no_grad():
    train_acc = (generalist(clinic.train.x).argmax(-1) == clinic.train.diagnosis).float().mean()
    card = clinic.train.of_specialty(0)
    card_train_acc = (cardiologist(card.x).argmax(-1) == card.diagnosis).float().mean()
print(f"generalist:   training patients {train_acc:.1%}, held-out patients {member_acc[0]:.1%}")
print(f"cardiologist: training patients {card_train_acc:.1%} (cardiology only), "
      f"held-out cardiology {accuracy['one cardiologist (F = 16)'][0]:.1%}")

# %%
from moe_course.plots import learning_curves

curves = {"generalist, all specialties": ensemble.histories[0]}
curves.update({f"specialist, {h['specialty'].iloc[0]} only": h for h in team.histories})
ax = learning_curves(curves, "train_loss", title="The generalist's training loss stays high",
                     ylabel="training cross-entropy (nats)")
ax.set_ylim(bottom=0);

# %% [markdown]
# The generalist does about as well on the patients it trained on as on new ones: it is
# not memorising, it simply cannot fit four conflicting rules with 16 hidden units. Its
# training loss flattens out well above every specialist's. That is **underfitting**, a
# bias problem, and no amount of averaging identical generalists removes it. Lesson 01
# showed that even a generalist as wide as the whole team of four stays behind it.
#
# ## From an ensemble to a mixture
#
# Write the ensemble's prediction as a weighted sum:
#
# $$\bar p(y \mid x) = \sum_{r=1}^{R} \tfrac{1}{R}\, p_r(y \mid x)$$
#
# Every doctor gets the same weight, $1/R$, for every patient. Now let the weight
# depend on the patient, $g_r(x)$, chosen by someone who looks at the patient first: that
# is a **GP**, and the sum becomes a **mixture of experts**. With a GP in front, the doctors
# no longer need to be identical generalists; each can become a specialist, because the GP
# will send it only the patients it knows. That is lesson 03.
#
# ## Recap
#
# - An ensemble of identically trained doctors averages their probabilities. Its error
#   splits exactly into bias² (shared mistakes) and variance (disagreement); averaging M
#   doctors shrinks the variance about as 1/M and leaves the bias untouched.
# - On the clinic most of the error is bias, so 16 doctors buy only a few points of
#   accuracy for 16 times the compute.
# - A generalist the size of one specialist underfits the conflicting specialties; a
#   specialist is excellent at home and blind elsewhere. What is missing is someone who
#   knows which specialist to ask.
#
# **Next:** lesson 03 adds a gate (the GP) that weighs every specialist's answer for each
# patient, trains it together with the experts, and watches them specialise.
#
# **Exercises:** `exercises/02_ensembles_and_generalists.ipynb`: averaging an ensemble's
# probabilities, the bias/variance decomposition, and the ensemble's cross-entropy.
#
# **Read more:** Geman, Bienenstock and Doursat 1992, *Neural Networks and the
# Bias/Variance Dilemma* (Neural Computation 4(1)); Breiman 1996, *Bagging Predictors*
# (Machine Learning 24); Lakshminarayanan, Pritzel and Blundell 2017, *Simple and Scalable
# Predictive Uncertainty Estimation using Deep Ensembles*, arXiv:1612.01474; Fort, Hu and
# Lakshminarayanan 2019, *Deep Ensembles: A Loss Landscape Perspective*, arXiv:1912.02757.
