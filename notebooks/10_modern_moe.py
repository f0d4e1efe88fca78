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
# # 10 · The modern hospital: MoE as practised in 2024–2026
#
# The hospital of lessons 04 to 08 has one GP, a handful of specialists and one rule: each
# patient sees one doctor per floor. The hospitals built since then look different. Mixtral
# sends each patient to **two** doctors. DeepSeek hires **many narrow sub-specialists** and
# keeps a few **general doctors on every ward round**. DeepSeek-V3 stops scolding the GP for
# uneven queues and lets a **receptionist nudge** them instead. Qwen asks *where* queues
# should be even: in every clinic session, or over the whole day. Many of these hospitals were
# not built from scratch: they were **grown from a good general clinic** (upcycling). And all
# of them have to house every specialist, even on a quiet night.
#
# Every one of these choices is an option of the `MoELayer` you built. This lesson turns them
# on one at a time and measures what each does on the course's own data.
#
# **In this lesson you will**
#
# - read Mixtral, DeepSeek-V3, Qwen2-MoE and OLMoE blocks as settings of one `MoEConfig`
#   (SwiGLU experts, the Mixtral gate, sigmoid scores, shared experts);
# - measure **top-2 against top-1** and **fine-grained + shared experts against plain ones** at
#   matched expert FLOPs and expert weights, on lesson 08's phone book, over five seeds;
# - balance the load **without an auxiliary loss** (DeepSeek-V3's bias), and measure the load
#   over training and the specialisation against the Switch loss;
# - see why **where** the balance is measured (the global batch or each micro-batch) decides
#   whether experts can specialise;
# - **upcycle** a trained dense FFN into an MoE layer, exactly, and measure what it buys;
# - measure what **serving** an MoE costs on this CPU: memory, and tokens per second by batch size.
#
# Shape letters: **N** tokens (patients), **D** width, **F** expert width, **E** experts,
# **K** the k of top-k.

# %%
from dataclasses import replace

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from moe_course import seed_everything
from moe_course.figures.plots import use_course_style
from moe_course.show import show_source

# ---- the one knob of this lesson -------------------------------------------
# SCALE = 1 trains every phone book and clinic model for the steps below, several at a time on
# two CPU cores. SCALE = 2, 3, ... trains each SCALE times longer; the printed verdicts then say
# whether the orderings hold with longer training.
SCALE = 1
# -----------------------------------------------------------------------------

seed_everything(0)
use_course_style()
torch.set_num_threads(1)  # tiny models: one thread is fastest on a CPU

# %% [markdown]
# ## One layer, many hospitals
#
# A modern MoE block is still lesson 04's layer: a router scores the experts, each token goes to
# its top k, the outputs are weighed by the gates and added up. What changed is a handful of
# choices, each now an option of `MoEConfig`:
#
# | option | what it does | who uses it |
# |---|---|---|
# | `activation="swiglu"` | gated experts: $(\mathrm{SiLU}(xW_g) \odot xW_{in})\,W_{out}$, three matrices | Mixtral, DeepSeek, Qwen, OLMoE |
# | `router="mixtral"` | softmax over the k chosen logits | Mixtral |
# | `router="top_k", renormalize=False` | softmax over all experts, the chosen k kept as they are | DeepSeekMoE, OLMoE, Qwen2-MoE |
# | `router="sigmoid"` | each expert scored on its own, a bias that only selects | DeepSeek-V3 |
# | `num_shared_experts` | experts every token visits, ungated | DeepSeekMoE, DeepSeek-V3, Qwen2-MoE |
# | `shared_expert_gate=True` | a sigmoid gate on the shared experts | Qwen2-MoE |
# | `MoEConfig.fine_grained(m, K_s)` | m times as many experts, each 1/m as wide | DeepSeekMoE |
#
# Here are four of them at toy size next to a Switch layer, all with a budget of 8 experts of
# width 64 (or its fine-grained equivalent). The package's tests check each against the Hugging Face
# implementation of the same block (`tests/test_hf_crosscheck.py`: the same weights give the
# same output).

# %%
from moe_course.flops import count_parameters, moe_layer_flops
from moe_course.moe import MoEConfig, MoELayer

D = 32
HOSPITALS = {
    "Switch (2021)": MoEConfig(D, 64, 8),
    "Mixtral": MoEConfig(D, 64, 8, top_k=2, router="mixtral", activation="swiglu", bias=False),
    "OLMoE": MoEConfig(D, 16, 32, top_k=8, router="top_k", renormalize=False, activation="swiglu", bias=False),
    "DeepSeek-V3": MoEConfig(D, 64, 8, top_k=2, router="sigmoid", bias_update_rate=1e-3, activation="swiglu", bias=False).fine_grained(4, 1),
    "Qwen2-MoE": MoEConfig(D, 16, 31, top_k=7, router="top_k", renormalize=False, num_shared_experts=1, shared_expert_gate=True,
                           activation="swiglu", bias=False),
}
rows = []
for name, cfg in HOSPITALS.items():
    layer = MoELayer(cfg)
    flops = moe_layer_flops(1, D, cfg.d_ff, cfg.num_experts, cfg.top_k, activation=cfg.activation,
                            num_shared_experts=cfg.num_shared_experts, shared_expert_gate=cfg.shared_expert_gate)
    rows.append({"model": name, "router": cfg.router, "experts E": cfg.num_experts, "shared": cfg.num_shared_experts, "active k": cfg.top_k,
                 "width F": cfg.d_ff, "activation": cfg.activation, "parameters": count_parameters(layer), "FLOPs per token": flops})
pd.DataFrame(rows).set_index("model")

# %% [markdown]
# Read the table across: the SwiGLU models hold more parameters at the same width (three
# matrices per expert), top-2 doubles the FLOPs of top-1, and the fine-grained layouts spend
# the same budget on many narrow experts.
#
# ### Mixtral's gate
#
# Mixtral (Jiang et al. 2024, arXiv:2401.04088) writes its gate as a softmax over the k largest
# logits only, $G(x) = \mathrm{softmax}(\mathrm{TopK}(x W_g))$. Lesson 04's top-k router took the
# softmax over all E experts, kept the top k and renormalised them. Those are the same numbers:
# the softmax's denominator cancels when you renormalise.

# %%
from moe_course.routing import mixtral_routing, top_k_routing

show_source(mixtral_routing)

# %%
logits = torch.randn(1000, 8, generator=torch.Generator().manual_seed(0)) * 3
a, b = mixtral_routing(logits, 2), top_k_routing(logits, 2)
print(f"same experts for every token: {torch.equal(a.expert_index, b.expert_index)}; "
      f"largest gate difference: {(a.gates - b.gates).abs().max().item():.1e}")

# %% [markdown]
# Hugging Face's Mixtral computes it the second way, which is why the two cross-check. With
# k = 1 this gate is always 1, and the router gets no gradient through it: that is why Switch
# keeps the raw probability instead (lesson 04).
#
# ### SwiGLU experts
#
# The gated FFN (Shazeer 2020, *GLU Variants Improve Transformer*, arXiv:2002.05202) lets a
# second projection decide, unit by unit, how much of the first passes:

# %%
from moe_course.experts import hidden_activation

show_source(hidden_activation)

# %% [markdown]
# ## Many narrow doctors, a few on every round: the phone book
#
# Lesson 08's phone book is the cleanest place to ask what the routing layout buys: a layer
# must memorise a table of **records** (random keys, random wards: pure knowledge), or learn a
# **rule** every patient follows (a skill). We compare four layers that spend **the same
# expert budget**: the same expert weight matrices and the same expert FLOPs per patient.
#
# - **Switch**: 8 experts of width 8, top-1 with the raw gate (lessons 04 and 08);
# - **top-2**: 16 experts of width 4, two per patient, Mixtral's renormalised gate;
# - **fine-grained**: 32 experts of width 2, four per patient (DeepSeekMoE, Dai et al. 2024,
#   arXiv:2401.06066), softmax gates kept as they are;
# - **fine-grained + shared**: the same, one of the four being a **shared** expert every patient
#   visits, three routed.
#
# `MoEConfig.fine_grained(m, K_s)` makes the last two from the first: m times as many experts,
# each 1/m as wide, m·k active, K_s of them shared.

# %%
from moe_course.experiments.phonebook import PhoneBookConfig

RECORDS = PhoneBookConfig(task="records", num_records=2048, d_model=32, num_wards=16)  # 2,048 cards with random wards
RULE = PhoneBookConfig(task="rule", num_records=1024, d_model=32, num_wards=16)  # 1,024 new patients per step, one rule
SWITCH = MoEConfig(32, 8, 8, capacity_factor=None, dispatch="grouped_mm")  # dropless: every record is asked for
LAYERS = {
    "Switch": SWITCH,
    "top-2": replace(SWITCH, d_ff=4, num_experts=16, top_k=2, router="top_k"),
    "fine-grained": SWITCH.fine_grained(4),
    "fine-grained + shared": SWITCH.fine_grained(4, num_shared_experts=1),
}
show_source(MoEConfig.fine_grained)

# %%
from moe_course.experiments.modern_phonebook import PhoneBookMoERun

rows = []
for name, cfg in LAYERS.items():
    run = PhoneBookMoERun(name, RECORDS, moe=cfg)
    count = cfg.num_experts + cfg.num_shared_experts
    rows.append({"layer": name, "experts (routed + shared)": f"{cfg.num_experts} + {cfg.num_shared_experts}", "width F": cfg.d_ff,
                 "active per patient": cfg.top_k + cfg.num_shared_experts, "expert weights": count * 2 * 32 * cfg.d_ff,
                 "expert biases": count * (cfg.d_ff + 32), "router parameters": 32 * cfg.num_experts,
                 "expert FLOPs per patient": (cfg.top_k + cfg.num_shared_experts) * 4 * 32 * cfg.d_ff,
                 "router FLOPs per patient": 2 * 32 * cfg.num_experts, "all parameters": run.params,
                 "all FLOPs per patient": run.flops_per_patient})
accounting = pd.DataFrame(rows).set_index("layer")
accounting

# %% [markdown]
# The expert weights and the expert FLOPs match exactly. Two things grow with the number of
# experts: each expert's output bias (D numbers each), and the router, which scores every
# expert (2·D·E FLOPs and D·E parameters), so the layouts with more experts pay more for their
# GP. In a real model (D in the thousands, experts thousands wide) that is a sliver; in this toy
# it is not, and the printout below says how large.

# %%
share = accounting["router FLOPs per patient"] / accounting["all FLOPs per patient"]
print("the router's share of all FLOPs per patient: " + ", ".join(f"{k}: {v:.0%}" for k, v in share.items()))

# %% [markdown]
# Every layer learns the records, and the two fine-grained layouts also learn the rule (the
# shared expert's question), five seeds each: a seed draws its own table or rule and its own
# starting weights. Training is Adam on the whole table at every step. Records are judged by
# **recall** (every card asked for, the share answered right), the rule on patients the model
# never saw. The same cell also trains the runs of the upcycling section below; all run two at
# a time, each in its own process on one thread.

# %%
from moe_course.experiments.modern_phonebook import phone_book_moe_table, run_phone_book_moes

STEPS = 80 * SCALE
SEEDS = (0, 1, 2, 3, 4)
runs = [PhoneBookMoERun(name, RECORDS, moe=cfg, seed=s, steps=STEPS) for s in SEEDS for name, cfg in LAYERS.items()]
runs += [PhoneBookMoERun(name, RULE, moe=LAYERS[name], seed=s, steps=STEPS) for s in SEEDS for name in ("fine-grained", "fine-grained + shared")]
HALF = STEPS // 2
UPCYCLING = {  # a dense FFN of width 8 trains HALF steps; then, for HALF more steps:
    "dense, trained on": PhoneBookMoERun("dense, trained on", RECORDS, d_ff=8, dense_steps=HALF, steps=HALF),
    "upcycled to Switch": PhoneBookMoERun("upcycled to Switch", RECORDS, moe=SWITCH, dense_steps=HALF, steps=HALF),
    "upcycled to top-2": PhoneBookMoERun("upcycled to top-2", RECORDS, moe=replace(SWITCH, top_k=2, router="top_k"), dense_steps=HALF, steps=HALF),
    "Switch from scratch, last half only": PhoneBookMoERun("Switch from scratch, last half only", RECORDS, moe=SWITCH, steps=HALF),
}
runs += [replace(run, seed=s) for s in SEEDS for run in UPCYCLING.values()]
results = run_phone_book_moes(runs, workers=2)
book = phone_book_moe_table(results)
records, rule = (book[(book["task"] == task) & book["label"].isin(LAYERS)] for task in ("records", "rule"))

# %%
def seed_table(table: pd.DataFrame, order) -> pd.DataFrame:
    """Accuracy per layer: mean, standard deviation over seeds, lowest and highest seed."""
    g = table.groupby("label")["accuracy"]
    return pd.DataFrame({"mean": g.mean(), "std": g.std(), "lowest": g.min(), "highest": g.max()}).loc[list(order)]


print(f"records recalled ({RECORDS.num_records} records, {STEPS} steps, seeds {SEEDS}):")
print(seed_table(records, LAYERS).round(3).to_string())
print(f"\nthe rule on new patients ({STEPS} steps):")
print(seed_table(rule, [n for n in LAYERS if n in set(rule["label"])]).round(3).to_string())

# %%
def bars_with_seeds(ax, table: pd.DataFrame, order, title: str, ylabel: str) -> None:
    means = table.groupby("label")["accuracy"].mean().loc[list(order)]
    ax.bar(range(len(order)), means.values, color=[f"C{i}" for i in range(len(order))], alpha=0.75)
    for i, name in enumerate(order):
        seeds = table.loc[table["label"] == name, "accuracy"].values
        ax.scatter(np.full(len(seeds), i) + np.linspace(-0.15, 0.15, len(seeds)), seeds, color="black", s=12, zorder=3,
                   label="one seed" if i == 0 else None)
    ax.set_xticks(range(len(order)), [n.replace(" + ", "\n+ ") for n in order])
    ax.set(title=title, ylabel=ylabel, ylim=(0, 1))
    ax.legend(loc="lower right")


fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
bars_with_seeds(left, records, list(LAYERS), "knowledge: records recalled", "share of the table answered right")
bars_with_seeds(right, rule, [n for n in LAYERS if n in set(rule["label"])], "skill: the rule on new patients",
                "share of new patients answered right")
fig.tight_layout()

# %% [markdown]
# The verdict, computed seed by seed (each seed gives every layer the same table):

# %%
def by_seed(table: pd.DataFrame) -> pd.DataFrame:
    return table.pivot_table(index="seed", columns="label", values="accuracy")


def verdict(table: pd.DataFrame, better: str, worse: str, what: str) -> None:
    p = by_seed(table)
    wins = int((p[better] > p[worse]).sum())
    gap = (p[better] - p[worse])
    print(f"{what}: {better} {p[better].mean():.3f} vs {worse} {p[worse].mean():.3f}; ahead in {wins} of {len(p)} seeds "
          f"(difference {gap.min():+.3f} to {gap.max():+.3f})")


verdict(records, "top-2", "Switch", "records")
verdict(records, "fine-grained", "top-2", "records")
verdict(records, "fine-grained", "fine-grained + shared", "records")
verdict(rule, "fine-grained + shared", "fine-grained", "rule")

# %% [markdown]
# How to read it. Each patient's answer is the sum of what its active experts say. One expert
# of width 8 (Switch) gives a key one small memory; four experts of width 2 chosen out of 32
# give it one of thousands of combinations, so the same hidden units can be arranged into far
# more distinct memories: that is DeepSeekMoE's argument for fine granularity, and if the
# verdict lines say "ahead in 5 of 5 seeds", the phone book agrees. A **shared** expert is the
# opposite: every record goes through it, so its units cannot belong to any one record. If
# the shared layout recalls fewer records but learns the rule better, the division of labour
# is the one DeepSeekMoE describes: common knowledge in the shared expert, the specific in the
# routed ones. (OLMoE's authors found shared experts did not help their language model: the
# answer depends on how much of the work is common.)
#
# Remember the caveat of the accounting table: the fine-grained layouts spend more on their
# router, in parameters and FLOPs, at this toy size.
#
# ## Balancing without a loss: the receptionist
#
# Lesson 05 kept the doctors busy with the Switch balance loss: a term in the training loss
# whose gradient pushes the router away from busy experts. DeepSeek-V3 (arXiv:2412.19437,
# §2.1.2) argues that this gradient also pulls the router away from the best expert, and
# replaces it with a **bias** per expert that only affects *who is chosen*. Its scores are
# sigmoids, one per expert, and its gates are the chosen scores renormalised:

# %%
from moe_course.routing import sigmoid_routing

show_source(sigmoid_routing)

# %% [markdown]
# The bias is not a parameter and gets no gradient. After every optimiser step a small rule
# moves it by a fixed step γ (DeepSeek-V3 uses 0.001): down for an expert that got more than
# the mean load, up for one that got less.

# %%
from moe_course.routing import expert_bias_update

show_source(expert_bias_update)

# %% [markdown]
# The layer never changes its own state in its forward pass. It reports its load
# (`MoEOutput.tokens_per_expert`), and the training loop calls the hook after the step. Here is
# the loop this section trains with; the hook is the line after `optimizer.step()`:

# %%
from moe_course.experiments.modern_balance import train_balance

show_source(train_balance, lines=(17, 28))

# %% [markdown]
# We train lesson 05's `ClinicMoE` on a clinic of 8 specialties with 8 experts, top-2, sigmoid
# scores, three ways: no balancing at all; the Switch balance loss at its usual weight α =
# 0.01; and the bias with DeepSeek-V3's γ = 0.001, no loss. Five seeds each. We record the load
# (the busiest expert's load over the mean load, 1.0 when even) over training, the held-out
# accuracy, and the **specialisation**: how much a patient's specialty tells about its first
# expert (the normalised mutual information of lesson 03, 1 for one expert per specialty).
#
# The same cell trains the runs of the next section.

# %%
from moe_course.data.clinic import make_clinic
from moe_course.experiments.modern_balance import BalanceRun, balance_table, run_balance

clinic = make_clinic(num_specialties=8, seed=0)
SIGMOID = MoEConfig(16, 16, 8, top_k=2, router="sigmoid", aux_loss_coef=0.0, z_loss_coef=0.0, dispatch="grouped_mm")
SOFTMAX = replace(SIGMOID, router="top_k")
CLINIC_STEPS = 200 * SCALE
ALPHA_SCOPE = 0.1  # the balance weight of the next section
RECIPES = {
    "no balancing": dict(moe=SIGMOID),
    "balance loss α=0.01": dict(moe=SIGMOID, aux=1e-2),
    "bias γ=0.001": dict(moe=replace(SIGMOID, bias_update_rate=1e-3)),
    "global batch": dict(moe=SOFTMAX, aux=ALPHA_SCOPE, batches="by_specialty"),
    "per micro-batch": dict(moe=SOFTMAX, aux=ALPHA_SCOPE, batches="by_specialty", scope="micro"),
}
balance_runs = [BalanceRun(name, seed=s, steps=CLINIC_STEPS, eval_every=CLINIC_STEPS // 12, **kw) for s in SEEDS for name, kw in RECIPES.items()]
balance_results = run_balance(clinic, balance_runs, workers=2)
balance = balance_table(balance_results)

# %%
THREE = ["no balancing", "balance loss α=0.01", "bias γ=0.001"]
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
for i, name in enumerate(THREE):
    curves = [r.history for r in balance_results if r.run.label == name]
    steps = curves[0]["step"].values[1:]
    train = np.stack([c["train_max_over_mean"].values[1:] for c in curves])  # (seeds, evaluations)
    left.plot(steps, train.mean(0), color=f"C{i}", label=name)
    left.fill_between(steps, train.min(0), train.max(0), color=f"C{i}", alpha=0.2)
    nmi = np.stack([c["specialisation"].values for c in curves])
    right.plot(curves[0]["step"].values, nmi.mean(0), color=f"C{i}", label=name)
    right.fill_between(curves[0]["step"].values, nmi.min(0), nmi.max(0), color=f"C{i}", alpha=0.2)
left.axhline(1.0, color="grey", lw=1, ls="--")
left.set(title="load over training (training batches)", xlabel="training step", ylabel="busiest expert's load / mean load")
right.set(title="specialisation over training (held-out)", xlabel="training step", ylabel="NMI(specialty; first expert)", ylim=(0, 1))
left.legend()
right.legend()
fig.suptitle("line: mean over five seeds; band: lowest to highest seed")
fig.tight_layout()

# %%
def recipe_table(names) -> pd.DataFrame:
    g = balance[balance["label"].isin(names)].groupby("label")
    out = pd.DataFrame({f"{col} {stat}": getattr(g[col], stat)() for col in ("max_over_mean", "accuracy", "specialisation")
                        for stat in ("mean", "std")})
    return out.loc[list(names)]


print(f"at the end of {CLINIC_STEPS} steps, held-out patients, seeds {SEEDS}:")
print(recipe_table(THREE).round(3).to_string())
p = balance.pivot_table(index="seed", columns="label", values="max_over_mean")
for name in THREE[1:]:
    evener = int((p[name] < p["no balancing"]).sum())
    print(f"{name}: a more even load than no balancing in {evener} of {len(p)} seeds")
evener = int((p["bias γ=0.001"] < p["balance loss α=0.01"]).sum())
print(f"the bias leaves a more even load than the balance loss in {evener} of {len(p)} seeds")
acc = balance.pivot_table(index="seed", columns="label", values="accuracy")
gap = acc["bias γ=0.001"] - acc["balance loss α=0.01"]
print(f"accuracy, bias minus balance loss: {gap.mean():+.3f} on average (seeds {gap.min():+.3f} to {gap.max():+.3f})")

# %% [markdown]
# Read the load curve first. The balance loss acts through the router's gradient, on every
# step, in proportion to α; the bias acts through a fixed nudge per step, so it needs a number
# of steps of the order of (the gap between scores) / γ before the queues even out, and then
# it holds them. If the bias's curve ends lower than the loss's, the receptionist did more for
# the queues than the scolding did at this α. Then compare the accuracies and the
# specialisation: if the seeds' ranges overlap, neither way of balancing changed what the
# doctors learned on this clinic; DeepSeek-V3's argument is about interference that shows at
# the scale of their models, and this run neither confirms nor refutes it.
#
# ## Where balance is measured: the global batch or each micro-batch
#
# The balance loss needs two statistics per expert: the share of tokens it got, $f_i$, and its
# mean probability, $P_i$. Over *which* tokens? In large-scale training a step's batch is split
# into micro-batches (over data-parallel workers and gradient-accumulation steps), and the
# easiest code computes $f$ and $P$ in each micro-batch. Qiu et al. 2025 (*Demons in the
# Detail*, arXiv:2501.11873) show that this quietly asks for balance **inside each
# micro-batch**, and a micro-batch often holds text from one domain: the loss then forbids
# experts to specialise by domain. Counting $f$ over the global batch (summing the counts over
# micro-batches and workers) lifts that.

# %%
from moe_course.losses import load_balancing_loss_from_counts

show_source(load_balancing_loss_from_counts)

# %% [markdown]
# We make the clinic's steps look like that: each step is 4 micro-batches of 32 patients, each
# micro-batch from a single specialty. The two recipes differ in one line: the balance loss
# (softmax top-2 router, α = 0.1) is computed over the whole step ("global batch"), or in each
# micro-batch and averaged ("per micro-batch"). With accumulated counts, the global loss of
# separate micro-batch passes is the same number as the whole-step loss (a test in the package
# checks it), so one pass per step does here.

# %%
TWO = ["global batch", "per micro-batch"]
print(recipe_table(TWO).round(3).to_string())
s = balance.pivot_table(index="seed", columns="label", values="specialisation")
a = balance.pivot_table(index="seed", columns="label", values="accuracy")
lower = int((s["per micro-batch"] < s["global batch"]).sum())
print(f"per-micro-batch balance specialises less than global balance in {lower} of {len(s)} seeds "
      f"(NMI {s['per micro-batch'].mean():.3f} vs {s['global batch'].mean():.3f}); "
      f"accuracy {a['per micro-batch'].mean():.3f} vs {a['global batch'].mean():.3f}, "
      f"lower in {int((a['per micro-batch'] < a['global batch']).sum())} of {len(a)} seeds")

# %% [markdown]
# Who sees whom: the specialty × expert table of the held-out patients' first experts, for the
# median seed of each recipe (the seed whose specialisation is the median of the five).

# %%
def median_seed(name: str):
    part = sorted((r for r in balance_results if r.run.label == name), key=lambda r: r.specialisation)
    return part[len(part) // 2]


fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True)
for ax, name in zip(axes, TWO):
    r = median_seed(name)
    shares = (r.seen / r.seen.sum(1, keepdim=True)).numpy()
    im = ax.imshow(shares, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set(title=f"{name} (seed {r.run.seed}, NMI {r.specialisation:.2f})", xlabel="first expert",
           xticks=range(shares.shape[1]), yticks=range(shares.shape[0]))
    ax.grid(False)
axes[0].set(ylabel="specialty", yticklabels=clinic.specialties)
fig.colorbar(im, ax=axes, label="share of the specialty's patients")

# %% [markdown]
# If the left table shows bright cells (each specialty mostly with one or two experts) and the
# right one an even smear, the micro-batch loss has done what Qiu et al. describe: balanced
# every session by sending every specialty everywhere. α = 0.1 is ten times the Switch weight:
# set `ALPHA_SCOPE = 1e-2` and rerun to see how much of the difference is left at the usual
# weight. Whatever the weight, the fix costs nothing: count $f$ over the global batch.
#
# ## Growing an MoE from a dense clinic: upcycling
#
# Sparse upcycling (Komatsuzaki et al. 2022, arXiv:2212.05055) starts an MoE from a trained
# dense model: every expert becomes a copy of the dense FFN, everything else carries over, and
# only the router is new. `moe.upcycle` does it for one layer, `transformer.upcycle_gpt` for a
# whole GPT; both copy with `Experts.copy_feed_forward_`.

# %%
from moe_course.experiments.modern_phonebook import dense_ffn
from moe_course.moe import upcycle

torch.manual_seed(0)
ffn = dense_ffn(32, 8)  # a dense FFN, as if trained
x = torch.randn(256, 32)
with torch.no_grad():
    top2 = upcycle(ffn, replace(SWITCH, top_k=2, router="top_k"))(x)
    switch = upcycle(ffn, SWITCH)(x)
    p_max = switch.router_probs.max(-1, keepdim=True).values  # (N, 1)
    print(f"top-2, renormalised gates: largest |y - FFN(x)| = {(top2.y - ffn(x)).abs().max().item():.1e}")
    print(f"Switch, raw top-1 gate: largest |y - p_max · FFN(x)| = {(switch.y - p_max * ffn(x)).abs().max().item():.1e}; "
          f"p_max from {p_max.min().item():.3f} to {p_max.max().item():.3f} (1/E = {1 / SWITCH.num_experts:.3f})")

# %% [markdown]
# With gates that sum to 1, every token gets $\sum_i g_i \cdot \mathrm{FFN}(x) = \mathrm{FFN}(x)$:
# the upcycled layer *is* the dense layer on its first step. Switch's raw gate shrinks the
# output by the router's top probability, close to 1/E for a fresh router: the upcycled Switch
# model starts off worse than the model it came from.
#
# Does upcycling pay? On the phone book (records), a dense FFN of width 8 trained for the first
# half of the steps; then, for the second half, it trains on as it is, or is upcycled into the
# Switch layer (same FLOPs) or into top-2 over the copies (twice the expert FLOPs); against a
# Switch layer trained from scratch for only the second half, and the Switch layer of the first
# experiment, trained from scratch for all the steps.

# %%
up = book[book["label"].isin(UPCYCLING)]
rows = []
for name in UPCYCLING:
    part = up[up["label"] == name]
    rows.append({"run": name, "recall when copied": part["start_accuracy"].mean(), "recall at the end": part["accuracy"].mean(),
                 "std": part["accuracy"].std()})
full = records[records["label"] == "Switch"]
rows.append({"run": "Switch from scratch, all steps", "recall when copied": float("nan"), "recall at the end": full["accuracy"].mean(),
             "std": full["accuracy"].std()})
print(f"dense FFN after {HALF} steps: recall {up['dense_accuracy'].mean():.3f}")
print(pd.DataFrame(rows).set_index("run").round(3).to_string())

# %%
fig, ax = plt.subplots(figsize=(8, 4.2))
styles = {"dense, trained on": "C7", "upcycled to Switch": "C0", "upcycled to top-2": "C1", "Switch from scratch, last half only": "C2"}
for name, color in styles.items():
    curves = [r.history for r in results if r.run.label == name]
    h = np.stack([c["accuracy"].values for c in curves])
    steps = curves[0]["step"].values + (HALF if name.endswith("only") else 0)
    ax.plot(steps, h.mean(0), color=color, label=name)
curves = [r.history for r in results if r.run.label == "Switch" and r.run.book.task == "records"]
ax.plot(curves[0]["step"].values, np.stack([c["accuracy"].values for c in curves]).mean(0), color="C3", ls="--", label="Switch from scratch, all steps")
ax.axvline(HALF, color="grey", lw=1, ls=":")
ax.set(title="upcycling on the phone book (mean of five seeds)", xlabel="training step (the dotted line: the copy)",
       ylabel="records recalled", ylim=(0, 1))
ax.legend(fontsize=9)
fig.tight_layout()

# %%
p = up.pivot_table(index="seed", columns="label", values="accuracy")
p["Switch from scratch, all steps"] = full.set_index("seed")["accuracy"]
for other in ("dense, trained on", "Switch from scratch, last half only", "Switch from scratch, all steps"):
    wins = int((p["upcycled to Switch"] > p[other]).sum())
    print(f"upcycled to Switch vs {other}: {p['upcycled to Switch'].mean():.3f} vs {p[other].mean():.3f}, ahead in {wins} of {len(p)} seeds")

# %% [markdown]
# The fair question depends on what you already have. If a trained dense model exists, its
# steps are spent: compare the upcycled model with training the dense one on, and with a Switch
# model started now (the "last half only" line). If the upcycled model beats both, upcycling is
# the better use of the remaining budget. If you could have trained the Switch model from the
# start, the "all steps" line is the comparison. If it stays ahead, the dense phase bought
# little here, and that is what memorisation leads one to expect: the dense model's records
# fill one expert's width, and every copy starts with the same few records instead of its own
# share. Komatsuzaki et al. report that upcycling wins over a long stretch of extra training at
# scale, where the dense model has learned much that every expert can reuse (a language
# model's skills, not a table of records).
#
# ## Serving: every specialist must have a room
#
# Training cost is counted in FLOPs; serving cost is also memory, and how many tokens arrive
# together. An MoE layer of E experts costs a token the FLOPs of one dense FFN, but must keep
# all E experts in memory. And when few tokens arrive at once (one user, one token at a time),
# each expert gets a tiny block, or none: the matmuls are small, and the router and the
# sorting cost as much as the work. We time one layer of D = 256 in inference: a dense FFN of
# width 1,024; Switch with 8 experts of that width; top-2 over those 8; and DeepSeekMoE's
# layout of the Switch budget (32 experts of width 256, four active, one shared). Every layer
# is timed next to a fresh run of the dense one, and we report medians.

# %%
from moe_course.bench.serving import serving_table, weight_bytes
from moe_course.experts import FeedForward

torch.manual_seed(0)
SERVE = MoEConfig(256, 1024, 8, capacity_factor=None)
SERVED = {
    "dense FFN": FeedForward(256, 1024),
    "Switch, 8 experts": MoELayer(SERVE),
    "top-2 of 8": MoELayer(replace(SERVE, top_k=2, router="top_k")),
    "fine-grained + shared": MoELayer(SERVE.fine_grained(4, 1)),
}
memory = pd.Series({name: weight_bytes(m) / 2**20 for name, m in SERVED.items()}, name="weights (MiB, float32)")
print(memory.round(2).to_string())
serving = serving_table(SERVED, [1, 16, 256, 4096], repeats=5, tokens_per_round=64)

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
for i, name in enumerate(SERVED):
    part = serving[serving["layer"] == name]
    left.plot(part["tokens"], part["tokens_per_second"], marker="o", color=f"C{i}", label=name)
    right.plot(part["tokens"], part["ratio"], marker="o", color=f"C{i}", label=name)
left.set(xscale="log", yscale="log", title="throughput (one CPU thread, inference)", xlabel="tokens per call",
         ylabel="tokens per second")
right.set(xscale="log", yscale="log", title="time per token, relative to the dense FFN", xlabel="tokens per call",
          ylabel="time / dense time (paired median)")
right.axhline(1.0, color="grey", lw=1, ls="--")
right.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=2))  # ticks at 1, 2, 4, 8, written plainly
right.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
right.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
left.legend()
fig.tight_layout()

# %%
ratio = serving.pivot_table(index="tokens", columns="layer", values="ratio")
print(ratio[list(SERVED)].round(2).to_string())
for name in list(SERVED)[1:]:
    close = [n for n in ratio.index if (ratio.loc[n:, name] <= 1.25).all()]  # from here on, every larger batch is close too
    where = f"from {int(min(close))} tokens per call on" if close else "at none of these batch sizes"
    print(f"{name}: {memory[name] / memory['dense FFN']:.1f}x the dense weights; within 25% of the dense time per token {where}; "
          f"{ratio[name].iloc[0]:.1f}x the dense time with one token per call")

# %% [markdown]
# What that means for running such a model. Memory grows with *all* the experts, FLOPs only with
# the active ones, so an MoE is cheap to compute and expensive to hold. If the per-token time
# approaches the dense layer's only at large batches, an MoE pays off when many requests are
# served together, which is how MoE models are served:
# batches gathered from many users, experts spread over several devices (lesson 09's expert
# parallelism) so that each device holds a few and receives many tokens for them, and
# sometimes rarely used experts kept off the accelerator. One user on a laptop, one token at
# a time, gets the memory bill of the whole hospital and little of its speed.
#
# ## Recap
#
# - Modern MoE blocks are options of one layer: SwiGLU experts, Mixtral's gate (the same
#   numbers as lesson 04's renormalised top-k), sigmoid scores, shared experts, many narrow
#   experts; the package checks each against Hugging Face's implementation.
# - Layout matters at a fixed expert budget: the phone book measured top-2 against top-1 and
#   fine-grained against both; a shared expert trades record memory for the common skill.
# - Balance can be kept by a bias that only selects, moved between steps by the load; and the
#   balance loss must count over the global batch, or it forbids specialising by domain.
#   Upcycling starts an MoE exactly where a dense model stands; serving an MoE needs the
#   memory of all experts and large batches.
#
# **Exercises:** `exercises/10_modern_moe.ipynb`: Mixtral's gate, DeepSeek-V3's gate, the bias
# update, shared + routed experts, and upcycling.
#
# **Read more:** Jiang et al. 2024, *Mixtral of Experts*, arXiv:2401.04088; Dai et al. 2024,
# *DeepSeekMoE*, arXiv:2401.06066; DeepSeek-AI 2024, *DeepSeek-V3 Technical Report*,
# arXiv:2412.19437 (§2.1.2, auxiliary-loss-free balancing); Wang et al. 2024,
# *Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts*, arXiv:2408.15664; Qiu
# et al. 2025, *Demons in the Detail*, arXiv:2501.11873 (global-batch balance); Muennighoff et
# al. 2024, *OLMoE*, arXiv:2409.02060; Komatsuzaki et al. 2022, *Sparse Upcycling*,
# arXiv:2212.05055; Shazeer 2020, *GLU Variants Improve Transformer*, arXiv:2002.05202.
