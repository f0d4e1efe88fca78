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
# # 04 · The GP: sparse routing
#
# Lesson 03's mixture let a GP weigh the opinions of *every* specialist, so every patient
# paid for every consultation. The fourth approach of the story is the one hospitals use:
# the GP listens first and then sends you to the one specialist (or two) who can help.
# Nobody else sees you, and nobody else costs anything. In a network this is **sparse
# routing**, and the layer built on it is the sparse Mixture-of-Experts layer of Shazeer et
# al. (2017) and the Switch Transformer (Fedus, Zoph and Shazeer, 2021).
#
# **In this lesson you will**
#
# - route each token to its **top-k** experts with gates renormalised to sum to 1, and meet
#   the Switch Transformer's **top-1** router with its *raw* gate;
# - see why the expert's output is multiplied by the gate: without it the router gets no
#   gradient and cannot learn;
# - add **noise** to the router's scores (noisy top-k) so that it keeps exploring;
# - watch compute come apart from parameters: at fixed k the FLOPs per token stay flat
#   while the parameters grow with the number of experts;
# - run the course's headline experiment: the essay's **four approaches** side by side on
#   the clinic, accuracy and FLOPs per patient, at matched parameter budgets, over six seeds;
# - see a second opinion from the same kind of doctor share the first one's blind spot, and
#   watch a GP **lock in** to a bad referral pattern in its first steps.
#
# Shape letters: **N** tokens (here: patients), **D** token width, **F** an expert's hidden
# width, **E** experts, **K** the k of top-k.

# %%
import matplotlib.pyplot as plt
import pandas as pd
import torch

from moe_course import seed_everything
from moe_course.figures.plots import use_course_style
from moe_course.show import show_source

# ---- the one knob of this lesson -------------------------------------------
# 1 runs in well under a minute on a laptop CPU. Larger values train every model
# of the four-approach experiment longer (SCALE × the steps) and repeat it over
# more seeds (6 × SCALE), so the comparison rests on more runs and the lock-in
# section can show whether a stuck GP frees itself with more training.
SCALE = 1
# -----------------------------------------------------------------------------

seed_everything(0)
use_course_style()
# The clinic's models are tiny: on a CPU one thread runs them fastest (and the experiment
# below trains them in worker processes on the CPU, one thread each, whatever the machine).
torch.set_num_threads(1)

# %% [markdown]
# ## Top-k routing: see only the best k
#
# The GP is the same linear layer as before: it gives every expert a score, the **router
# logits** (N, E), and a softmax over the experts turns them into probabilities $p$. Now the
# GP *decides*: each token keeps only its $k$ most probable experts, and their answers are
# mixed with **gates** that are the kept probabilities renormalised to sum to 1:
#
# $$g_j = \frac{p_{e_j}}{\sum_{j'=1}^{k} p_{e_{j'}}}, \qquad
#   y = \sum_{j=1}^{k} g_j \cdot \text{expert}_{e_j}(x)$$
#
# The other $E - k$ experts never see the token. This is GShard's top-2 and Mixtral's router
# (exercise 4.1). The package's version:

# %%
from moe_course.routing import top_k_routing

show_source(top_k_routing)

# %% [markdown]
# Five patients and four experts, with scores from an untrained router. Each patient keeps
# its two best experts; the gates of a patient sum to 1.

# %%
seed_everything(1)
logits = 1.5 * torch.randn(5, 4)  # (N, E)
routing = top_k_routing(logits, k=2)
pd.DataFrame({
    "probabilities p (over 4 experts)": [[round(v, 2) for v in row] for row in routing.router_probs.tolist()],
    "chosen experts": routing.expert_index.tolist(),
    "gates": [[round(v, 2) for v in row] for row in routing.gates.tolist()],
    "sum of gates": routing.gates.sum(-1).tolist(),
}, index=[f"patient {i}" for i in range(5)])

# %% [markdown]
# ## Switch: one doctor, and the raw gate
#
# The Switch Transformer goes all the way to $k = 1$: one expert per token, the cheapest
# visit there is. With a single choice, renormalising would make every gate exactly 1, so
# Switch keeps the **raw** probability of the chosen expert as its gate:
#
# $$i(x) = \arg\max_e p_e(x), \qquad y = p_{i(x)}(x) \cdot \text{expert}_{i(x)}(x)$$

# %%
from moe_course.routing import switch_routing

show_source(switch_routing)

# %% [markdown]
# ### Why multiply by the gate?
#
# The choice itself, an argmax, has no gradient: nudging the router's weights a little does
# not change which expert wins, so the loss cannot tell the router anything through the
# choice. The only path from the loss back to the router is the gate value that multiplies
# the expert's output. If the answer of a referral was good, the gradient raises the
# probability of that expert for tokens like this one; if it was bad, it lowers it, and
# another expert gets its chance.
#
# Let us check it on the clinic with the model of this lesson's experiment (below): a gate
# and four experts, each patient routed to one of them. Once with Switch's raw gate, once with
# the top-1 gate renormalised to 1. Same weights, same patients, one backward pass each,
# and we look at the gradient that reaches the router's weights (the balance loss of lesson
# 05 is switched off here, because it would reach the router by another path).

# %%
import torch.nn.functional as F

from moe_course.data.clinic import make_clinic
from moe_course.mixture import RoutedMixture, RoutedMixtureConfig

clinic = make_clinic(num_specialties=4, seed=0)
S, E, H = clinic.num_specialties, 4, 16  # specialties, experts, hidden units per expert
x, y = clinic.train.x[:256], clinic.train.diagnosis[:256]

router_grad = {}
for router in ("switch", "top_k"):
    seed_everything(0)  # the same initial weights for both
    model = RoutedMixture(RoutedMixtureConfig(clinic.d_in, H, clinic.num_diagnoses, E, top_k=1, router=router, aux_loss_coef=0.0))
    out = model(x)
    F.cross_entropy(out.logits, y).backward()
    router_grad[router] = model.gate.proj.weight.grad.norm().item()
    print(f"{router:>7} router: gates of the first patients {out.gates[:4, 0].detach().numpy().round(3)}, "
          f"size of the router's gradient {router_grad[router]:.2e}")
print(f"ratio: {router_grad['top_k'] / router_grad['switch']:.1e}")

# %% [markdown]
# With the raw gate the router gets a real gradient. With gates fixed at 1 what reaches it is
# smaller by many orders of magnitude (the ratio printed above): float round-off of
# $p / p$, not a signal. Such a router would stay where it was initialised, sending patients
# at random forever. That is why Switch keeps the raw gate, and why top-k with $k \ge 2$ may
# renormalise: with two or more choices the renormalised gates still depend on the scores
# (exercise 4.3 builds a whole Switch layer and checks that its router gets its gradient).
#
# ## Noisy top-k: a GP who sometimes asks someone else
#
# A GP who always refers a patient to the same doctor never learns whether another doctor
# would have done better: the router only hears back from the experts it picks. Shazeer et
# al. (2017) add noise to the scores *before* choosing, with a scale the router learns for
# every token and expert:
#
# $$H(x) = x W_g + \varepsilon \cdot \mathrm{softplus}(x W_{noise}), \quad
#   \varepsilon \sim \mathcal{N}(0, 1), \qquad
#   G(x) = \mathrm{softmax}(\mathrm{KeepTopK}(H(x), k))$$
#
# where KeepTopK sets everything outside the top k to $-\infty$. The noise is used in
# training only (exercise 4.2):

# %%
from moe_course.routing import noisy_top_k_routing

show_source(noisy_top_k_routing)

# %% [markdown]
# Three patients with made-up scores: a close call between two doctors, a clear case, and
# a patient with no strong preference. We route each one 2000 times with $k = 1$ and count
# how often each doctor is picked. $W_{noise}$ starts at zero, as Shazeer et al. initialise
# it, so the noise has the scale $\mathrm{softplus}(0) = \ln 2 \approx 0.69$ everywhere.

# %%
clean = torch.tensor([[2.0, 1.8, -1.0, -1.0],   # a close call between doctors 0 and 1
                      [3.0, 0.0, -0.5, -1.0],   # a clear case for doctor 0
                      [0.3, 0.1, 0.2, 0.0]])    # no strong preference
draws = 2000
picks = torch.zeros(3, 4)
generator = torch.Generator().manual_seed(0)
for _ in range(draws):
    r = noisy_top_k_routing(clean, torch.zeros_like(clean), k=1, training=True, generator=generator)
    picks += torch.nn.functional.one_hot(r.expert_index[:, 0], 4)
evaluation = noisy_top_k_routing(clean, torch.zeros_like(clean), k=1, training=False)
patients = ["close call", "clear case", "no preference"]
print("without noise (evaluation) every patient goes to doctor", evaluation.expert_index[:, 0].tolist())

fig, ax = plt.subplots(figsize=(8, 3.6))
share = (picks / draws).numpy()
for e in range(4):
    ax.bar([i + 0.2 * (e - 1.5) for i in range(3)], share[:, e], width=0.2, label=f"doctor {e}")
ax.set_xticks(range(3), patients)
ax.set(title="Noisy top-1 routing: how often each doctor is picked", ylabel=f"share of {draws} referrals", ylim=(0, 1.05))
ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
ax.legend(ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False);

# %% [markdown]
# The clear case almost always goes to its doctor; the close call is split between the two
# candidates, and the undecided patient visits everyone. During training that spreads
# experience over the experts where the router is unsure, and as the router grows more
# confident (larger score gaps, and it can shrink the noise it learns), its choices settle.
# At evaluation time the noise is off and the choice is the plain top-k.
#
# ## Knowledge without effort: parameters versus FLOPs
#
# Lesson 01 showed that a dense block's parameters and FLOPs grow together. A sparse layer
# breaks that tie. Take the package's `MoELayer` (the GP and E experts of width F, as in a
# transformer; lesson 08 builds on it) with D = 64 and F = 256. We count the parameters of
# real layers and the FLOPs per token of the router plus k experts.

# %%
from moe_course.experts import FeedForward
from moe_course.flops import count_parameters, ffn_flops
from moe_course.mixture import moe_layer_flops, moe_layer_param_count
from moe_course.moe import MoEConfig, MoELayer

D, F_ = 64, 256
experts_list = [1, 2, 4, 8, 16, 32, 64]
rows = []
for e in experts_list:
    layer = MoELayer(MoEConfig(d_model=D, d_ff=F_, num_experts=e))
    params = count_parameters(layer)
    assert params == moe_layer_param_count(D, F_, e)  # the formula counts the real module
    rows.append({"experts E": e, "parameters": params,
                 "FLOPs per token, k = 1": moe_layer_flops(1, D, F_, e, 1),
                 "FLOPs per token, k = 2": moe_layer_flops(1, D, F_, e, 2) if e >= 2 else float("nan")})
cost = pd.DataFrame(rows)
dense = {"parameters": count_parameters(FeedForward(D, F_)), "FLOPs": ffn_flops(1, D, F_)}
cost.style.format({"parameters": "{:,}", "FLOPs per token, k = 1": "{:,.0f}", "FLOPs per token, k = 2": "{:,.0f}"}).hide(axis="index")

# %%
ax = plt.figure(figsize=(7.5, 4.4)).gca()
ax.loglog(cost["experts E"], cost["parameters"], "o-", label="parameters (knowledge)")
ax.loglog(cost["experts E"], cost["FLOPs per token, k = 1"], "s-", label="FLOPs per token, top-1 (effort)")
ax.loglog(cost["experts E"], cost["FLOPs per token, k = 2"], "^--", label="FLOPs per token, top-2")
ax.axhline(dense["FLOPs"], color="gray", ls=":", lw=1.5, label="FLOPs per token of one dense FFN (D → F → D)")
ax.set(title="A sparse layer: knowledge grows with E, effort stays flat", xlabel="number of experts E (log scale)",
       ylabel="count (log scale)", xticks=experts_list, xticklabels=[str(e) for e in experts_list])
ax.legend(fontsize=9);
print(f"from E = 1 to E = {experts_list[-1]}: parameters ×{cost['parameters'].iloc[-1] / cost['parameters'].iloc[0]:.0f}, "
      f"FLOPs per token (k = 1) ×{cost['FLOPs per token, k = 1'].iloc[-1] / cost['FLOPs per token, k = 1'].iloc[0]:.2f}")

# %% [markdown]
# The parameters climb with E while the FLOPs per token stay almost flat: only the router,
# a D × E matrix, grows with E, and it is tiny next to an expert. Choosing k sets the effort:
# top-2 costs twice the expert work of top-1, whatever E is. This is the hospital of lesson
# 00's slider: hire more specialists, and a visit still costs one (or two) consultations.
#
# ## The four approaches, side by side
#
# Now the course's headline experiment. On the clinic of lessons 01–03 (four specialties
# whose diagnosis rules contradict each other) we train the essay's four approaches with one
# recipe. Every approach gets the same budget, **E · F = 64 hidden units** in all, so the
# parameter counts match (a gate, and four output layers instead of one, make the small
# differences):
#
# 1. **second cardiologists.** You went to your friend the cardiologist, and you ask three
#    more: four doctors of 16 hidden units, each trained from its own seed on the
#    **cardiology patients only**, their probabilities averaged (lesson 02's ensemble). Four
#    doctors of 16 units are the budget of the others; what they all share is their training.
# 2. **a generalist**: one MLP of 64 hidden units, trained on everyone (lessons 01–02).
# 3. **every specialist**: the dense mixture, a gate and 4 experts of 16 units, every
#    expert on every patient (lesson 03).
# 4. **the GP**: the *same* gate and experts, but each patient sees only its top experts, with
#    the Switch load-balancing loss ($\alpha = 0.01$; lesson 05 takes that loss apart). Two
#    versions: **4a, top-1** with Switch's raw gate, and **4b, top-2** with the two gates
#    renormalised to sum to 1 (the router of exercise 4.1, as in GShard and Mixtral).
#
# Everyone is judged on every held-out patient, whatever their specialty: a clinic does not
# choose who walks in. For reference, the specialists with a **perfect GP** (the oracle of
# lesson 01, who peeks at the specialty) show how far a router could take us.
#
# The GP's model is `RoutedMixture`: the dense mixture's parameters, with a sparse visit.

# %%
show_source(RoutedMixture.forward)

# %% [markdown]
# `four_approaches` trains every approach for every seed and measures each trained model on
# the held-out patients. The FLOPs are **measured**, not taken from a formula: PyTorch's FLOP
# counter records every matrix multiplication a model runs on the held-out patients
# (lesson 01's convention, 2 FLOPs per multiply-add), divided by the number of patients.
# Each model trains in seconds, so we repeat everything over six seeds: one seed decides a
# model's first weights and the order of its training batches, and a comparison is only as
# good as its spread over seeds. The runs are independent, so two worker processes train
# them side by side (`moe_course.experiments.workers`), one CPU thread each.

# %%
from moe_course.experiments.approaches import CARDIOLOGISTS, DENSE, GENERALIST, ORACLE, TOP_1, TOP_2, four_approaches
from moe_course.training import CLINIC_LR, TrainConfig

SEEDS = list(range(6 * SCALE))
CONFIG = TrainConfig(steps=600 * SCALE, batch_size=128, lr=CLINIC_LR, eval_every=600 * SCALE)
results = four_approaches(clinic, CONFIG, num_experts=E, d_ff=H, seeds=SEEDS, aux_loss_coef=0.01,
                          track_every=25, workers=2)
results.report()

# %% [markdown]
# One row per approach: the mean over the seeds, ± their standard deviation, and the worst
# and best seed. The specialisation score (lesson 03: 1 when every specialty has a doctor of
# its own, 0 when the specialty says nothing about the doctor) exists only for the approaches
# with a gate. The picture puts accuracy against what a patient costs:

# %%
from moe_course.figures.plots import accuracy_vs_flops

accuracy_vs_flops(results.table, title="Four ways to see a doctor: accuracy against effort", reference=ORACLE,
                  chance=1 / clinic.num_diagnoses);

# %% [markdown]
# Read it from left to right: the further left, the less a patient pays. Each marker is the
# mean over the seeds, the small dots are the seeds, the bar spans the worst to the best. The
# next cell prints the comparisons that matter, seed by seed (every seed trains every
# approach, so we can subtract within a seed). A difference counts as **beyond the spread of
# the seeds** when its mean is more than two standard errors from zero.

# %%
from moe_course.experiments.approaches import paired_difference

flops = results.summary()["FLOPs per patient"]
print(f"FLOPs per patient: top-1 GP {flops[TOP_1]:,.0f}, top-2 GP {flops[TOP_2]:,.0f}, dense mixture {flops[DENSE]:,.0f}, "
      f"generalist and second cardiologists {flops[GENERALIST]:,.0f}")
print(f"the top-1 GP pays {flops[TOP_1] / flops[GENERALIST]:.0%} of the generalist's FLOPs, "
      f"the top-2 GP {flops[TOP_2] / flops[DENSE]:.0%} of the dense mixture's\n")
for a, b in [(TOP_1, GENERALIST), (TOP_2, GENERALIST), (TOP_2, DENSE), (TOP_2, TOP_1), (DENSE, GENERALIST),
             (GENERALIST, CARDIOLOGISTS), (ORACLE, TOP_2)]:
    print(paired_difference(results.table, a, b))

# %% [markdown]
# These lines are the experiment's verdicts; the prose can only add why. Things to look for:
#
# - **Effort.** A GP's patient pays for the gate and one or two doctors, a fixed cost however
#   many doctors the hospital hires; the dense mixture and the generalist pay for all
#   64 hidden units. The FLOP shares are printed above.
# - **Top-2 against everyone.** With two doctors per patient, the GP hears two answers and
#   can compare them. Whether that buys the dense mixture's accuracy (or more) at a fraction
#   of its FLOPs is the third verdict line.
# - **Top-1 against the generalist.** The top-1 GP is the cheapest model in the table. If it
#   is within the spread of the generalist, it matches a dense model at a fraction of the
#   effort; its spread over seeds is the subject of the last section.
# - **The perfect GP** shows how much a better router could still add.
#
# ## Approach 1 up close: a blind spot that averaging cannot fix
#
# The second cardiologists have the generalist's budget and cost; the sixth verdict line
# compares them. Where do they succeed, and where do they fail? Accuracy per specialty,
# averaged over the seeds:

# %%
from moe_course.figures.plots import grouped_bars

by_specialty = results.by_specialty()
ax = grouped_bars({name: by_specialty.loc[name].to_numpy() for name in by_specialty.index}, clinic.specialties,
                  title="Who gets which specialty right? (mean over the seeds)", ylabel="held-out accuracy",
                  chance=1 / clinic.num_diagnoses)
ax.figure.set_size_inches(13, 4.8)
ax.set_ylim(0, 1.12)
ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"));

# %% [markdown]
# Did averaging four cardiologists help at all? Compare one cardiologist (the mean over the
# four members and the seeds) with the four averaged, specialty by specialty, and split their
# error into bias and variance as lesson 02 did (the Brier decomposition: bias is the error of
# the average doctor, variance is how much the doctors disagree).

# %%
from moe_course.analysis.metrics import accuracy_by_group
from moe_course.experiments.ensembles import brier_decomposition

x_val, y_val, s_val = clinic.val.x, clinic.val.diagnosis, clinic.val.specialty
one, four, bias, error = [], [], [], []
for seed in SEEDS:
    team = results.models[(CARDIOLOGISTS, seed)]
    member_logits = team(x_val)  # (R, N, diagnoses): every cardiologist on every patient
    one.append(torch.stack([accuracy_by_group(logits, y_val, s_val, S) for logits in member_logits]).mean(0))  # (S,)
    four.append(accuracy_by_group(team.probs(x_val), y_val, s_val, S))  # (S,)
    parts = brier_decomposition(torch.softmax(member_logits, -1), y_val)  # per patient (N,)
    bias.append(torch.zeros(S).index_add_(0, s_val, parts.bias))
    error.append(torch.zeros(S).index_add_(0, s_val, parts.error))
one, four = torch.stack(one).mean(0), torch.stack(four).mean(0)
bias_share = torch.stack(bias).sum(0) / torch.stack(error).sum(0)  # (S,)
pd.DataFrame({"one cardiologist": one.numpy(), "four averaged": four.numpy(), "gain from averaging": (four - one).numpy(),
              "share of the error that is bias": bias_share.numpy()},
             index=clinic.specialties).style.format("{:.1%}").format("{:+.1%}", subset=["gain from averaging"])

# %%
home = clinic.specialties[0]
away = [s for s in range(1, S)]
print(f"in {home}, averaging four cardiologists moved the accuracy by {100 * (four[0] - one[0]):+.1f} points "
      f"(to {four[0]:.1%}; the perfect GP's cardiologist: {by_specialty.loc[ORACLE, home]:.1%}); "
      f"in the other specialties by {100 * (four[away] - one[away]).abs().max():.1f} points at most")
print(f"share of the cardiologists' error that is bias: {bias_share[0]:.0%} in {home}, "
      f"{bias_share[away].min():.0%} to {bias_share[away].max():.0%} in the other specialties")
twin = clinic.specialties[1]
print(f"in {twin}, {home}'s contradicting twin, the four cardiologists are right on {four[1]:.1%} of the patients "
      f"(chance: {1 / clinic.num_diagnoses:.0%})" + (": worse than guessing" if four[1] < 1 / clinic.num_diagnoses else ""))

# %% [markdown]
# This is the essay's first approach, measured. Bias is the error of the *average*
# cardiologist: the part they all share. Variance is the part they disagree about, the only
# part averaging can remove. Where the printed bias share is close to 100%, the cardiologists
# agree with each other and are wrong together, and asking a fifth one would change nothing.
# Ophthalmology is the sharpest case: its rule renames every cardiology diagnosis, so a
# cardiologist who confidently applies the cardiology rule is wrong on every patient whose
# measurements it reads correctly. A second opinion from a doctor with the same training
# shares the first doctor's blind spot.
#
# ## Where does the GP send each specialty?
#
# The maps of lesson 03, now for the three models with a gate: for the dense mixture the mean
# gate weight, for the GPs the share of each specialty's patients who see each doctor. Every
# seed trained its own models, so which seed do we show? **We show the median seed of the
# top-1 GP's specialisation score** (the lower of the two middle seeds when the number of
# seeds is even), so the picture is typical for this run, neither its best nor its worst seed.

# %%
from moe_course.analysis.specialisation import gate_mass_by_specialty, seen_by_specialty
from moe_course.experiments.approaches import median_seed
from moe_course.figures.plots import gate_mass_heatmap

spec = results.pivot("specialisation")[[DENSE, TOP_1, TOP_2]]
shown = median_seed(spec[TOP_1])
print("specialisation score of each seed's models:")
print(spec.round(2).to_string())
print(f"\nthe median seed of the top-1 GP: seed {shown}")


fig, axes = plt.subplots(1, 3, figsize=(18.5, 4.3))
with torch.no_grad():
    dense_weights = results.models[(DENSE, shown)](x_val).router_probs  # (N, E)
    gate_mass_heatmap(gate_mass_by_specialty(dense_weights, s_val, S), clinic.specialties, ax=axes[0],
                      title=f"3 · dense mixture, seed {shown}: mean gate weight\n(specialisation {spec.loc[shown, DENSE]:.2f})")
    for ax, name, k in [(axes[1], TOP_1, 1), (axes[2], TOP_2, 2)]:
        routed = results.models[(name, shown)](x_val)
        gate_mass_heatmap(seen_by_specialty(routed.expert_index, s_val, S, E), clinic.specialties, ax=ax,
                          label=f"share of the specialty's patients\n(each sees {k} doctor{'s' if k > 1 else ''})",
                          title=f"{name.split(' (')[0]}, seed {shown}: who sees whom\n(specialisation {spec.loc[shown, name]:.2f})")
fig.tight_layout()

# %% [markdown]
# A bright cell alone in its row and column is a specialty with a doctor of its own. A row
# spread over several doctors is a specialty whose patients meet doctors who never learned
# their rule; a column bright in several rows is a doctor who must know several rules at once.
# (The specialisation score reads the GP's *first* choice; the top-2 map shows both.)
#
# ## Why some GPs never learn to route: lock-in
#
# Look at the spread of the GPs' specialisation scores over the seeds in the table above: same
# data, same recipe, only a different seed. Is a GP with a low score just slow, or stuck? The
# trainer recorded the specialisation score every 25 steps:

# %%
hist = results.histories
fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), sharey=True)
for ax, name in zip(axes, (TOP_1, TOP_2)):
    for seed, rows in hist[hist["approach"] == name].groupby("seed"):
        ax.plot(rows["step"], rows["score"], marker="o", ms=2.5, label=f"seed {seed}")
    ax.set(title=f"{name.split(' (')[0]}: specialisation while training", xlabel="training step",
           ylabel="specialisation score (0 to 1)", ylim=(0, 1.02))
axes[1].legend(ncol=1, fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="one line per seed")
fig.tight_layout()

# %% [markdown]
# Each line is one seed. Where a line flattens out early, more training would not change it:
# the GP has settled. Where it flattens low, the GP has **locked in** to a referral pattern
# that ignores the specialty. What decides which seeds lock in? Look at the first steps. For
# every seed, `seed_report` counts how many doctors the top-1 GP really uses (the "effective
# number", $e^{H}$ of the share of patients each doctor gets, 4 when they share equally, 1 when
# one doctor gets everyone), at the start and after 25 steps; how far its specialisation
# still moved in the second half of training; and the **context share**: how much of the GP's
# decision comes from the department the patient walked into rather than from the
# measurements (in the clinic the measurements are loud and mean the same in every specialty;
# the department's cue is faint, but it is the one that says whose rule applies).

# %%
report = results.seed_report(TOP_1, early_step=25)
report.style.format("{:.2f}").format("{:.1%}", subset=["held-out accuracy"])

# %%
early = report["doctors in use: step 25"]
final = report["specialisation: end"]
print(f"rank correlation between the doctors in use after 25 steps and the final specialisation: "
      f"{early.rank().corr(final.rank()):+.2f} over {len(report)} seeds")
print(f"rank correlation between the final context share and the final specialisation: "
      f"{report['context share: end'].rank().corr(final.rank()):+.2f}")
print(f"context share at the start: {report['context share: start'].min():.2f} to {report['context share: start'].max():.2f}; "
      f"at the end: {report['context share: end'].min():.2f} to {report['context share: end'].max():.2f}")
moved = report["change in the second half"].abs().max()
print(f"the most any seed's specialisation moved in the second half of training: {moved:.2f}; "
      f"the seeds' final scores span {final.min():.2f} to {final.max():.2f}")
settled = moved < (final.max() - final.min()) / 4  # no seed moved by a quarter of the spread between seeds
print("so the seeds' differences were " + ("settled in the first half: lock-in, not slow learning" if settled
                                           else "still changing in the second half: longer training may help"))
print(paired_difference(results.table, TOP_2, TOP_1, column="specialisation"))

# %%
fig, ax = plt.subplots(figsize=(7.5, 4.6))
for name, marker in ((TOP_1, "o"), (TOP_2, "^")):
    r = results.seed_report(name, early_step=25)
    ax.scatter(r["doctors in use: step 25"], r["specialisation: end"], marker=marker, s=60, label=name.split(" (")[0])
    for seed, row in r.iterrows():
        ax.annotate(f"{seed}", (row["doctors in use: step 25"], row["specialisation: end"]), xytext=(5, 3),
                    textcoords="offset points", fontsize=8)
ax.set(title="The first 25 steps, and where each GP ends",
       xlabel="doctors in use after 25 steps (effective number, out of 4)", ylabel="final specialisation score",
       xlim=(1, E), ylim=(0, 1.02))
ax.legend(title="one marker per seed (number: the seed)", fontsize=9);

# %% [markdown]
# What does a stuck GP do? The same "who sees whom" map as above, for two seeds picked by a
# rule, the **lowest and the highest final specialisation** of the top-1 GP (the two ends of
# the range), after 25 steps and at the end of training:

# %%
ends = [int(final.idxmin()), int(final.idxmax())]
steps = hist[(hist["approach"] == TOP_1) & (hist["seed"] == ends[0])]["step"].tolist()
fig, axes = plt.subplots(2, 2, figsize=(12.5, 8))
for row, seed in zip(axes, ends):
    counts = results.counts[(TOP_1, seed)].float()  # (evaluations, S, E): first choices
    for ax, step in zip(row, (25, steps[-1])):
        table = counts[steps.index(step)]
        gate_mass_heatmap(table / table.sum(1, keepdim=True), clinic.specialties, ax=ax, label="share of the specialty's patients",
                          title=f"top-1 GP, seed {seed}, step {step}\n(specialisation {report.loc[seed, 'specialisation: end' if step == steps[-1] else 'specialisation: step 25']:.2f})")
fig.tight_layout()

# %% [markdown]
# Here is a story of lock-in; the printouts and maps above say how well this run's seeds fit
# it. If the GP sends most patients to two or three doctors in its first steps, those doctors see
# every specialty, learn a little of every rule, and soon give the best answers to everyone.
# The idle doctors get no practice, so a patient sent to them gets a poor answer, and the raw
# gate turns that poor answer into a gradient that sends even fewer patients their way. A
# top-1 GP only hears back from the doctor it chose, so nothing tells it that a doctor of the
# patient's own specialty would have done better: it keeps routing by what it read at the
# start, mostly the loud measurements, and ignores the department. If that is what happened
# here, the first rank correlation is positive (fewer doctors in use early, less
# specialisation at the end), the second one too (the GPs that learned to listen to the
# department are the ones that specialised), the context share starts low for every seed,
# and the stuck seed's maps send every specialty to the same few doctors from step 25 on.
#
# The top-2 GP hears back from two doctors for every patient. The renormalised gates
# $g_1 / (g_1 + g_2)$ then carry a comparison: whichever of the two answered better gets the
# larger share next time. The last line of the printout says whether that helped it
# specialise, seed for seed. Lesson 05 looks at the other remedies: a load-balancing loss
# that keeps every doctor busy, and capacity limits.
#
# ## Recap
#
# - A sparse router sends each token to its top-k experts only; top-k with $k \ge 2$
#   renormalises the gates, Switch's top-1 keeps the raw gate, because the gate is the
#   router's only source of gradient. Noise before the choice lets the router explore.
# - At fixed k, a sparse layer's parameters grow with the number of experts while its FLOPs
#   per token stay flat: knowledge and effort come apart.
# - On the clinic, at matched parameter budgets and over six seeds, the GPs pay a fraction of
#   the dense models' FLOPs per patient; the printed verdicts say what that costs or buys in
#   accuracy. Averaging doctors with the same training removes only their disagreement
#   (variance), never their shared blind spot (bias). A GP's first steps can lock it into a
#   referral pattern that ignores the specialty; a top-2 GP compares two answers per patient.
#
# **Next:** lesson 05 keeps the clinic running: what happens when the GP sends everyone to a
# few doctors (collapse), how a balance loss and the router z-loss fix it, and what a full
# waiting room (expert capacity) does to the patients who do not get a chair.
#
# **Exercises:** `exercises/04_sparse_routing.ipynb`: top-k routing with renormalised gates,
# noisy top-k gating, and a Switch layer whose router gets its gradient.
#
# **Read more:** Shazeer et al. 2017, *Outrageously Large Neural Networks: The
# Sparsely-Gated Mixture-of-Experts Layer*, arXiv:1701.06538 (noisy top-k); Lepikhin et al.
# 2020, *GShard*, arXiv:2006.16668 (top-2); Fedus, Zoph and Shazeer 2021, *Switch
# Transformers*, arXiv:2101.03961 (top-1 and the raw gate); Jiang et al. 2024, *Mixtral of
# Experts*, arXiv:2401.04088 (top-2 with renormalised gates in a modern model).
