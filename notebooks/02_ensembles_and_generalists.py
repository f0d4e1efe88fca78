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
# we build a GP, let us try the two cheap fixes from the story of lesson 00. You feel unwell,
# and your friend the cardiologist gave you advice. Should you
#
# 1. **get a second opinion** from another cardiologist, and a third, and average what they
#    say? They were trained exactly like your friend.
# 2. **see a generalist**, one doctor who has seen patients of every specialty?
#
# **In this lesson you will**
#
# - train 16 cardiologists that differ only in their random seed and average their
#   probabilities (an *ensemble*);
# - see them excellent in cardiology and blind outside it, and averaging leave the blind spot
#   exactly where it was;
# - split their error exactly into **bias** (all doctors wrong the same way) and
#   **variance** (doctors disagreeing), and watch averaging shrink the variance and leave
#   the bias alone;
# - see a generalist the size of one specialist underfit the clinic;
# - see how an ensemble turns into a mixture of experts once the weights may depend on
#   the patient.
#
# Shape letters: **N** patients, **D** patient width, **F** hidden width; in this lesson
# **R** counts the members of an ensemble and **M** the size of a smaller ensemble.

# %%
import pandas as pd
import torch

from moe_course import get_device, seed_everything
from moe_course.figures.plots import use_course_style

# ---- the one knob of this lesson -------------------------------------------
# 1 runs in well under a minute on a laptop CPU. Larger values train every doctor
# longer (SCALE × the steps).
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
# every diagnosis renamed). Cardiology is specialty 0, and ophthalmology, specialty 1, is its
# twin. All doctors in this lesson are the clinic MLP of lesson 01,
# `FeedForward(d_in, F, d_out=diagnoses)`, with **F = 16 hidden units: the size of one
# specialist**, and all train with the same recipe.

# %%
from moe_course.data.clinic import make_clinic
from moe_course.training import CLINIC_LR, ClassificationTask, TrainConfig

clinic = make_clinic(num_specialties=4, seed=0)
S, H = clinic.num_specialties, 16  # specialties; hidden units of one doctor
R = 16  # doctors in an ensemble
CONFIG = TrainConfig(steps=600 * SCALE, batch_size=128, lr=CLINIC_LR, eval_every=50)
x_val, y_val, s_val = clinic.val.x, clinic.val.diagnosis, clinic.val.specialty
CARDIOLOGY = 0
print(f"{len(clinic.train)} training patients, {len(clinic.val)} held-out; specialty {CARDIOLOGY} is "
      f"{clinic.specialties[CARDIOLOGY]}; chance accuracy {1 / clinic.num_diagnoses:.0%}")

# %% [markdown]
# ## Approach 1: a second cardiologist
#
# Two cardiologists with the same education still disagree on some patients: they started
# with different first impressions and saw their cases in a different order. For a network,
# both come from the **seed**: the random initial weights and the random order of the
# training batches. `train_ensemble` trains R models that differ in nothing else:

# %%
from moe_course.experiments.ensembles import train_ensemble
from moe_course.show import show_source

show_source(train_ensemble)

# %% [markdown]
# Our cardiologists learn from the cardiology patients only, as a cardiologist does.

# %%
from moe_course.experts import FeedForward

cardio_train, cardio_val = clinic.train.of_specialty(CARDIOLOGY), clinic.val.of_specialty(CARDIOLOGY)
cardio_task = ClassificationTask(cardio_train.x, cardio_train.diagnosis, cardio_val.x, cardio_val.diagnosis)
cardiologists = train_ensemble(lambda: FeedForward(clinic.d_in, H, d_out=clinic.num_diagnoses), cardio_task, CONFIG,
                               num_members=R, device=device)
member_logits = cardiologists(x_val)  # (R, N, diagnoses): every cardiologist on every held-out patient
home = s_val == CARDIOLOGY  # (N,) the held-out cardiology patients
member_acc = (member_logits[:, home].argmax(-1) == y_val[home]).float().mean(dim=1)  # (R,)
print(f"{R} cardiologists trained on {len(cardio_train)} cardiology patients; on held-out cardiology patients "
      f"one of them is right on {member_acc.min():.1%} to {member_acc.max():.1%} (mean {member_acc.mean():.1%})")

# %% [markdown]
# How often do they disagree? For each cardiology patient, compare every doctor's top
# diagnosis with the majority's.

# %%
votes = member_logits[:, home].argmax(-1)  # (R, N_home): each doctor's diagnosis
majority = votes.mode(dim=0).values  # (N_home,)
unanimous = (votes == majority).all(dim=0).float().mean()
print(f"all {R} cardiologists give the same diagnosis for {unanimous:.1%} of the cardiology patients; "
      f"on the other {1 - unanimous:.1%} at least one of them disagrees")

# %% [markdown]
# ### Averaging the doctors
#
# The ensemble's opinion is the average of the doctors' **probabilities** (not of their raw
# scores, the logits): each doctor's opinion is a distribution over the diagnoses, and so is
# their average. This is exercise 2.1:

# %%
from moe_course.experiments.ensembles import average_probs

show_source(average_probs)

# %% [markdown]
# Now every held-out patient walks in, whatever their specialty, and we compare one
# cardiologist (the mean over the 16) with all 16 averaged, specialty by specialty.

# %%
from moe_course.analysis.metrics import accuracy_by_group

ensemble_probs = average_probs(member_logits)  # (N, diagnoses)
one = torch.stack([accuracy_by_group(logits, y_val, s_val, S) for logits in member_logits]).mean(0)  # (S,)
averaged = accuracy_by_group(ensemble_probs, y_val, s_val, S)  # (S,)
pd.DataFrame({"one cardiologist (mean of 16)": one.numpy(), f"{R} cardiologists averaged": averaged.numpy(),
              "gain from averaging": (averaged - one).numpy()},
             index=clinic.specialties).style.format("{:.1%}").format("{:+.1%}", subset=["gain from averaging"])

# %%
away = [s for s in range(S) if s != CARDIOLOGY]
twin = clinic.specialties[1]
print(f"averaging {R} cardiologists: {100 * (averaged[CARDIOLOGY] - one[CARDIOLOGY]):+.1f} points in cardiology, "
      f"at most {100 * (averaged[away] - one[away]).abs().max():.1f} points (up or down) in any other specialty")
print(f"in {twin}, cardiology's contradicting twin, the averaged cardiologists are right on {averaged[1]:.1%} of the "
      f"patients (chance: {1 / clinic.num_diagnoses:.0%})" + (": worse than guessing" if averaged[1] < 1 / clinic.num_diagnoses else ""))

# %% [markdown]
# Sixteen times the compute, and outside cardiology the second, third and sixteenth opinions
# change what the first one said by the amount printed above. A cardiologist knows the
# cardiology rule and nothing else; so do the other fifteen. In ophthalmology, whose rule
# renames every cardiology diagnosis, a doctor who applies the cardiology rule gives an answer
# that is, by construction, never the right one there. Why can averaging not do more? Because
# of *what kind* of error averaging can remove.
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
from moe_course.experiments.ensembles import brier_decomposition

show_source(brier_decomposition)

# %%
member_probs = torch.softmax(member_logits, dim=-1)  # (R, N, diagnoses)
parts = brier_decomposition(member_probs, y_val)  # per patient (N,)
gap = (parts.error - parts.bias - parts.variance).abs().max()
print(f"largest |error - bias - variance| over the {len(y_val)} patients: {gap:.1e} (float rounding)")
per_specialty = pd.DataFrame({name: torch.zeros(S).index_add_(0, s_val, getattr(parts, name)).numpy()
                              / torch.bincount(s_val, minlength=S).numpy() for name in ("error", "bias", "variance")},
                             index=clinic.specialties)
per_specialty["share of the error that is bias"] = per_specialty["bias"] / per_specialty["error"]
per_specialty.style.format("{:.4f}").format("{:.1%}", subset=["share of the error that is bias"])

# %% [markdown]
# Read the table row by row. In cardiology the error is small, and the variance column says
# how much of it comes from the doctors disagreeing. Elsewhere the error is large, and the
# share of bias says how much of it the doctors share: where that share is close to 100%,
# they all give the same wrong answer. *All the cardiologists are wrong the same way.*
#
# ## What averaging M doctors buys
#
# Split the 16 doctors into ensembles of M = 1, 2, 4 and 8 (16 ensembles of one, 8 of two,
# ...; no doctor in two ensembles) and decompose the error of those ensembles the same way,
# once on the cardiology patients and once on everyone else. Averaging is linear, so the
# ensembles' average prediction is the same $\bar p$ for every M: the bias cannot move. Only
# the variance can shrink.

# %%
from moe_course.experiments.ensembles import bias_variance_by_size

sizes = [1, 2, 4, 8]
at_home = bias_variance_by_size(member_probs[:, home], y_val[home], sizes)
elsewhere = bias_variance_by_size(member_probs[:, ~home], y_val[~home], sizes)
at_home["variance / variance of one doctor"] = at_home["variance"] / at_home["variance"].iloc[0]
at_home["1 / M"] = 1 / at_home["size"]
at_home[f"1 / M, for {R} doctors in all"] = (1 / at_home["size"] - 1 / R) / (1 - 1 / R)
at_home.style.format({"error": "{:.4f}", "bias": "{:.4f}", "variance": "{:.4f}", "accuracy": "{:.1%}",
                      "variance / variance of one doctor": "{:.3f}", "1 / M": "{:.3f}",
                      f"1 / M, for {R} doctors in all": "{:.3f}"}).hide(axis="index")

# %%
import matplotlib.pyplot as plt

from moe_course.figures.plots import bias_variance_bars

fig, axes = plt.subplots(1, 3, figsize=(17, 4.4))
bias_variance_bars(at_home, title="The cardiology patients:\nbias and variance of the ensembles", ax=axes[0])
bias_variance_bars(elsewhere, title="The other specialties' patients:\nbias and variance of the ensembles", ax=axes[1])
handles, labels = axes[0].get_legend_handles_labels()
for ax in axes[:2]:
    ax.get_legend().remove()
fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.35, 0.0), ncol=2, frameon=False)  # one for both panels
for frame, label in ((at_home, "cardiology patients"), (elsewhere, "patients of the other specialties")):
    axes[2].plot(frame["size"], frame["accuracy"], "o-", label=label)
axes[2].axhline(1 / clinic.num_diagnoses, ls="--", color="gray", lw=1)
axes[2].annotate("chance", (sizes[-1], 1 / clinic.num_diagnoses), xytext=(0, 4), textcoords="offset points",
                 ha="right", color="gray", fontsize=8)
axes[2].set_xscale("log", base=2)
axes[2].set(title="Held-out accuracy of the ensembles", xlabel="ensemble size M (doctors averaged, log scale)",
            ylabel="held-out accuracy", xticks=sizes, xticklabels=[str(m) for m in sizes], ylim=(0, 1.02))
axes[2].xaxis.set_minor_locator(plt.NullLocator())
axes[2].yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
axes[2].legend(loc="center right")
fig.tight_layout(rect=(0, 0.07, 1, 1))

# %%
print(f"cardiology patients: variance falls from {at_home['variance'].iloc[0]:.4f} (M = 1) to "
      f"{at_home['variance'].iloc[-1]:.4f} (M = {sizes[-1]}), the bias stays at {at_home['bias'].iloc[0]:.4f}")
print(f"everyone else: the error is {elsewhere['error'].iloc[0]:.4f} for one doctor and {elsewhere['error'].iloc[-1]:.4f} "
      f"for ensembles of {sizes[-1]}; of it, {elsewhere['bias'].iloc[0]:.4f} is bias")

# %% [markdown]
# Read the left panel from left to right: the blue part (bias) is the same height in every
# bar; the orange part (variance) falls. The table puts the measured fall next to the 1/M law
# for independent doctors. With only 16 doctors in all, the ensembles of 8 are compared with an
# average made of just two of them, so their spread looks smaller still; the last column is
# the 1/M law corrected for that, $(1/M - 1/R)/(1 - 1/R)$. Compare it with the measured ratios.
# The middle panel is the blind spot: a tall blue bar that no number of cardiologists shortens.
#
# Averaging more doctors quickly runs out of error to remove: what is left is the bias, the
# part that identical training makes every doctor share.
#
# The same holds for the cross-entropy the doctors were trained on: the loss of the
# averaged probabilities is never above the doctors' average loss (Jensen's inequality),
# and the gap is what disagreement buys. Exercise 2.3 computes the ensemble's loss; here on
# the cardiology patients:

# %%
from moe_course.experiments.ensembles import log_loss_gap

losses = pd.DataFrame([{"ensemble size M": m, **log_loss_gap(member_logits[:m, home], y_val[home])} for m in sizes])
losses.columns = ["ensemble size M", "doctors' mean cross-entropy", "ensemble's cross-entropy", "gap (what averaging buys)"]
losses.style.format(precision=3).hide(axis="index")

# %% [markdown]
# ## Approach 2: a generalist the size of one specialist
#
# The other cheap fix: a doctor who has seen patients of every specialty. We train 16 of them
# the same way (16 hidden units each, all patients, different seeds), so we can look at one
# generalist and at 16 averaged. For comparison we also train a team of specialists of the
# same size, each on its own specialty's patients only, with the same recipe: the team, with
# a perfect GP that reads the specialty label (the oracle of lesson 01), is the upper bound.
# (Its cardiologist is our first cardiologist: same seed, same patients.)

# %%
from moe_course.experiments.specialists import train_specialists

task = ClassificationTask.from_clinic(clinic)
generalists = train_ensemble(lambda: FeedForward(clinic.d_in, H, d_out=clinic.num_diagnoses), task, CONFIG,
                             num_members=R, device=device)
team = train_specialists(clinic, d_ff=H, config=CONFIG, device=device)
same = all(torch.equal(a, b) for a, b in zip(team.specialists[CARDIOLOGY].state_dict().values(),
                                              cardiologists.members[0].state_dict().values()))
print("the team's cardiologist has exactly the weights of our first cardiologist:", same)
generalist = generalists.members[0]
with torch.no_grad():
    accuracy = {
        "one cardiologist": accuracy_by_group(cardiologists.members[0](x_val), y_val, s_val, S),
        f"{R} cardiologists averaged": averaged,
        "one generalist": accuracy_by_group(generalist(x_val), y_val, s_val, S),
        f"{R} generalists averaged": accuracy_by_group(generalists.probs(x_val), y_val, s_val, S),
        f"{S} specialists, perfect GP": accuracy_by_group(team(x_val, s_val), y_val, s_val, S),
    }
pd.DataFrame({k: v.numpy() for k, v in accuracy.items()}, index=clinic.specialties).T.style.format("{:.1%}")

# %%
from moe_course.figures.plots import grouped_bars

ax = grouped_bars(accuracy, clinic.specialties, title="Who gets which specialty right?",
                  ylabel="held-out accuracy", chance=1 / clinic.num_diagnoses)
ax.figure.set_size_inches(12, 4.6)
ax.set_ylim(0, 1.12)
ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"));

# %%
overall = {k: (v * torch.bincount(s_val, minlength=S) / len(s_val)).sum().item() for k, v in accuracy.items()}
for name, acc in overall.items():
    print(f"{acc:6.1%}  {name} (all held-out patients)")
print(f"averaging {R} generalists: {100 * (overall[f'{R} generalists averaged'] - overall['one generalist']):+.1f} points "
      f"over one generalist; the perfect GP's team is {100 * (overall[f'{S} specialists, perfect GP'] - overall[f'{R} generalists averaged']):+.1f} "
      f"points above the averaged generalists")

# %% [markdown]
# Three different failures in one picture, with the numbers printed above:
#
# - **The cardiologists** are specialists without a GP: good at home, blind elsewhere, and
#   their average shares the blind spot (that is bias).
# - **The generalist** has seen every specialty and has to share 16 hidden units among four
#   contradicting rules.
# - **Averaging 16 generalists** removes their disagreement and nothing else; compare its
#   bars with the specialists' in every specialty.
#
# ## Underfitting, not overfitting
#
# Is the generalist short of data, or short of capacity? Compare its accuracy on the
# patients it trained on with its accuracy on new ones, and its training loss with the
# specialists'.

# %%
with torch.no_grad():
    train_acc = (generalist(clinic.train.x).argmax(-1) == clinic.train.diagnosis).float().mean()
    held_out_acc = (generalist(x_val).argmax(-1) == y_val).float().mean()
print(f"generalist: training patients {train_acc:.1%}, held-out patients {held_out_acc:.1%}")

# %%
from moe_course.figures.plots import learning_curves

curves = {"generalist, all specialties": generalists.histories[0]}
curves.update({f"specialist, {h['specialty'].iloc[0]} only": h for h in team.histories})
ax = learning_curves(curves, "train_loss", title="Training loss: one generalist and the four specialists",
                     ylabel="training cross-entropy (nats)")
ax.set_ylim(bottom=0);

# %%
history = generalists.histories[0]
last = history["train_loss"].iloc[-1]
third = history[history["step"] <= 2 * history["step"].iloc[-1] // 3]["train_loss"].iloc[-1]
specialists_last = [h["train_loss"].iloc[-1] for h in team.histories]
print(f"the generalist's training loss: {third:.3f} two thirds of the way, {last:.3f} at the end "
      f"({100 * (last - third) / third:+.0f}% over the last third)")
print(f"the specialists' final training losses: {min(specialists_last):.3f} to {max(specialists_last):.3f}")
print("the generalist ends " + ("above every specialist" if last > max(specialists_last) else "below some specialist"))

# %% [markdown]
# If the generalist does about as well on the patients it trained on as on new ones, it is
# not memorising: it cannot fit four conflicting rules with 16 hidden units. Its training
# loss need not be flat at the end (the printout gives its change over the last third of
# training); what matters is where it ends. If that is above every specialist's, each of whom
# learns one rule with the same 16 units, the generalist is **underfitting**: a bias problem,
# which no amount of averaging identical generalists removes. Lesson 01 showed that even a
# generalist as wide as the whole team of four stays behind it.
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
# no longer need to be identical; each can become a specialist, because the GP will send it
# only the patients it knows. That is lesson 03.
#
# ## Recap
#
# - An ensemble of identically trained doctors averages their probabilities. Its error
#   splits exactly into bias² (shared mistakes) and variance (disagreement); averaging M
#   doctors shrinks the variance about as 1/M and leaves the bias untouched.
# - A second cardiologist shares the first one's blind spot: outside cardiology their error
#   is bias, and averaging any number of them cannot remove it.
# - A generalist the size of one specialist underfits the conflicting specialties. What is
#   missing is someone who knows which specialist to ask.
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
