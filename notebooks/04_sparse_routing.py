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
#   the clinic, accuracy and FLOPs per patient, at matched parameter budgets.
#
# Shape letters: **N** tokens (here: patients), **D** token width, **F** an expert's hidden
# width, **E** experts, **K** the k of top-k.

# %%
import matplotlib.pyplot as plt
import pandas as pd
import torch

from moe_course import get_device, seed_everything
from moe_course.plots import use_course_style
from moe_course.show import show_source

# ---- the one knob of this lesson -------------------------------------------
# 1 runs in well under a minute on a laptop CPU. Larger values train every model
# of the four-approach experiment longer (SCALE × the steps) and repeat it over
# more seeds (2 × SCALE), so the comparison rests on more runs.
SCALE = 1
# -----------------------------------------------------------------------------

device = get_device()
seed_everything(0)
use_course_style()
# The clinic's models are tiny: on a CPU one thread runs them fastest.
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

from moe_course.clinic import make_clinic
from moe_course.routed import RoutedMixture, RoutedMixtureConfig

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
# it, so the noise has the scale softplus(0) ≈ 0.69 everywhere.

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
from moe_course.moe import MoEConfig, MoELayer
from moe_course.routed import moe_layer_flops, moe_layer_param_count

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
# whose diagnosis rules contradict each other), we train the essay's four approaches with the
# same recipe, each with **E · F = 64 hidden units** in all, so that the parameter budgets
# match (the gate and the number of output layers make the small differences):
#
# 1. **a second cardiologist**: an ensemble of 4 identical MLPs of 16 hidden units each,
#    trained with different seeds and averaged (lesson 02);
# 2. **a generalist**: one MLP of 64 hidden units (lessons 01–02);
# 3. **every specialist**: the dense mixture, a gate and 4 experts of 16 units, every
#    expert on every patient (lesson 03);
# 4. **the GP**: the *same* gate and experts, but each patient sees only its top-1 expert,
#    with Switch's raw gate and the Switch load-balancing loss (weight 0.01; lesson 05 takes
#    that loss apart).
#
# For reference, the specialists with a **perfect GP** (the oracle of lesson 01, who peeks at
# the specialty) show how far a router could take us.
#
# The GP's model is `RoutedMixture`: the dense mixture's parameters, with a sparse visit.

# %%
show_source(RoutedMixture.forward)

# %% [markdown]
# `four_approaches` trains all of them for every seed and measures each trained model on the
# held-out patients. The FLOPs are **measured**, not taken from a formula: PyTorch's FLOP
# counter records every matrix multiplication a model runs on the 2048 held-out patients
# (lesson 01's convention, 2 FLOPs per multiply-add), divided by the number of patients.

# %%
from moe_course.approaches import APPROACHES, ORACLE, four_approaches
from moe_course.training import TrainConfig

CONFIG = TrainConfig(steps=600 * SCALE, batch_size=128, lr=1e-2, eval_every=600 * SCALE)
results = four_approaches(clinic, CONFIG, num_experts=E, d_ff=H, seeds=list(range(2 * SCALE)), device=device)
summary = results.summary()
summary.style.format({"parameters": "{:,}", "FLOPs per patient": "{:,.0f}", "accuracy (mean)": "{:.1%}",
                      "accuracy (worst seed)": "{:.1%}", "accuracy (best seed)": "{:.1%}"})

# %%
from moe_course.plots import accuracy_vs_flops

accuracy_vs_flops(results.table, title="Four ways to see a doctor: accuracy against effort", reference=ORACLE,
                  chance=1 / clinic.num_diagnoses);

# %%
mean = summary["accuracy (mean)"]
flops = summary["FLOPs per patient"]
params = summary["parameters"]
print(f"parameters: from {params.min():,} to {params.max():,} across the approaches "
      f"(the largest is {params.max() / params.min() - 1:.0%} above the smallest)")
print(f"FLOPs per patient: the GP {flops[APPROACHES[3]]:,.0f}, the dense mixture {flops[APPROACHES[2]]:,.0f} "
      f"({flops[APPROACHES[2]] / flops[APPROACHES[3]]:.1f}× the GP), the generalist and the ensemble {flops[APPROACHES[1]]:,.0f}")
print("mean held-out accuracy, best first:")
for name, acc in mean.sort_values(ascending=False).items():
    print(f"  {acc:.1%}  {name}")
print(f"the GP minus the generalist: {100 * (mean[APPROACHES[3]] - mean[APPROACHES[1]]):+.1f} points; "
      f"the GP minus the dense mixture: {100 * (mean[APPROACHES[3]] - mean[APPROACHES[2]]):+.1f} points")

# %% [markdown]
# Read the plot from left to right. The GP (approach 4) sits far to the left: each patient
# pays for the gate and one doctor, a fraction of what the other three approaches spend
# (the FLOP ratio is printed above). The second cardiologist (approach 1) buys the least for
# its compute, as lesson 02 found: averaging identical doctors shrinks variance, not bias.
#
# In accuracy the ordering printed above is what this experiment measured; with two seeds
# per approach, differences of a point or two are within the spread between seeds (the
# bars). In our runs the dense mixture, which consults every doctor, is the most accurate of
# the four, and the GP does not reach it: sparse routing is not free. A top-1 GP only ever
# hears back from the doctor it chose, so it learns whom to send where more slowly than a
# gate that sees every doctor's answer on every patient (lesson 03's competitive learning).
# What the GP buys is effort: it reaches about the generalist's accuracy with a fraction of
# the compute per patient, and it leaves the door open to hiring more doctors at no extra
# cost per visit, which the dense approaches cannot do. And none of the four reaches the
# specialists with a perfect GP: there is room for a better router.
#
# Where does the GP send each specialty? The same maps as in lesson 03, for the two trained
# mixtures of the first seed: for the dense mixture the mean gate weight, for the GP the
# share of each specialty's patients sent to each doctor (its only doctor).

# %%
from moe_course.plots import gate_mass_heatmap
from moe_course.specialisation import gate_mass_by_specialty, specialisation_score, top_expert_counts

x_val, s_val = clinic.val.x, clinic.val.specialty
with torch.no_grad():
    dense_out = results.models[APPROACHES[2]](x_val)
    routed_out = results.models[APPROACHES[3]](x_val)
sent = top_expert_counts(routed_out.router_probs, s_val, S).float()  # (S, E): patients per specialty and expert
fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
gate_mass_heatmap(gate_mass_by_specialty(dense_out.router_probs, s_val, S), clinic.specialties, ax=axes[0],
                  title=f"3 · dense mixture: mean gate weight\n(specialisation score "
                        f"{specialisation_score(dense_out.router_probs, s_val, S):.2f})")
gate_mass_heatmap(sent / sent.sum(1, keepdim=True), clinic.specialties, ax=axes[1], label="share of the specialty's patients",
                  title=f"4 · the GP: where each specialty is sent\n(specialisation score "
                        f"{specialisation_score(routed_out.router_probs, s_val, S):.2f})")
fig.tight_layout()
load = sent.sum(0) / sent.sum()  # (E,) share of all held-out patients per doctor
print("share of the held-out patients the GP sends to each doctor:", [f"{v:.1%}" for v in load.tolist()])

# %% [markdown]
# Compare the two maps and their specialisation scores (lesson 03's normalised mutual
# information, 1 when every specialty has its own doctor). Where the GP splits a specialty
# between doctors, or sends two specialties to one, some patients meet a doctor who never
# learned their rule, and a doctor nobody is sent to (if the printout above names one) is
# parameters that buy nothing. Helping the GP spread its patients well is the subject of
# lesson 05.
#
# ## Recap
#
# - A sparse router sends each token to its top-k experts only; top-k with $k \ge 2$
#   renormalises the gates, Switch's top-1 keeps the raw gate, because the gate is the
#   router's only source of gradient. Noise before the choice lets the router explore.
# - At fixed k, a sparse layer's parameters grow with the number of experts while its FLOPs
#   per token stay flat: knowledge and effort come apart.
# - On the clinic, at matched parameter budgets, the GP needs a fraction of the other
#   approaches' FLOPs per patient; what it gives up in accuracy, and how much, is in the
#   table above.
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
