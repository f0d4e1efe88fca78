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
# # 05 · Keeping the clinic running: balance, stability and full waiting rooms
#
# Lesson 04's GP sends each patient to one doctor. That is cheap, but a real clinic soon
# meets new troubles. A GP who likes one doctor sends everybody there, and the others sit
# idle: the hospital pays for specialists it never uses. A GP who grows too sure of itself
# becomes numerically fragile. And a doctor's waiting room has only so many chairs: on a
# busy day, who is turned away? This lesson measures each trouble on the clinic and the fix
# the Switch Transformer and its successors use.
#
# **In this lesson you will**
#
# - watch **expert collapse**: without help, a few doctors take most patients (per-doctor
#   load over training), and the Switch **load-balancing loss** spreads them out;
# - see the router's logits grow during training, and the **router z-loss** hold them down;
# - give every doctor a fixed number of chairs (**expert capacity**) and measure the share of
#   patients turned away and the accuracy against the capacity factor;
# - meet **expert choice** routing, balanced by construction, and see why it cannot be used
#   as it stands to generate text one token at a time;
# - play with all of it: experts, k, capacity, noise and the balance weight, on sliders.
#
# Shape letters: **N** tokens (patients), **D** width, **E** experts, **K** the k of top-k,
# **C** capacity (chairs per doctor).

# %%
import dataclasses

import matplotlib.pyplot as plt
import pandas as pd
import torch

from moe_course import get_device, seed_everything
from moe_course.plots import use_course_style
from moe_course.show import show_source

# ---- the one knob of this lesson -------------------------------------------
# 1 runs in about a minute on a laptop CPU. Larger values train every model
# longer (SCALE × the steps) and repeat the collapse and z-loss runs over more
# seeds (2 × SCALE).
SCALE = 1
# -----------------------------------------------------------------------------

device = get_device()
seed_everything(0)
use_course_style()
torch.set_num_threads(1)  # tiny models: one thread is fastest on a CPU

# %% [markdown]
# ## The clinic as a transformer layer
#
# From now on the doctors work the way they do inside a transformer. `ClinicMoE` embeds a
# patient into a vector $h$ of width D, passes it through one `MoELayer` (the GP and E
# experts, each a D → F → D feed-forward block) inside a **residual connection**,
# $h + \text{MoE}(h)$, and reads the diagnosis off the result with a linear head. The
# residual connection matters later: a patient who gets no doctor keeps $h$ and still
# reaches the head.

# %%
from moe_course.models import ClinicMoE

show_source(ClinicMoE.forward)

# %% [markdown]
# We hire **8 doctors for the 4 specialties**, so there is room to share the work, and train
# with lesson 04's recipe. `MoEConfig` holds the knobs of this lesson: the weight α of the
# balance loss, the weight of the z-loss and the capacity factor (None: no limit).

# %%
from moe_course.clinic import make_clinic
from moe_course.moe import MoEConfig
from moe_course.training import ClassificationTask, TrainConfig, train

clinic = make_clinic(num_specialties=4, seed=0)
task = ClassificationTask.from_clinic(clinic)
E = 8
BASE = MoEConfig(d_model=16, d_ff=16, num_experts=E, aux_loss_coef=0.0, z_loss_coef=0.0)
CONFIG = TrainConfig(steps=600 * SCALE, batch_size=128, lr=1e-2, eval_every=25 * SCALE)
SEEDS = list(range(2 * SCALE))
BASE

# %% [markdown]
# ## Expert collapse
#
# Early in training the router's scores are small and nearly random, yet each patient still
# goes to exactly one doctor. Whichever doctors happen to get many patients learn fastest;
# the better they get, the more the router trusts them, and the more patients they get.
# Doctors who got few patients at the start learn little and stay unpopular. Nothing in the
# diagnosis loss pushes back: the rich get richer.
#
# A `LoadTracker` records, every 25 steps, the share of the held-out patients the router
# sends to each doctor. We train twice per seed: without any balancing (α = 0), and with the
# Switch Transformer's load-balancing loss at its paper's weight, α = 0.01.

# %%
from moe_course.balance import LoadTracker


def run(moe_config, seed):
    """Train one ClinicMoE with moe_config; record the load over training."""
    seed_everything(seed)
    model = ClinicMoE(clinic.d_in, clinic.num_diagnoses, moe_config)
    tracker = LoadTracker(clinic.val.x)
    tracker(0, model)  # the load at initialisation
    result = train(model, task, dataclasses.replace(CONFIG, seed=seed), device=device, callback=tracker)
    return {"model": model.cpu(), "tracker": tracker, "accuracy": result.final["val_acc"]}


runs = {}
for seed in SEEDS:
    runs["no balance loss", seed] = run(BASE, seed)
    runs["balance loss α = 0.01", seed] = run(dataclasses.replace(BASE, aux_loss_coef=1e-2), seed)

# %% [markdown]
# The load of every doctor at a few moments of training, for the first seed. The dashed line
# is the fair share, 1/E of the patients each.

# %%
from moe_course.plots import load_snapshots

steps = runs["no balance loss", 0]["tracker"].history["step"].tolist()
picks = sorted({min(range(len(steps)), key=lambda i: abs(steps[i] - s)) for s in (0, 25, 100, 300, steps[-1])})
load_snapshots({name: runs[name, 0]["tracker"].shares for name in ("no balance loss", "balance loss α = 0.01")},
               steps, picks, title="How the GP spreads the patients over 8 doctors");

# %% [markdown]
# And in numbers, at the end of training, for every seed: the balance loss (1.0 when every
# doctor gets the same share; lower is more even), the share of the busiest doctor (the fair
# share is 1/8), the **idle doctors** (those who get less than a quarter of their fair share)
# and the held-out accuracy.

# %%
final = pd.DataFrame([
    {"run": name, "seed": seed, **{k: v for k, v in r["tracker"].rows[-1].items() if k in ("balance loss", "busiest share", "idle doctors")},
     "held-out accuracy": r["accuracy"]}
    for (name, seed), r in runs.items()
])
final.style.format({"balance loss": "{:.2f}", "busiest share": "{:.0%}", "held-out accuracy": "{:.1%}"}).hide(axis="index")

# %%
means = final.groupby("run", sort=False)[["balance loss", "busiest share", "idle doctors", "held-out accuracy"]].mean()
for name, row in means.iterrows():
    print(f"{name:>22}: balance loss {row['balance loss']:.2f}, busiest doctor {row['busiest share']:.0%} of the patients, "
          f"{row['idle doctors']:.1f} idle doctors, accuracy {row['held-out accuracy']:.1%} (means over {len(SEEDS)} seeds)")

# %% [markdown]
# Without the balance loss the GP leans on a few doctors: the load is uneven from the very
# start (a random router is not an even one), and training does not fix it: some doctors
# keep a large share while others idle. With the balance loss the load evens out within
# the first few dozen steps and stays closer to fair. The mean numbers above say how much
# for this clinic. The accuracy shows that balancing does not cost the diagnosis anything
# here. The win is the doctors themselves: an idle doctor's parameters cost memory and buy
# nothing.
#
# ### The load-balancing loss
#
# The Switch Transformer's auxiliary loss (exercise 5.1) is
#
# $$\text{loss} = E \cdot \sum_{i=1}^{E} f_i \cdot P_i$$
#
# with $f_i$ the **fraction of the tokens sent to expert i** (counted from the choices) and
# $P_i$ the **mean router probability** of expert i. The counts have no gradient; the
# probabilities do, so the gradient lowers the probability of every expert in proportion to
# how busy it already is. It is 1.0 when the routing is perfectly even and E when one expert
# takes everybody with certainty:

# %%
from moe_course.losses import load_balancing_loss

show_source(load_balancing_loss)

n = 16
uniform = load_balancing_loss(torch.full((n, E), 1 / E), torch.arange(n) % E)
everyone_to_0 = load_balancing_loss(torch.eye(E)[[0] * n], torch.zeros(n, dtype=torch.long))
print(f"perfectly even routing: {uniform:.2f}; every patient sent to doctor 0 with certainty: {everyone_to_0:.2f} (= E)")

# %% [markdown]
# ## The router z-loss: a GP who stays humble
#
# Watch the router's logits while the model trains. The tracker also recorded the router
# z-loss, the mean of $(\log \sum_j e^{x_j})^2$ over the patients, which grows with the
# size of the logits. ST-MoE (Zoph et al. 2022) adds it to the training loss with a small
# weight, 0.001, to keep the logits small (exercise 5.2):

# %%
from moe_course.losses import router_z_loss

show_source(router_z_loss)

# %%
for seed in SEEDS:
    runs["balance loss + z-loss", seed] = run(dataclasses.replace(BASE, aux_loss_coef=1e-2, z_loss_coef=1e-3), seed)

# %%
names = ["no balance loss", "balance loss α = 0.01", "balance loss + z-loss"]
fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
for name in names:
    h = runs[name, 0]["tracker"].history
    axes[0].plot(h["step"], h["z-loss"], "o-", ms=3, label=name)
axes[0].set(title="The router's logits grow unless held down", xlabel="training step",
            ylabel="router z-loss: mean logsumexp(logits)²")
axes[0].legend()
with torch.no_grad():
    for name in names[1:]:
        m = runs[name, 0]["model"]
        logits = m.moe.router(m.embed(clinic.val.x)).flatten()
        axes[1].hist(logits.numpy(), bins=60, alpha=0.6, density=True, label=name)
axes[1].set(title="Router logits after training (held-out patients)", xlabel="router logit", ylabel="density")
axes[1].legend()
fig.tight_layout()

z_table = pd.DataFrame([
    {"run": name, "seed": seed, "z-loss": runs[name, seed]["tracker"].rows[-1]["z-loss"],
     "largest |logit|": runs[name, seed]["tracker"].rows[-1]["largest |logit|"], "held-out accuracy": runs[name, seed]["accuracy"]}
    for name in names for seed in SEEDS
]).groupby("run", sort=False).mean().drop(columns="seed")
z_table.style.format({"z-loss": "{:.1f}", "largest |logit|": "{:.2f}", "held-out accuracy": "{:.1%}"})

# %% [markdown]
# Without the z-loss the logits keep growing as the router becomes sure of itself; with it
# they grow more slowly and end up smaller (means over the seeds in the table; the largest
# |logit| is taken per patient, then averaged). Why care, if the accuracy barely moves?
# Because large models train in low precision. **bfloat16** keeps only 8 significant bits,
# so the gap between neighbouring numbers, and with it the rounding error, grows with the
# size of the number. After the softmax's exponential, an error of δ in a logit multiplies
# a probability by about $e^{\delta}$. Here are the rounding errors of logits stored in
# bfloat16, and the resulting errors of the routing probabilities (the softmax itself in
# float32), at three sizes of logits:

# %%
g = torch.Generator().manual_seed(0)
rows = []
for scale in (1.0, 10.0, 100.0):
    logits = scale * torch.randn(10_000, E, generator=g)
    rounded = logits.bfloat16().float()
    rows.append({"typical |logit|": scale, "largest rounding error of a logit": (rounded - logits).abs().max().item(),
                 "largest error of a probability": (torch.softmax(rounded, -1) - torch.softmax(logits, -1)).abs().max().item()})
pd.DataFrame(rows).style.format({"typical |logit|": "{:g}", "largest rounding error of a logit": "{:.3f}",
                                 "largest error of a probability": "{:.4f}"}).hide(axis="index")

# %% [markdown]
# Small logits survive bfloat16; large ones do not: the probabilities, which become the
# gates that weigh the experts' answers and the P of the balance loss, come out wrong by
# more and more. This is why the Switch Transformer computes its router in float32
# ("selective precision"; `MoELayer.router` does too, even under autocast) and why ST-MoE
# adds the z-loss on top: it keeps the numbers in the range where they are safe.
#
# ## Full waiting rooms: expert capacity
#
# On hardware, each expert processes a fixed-size block of tokens, so every expert gets a
# fixed number of slots per batch, its **capacity**:
#
# $$C = \left\lceil \frac{k \cdot N}{E} \cdot \text{capacity factor} \right\rceil$$
#
# A capacity factor of 1 gives every doctor exactly its fair share of chairs; above 1 leaves
# slack for uneven days. Patients beyond a doctor's C chairs are **dropped**: the layer
# skips them, and the residual connection carries them on unchanged. Who is dropped? The
# package (like the Switch and GShard implementations) serves each expert's patients **first
# come, first served**, in the order of the batch; with top-k, every first choice is served
# before any second choice (exercise 5.3 builds the top-1 case).

# %%
from moe_course.routing import capacity_mask, expert_capacity

show_source(expert_capacity)

# %% [markdown]
# Twelve patients, three doctors, capacity factor 1: four chairs each. Doctor 0 is popular.

# %%
expert_index = torch.tensor([0, 2, 0, 0, 1, 0, 2, 0, 1, 0, 2, 2])  # (N,): each patient's chosen doctor
C = expert_capacity(len(expert_index), num_experts=3, capacity_factor=1.0)
assignment = capacity_mask(expert_index, num_experts=3, capacity=C)
print(f"capacity C = {C} chairs per doctor")
pd.DataFrame({"doctor": expert_index.tolist(), "arrival at that doctor": assignment.position[:, 0].tolist(),
              "gets a chair": assignment.keep[:, 0].tolist()}, index=[f"patient {t}" for t in range(12)]).T

# %% [markdown]
# Doctor 0's fifth and sixth patients are turned away, although doctor 1 still has free
# chairs: a dropped patient does not get a second choice. In `ClinicMoE`, a dropped patient's
# MoE output is zero, so the residual connection hands the embedding $h$ to the head as it
# was. On one batch of held-out patients, with a tight capacity:

# %%
seed_everything(0)
tight = ClinicMoE(clinic.d_in, clinic.num_diagnoses, dataclasses.replace(BASE, capacity_factor=0.5))
tight.load_state_dict(runs["balance loss + z-loss", 0]["model"].state_dict())  # the trained weights, fewer chairs
with torch.no_grad():
    out = tight(clinic.val.x[:128])
dropped = ~out.moe.keep.any(dim=-1)
print(f"capacity {out.moe.capacity} chairs per doctor for 128 patients: {int(dropped.sum())} patients turned away; "
      f"the largest |MoE output| among them: {out.moe.y[dropped].abs().max().item():.1f}")

# %% [markdown]
# How much does capacity matter? A small version of the Switch Transformer's capacity-factor
# comparison (its Table 1): one model per capacity factor, trained *and* evaluated with that
# many chairs, in batches of 128 patients, with the balance loss and the z-loss on. The
# model without any limit is the z-loss run above (same recipe, no capacity).

# %%
from moe_course.balance import capacity_sweep, evaluate_capacity

factors = [0.5, 1.0, 1.5, 2.0]
capacity_table, capacity_models = capacity_sweep(clinic, dataclasses.replace(BASE, aux_loss_coef=1e-2, z_loss_coef=1e-3),
                                                 dataclasses.replace(CONFIG, eval_every=CONFIG.steps), factors, device=device)
no_limit = evaluate_capacity(runs["balance loss + z-loss", 0]["model"], clinic.val, CONFIG.batch_size)
capacity_table.style.format({"capacity factor": "{:.2f}", "slots per expert": "{:.0f}", "held-out accuracy": "{:.1%}",
                             "dropped share": "{:.1%}"}).hide(axis="index")

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
axes[0].plot(capacity_table["capacity factor"], capacity_table["dropped share"], "o-")
axes[0].set(title="Patients turned away", xlabel="capacity factor", ylabel="share of held-out patients dropped",
            xticks=factors)
axes[1].plot(capacity_table["capacity factor"], capacity_table["held-out accuracy"], "o-", label="with a capacity limit")
axes[1].axhline(no_limit["held-out accuracy"], ls="--", color="gray", lw=1.2, label="no limit (nobody dropped)")
axes[1].set(title="Diagnosis quality", xlabel="capacity factor", ylabel="held-out accuracy", xticks=factors)
for ax in axes:
    ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
axes[1].legend()
fig.tight_layout()
print(f"no limit: accuracy {no_limit['held-out accuracy']:.1%}, dropped {no_limit['dropped share']:.1%}")

# %% [markdown]
# With a capacity factor below 1 some patients are turned away on every batch, even if the
# routing were perfectly even, and accuracy suffers with them: a dropped patient gets only
# the shared head's generic guess. A factor of 1 still drops a noticeable share here: our
# batches are small (128 patients, 16 per doctor on average) and the routing is not exactly
# even, so on every batch some doctor is over-booked. With more slack, the drops fall
# towards zero and the accuracy is back at the level of the model without a limit (with
# one seed per factor, a point or two either way means little). The Switch
# Transformer reports that with balanced routing and much larger batches fewer than 1% of
# tokens are dropped; the price of slack is padding: every chair costs compute whether or
# not it is filled.
#
# ## Expert choice: the doctors choose
#
# Zhou et al. (2022) turn the referral around: instead of every patient choosing its top-k
# doctors, **every doctor chooses its top-C patients** from the batch, by the same router
# scores, $S = \mathrm{softmax}(\text{logits})$ over the doctors. Every doctor gets exactly
# C patients: perfect balance by construction, no balance loss needed, nobody over capacity.
# The price: a patient may be chosen by several doctors, or by none (exercise 5.4).

# %%
from moe_course.routing import expert_choice_routing, switch_routing

show_source(expert_choice_routing)

# %% [markdown]
# The router of the trained model (balance loss and z-loss, first seed), on a batch of 64
# held-out patients, with capacity factor 1 (C = 64 / 8 = 8 patients per doctor):

# %%
model = runs["balance loss + z-loss", 0]["model"]
x = clinic.val.x[:64]
with torch.no_grad():
    logits = model.moe.router(model.embed(x))  # (N, E)
C = expert_capacity(len(x), E, 1.0)
token_choice = switch_routing(logits)
expert_choice = expert_choice_routing(logits, C)
per_patient = torch.bincount(expert_choice.experts_per_token, minlength=4)

fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
axes[0].bar([e - 0.2 for e in range(E)], token_choice.tokens_per_expert().numpy(), width=0.4, label="patients choose (top-1)")
picked = [len(set(row)) for row in expert_choice.token_index.tolist()]  # distinct patients each doctor took
axes[0].bar([e + 0.2 for e in range(E)], picked, width=0.4, label=f"doctors choose (C = {C} each)")
axes[0].axhline(C, ls="--", color="gray", lw=1)
axes[0].set(title="Patients per doctor", xlabel="doctor (expert)", ylabel="patients in the batch", xticks=range(E))
axes[0].legend(fontsize=9)
axes[1].bar(range(len(per_patient)), per_patient.numpy())
axes[1].set(title="Expert choice: doctors per patient", xlabel="number of doctors who picked the patient",
            ylabel="patients in the batch", xticks=range(len(per_patient)))
for ax in axes:
    ax.yaxis.set_major_locator(plt.MaxNLocator(integer=True))
fig.tight_layout()
print(f"expert choice: {int(per_patient[0])} of {len(x)} patients are picked by no doctor, "
      f"{int(per_patient[2:].sum())} by two or more")

# %% [markdown]
# ### Why expert choice cannot generate text as it stands
#
# Each doctor ranks *all* the patients of the batch before choosing, so whether patient 5
# gets a doctor depends on who else is in the batch, including patients who arrive *after*
# it. In a language model the batch holds the tokens of a sequence, and when generating
# text the later tokens do not exist yet: token t must be routed before token t + 1 is
# written. Let us replace the last 16 patients of the batch with 16 others and see whether
# the first 48 are routed differently:

# %%
later = torch.cat([x[:48], clinic.val.x[64:80]])  # same first 48 patients, a different "future"
with torch.no_grad():
    logits_later = model.moe.router(model.embed(later))


def doctors_of_each_patient(ec, n):
    chosen = torch.zeros(n, E, dtype=torch.bool)
    chosen[ec.token_index.flatten(), torch.arange(E).repeat_interleave(ec.token_index.shape[1])] = True
    return chosen  # (N, E): which doctors picked each patient


before = doctors_of_each_patient(expert_choice, 64)[:48]
after = doctors_of_each_patient(expert_choice_routing(logits_later, C), 64)[:48]
changed_ec = int((before != after).any(-1).sum())
changed_tc = int((switch_routing(logits_later).expert_index[:48] != token_choice.expert_index[:48]).sum())
print(f"expert choice: {changed_ec} of the first 48 patients get a different set of doctors when the last 16 change")
print(f"token choice (top-1): {changed_tc} of them do")

# %% [markdown]
# With token choice a patient's doctor depends on the patient alone. With expert choice the
# future changes the past, so an autoregressive model cannot use it as it is (the paper
# evaluates it on tasks that see the whole input at once; a decoder would need another
# rule at generation time).
#
# ## Playground: run the clinic
#
# Five sliders. **Experts E**, **doctors per patient k** and the **balance-loss weight α**
# train a small clinic (a second or so; each one is kept, so going back is instant).
# **Capacity factor** and **router noise σ** change the day, not the training: noise σ adds
# Gaussian noise of that size to the router's logits before the choice (noisy top-k with a
# fixed scale). The left picture shows 64 patients in order of arrival (the strip on top is
# their specialty) and the doctor(s) each one saw, coloured by the gate; a black × is a
# referral turned away at a full waiting room. The right one shows each waiting room
# against its capacity.

# %%
from moe_course.widgets import waiting_room_playground

waiting_room_playground(clinic)

# %% [markdown]
# Things to try: set α to 0 and count the idle doctors; lower the capacity factor below 1
# and watch who is turned away (later arrivals, at the busiest doctors); raise the noise and
# see the load even out while the specialties get mixed up and the accuracy falls; set k = 2
# and see second choices dropped before first ones.
#
# ## Recap
#
# - Left alone, a top-1 router leans on a few experts; the Switch load-balancing loss,
#   $E \sum_i f_i P_i$, spreads the load, and the router z-loss keeps the router's logits
#   small enough to survive low precision.
# - A capacity factor sets each expert's chairs per batch; patients beyond it are dropped
#   (first come, first served) and pass through the residual connection; too few chairs
#   cost accuracy, too many cost padding.
# - Expert choice balances perfectly by letting the experts pick, but a token's routing then
#   depends on the rest of the batch, including the future: not usable as it stands for
#   autoregressive decoding.
#
# **Next:** lesson 06 makes the dispatch fast: sending each token to its expert without
# loops over masks, and measuring it against a dense layer of the same active size.
#
# **Exercises:** `exercises/05_balance_and_capacity.ipynb`: the load-balancing loss, the
# router z-loss, capacity with dropping, and expert-choice routing.
#
# **Read more:** Fedus, Zoph and Shazeer 2021, *Switch Transformers*, arXiv:2101.03961
# (balance loss, capacity factor, selective precision); Zoph et al. 2022, *ST-MoE: Designing
# Stable and Transferable Sparse Expert Models*, arXiv:2202.08906 (router z-loss); Lepikhin
# et al. 2020, *GShard*, arXiv:2006.16668 (capacity and dropping); Zhou et al. 2022,
# *Mixture-of-Experts with Expert Choice Routing*, arXiv:2202.09368; Shazeer et al. 2017,
# arXiv:1701.06538 (the importance loss, an earlier balance loss).
