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
# # 08 · The Switch Transformer: the whole hospital
#
# Lesson 07 built a small GPT: blocks of attention (the ward meeting, where tokens read
# each other's notes) and a feed-forward block (the examination, where each token is
# seen alone). This lesson opens the hospital. In every block the single examination room
# becomes a **Switch layer**: a GP (the router) sends each token to one of E specialists
# (the experts), each as big as the old room. A token still sees exactly one doctor per
# floor, so it costs the same FLOPs as before; the hospital as a whole holds E times the
# expertise.
#
# That is the bet of the Switch Transformer (Fedus, Zoph and Shazeer 2021,
# arXiv:2101.03961): more parameters at the same compute per token. The paper found the
# extra parameters help most where a model must *remember* things. Our clinic's library
# has exactly that split: the records (`patient 48: eye`, pure memory) and five skills
# (sums, reversing, sorting, closing brackets, grammar), which follow rules.
#
# **In this lesson you will**
#
# - swap the FFN of every block for a Switch layer and count, per token, what each model
#   knows (parameters) and what it costs (FLOPs);
# - train the dense model and its Switch twin on the same stream for the same number of
#   steps, over three seeds, and compare their held-out loss overall and per domain, with
#   the wall-clock cost reported on its own;
# - add experts at fixed compute (E = 1, 2, 4, 8, 16);
# - look inside: which expert gets which domain and which characters, how the load and
#   the dropped tokens evolve, and how sure the GP is.
#
# Whatever the numbers say, this notebook reports them as measured: it trains what it plots.

# %%
import pandas as pd
import torch

from moe_course.figures.plots import use_course_style

# ---- the one knob of this lesson -------------------------------------------
# 1 trains nine small models (2 blocks, width 64) for 300 steps each, two at a time,
# in about a minute on two CPU cores. A larger SCALE trains every model SCALE times as
# long. With SCALE = 4 (about 5 minutes on two cores) every model, dense or Switch,
# learned (nearly) all 90 records on our test machine, so the records stopped telling
# the models apart; the dense model pulled ahead on reversal and sorting, and only the
# second floor's GP grew clearly surer. Give the models more to remember as well
# (see the end of the lesson) to look for the regime of the Switch paper.
SCALE = 1
# -----------------------------------------------------------------------------

torch.set_num_threads(1)  # small models run fastest on one thread; the runs below use one each
use_course_style()

# %% [markdown]
# ## From examination room to hospital floor
#
# In the package a `Block` holds either a `FeedForward` (dense) or a `MoELayer` (Switch).
# Here is its forward pass; the only Switch-specific part is the `MoEOutput` it returns,
# whose `router_loss` (the weighted load-balancing and z-losses of lesson 05) the model adds
# up over blocks into `GPTOutput.router_loss`, and the training loss adds to the cross-entropy.

# %%
from moe_course.show import show_source
from moe_course.transformer import Block

show_source(Block.forward)

# %% [markdown]
# Three things to notice:
#
# - the Switch layer reads `ln_2(x)`, like the FFN it replaces, and its output is added
#   to the residual stream. A token dropped for lack of capacity gets `y = 0` and rides
#   the residual unchanged to the next floor;
# - with E = 1 the router's softmax over one expert is exactly 1, so a Switch block is
#   exactly the dense block (a test in the package checks it);
# - the router is a D × E matrix computed in float32, initialised small (the Switch
#   paper's "scale 0.1"), so at the start the GP is nearly indifferent: every expert gets
#   probability close to 1/E.
#
# The two models of this lesson: a dense GPT, and its twin with 8 experts per block.

# %%
from moe_course.data.corpus import Corpus, CorpusConfig
from moe_course.transformer import GPT, GPTConfig, flops_per_token, param_count

corpus_config = CorpusConfig()  # the clinic's library of lesson 07: 90 records and five skills
corpus = Corpus(corpus_config)
dense = GPTConfig(
    vocab_size=corpus.vocab_size,
    block_size=32,  # T: a slimmer cousin of lesson 07's model, so that nine runs fit in about a minute
    d_model=64,  # D
    n_layers=2,
    n_heads=4,
    d_ff=128,  # F: the dense FFN's width, and each expert's
)
switch = dense.switch_twin(8)  # the same model, every FFN a Switch layer of 8 experts
print(GPT(switch).blocks[0])

# %% [markdown]
# ## What each model knows, and what a token costs
#
# `param_count` and `flops_per_token` count both by formula (the package's tests check
# them against `count_parameters` and PyTorch's FLOP counter). "Active" parameters are
# those a single token actually uses: with top-1 routing, one expert per floor.

# %%
rows = []
for E in (1, 2, 4, 8, 16):
    cfg = dense if E == 1 else dense.switch_twin(E)
    p, f = param_count(cfg), flops_per_token(cfg)
    rows.append({"experts": E, "parameters": p.total, "active parameters": p.active, "FFN + router parameters": p.ffn + p.router,
                 "FLOPs per token (forward)": f.total, "of which router": f.router})
accounting = pd.DataFrame(rows).set_index("experts")
accounting.style.format("{:,}")

# %%
import matplotlib.pyplot as plt

fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
left.bar([str(e) for e in accounting.index], accounting["parameters"] / 1e3, label="all parameters")
left.bar([str(e) for e in accounting.index], accounting["active parameters"] / 1e3, label="used by one token", alpha=0.9)
left.set(title="what the model knows", xlabel="experts per Switch layer (1 = dense)", ylabel="parameters (thousands)")
left.legend()
right.bar([str(e) for e in accounting.index], accounting["FLOPs per token (forward)"] / 1e3, color="C2")
right.set(title="what one token costs", xlabel="experts per Switch layer (1 = dense)", ylabel="forward FLOPs per token (thousands)")
fig.tight_layout()

# %% [markdown]
# Parameters grow linearly with E; FLOPs per token stay flat except for the router's
# 2·D·E per floor (a fraction of a percent here). That is the whole promise: a hospital
# with eight times the specialists, and each patient still sees one doctor per floor.
#
# ## The race: same stream, same steps, same FLOPs per token
#
# Both models read the same batches (the sampler is seeded), train for the same number of
# steps with the same optimiser, and are judged on the same held-out text (fresh samples,
# same records). Three seeds each, because one run of a small model can be lucky. We also
# train Switch twins with 2, 4 and 16 experts (seed 0) for the experts sweep further down,
# and record the routing of the 8-expert model at every evaluation.
#
# `run_lms` trains two runs at a time, each in its own process on one CPU thread. This is
# the longest cell of the course: about a minute at `SCALE = 1`, with a progress bar.

# %%
from moe_course.experiments.lm_runs import LMRun, results_table, run_lms, summarise
from moe_course.training import TrainConfig

STEPS = 300 * SCALE
train_config = TrainConfig(steps=STEPS, batch_size=32, lr=1e-2, warmup_steps=STEPS // 10, lr_min_ratio=0.1, eval_every=STEPS // 6)
SEEDS = (0, 1, 2)
SWEEP = (2, 4, 16)

runs = [LMRun("dense", dense, train_config, seed) for seed in SEEDS]
runs += [LMRun("switch E=8", switch, train_config, seed, track_routing=(seed == 0)) for seed in SEEDS]
runs += [LMRun(f"switch E={E}", dense.switch_twin(E), train_config, 0) for E in SWEEP]
results = run_lms(runs, corpus_config, workers=2, eval_rows=96)
table = results_table(results)
main = table[table["label"].isin(["dense", "switch E=8"])]

# %% [markdown]
# ### Held-out loss during training
#
# Loss in nats per character on the held-out text; the line is the mean over the three
# seeds, the band spans the best and the worst seed. Left: all domains. Right: the records
# alone, where memory matters most.

# %%
from moe_course.figures.lm_plots import domain_bars, loss_curves

main_results = [r for r in results if r.run.label in ("dense", "switch E=8")]
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
loss_curves(main_results, "val_loss", title="all domains", ax=left)
loss_curves(main_results, "val_loss_facts", title="the records (facts) only", ax=right)
fig.tight_layout()

# %% [markdown]
# ### Per domain, at the end
#
# The table gives mean ± standard deviation over the seeds; `exact` is the share of
# held-out samples whose whole answer is right (for the records: the ward).

# %%
domains = list(corpus.domains)
summary = summarise(main, [f"val_loss_{d}" for d in domains] + ["val_loss"] + [f"val_exact_{d}" for d in ("facts", "arithmetic", "reversal")])


def mean_sd(col: str, fmt: str = "{:.3f}") -> pd.Series:
    return summary[(col, "mean")].map(fmt.format) + " ± " + summary[(col, "std")].map(fmt.format)


per_domain = pd.DataFrame({d: mean_sd(f"val_loss_{d}") for d in domains} | {"overall": mean_sd("val_loss")})
per_domain

# %%
pd.DataFrame({f"exact {d}": mean_sd(f"val_exact_{d}", "{:.0%}") for d in ("facts", "arithmetic", "reversal")})

# %%
domain_bars(main, domains, title="held-out loss per domain after training");

# %% [markdown]
# What do the numbers say? The next cell puts the difference per domain next to the spread
# between seeds: a difference smaller than the seeds' own scatter is not a result.

# %%
losses = [f"val_loss_{d}" for d in domains] + ["val_loss"]
means = summary.xs("mean", axis=1, level=1)[losses]  # the summary above, per label
sds = summary.xs("std", axis=1, level=1)[losses]
verdict = pd.DataFrame({
    "switch − dense": means.loc["switch E=8"] - means.loc["dense"],
    "larger seed sd": sds.max(),
})
verdict["verdict"] = [
    ("switch lower" if d < 0 else "dense lower") if abs(d) > s else "within seed noise"
    for d, s in zip(verdict["switch − dense"], verdict["larger seed sd"])
]
verdict.index = [i.removeprefix("val_loss_").replace("val_loss", "overall") for i in verdict.index]
verdict.round(3)

# %% [markdown]
# Read this table before the text below: it was computed just now, the text was written
# in advance. On our 2-core test machine, at `SCALE = 1`, the Switch model did **not**
# beat its dense twin on the records: the expected "experts add knowledge" effect did not
# show at this size and length of training. The sections below measure why.
#
# ### Wall-clock time, separately
#
# Equal FLOPs per token are not equal seconds. Routing, sorting tokens by expert, many
# small matrix products instead of one large one and the auxiliary losses all cost time
# on a CPU (lesson 06 measured the dispatch alone). Both kinds of model trained side by
# side in the same two worker processes, so their times are comparable.

# %%
speed = table.groupby("label", sort=False)["seconds_per_step"].mean().to_frame("seconds per step")
speed["relative to dense"] = speed["seconds per step"] / speed.loc["dense", "seconds per step"]
speed.round(3)

# %% [markdown]
# ## More experts at fixed compute
#
# The Switch paper's most famous figure: keep the FLOPs per token fixed and add experts;
# the loss keeps falling. Our small version: E = 1 (the dense model), 2, 4, 8 and 16, all
# seed 0, all with the same FLOPs per token. The grey band marks the range of the dense
# model over its three seeds: differences inside it are noise.

# %%
from moe_course.figures.lm_plots import experts_scaling

sweep = table[table["seed"] == 0].sort_values("experts")
dense_runs = table[table["label"] == "dense"]
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
experts_scaling(sweep, "val_loss", reference=dense_runs, title="all domains", ax=left)
experts_scaling(sweep, "val_loss_facts", reference=dense_runs, title="the records (facts)", ax=right)
fig.suptitle("more experts, same FLOPs per token (seed 0)", fontweight="bold")
fig.tight_layout()
sweep[["experts", "val_loss", "val_loss_facts", "val_exact_facts", "seconds_per_step"]].set_index("experts").round(3)

# %% [markdown]
# On our test machine the curve did not fall: on the records the Switch models landed in
# or just above the dense model's own seed range, and over all domains the loss rose a
# little with E. In the Switch paper the same plot falls steadily, for models trained far longer.
# The next sections look for the reasons inside the model.
#
# ## Inside the hospital
#
# Now the 8-expert model of seed 0, whose routing was recorded during training. First the
# end state: for every floor (Switch layer), which share of each domain's characters went
# to each expert. A row concentrated on one expert means that domain has a specialist; a
# flat row means the GP spreads it over everyone. The title gives the specialisation
# score: the normalised mutual information between domain and expert (0: the expert tells
# you nothing about the domain; 1: each domain has its own experts).

# %%
from moe_course.training.lm import LMTask
from moe_course.figures.lm_plots import routing_heatmaps
from moe_course.analysis.lm_routing import routing_report

watched = next(r for r in results if r.run.label == "switch E=8" and r.run.seed == 0)
task = LMTask(corpus, block_size=dense.block_size, eval_rows=96, eval_chunk=train_config.batch_size)
model = watched.model()
layers = routing_report(model, task.held_out, task.domains, chunk=train_config.batch_size)
routing_heatmaps(layers, title="where each domain's characters go, after training");

# %% [markdown]
# Routing decides per *character*, not per sample: a record is `p`, `a`, `t`, … `4`, `8`,
# `:`, ` `, `e`, `y`, `e`. So it is worth asking which characters each expert prefers. The
# table lists, for every expert of the first floor, the input characters it receives most
# often *relative to how common they are* (lift = P(char | expert) / P(char)).

# %%
prefs = layers[0].preferred_chars(corpus.tokenizer, k=4, min_count=10)
prefs["char"] = prefs["char"].map(repr)
(prefs.assign(pick=lambda t: t["char"] + " ×" + t["lift"].round(1).astype(str))
      .groupby("expert")["pick"].apply(", ".join).to_frame("characters this expert gets most (lift)"))

# %% [markdown]
# ### Over training: load, dropped tokens, and the GP's confidence

# %%
from moe_course.figures.lm_plots import expert_share_over_training, routing_over_training

tracker = watched.routing_tracker(task)
expert_share_over_training(tracker.history, title="share of tokens per expert during training");

# %% [markdown]
# Each colour is one expert; an even split would give every expert one eighth of the
# height. The load-balancing loss (α = 0.01) keeps the GP from sending everyone to one
# doctor, but it does not force a perfect split.

# %%
routing_over_training(tracker.summary, title="routing during training");

# %% [markdown]
# Left, the tokens no expert processed because its queue was full (capacity factor 1.25):
# they skip the floor's FFN entirely. Right, the specialisation score over training.
#
# One more number explains a lot: how sure the GP is. A Switch layer multiplies the chosen
# expert's output by the router probability of that expert, the **gate**. At the start,
# with a nearly uniform router, the gate is about 1/E: the expert's answer reaches the
# residual stream at an eighth of its size, while the dense FFN's answer arrives in full.

# %%
gates = tracker.summary.pivot(index="step", columns="layer", values="mean_gate")
gates.columns = [f"mean gate, layer {c}" for c in gates.columns]
ax = gates.plot(marker="o", title="how sure the GP is: the mean gate of the chosen expert", ylim=(0, 1))
ax.axhline(1 / switch.num_experts, ls="--", color="gray", lw=1)
ax.annotate("1/E: no preference", (gates.index.min(), 1 / switch.num_experts), xytext=(4, 4), textcoords="offset points", color="gray", fontsize=8)
ax.set(xlabel="training step", ylabel="gate (router probability)");

# %% [markdown]
# ## Why the hospital did not pay off here, and when it does
#
# Put the measurements together (check them against the tables above):
#
# - **The GP is unsure for a long time.** The mean gate stays well below 1, so every expert's
#   contribution is scaled down while the dense FFN's is not. The experts can grow their
#   weights to compensate, but that takes steps we did not give them.
# - **Each specialist sees an eighth of the patients.** A dense FFN learns from every token
#   in every batch; an expert learns only from the tokens routed to it. Early in training,
#   when routes still change (look at the load plot), an expert may lose what it learned
#   for tokens that then move elsewhere. This "routing fluctuation" is studied in
#   StableMoE (Dai et al. 2022, arXiv:2204.08396).
# - **90 records fit in the dense FFN** (the next cell counts): what limits this tiny model
#   after 300 steps is not room to store the records but learning *how* to look them up.
#   Attention has to learn to fetch the two digits (lesson 07's heads) before any FFN,
#   dense or expert, can map them to a ward. Extra experts add room, not that skill.
#
# %%
import math

bits = corpus_config.num_facts * math.log2(corpus_config.num_wards)
print(f"the records hold {corpus_config.num_facts} × log2({corpus_config.num_wards}) = {bits:.0f} bits;")
print(f"the dense model's FFNs alone have {param_count(dense).ffn:,} parameters, the Switch model's {param_count(switch).ffn:,}")

# %% [markdown]
# The Switch paper's gains were measured with far larger models trained for far longer
# (hundreds of thousands of steps), where the GP settles early in the run and the
# dense model's capacity, not its training time, is the limit. To move towards that
# regime, raise `SCALE` (longer runs), and give the model more to remember:
# `CorpusConfig(num_facts=600, id_digits=3)`; or train larger models outside the notebook
# with `python -m moe_course.train --model switch --experts 8 --steps 5000` (see the
# README), which writes a `metrics.csv` with the same per-domain columns.
#
# ## The trained models at work
#
# A few prompts completed greedily by the dense and the Switch model of seed 0. The
# "expected" column is what the clinic's library would write.

# %%
from moe_course.training.lm import complete

seed0 = {r.run.label: r.model() for r in results if r.run.seed == 0 and r.run.label in ("dense", "switch E=8")}
patients = list(corpus.facts)[:3]
prompts = [(f"patient {p}: ", corpus.facts[p]) for p in patients] + [("21+34=", "55"), ("rev clinic=", "cinilc"), ("sort dbca=", "abcd")]
pd.DataFrame([{"prompt": p, "expected": want, **{name: complete(m, corpus, p).rstrip("\n") for name, m in seed0.items()}}
              for p, want in prompts])

# %% [markdown]
# ## Recap
#
# - A Switch Transformer replaces each FFN with a router and E experts: E times the FFN
#   parameters, the same FLOPs per token (plus a tiny router), more wall-clock time on a CPU.
# - Compared honestly (same stream, same steps, three seeds, per domain), a small Switch
#   model trained for a few hundred steps did not beat its dense twin here; the routing
#   plots show a GP that is still unsure and still reshuffling its patients.
# - Looking inside is cheap and tells you more than the loss: load per expert, dropped
#   tokens, the gate, and which domains and characters each expert takes.
#
# **Exercises:** `exercises/08_switch_transformer.ipynb`: write the Switch block's forward
# pass (attention, then the Switch layer, both residuals, and the auxiliary loss) and the
# parameter and FLOP accounting of a language model.
#
# **Next:** lesson 09 (planned) takes the hospital beyond one machine: experts on different
# devices, tokens sent between them with an all-to-all, and soft MoE.
#
# **Read more:** Fedus, Zoph and Shazeer 2021, *Switch Transformers: Scaling to Trillion
# Parameter Models with Simple and Efficient Sparsity*, arXiv:2101.03961 (top-1 routing,
# capacity factor, the balance loss, float32 routers, the scale-0.1 initialisation, the
# experts-at-fixed-compute figure); Lepikhin et al. 2020, *GShard*, arXiv:2006.16668;
# Shazeer et al. 2017, *Outrageously Large Neural Networks*, arXiv:1701.06538; Zoph et al.
# 2022, *ST-MoE: Designing Stable and Transferable Sparse Expert Models*, arXiv:2202.08906
# (the router z-loss); Dai et al. 2022, *StableMoE: Stable Routing Strategy for Mixture of
# Experts*, arXiv:2204.08396 (routing fluctuation).
