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
# # 03 · See every specialist: the dense mixture of experts
#
# Lesson 02 averaged identical doctors and found that it barely helps: they share the same
# blind spots. The third approach of the story hires *different* specialists, asks every
# one of them about every patient, and lets a GP decide how much to trust each answer
# *for this patient*. That is the original mixture of experts (Jacobs, Jordan, Nowlan and
# Hinton, 1991).
#
# **In this lesson you will**
#
# - build the **softmax gate** (the GP) and the **dense mixture**: the gate-weighted average of
#   every expert's answer;
# - train it on the clinic and compare it with a generalist of the same size and with the
#   specialists who get a perfect GP;
# - watch the experts **specialise**: a specialty × expert heatmap of the gate's weights, and
#   a specialisation score tracked during training;
# - measure what seeing every specialist costs: FLOPs and time per batch grow **linearly**
#   with the number of experts;
# - play with the trained GP: pick a patient or a specialty and see whom it trusts.
#
# Shape letters: **N** patients, **D** patient width, **F** an expert's hidden width,
# **E** experts.

# %%
import pandas as pd
import torch

from moe_course import get_device, seed_everything
from moe_course.figures.plots import use_course_style

# ---- the one knob of this lesson -------------------------------------------
# 1 runs in well under a minute on a laptop CPU. Larger values train every model
# longer (SCALE × the steps); the specialisation score and the accuracy table then
# show how much further the mixture's experts get with the extra steps.
SCALE = 1
# -----------------------------------------------------------------------------

device = get_device()
seed_everything(0)
use_course_style()
# The clinic's models are tiny: on a CPU one thread runs them fastest (too little work
# per step to share out), and it makes the timings at the end steadier.
torch.set_num_threads(1)

# %% [markdown]
# ## The GP: a softmax gate
#
# The GP reads the patient $x$ and gives each of the $E$ experts a score, $x W_g + b_g$,
# then turns the scores into weights with a softmax **over the experts**:
#
# $$g(x) = \mathrm{softmax}(x W_g + b_g), \qquad g_e(x) > 0, \qquad \sum_{e=1}^{E} g_e(x) = 1$$
#
# The weights say how much the GP trusts each doctor for *this* patient. Exercise 3.1:

# %%
from moe_course.gating import softmax_gate
from moe_course.show import show_source

show_source(softmax_gate)

# %% [markdown]
# An untrained gate on three patients: each row is one patient's weights over four
# experts, and each row sums to 1.

# %%
from moe_course.data.clinic import make_clinic

clinic = make_clinic(num_specialties=4, seed=0)
S, E, H = clinic.num_specialties, 4, 16  # specialties, experts, hidden units per expert
w_gate = torch.randn(clinic.d_in, E)
weights = softmax_gate(clinic.val.x[:3], w_gate)  # (3, E)
pd.DataFrame(weights.numpy(), columns=[f"expert {e}" for e in range(E)],
             index=[f"patient {i}" for i in range(3)]).assign(sum=weights.sum(-1).numpy()).round(3)

# %% [markdown]
# ## The dense mixture: every specialist, weighed by the GP
#
# Each expert is the clinic MLP of lesson 01, and gives a probability for each diagnosis,
# $p_e(y \mid x)$. The mixture's answer is their gate-weighted average:
#
# $$p(y \mid x) = \sum_{e=1}^{E} g_e(x)\; p_e(y \mid x)$$
#
# We mix **probabilities**, as lesson 02's ensemble did. In fact an ensemble *is* a mixture
# whose gate says $1/E$ to everyone; the mixture only adds a GP who listens first. Training
# minimises $-\log p(y \mid x)$, and that choice matters: the gradient for a patient
# reaches each expert in proportion to how well that expert already explains the patient,
# so experts **compete** for patients and each one drifts towards the cases it is good at
# (Jacobs et al. 1991 contrast this with blending the experts' raw outputs, which makes
# them cooperate on every case instead). Exercise 3.2 builds the forward pass; here is the
# package's, computed in log space so that a very confident expert cannot underflow:

# %%
from moe_course.mixture import DenseMixture, mixture_log_probs

show_source(DenseMixture.forward)
show_source(mixture_log_probs)

# %% [markdown]
# The ensemble claim, checked: give an untrained mixture a gate with zero weights (every
# score equal, so every $g_e = 1/E$) and it predicts exactly the average of its experts'
# probabilities.

# %%
from moe_course.experiments.ensembles import average_probs
from moe_course.mixture import DenseMixtureConfig

seed_everything(0)
mixture = DenseMixture(DenseMixtureConfig(d_in=clinic.d_in, d_ff=H, num_classes=clinic.num_diagnoses, num_experts=E))
with torch.no_grad():
    torch.nn.init.zeros_(mixture.gate.proj.weight)
    torch.nn.init.zeros_(mixture.gate.proj.bias)
    out = mixture(clinic.val.x)
    as_ensemble = average_probs(out.expert_logits.transpose(0, 1))  # experts as ensemble members: (E, N, classes)
print("gate weights of patient 0:", out.router_probs[0].numpy())
print(f"largest difference between the mixture and the ensemble average: {(out.probs - as_ensemble).abs().max():.1e}")

# %% [markdown]
# ## Training the mixture on the clinic
#
# Three models, trained with the same recipe as in lesson 02, all with $E \cdot F = 64$
# hidden units in total:
#
# - a **generalist**, one MLP with 64 hidden units;
# - the **dense mixture**: a gate and 4 experts of 16 hidden units each, trained together
#   from scratch; nobody tells the gate which patient belongs to which specialty;
# - the **specialists with a perfect GP**, 4 MLPs of 16 units each, each trained on its own
#   specialty and sent exactly its own patients (the oracle of lesson 01): the upper bound.
#
# While the mixture trains, a `SpecialisationTracker` records how its gate distributes the
# held-out patients every 50 steps.

# %%
from moe_course.analysis.specialisation import SpecialisationTracker
from moe_course.experiments.specialists import train_specialists
from moe_course.experts import FeedForward
from moe_course.flops import count_parameters
from moe_course.training import CLINIC_LR, ClassificationTask, TrainConfig, train

task = ClassificationTask.from_clinic(clinic)
CONFIG = TrainConfig(steps=600 * SCALE, batch_size=128, lr=CLINIC_LR, eval_every=50)  # lesson 01's recipe
x_val, y_val, s_val = clinic.val.x, clinic.val.diagnosis, clinic.val.specialty

seed_everything(0)
generalist = FeedForward(clinic.d_in, E * H, d_out=clinic.num_diagnoses)
generalist_run = train(generalist, task, CONFIG, device=device)

seed_everything(0)
mixture = DenseMixture(DenseMixtureConfig(d_in=clinic.d_in, d_ff=H, num_classes=clinic.num_diagnoses, num_experts=E))
tracker = SpecialisationTracker(x_val, s_val, S)
mixture_run = train(mixture, task, CONFIG, device=device, callback=tracker)
mixture = mixture.cpu()

team = train_specialists(clinic, d_ff=H, config=CONFIG, device=device)

with torch.no_grad():
    generalist_logits = generalist.cpu()(x_val)
    out = mixture(x_val)
    team_logits = team(x_val, s_val)
overall = {
    "generalist (F = 64)": (generalist_logits.argmax(-1) == y_val).float().mean().item(),
    "dense mixture (E = 4, F = 16 each)": (out.logits.argmax(-1) == y_val).float().mean().item(),
    "4 specialists, perfect GP": (team_logits.argmax(-1) == y_val).float().mean().item(),
}
sizes = {
    "generalist (F = 64)": count_parameters(generalist),
    "dense mixture (E = 4, F = 16 each)": count_parameters(mixture),
    "4 specialists, perfect GP": sum(count_parameters(m) for m in team.specialists),
}
ranking = sorted(overall, key=overall.get, reverse=True)
print("from most to least accurate: " + " > ".join(ranking))
pd.DataFrame({"held-out accuracy": overall, "parameters": sizes}).style.format({"held-out accuracy": "{:.1%}", "parameters": "{:,}"})

# %% [markdown]
# Same number of hidden units, same training steps. The mixture has a few more parameters
# than the generalist (the gate, and four output layers instead of one). The ranking above
# says where the learned GP lands between the generalist and the perfect GP. (The generalist
# is lesson 01's first seed: the same model, seed and recipe, so the same accuracy.) Per
# specialty:

# %%
from moe_course.analysis.metrics import accuracy_by_group
from moe_course.figures.plots import grouped_bars

per_specialty = {
    "generalist (F = 64)": accuracy_by_group(generalist_logits, y_val, s_val, S),
    "dense mixture (E = 4, F = 16 each)": accuracy_by_group(out.logits, y_val, s_val, S),
    "4 specialists, perfect GP": accuracy_by_group(team_logits, y_val, s_val, S),
}
ax = grouped_bars(per_specialty, clinic.specialties, title="A GP in front of the experts: accuracy per specialty",
                  ylabel="held-out accuracy", chance=1 / clinic.num_diagnoses)
ax.set_ylim(0, 1.12);

# %% [markdown]
# ## Did the experts specialise?
#
# Nobody told the mixture about specialties. Yet if it works like a team of specialists, the
# gate should send each specialty mostly to one expert. The left heatmap shows, for the
# held-out patients of each specialty (rows), the average weight the gate gives each expert
# (columns): rows sum to 1. The right one shows how often each expert, **asked alone**, gets
# that specialty's patients right.

# %%
import matplotlib.pyplot as plt

from moe_course.analysis.specialisation import expert_accuracy_by_specialty, gate_mass_by_specialty
from moe_course.figures.plots import gate_mass_heatmap, heatmap

mass = gate_mass_by_specialty(out.router_probs, s_val, S)  # (S, E)
alone = expert_accuracy_by_specialty(out.expert_logits, y_val, s_val, S)  # (S, E)
fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
gate_mass_heatmap(mass, clinic.specialties, title="Where the GP sends each specialty", ax=axes[0])
heatmap(alone, rows=clinic.specialties, cols=[str(e) for e in range(E)], fmt=".0%", vmin=0, vmax=1,
        title="How good each expert is on its own", xlabel="expert", ylabel="specialty of the patients", ax=axes[1])
axes[1].collections[0].colorbar.set_label("held-out accuracy of the expert alone")
fig.tight_layout()

# %% [markdown]
# Compare the two maps cell by cell: where the gate puts its weight (bright on the left),
# the expert is good at that specialty (bright on the right), and experts that get little
# weight for a specialty are often near or below chance on it. The GP learned whom to trust,
# and the experts learned the rules of the patients they are sent. Where one expert serves
# two specialties, or a specialty is split, the mixture has not (yet) found a clean
# division of labour.
#
# ### A score for specialisation
#
# One number summarises the heatmap: take each patient's **top expert** (largest gate
# weight) and measure how much knowing the specialty tells you about it, the normalised
# mutual information
#
# $$\text{score} = \frac{2\, I(\text{specialty};\ \text{top expert})}{H(\text{specialty}) + H(\text{top expert})}$$
#
# It is 1 when every specialty has its own expert, and 0 when the specialty tells you
# nothing about the expert (for example when one expert takes everyone). Exercise 3.3:

# %%
from moe_course.analysis.specialisation import normalized_mutual_information, specialisation_score

show_source(normalized_mutual_information)

# %%
history = tracker.history.merge(mixture_run.history[["step", "val_acc"]], on="step")
print(f"specialisation score after {history['step'].iloc[0]} steps: {history['score'].iloc[0]:.2f}; "
      f"after {history['step'].iloc[-1]} steps: {history['score'].iloc[-1]:.2f}")
print(f"(check: the score of the final gate, recomputed: {specialisation_score(out.router_probs, s_val, S):.2f})")

fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
axes[0].plot(history["step"], history["score"], "o-", ms=3, label="specialisation score")
axes[0].set(title="The experts specialise as they train", xlabel="training step",
            ylabel="normalised mutual information\n(specialty vs top expert)", ylim=(0, 1))
axes[1].plot(history["step"], history["val_acc"], "o-", ms=3, color="C1", label="dense mixture")
axes[1].axhline(overall["generalist (F = 64)"], ls="--", color="C0", lw=1, label="generalist (F = 64), at the end")
axes[1].axhline(overall["4 specialists, perfect GP"], ls=":", color="C2", lw=1.5, label="specialists with a perfect GP")
axes[1].set(title="...and the mixture's accuracy rises with it", xlabel="training step", ylabel="held-out accuracy")
axes[1].yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
axes[1].legend(loc="lower right", fontsize=9)
fig.tight_layout()

# %% [markdown]
# The division of labour is learned gradually. Snapshots of the gate heatmap along the way:

# %%
picks = [0, len(tracker.gate_mass) // 2, len(tracker.gate_mass) - 1]
fig, axes = plt.subplots(1, len(picks), figsize=(15, 3.6))
for ax, i in zip(axes, picks):
    gate_mass_heatmap(tracker.gate_mass[i], clinic.specialties, ax=ax,
                      title=f"after {tracker.rows[i]['step']} steps (score {tracker.rows[i]['score']:.2f})")
    if ax is not axes[0]:
        ax.set_ylabel("")
fig.tight_layout()

# %% [markdown]
# ## What seeing every specialist costs
#
# In a dense mixture every patient goes through every expert, so the work grows with the
# number of experts even when one of them would do. Counting matmul FLOPs per patient
# (2 per multiply-add, lesson 01's convention): the gate costs $2DE$ and each expert
# $2DF + 2F\cdot\text{classes}$. Exercise 3.4:

# %%
from moe_course.mixture import dense_mixture_flops, dense_mixture_param_count

show_source(dense_mixture_flops)

# %%
experts_list = [1, 2, 4, 8, 16, 32]
d, c = clinic.d_in, clinic.num_diagnoses
cost = pd.DataFrame({
    "experts E": experts_list,
    "parameters": [dense_mixture_param_count(d, H, c, e) for e in experts_list],
    "FLOPs per patient": [dense_mixture_flops(1, d, H, c, e) for e in experts_list],
})
cost["FLOPs / FLOPs with E = 1"] = cost["FLOPs per patient"] / cost["FLOPs per patient"].iloc[0]
assert cost["parameters"].iloc[2] == count_parameters(mixture)  # the formula counts the real module
cost.style.format({"parameters": "{:,}", "FLOPs per patient": "{:,}", "FLOPs / FLOPs with E = 1": "{:.2f}"}).hide(axis="index")

# %% [markdown]
# Knowledge (parameters) and effort (FLOPs per patient) grow together, in step with E:
# doubling the number of specialists doubles what each visit costs. Does the clock agree?
# We time one training step (forward and backward) on a batch of 4096 patients for
# mixtures with 1 to 16 experts. Every step runs right next to a step of the one-expert
# mixture, so a busy moment on the machine slows both alike, and we report the median of
# these paired ratios.

# %%
from moe_course.bench.timing import time_per_batch

timed = [1, 2, 4, 8, 16]
seed_everything(0)
models = {f"E = {e}": DenseMixture(DenseMixtureConfig(d, H, c, e)) for e in timed}
batch = torch.randint(0, len(clinic.train), (4096,))
timing = time_per_batch(models, clinic.train.x[batch], clinic.train.diagnosis[batch], repeats=30)
timing["experts E"] = timed
timing["FLOPs ratio"] = [dense_mixture_flops(4096, d, H, c, e) / dense_mixture_flops(4096, d, H, c, 1) for e in timed]
timing[["experts E", "seconds", "ratio", "FLOPs ratio"]].style.format(
    {"seconds": "{:.4f}", "ratio": "{:.2f}", "FLOPs ratio": "{:.2f}"}).hide(axis="index")

# %%
import numpy as np

ax = plt.figure(figsize=(6.5, 4)).gca()
ax.plot(timing["experts E"], timing["FLOPs ratio"], "s--", label="FLOPs (counted)")
ax.plot(timing["experts E"], timing["ratio"], "o-", label="time per batch (measured)")
ax.set(title="Every expert you hire, every patient pays for", xlabel="number of experts E",
       ylabel="cost relative to E = 1 (×)", xticks=timed)
ax.legend()

slope, intercept = np.polyfit(timing["experts E"], timing["seconds"], 1)
fit = intercept + slope * timing["experts E"]
r2 = 1 - ((timing["seconds"] - fit) ** 2).sum() / ((timing["seconds"] - timing["seconds"].mean()) ** 2).sum()
print(f"a straight line through the measured times: {1000 * intercept:.1f} ms per batch whatever E, "
      f"plus {1000 * slope:.2f} ms for every expert (R² = {r2:.3f})")

# %% [markdown]
# Both grow along a straight line with E: every expert adds the same amount of work, and
# the R² printed above says how well one line fits the measured times. If the measured
# ratio climbs more slowly than the FLOP ratio, the line's first term is why: every step
# also pays a part that does not depend on E (the loss, and the bookkeeping of autograd
# and Python), which tiny experts like ours do not dwarf; with bigger experts the two
# lines move closer. Either way, hiring 16 specialists makes every visit many times dearer than
# one, however few of them a patient needs. That is the problem lesson 04's GP solves:
# consult only the top one or two.
#
# ## Playground: ask the GP
#
# Pick **one patient** to see the gate's weight on every expert (how much the GP trusts
# each doctor for this patient) next to every expert's answer, with the true diagnosis
# framed. Or pick **one specialty** to see where the GP sends its patients on average and
# how well each expert alone would treat them.

# %%
from moe_course.figures.widgets import mixture_playground

mixture_playground(mixture, clinic.val, clinic.specialties)

# %% [markdown]
# Things to try: find a patient whose top expert is wrong while the mixture is right (the
# other experts' weights rescue it), and a specialty whose weight is split between two
# experts.
#
# ## Recap
#
# - A dense mixture asks every expert and averages their probabilities with weights from a
#   softmax gate; trained by the mixture's likelihood, the experts compete for patients and
#   specialise, with no labels telling them how.
# - On the clinic it beats a generalist of the same width, and its gate learns to send
#   specialties to the experts that know them; the specialisation score tracks this.
# - Its cost grows linearly with the number of experts: every patient sees every doctor.
#
# **Next:** lesson 04 keeps the GP and drops the waste: **sparse routing** sends each patient
# to its top-k experts only, so the hospital can hire more specialists without each visit
# getting dearer.
#
# **Exercises:** `exercises/03_dense_mixture.ipynb`: the softmax gate, the dense mixture's
# forward pass, the specialisation score, and the mixture's FLOPs.
#
# **Read more:** Jacobs, Jordan, Nowlan and Hinton 1991, *Adaptive Mixtures of Local Experts*
# (Neural Computation 3(1)); Jordan and Jacobs 1994, *Hierarchical Mixtures of Experts and
# the EM Algorithm* (Neural Computation 6(2)); Eigen, Ranzato and Sutskever 2013, *Learning
# Factored Representations in a Deep Mixture of Experts*, arXiv:1312.4314; Shazeer et al.
# 2017, *Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer*,
# arXiv:1701.06538 (next lesson).
