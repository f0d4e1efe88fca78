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
# - measure **expert collapse**: how unevenly the GP spreads the patients over the doctors
#   while it trains, with and without the Switch **load-balancing loss**, over five seeds;
# - see the router's logits grow during training, the **router z-loss** hold them down, and
#   what bfloat16 does to the trained router's logits;
# - give every doctor a fixed number of chairs (**expert capacity**), measure the share of
#   patients turned away and the accuracy against the capacity factor, and find out who is
#   turned away and why;
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
from moe_course.figures.plots import use_course_style
from moe_course.show import show_source

# ---- the one knob of this lesson -------------------------------------------
# 1 runs in about a minute on a laptop CPU. Larger values train every model
# longer (SCALE × the steps); the printed verdicts then say whether the load,
# the logits and the dropped share change with the longer training.
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
# Inside, `MoELayer.forward` is the whole layer, in five steps:
#
# 1. **The router** (the GP) scores every expert for every patient: logits (N, E), and their
#    softmax, the router's probabilities.
# 2. **Routing** picks each patient's K doctors, best first, and the weight (gate) of each
#    one's answer: lesson 04's `switch_routing` or `top_k_routing`.
# 3. **Capacity**: with a capacity factor, each doctor has C chairs, and assignments beyond
#    them are dropped ("Full waiting rooms" below).
# 4. **Dispatch**: every expert runs on its patients, and each patient's answers are weighed
#    by the gates and added up. Lesson 06 is about doing this fast.
# 5. **The router's losses**: the balance loss and the z-loss, the next two sections.
#    `MoEOutput` carries them unweighted (`aux_loss`, `z_loss`) and weighted by their
#    coefficients in `router_loss`, the one number training adds to the diagnosis loss.
#
# Two lines are about speed, not about the model, and you can read past them: the decorator
# `@one_thread_when_busy` changes how many CPU threads the layer uses when other programs keep
# the cores busy, and `fast.switch_layer_applies(...)` hands a plain Switch layer to
# one fused operation that does the same five steps in fewer calls (lesson 06 is about such
# arrangements). The tests check that both give the same outputs and gradients as the steps
# written out below them.

# %%
from moe_course.moe import MoELayer

show_source(MoELayer.forward)

# %% [markdown]
# We hire **8 doctors for the 4 specialties**, so there is room to share the work, and train
# with the clinic lessons' recipe. `MoEConfig` holds the knobs of this lesson: the weight α
# of the balance loss, the weight of the z-loss and the capacity factor (None: no limit).

# %%
from moe_course.data.clinic import make_clinic
from moe_course.moe import MoEConfig
from moe_course.training import CLINIC_LR, TrainConfig

clinic = make_clinic(num_specialties=4, seed=0)
E = 8
BASE = MoEConfig(d_model=16, d_ff=16, num_experts=E, aux_loss_coef=0.0, z_loss_coef=0.0)
CONFIG = TrainConfig(steps=600 * SCALE, batch_size=128, lr=CLINIC_LR, eval_every=50 * SCALE)
SEEDS = range(5)
BASE

# %% [markdown]
# ## Expert collapse
#
# Early in training the router's scores are small and nearly random, yet each patient still
# goes to exactly one doctor. Whichever doctors happen to get many patients learn fastest;
# the better they get, the more the router may trust them, and the more patients they may
# get. Doctors who got few patients at the start learn little and can stay unpopular.
# Nothing in the diagnosis loss pushes back. Does it happen here? We measure it.
#
# A `LoadTracker` records, every 50 steps, the share of the held-out patients the router
# sends to each doctor, and one number for the whole spread: the Switch balance measure
# $E \sum_i f_i P_i$ (explained below), which is 1.0 when the load is even and grows as it
# gets more uneven. We train three recipes, each from five seeds: without any balancing
# (α = 0), with the Switch Transformer's load-balancing loss at its paper's weight
# (α = 0.01), and the same plus the router z-loss (we need that one in the next section).
# `run_clinic_moes` trains two models at a time, each in its own process on one core.

# %%
from moe_course.experiments.balance import ClinicRun, run_clinic_moes

RECIPES = {
    "no balance loss": BASE,
    "balance loss α = 0.01": dataclasses.replace(BASE, aux_loss_coef=1e-2),
    "balance loss + z-loss": dataclasses.replace(BASE, aux_loss_coef=1e-2, z_loss_coef=1e-3),
}
results = run_clinic_moes(clinic, [ClinicRun(name, moe, seed) for name, moe in RECIPES.items() for seed in SEEDS], CONFIG)
runs = {(r.run.label, r.run.seed): r for r in results}

# %% [markdown]
# First the whole picture: the balance measure and the number of **idle doctors** (those who
# get less than a quarter of their fair share) over training, for every seed of the first two
# recipes.

# %%
collapse = ["no balance loss", "balance loss α = 0.01"]
fig, axes = plt.subplots(1, 2, figsize=(13, 4))
for i, name in enumerate(collapse):
    histories = [runs[name, seed].tracker.history for seed in SEEDS]
    steps = histories[0]["step"]
    for ax, column in zip(axes, ("balance loss", "idle doctors")):
        values = pd.concat([h[column] for h in histories], axis=1)  # (measurements, seeds)
        ax.plot(steps, values.mean(axis=1), lw=2, color=f"C{i}", label=f"{name}: mean")
        ax.fill_between(steps, values.min(axis=1), values.max(axis=1), color=f"C{i}", alpha=0.2,
                        label=f"{name}: lowest to highest seed")
axes[0].axhline(1.0, ls="--", color="gray", lw=1)
axes[0].set(title="How uneven is the load?", xlabel="training step", ylabel="balance measure E·Σ f·P (1 = even)")
axes[1].set(title="Doctors left idle", xlabel="training step", ylabel="idle doctors (of 8)")
axes[1].yaxis.set_major_locator(plt.MaxNLocator(integer=True))
fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=9, frameon=False)
fig.suptitle(f"Load over training, {len(SEEDS)} seeds per recipe", fontweight="bold")
fig.tight_layout(rect=(0, 0.07, 1, 1))

# %% [markdown]
# And the numbers, at the start and at the end of training, for every seed: the balance
# measure, the share of the busiest doctor (the fair share is 1/8) and the idle doctors, with
# the held-out accuracy at the end.

# %%
rows = []
for (name, seed), r in runs.items():
    first, last = r.tracker.rows[0], r.tracker.rows[-1]
    rows.append({"run": name, "seed": seed, "balance at start": first["balance loss"], "balance at end": last["balance loss"],
                 "busiest at start": first["busiest share"], "busiest at end": last["busiest share"],
                 "idle at start": first["idle doctors"], "idle at end": last["idle doctors"], "held-out accuracy": r.accuracy})
final = pd.DataFrame(rows)
final[final["run"].isin(collapse)].style.format(
    {"balance at start": "{:.2f}", "balance at end": "{:.2f}", "busiest at start": "{:.0%}", "busiest at end": "{:.0%}",
     "held-out accuracy": "{:.1%}"}).hide(axis="index")

# %% [markdown]
# What the run says (this cell reads the table and writes the verdict):

# %%
def summary(name, column):
    v = final.loc[final["run"] == name, column]
    return v.mean(), v.min(), v.max()


for name in collapse:
    part = final[final["run"] == name]
    worse = int((part["balance at end"] > part["balance at start"]).sum())
    b0, b1 = summary(name, "balance at start"), summary(name, "balance at end")
    idle = summary(name, "idle at end")
    acc = summary(name, "held-out accuracy")
    print(f"{name}: balance measure {b0[0]:.2f} at the start → {b1[0]:.2f} at the end (seeds {b1[1]:.2f}–{b1[2]:.2f}); "
          f"more uneven at the end than at the start in {worse} of {len(part)} seeds; "
          f"{idle[0]:.1f} idle doctors at the end (seeds {idle[1]:.0f}–{idle[2]:.0f}); accuracy {acc[0]:.1%} "
          f"(seeds {acc[1]:.1%}–{acc[2]:.1%})")
no, yes = (final[final["run"] == name] for name in collapse)
if (no["balance at end"].values > yes["balance at end"].values).all():
    print("For every seed, the run without the balance loss ends more unevenly loaded than its twin with it.")
else:
    print("Not for every seed does the balance loss leave the load more even: the recipes overlap.")
fell = no[no["busiest at end"] < no["busiest at start"]]
if len(fell):
    print(f"Without the balance loss, the busiest doctor's share still fell during training in {len(fell)} of {len(no)} "
          f"seeds (e.g. seed {int(fell['seed'].iloc[0])}: {fell['busiest at start'].iloc[0]:.0%} → "
          f"{fell['busiest at end'].iloc[0]:.0%}): the busiest doctor is only one of eight; the balance measure "
          "counts them all.")

# %% [markdown]
# Read the verdict with the curves. If the balance measure of the unbalanced runs climbs while
# their busiest doctor's share falls, the collapse here is not one doctor taking everybody:
# the four specialties pull the patients apart, so no single doctor can keep them all, but
# some doctors drop out (idle) while the others share the work unevenly. The balance loss
# pushes back on exactly that. The accuracy columns say whether the diagnosis pays for it;
# the win of balancing is the doctors themselves: an idle doctor's parameters cost memory
# and buy nothing.
#
# The load of every doctor at a few moments of training, for one seed: the seed whose
# unbalanced run ends with the median balance measure (a typical seed, not a picked one).
# The dashed line is the fair share, 1/E of the patients each.

# %%
from moe_course.figures.plots import load_snapshots

ranked = no.sort_values("balance at end")
typical = int(ranked["seed"].iloc[len(ranked) // 2])  # the median seed
steps = runs["no balance loss", typical].tracker.history["step"].tolist()
picks = sorted({min(range(len(steps)), key=lambda i: abs(steps[i] - s)) for s in (0, 25, 100, 300, steps[-1])})
load_snapshots({name: runs[name, typical].tracker.shares for name in collapse},
               steps, picks, title=f"How the GP spreads the patients over 8 doctors (seed {typical}, the median seed)");

# %% [markdown]
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
names = list(RECIPES)
fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
for i, name in enumerate(names):
    histories = [runs[name, seed].tracker.history for seed in SEEDS]
    z = pd.concat([h["z-loss"] for h in histories], axis=1)  # (measurements, seeds)
    axes[0].plot(histories[0]["step"], z.mean(axis=1), lw=2, color=f"C{i}", label=name)
    axes[0].fill_between(histories[0]["step"], z.min(axis=1), z.max(axis=1), color=f"C{i}", alpha=0.2)
axes[0].set(title=f"The router's logits over training ({len(SEEDS)} seeds; band: lowest to highest)",
            xlabel="training step", ylabel="router z-loss: mean logsumexp(logits)²")
axes[0].legend()
with torch.no_grad():
    for i, name in enumerate(names[1:], start=1):
        m = runs[name, typical].model
        logits = m.moe.router(m.embed(clinic.val.x)).flatten()
        axes[1].hist(logits.numpy(), bins=60, alpha=0.6, density=True, color=f"C{i}", label=name)
axes[1].set(title=f"Router logits after training (held-out patients, seed {typical})", xlabel="router logit",
            ylabel="density")
axes[1].legend()
fig.tight_layout()

z_rows = pd.DataFrame([
    {"run": name, "seed": seed, "z-loss": runs[name, seed].tracker.rows[-1]["z-loss"],
     "largest |logit|": runs[name, seed].tracker.rows[-1]["largest |logit|"], "held-out accuracy": runs[name, seed].accuracy}
    for name in names for seed in SEEDS
])
z_table = z_rows.groupby("run", sort=False)[["z-loss", "largest |logit|", "held-out accuracy"]].agg(["mean", "min", "max"])
z_table.style.format("{:.2f}").format("{:.1%}", subset=["held-out accuracy"])

# %%
def at(name, column):
    return z_rows.loc[z_rows["run"] == name, column].to_numpy()


smaller = int((at("balance loss + z-loss", "largest |logit|") < at("balance loss α = 0.01", "largest |logit|")).sum())
print(f"with the z-loss the largest |logit| per patient is smaller than without it in {smaller} of {len(SEEDS)} seeds "
      f"(means {at('balance loss + z-loss', 'largest |logit|').mean():.2f} vs {at('balance loss α = 0.01', 'largest |logit|').mean():.2f})")
for name in names:
    z = pd.concat([runs[name, seed].tracker.history["z-loss"] for seed in SEEDS], axis=1).mean(axis=1)
    late = z.iloc[3 * len(z) // 4]
    growing = z.iloc[-1] > 1.05 * late  # more than 5% up in the last quarter
    print(f"{name}: z-loss {late:.1f} at three quarters of training, {z.iloc[-1]:.1f} at the end "
          + ("(still growing)" if growing else "(about level)"))

# %% [markdown]
# The largest |logit| is taken per patient, then averaged. Why care about the size of the
# logits, if the accuracy hardly differs between the recipes (compare the table's accuracy
# columns)? Because large models train in low precision.
# **bfloat16** keeps only 8 significant bits, so the gap between neighbouring numbers, and
# with it the rounding error, grows with the size of the number. After the softmax's
# exponential, an error of δ in a logit multiplies a probability by about $e^{\delta}$.
#
# Let us store the trained routers' own logits in bfloat16 (the softmax itself stays in
# float32) and measure what changes: the rounding error of the logits, the error of the
# routing probabilities, and how many held-out patients would be sent to a different doctor.

# %%
bf16_rows, typical_logits = [], {}
for name in names:
    for seed in SEEDS:
        m = runs[name, seed].model
        with torch.no_grad():
            logits = m.moe.router(m.embed(clinic.val.x))  # (N, E), float32
        rounded = logits.bfloat16().float()
        if seed == typical:
            typical_logits[name] = logits
        bf16_rows.append({
            "run": name, "seed": seed, "largest |logit|": logits.abs().max().item(),
            "largest rounding error of a logit": (rounded - logits).abs().max().item(),
            "largest error of a probability": (torch.softmax(rounded, -1) - torch.softmax(logits, -1)).abs().max().item(),
            "patients sent elsewhere": int((rounded.argmax(-1) != logits.argmax(-1)).sum()),
        })
bf16 = pd.DataFrame(bf16_rows)
print(f"{len(clinic.val)} held-out patients; mean over {len(SEEDS)} seeds, with the lowest and highest seed:")
formats = {"largest |logit|": "{:.1f}", "largest rounding error of a logit": "{:.3f}",
           "largest error of a probability": "{:.4f}", "patients sent elsewhere": "{:.1f}"}
bf16_table = bf16.groupby("run", sort=False).agg(["mean", "min", "max"]).drop(columns="seed")
bf16_table.style.format({(col, stat): f for col, f in formats.items() for stat in ("mean", "min", "max")})

# %% [markdown]
# Each dot below is one logit of the median seed's trained routers: its size against its
# bfloat16 rounding error. The error grows in steps with the size of the logit: every time
# |logit| passes a power of two, the spacing of bfloat16 numbers doubles.

# %%
ax = plt.figure(figsize=(7, 4)).gca()
for i, (name, logits) in enumerate(typical_logits.items()):
    err = (logits.bfloat16().float() - logits).abs().flatten()
    size = logits.abs().flatten()
    keep = err > 0
    ax.scatter(size[keep], err[keep], s=3, alpha=0.3, color=f"C{i}", label=name)
ax.set(xscale="log", yscale="log", title=f"bfloat16 rounding of the trained routers' logits (seed {typical})",
       xlabel="|logit|", ylabel="|rounding error|")
ax.legend(markerscale=4, fontsize=9);

# %% [markdown]
# The table says how many patients would change doctor at the size these logits have. The
# scatter shows the rule behind it: the error is proportional to the size of the logit. If
# the logits keep growing (the printout above says which recipe's still were at the end of
# training), the probabilities, which become the gates that weigh the experts' answers and the P
# of the balance loss, come out wrong by more and more, and more patients change doctor on
# a rounding error. This is why the Switch Transformer computes its router in float32
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
tight = ClinicMoE(clinic.d_in, clinic.num_diagnoses, dataclasses.replace(RECIPES["balance loss + z-loss"], capacity_factor=0.5))
tight.load_state_dict(runs["balance loss + z-loss", typical].model.state_dict())  # the trained weights, fewer chairs
with torch.no_grad():
    out = tight(clinic.val.x[:128])
dropped = ~out.moe.keep.any(dim=-1)
print(f"capacity {out.moe.capacity} chairs per doctor for 128 patients: {int(dropped.sum())} patients turned away; "
      f"the largest |MoE output| among them: {out.moe.y[dropped].abs().max().item():.1f}")

# %% [markdown]
# How much does capacity matter? A small version of the Switch Transformer's capacity-factor
# comparison (its Table 1): one model per capacity factor, trained *and* evaluated with that
# many chairs, in batches of 128 patients, with the balance loss and the z-loss on, from
# three seeds each. The models without any limit are the z-loss runs above (same recipe, no
# capacity), of the same seeds.

# %%
from moe_course.analysis.load import evaluate_capacity

factors = [0.5, 1.0, 1.5, 2.0]
CAPACITY_SEEDS = range(3)
limited = run_clinic_moes(clinic, [ClinicRun(f"capacity factor {f}", dataclasses.replace(RECIPES["balance loss + z-loss"], capacity_factor=f), seed)
                                   for f in factors for seed in CAPACITY_SEEDS], dataclasses.replace(CONFIG, eval_every=CONFIG.steps))
capacity_runs = {(r.run.moe.capacity_factor, r.run.seed): r for r in limited}
for seed in CAPACITY_SEEDS:
    capacity_runs[None, seed] = runs["balance loss + z-loss", seed]
capacity = pd.DataFrame([
    {"capacity factor": f, "seed": seed, **evaluate_capacity(capacity_runs[f, seed].model, clinic.val, CONFIG.batch_size)}
    for f in factors + [None] for seed in CAPACITY_SEEDS
])
labels = capacity["capacity factor"].map(lambda f: "no limit" if pd.isna(f) else f"{f:g}")
capacity_table = capacity.groupby(labels.rename("capacity factor"), sort=False)[["dropped share", "held-out accuracy"]].agg(
    ["mean", "min", "max"])
capacity_table.style.format("{:.1%}")

# %%
limit = capacity[capacity["capacity factor"].notna()]
no_limit = capacity[capacity["capacity factor"].isna()]
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for ax, column, title in ((axes[0], "dropped share", "Patients turned away"), (axes[1], "held-out accuracy", "Diagnosis quality")):
    ax.scatter(limit["capacity factor"], limit[column], color="C0", alpha=0.5, label="one seed")
    ax.plot(factors, limit.groupby("capacity factor")[column].mean(), "o-", color="C0", label="mean of the seeds")
    ax.set(title=title, xlabel="capacity factor", ylabel=f"{column} (held-out patients)", xticks=factors)
    ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
axes[1].axhspan(no_limit["held-out accuracy"].min(), no_limit["held-out accuracy"].max(), color="gray", alpha=0.25,
                label="no limit: lowest to highest seed")
axes[1].legend(fontsize=9)
fig.tight_layout()

# %% [markdown]
# Below a capacity factor of 1 some patients must be turned away on every batch, even if
# the routing were perfectly even, and a dropped patient gets only the shared head's generic
# guess. But look at a factor of 1.0: with perfectly even routing it would turn nobody away,
# since every doctor has exactly its fair share of chairs. The table says how many it turns
# away here. Where do they come from? Take the models trained with a factor of 1.0 and count,
# in every held-out batch of 128, how many patients the GP sends to each doctor *before*
# anyone is turned away (`batch_loads`). Each doctor has 16 chairs; everyone beyond the 16th
# is dropped.

# %%
from moe_course.analysis.load import batch_loads, overflow_share
from moe_course.routing import expert_capacity

C = expert_capacity(CONFIG.batch_size, E, 1.0)
loads = {seed: batch_loads(capacity_runs[1.0, seed].model, clinic.val, CONFIG.batch_size) for seed in CAPACITY_SEEDS}  # (batches, E)
shown = sorted(CAPACITY_SEEDS, key=lambda s: overflow_share(loads[s], C))[len(CAPACITY_SEEDS) // 2]  # the median seed

fig, axes = plt.subplots(1, 2, figsize=(13, 4))
per_doctor = loads[shown].float()
order = per_doctor.mean(0).argsort(descending=True)
axes[0].boxplot(per_doctor[:, order].numpy(), positions=range(E), widths=0.6)
axes[0].axhline(C, color="C3", ls="--", lw=1.5, label=f"capacity: {C} chairs")
axes[0].set(title=f"Patients sent to each doctor per batch of {CONFIG.batch_size} (factor 1.0, seed {shown})",
            xlabel="doctor, busiest on average first", ylabel="patients in the batch",
            xticks=range(E), xticklabels=[str(int(e)) for e in order])
axes[0].legend()
grid = [0.5 + 0.125 * i for i in range(21)]
for i, seed in enumerate(CAPACITY_SEEDS):
    axes[1].plot(grid, [overflow_share(loads[seed], expert_capacity(CONFIG.batch_size, E, g)) for g in grid],
                 color=f"C{i}", label=f"seed {seed}: as routed")
    axes[1].plot(grid, [overflow_share(loads[seed].float().mean(0), expert_capacity(CONFIG.batch_size, E, g)) for g in grid],
                 color=f"C{i}", ls=":", label=f"seed {seed}: its average load in every batch")
axes[1].set(title="Who would be turned away at other capacities (same routing)", xlabel="capacity factor",
            ylabel="share of patients over capacity")
axes[1].yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
axes[1].legend(fontsize=8)
fig.tight_layout()

for seed in CAPACITY_SEEDS:
    average = loads[seed].float().mean(0)  # (E,)
    measured = capacity.loc[(capacity["capacity factor"] == 1.0) & (capacity["seed"] == seed), "dropped share"].item()
    print(f"seed {seed}: a doctor gets on average {average.min():.1f} to {average.max():.1f} patients a batch for {C} chairs; "
          f"over capacity: {overflow_share(loads[seed], C):.1%} (the dropped share above: {measured:.1%}); "
          f"with every batch at the average load: {overflow_share(average, C):.1%}")
explained = [overflow_share(loads[s].float().mean(0), C) / max(overflow_share(loads[s], C), 1e-9) for s in CAPACITY_SEEDS]
print(f"the uneven average load alone accounts for {min(explained):.0%} to {max(explained):.0%} of the drops; "
      "the rest comes from batch-to-batch swings")

# %% [markdown]
# The printout reads the boxes. The dropped patients are exactly the patients beyond a
# doctor's 16th chair, so the drops at a factor of 1.0 measure how uneven the load is. If a
# doctor's *average* load is above 16, that doctor overflows on most batches, however the
# patients happen to arrive; the dotted curves count only that part. The rest comes from
# swings between batches: a batch of 128 holds a few more cardiology patients one time and a
# few fewer the next. If the balance loss, at α = 0.01, pulls the load towards even without
# making it even (the verdict of the collapse section says how far it got), a factor of 1.0
# has no slack for what is left. The right panel reads off how much slack this routing
# needs: the capacity factor where its curve reaches zero.
#
# The Switch Transformer reports that with balanced routing and much larger batches fewer
# than 1% of tokens are dropped; the price of slack is padding: every chair costs compute
# whether or not it is filled.
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
# The router of a trained model (balance loss and z-loss, the median seed of the collapse
# section), on a batch of 64 held-out patients, with capacity factor 1 (C = 64 / 8 = 8
# patients per doctor):

# %%
model = runs["balance loss + z-loss", typical].model
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
from moe_course.figures.widgets import waiting_room_playground

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
