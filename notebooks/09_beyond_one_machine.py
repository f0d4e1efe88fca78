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
# # 09 · Beyond one machine: referrals between hospitals
#
# Lesson 08 built the whole hospital under one roof: a GP on every floor and a team of
# specialists behind each one. The models people actually train hire so many specialists that
# no single building can hold them. So the hospital becomes a **network of hospitals**. Each
# hospital (a process on its own device; the libraries call it a **rank**) keeps its own copy
# of the GP and of everything every patient needs (the router, attention, the embeddings), but
# only a share of the doctors: with W hospitals and E doctors, E/W each. When the GP picks a
# doctor who works elsewhere, the patient is **referred** there, examined, and the answer
# travels back. In a model this is *expert parallelism*, and the referrals are two
# **all-to-all exchanges** per layer (Lepikhin et al. 2020, GShard, arXiv:2006.16668).
#
# The second half of the lesson changes the referral rule itself, twice. **Soft MoE** sends
# nobody anywhere: each doctor examines a few blended "slots", each a weighted mix of every
# patient in the waiting room. **Adaptive computation** lets the GP send an unclear case to
# several doctors and a clear one to a single doctor: harder cases get more care, the idea the
# essay behind this course ends on.
#
# **In this lesson you will**
#
# - count why one device cannot hold a large MoE, while each token's compute barely moves;
# - read the two exchanges in code, then watch them in a real run of two processes started
#   from this notebook: who sends how many tokens to whom, step by step;
# - measure what the exchanges cost (bytes per token against the width D, k and capacity), how
#   dropless and capacity-padded exchanges differ, and what happens when one hospital gets
#   most of the patients;
# - check that the two processes compute exactly what one process computes;
# - train Soft MoE on the clinic and see why it cannot write text one token at a time;
# - train a router that gives some patients more doctors than others, and find out which.
#
# Shape letters: **N** tokens (patients), **D** width, **E** experts, **K** the k of top-k,
# **C** capacity, **W** processes (ranks); a rank holds E/W experts.

# %%
import time
from dataclasses import replace

import pandas as pd
import torch

from moe_course.figures.plots import use_course_style
from moe_course.show import show_source

# ---- the one knob of this lesson -------------------------------------------
# SCALE = 1: two processes train lesson 08's Switch model for 20 steps (twice: dropless and
# capacity-padded), then twenty small clinic models train two at a time.
# SCALE = 2, 3, ...: both trainings run SCALE times as many steps. The exchange picture then
# reaches further into training, where the GP has had time to balance its doctors; the
# verdicts below are computed, so they say what changes.
SCALE = 1
# -----------------------------------------------------------------------------

torch.set_num_threads(1)  # small models run fastest on one thread; every process below uses one
use_course_style()

# %% [markdown]
# ## Part 1 · A network of hospitals
#
# ### Why one building is not enough
#
# Training a model in float32 with the Adam optimiser keeps, for every parameter, the weight
# itself, its gradient and Adam's two running averages: four numbers of four bytes. Add
# experts to lesson 08's model, and to the same design at the width of the Switch
# Transformer's Base model, and count (`param_count` and `flops_per_token` from lesson 08):

# %%
from moe_course.data.corpus import Corpus, CorpusConfig
from moe_course.flops import flops_per_token, param_count
from moe_course.transformer import GPTConfig

SKILLS = ("arithmetic", "reversal", "sorting", "brackets", "grammar")
corpus_config = CorpusConfig(num_facts=400, id_digits=2, id_alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", fact_prompt="#{}",
                             mix={"facts": 0.8} | {skill: 0.04 for skill in SKILLS})  # lesson 08's stream: four fifths records
corpus = Corpus(corpus_config)
lesson08 = GPTConfig(vocab_size=corpus.vocab_size, block_size=32, d_model=64, n_layers=2, n_heads=4, d_ff=32,
                     ffn="switch", num_experts=8, moe_every=2)  # lesson 08's Switch model: block 2 holds 8 experts
base = GPTConfig(vocab_size=32128, block_size=512, d_model=768, n_layers=12, n_heads=12, d_ff=3072,
                 ffn="switch", num_experts=8, moe_every=2)  # the same design at the width of the Switch paper's Base model
BYTES_PER_PARAMETER = 16  # float32 training with Adam: weight 4 + gradient 4 + Adam's two moments 8
DEVICES_GB = {"a laptop (16 GB)": 16, "one large GPU (80 GB)": 80}
EXPERTS = (8, 64, 128, 512, 2048)

rows = []
for model, cfg in (("lesson 08 (D = 64)", lesson08), ("Switch-Base size (D = 768)", base)):
    for E in EXPERTS:
        c = replace(cfg, num_experts=E)
        p, f = param_count(c), flops_per_token(c)
        rows.append({"model": model, "experts": E, "parameters": p.total, "active per token": p.active,
                     "forward FLOPs per token": f.total, "GB": BYTES_PER_PARAMETER * p.total / 1e9})
memory = pd.DataFrame(rows)
memory.style.format({"parameters": "{:,}", "active per token": "{:,}", "forward FLOPs per token": "{:,}", "GB": "{:,.2f}"}).hide(axis="index")

# %%
from moe_course.figures.beyond_plots import memory_vs_experts

memory_vs_experts(memory, DEVICES_GB, title="memory to train the weights (float32 + Adam) against experts");
for model, part in memory.groupby("model", sort=False):
    flops = part["forward FLOPs per token"]
    print(f"{model}: {part['parameters'].iloc[-1] / part['parameters'].iloc[0]:.0f} times the parameters from E={EXPERTS[0]} to "
          f"E={EXPERTS[-1]}, {flops.iloc[-1] / flops.iloc[0]:.3f} times the FLOPs per token")

# %% [markdown]
# The parameters grow with E; of the compute per token only the router's `2·D·E` grows. Next
# to experts of the Base model's width that is a rounding error, and the FLOPs ratio printed
# for it stays close to 1: the promise of experts, with the bill arriving in memory. Lesson 08's
# experts are so narrow (F = 32) that choosing among thousands of them costs more than
# consulting one, which its FLOPs ratio shows; real models keep E in proportion to their
# width. The count covers only the weights and their optimiser state; the activations of a
# batch come on top. Where a line crosses a device's memory, one device can no longer train
# that model.
#
# The way out: give each device only some of the experts. Everything else (attention,
# embeddings, norms, routers) is **replicated**, a copy on every device. With W devices each
# holds the replicated part plus E/W experts. For the Base-size model, the fewest devices of
# 80 GB that can hold each E:

# %%
def per_device_gb(cfg: GPTConfig, world: int) -> float:
    p = param_count(cfg)
    one_expert = 2 * cfg.d_model * cfg.d_ff + cfg.d_ff + cfg.d_model  # w_in, w_out and both biases
    experts = len(cfg.moe_layers) * cfg.num_experts * one_expert
    return BYTES_PER_PARAMETER * (p.total - experts + experts / world) / 1e9


GPU_GB = DEVICES_GB["one large GPU (80 GB)"]
rows = []
for E in EXPERTS:
    c = replace(base, num_experts=E)
    fits = [w for w in (1, 2, 4, 8, 16, 32, 64, 128) if E % w == 0 and per_device_gb(c, w) <= GPU_GB]
    w = fits[0] if fits else None
    rows.append({"experts": E, "GB on one device": per_device_gb(c, 1), "devices needed (W)": w,
                 "experts per device": None if w is None else E // w, "GB per device": None if w is None else per_device_gb(c, w)})
pd.DataFrame(rows).style.format({"GB on one device": "{:,.1f}", "GB per device": "{:,.1f}"}, na_rep="more than 128").hide(axis="index")

# %% [markdown]
# ### The two exchanges, read as code
#
# `moe_course.distributed` builds this on `torch.distributed` (the gloo backend on a CPU, NCCL
# on GPUs; the same code). `ExpertParallelMoE` is lesson 05's `MoELayer` whose experts are
# spread over the ranks. Every rank runs the GP on its own tokens, then:
#
# 1. sorts its (token, expert) assignments by expert (lesson 06's `sort_by_expert`), so the
#    rows for each rank's experts form one block;
# 2. tells every rank how many rows to expect (**the count exchange**: E small numbers);
# 3. **all-to-all #1**: every row travels to its expert's rank;
# 4. the rank's own experts run on whatever arrived (lesson 06's dispatch again);
# 5. **all-to-all #2**: every answer travels back to the rank its token came from;
# 6. each token adds up its answers, weighed by its gates (lesson 06's `combine_rows`).

# %%
from moe_course.distributed.layer import ExpertParallelMoE

show_source(ExpertParallelMoE._dropless)

# %% [markdown]
# `all_to_all` is `torch.distributed.all_to_all_single` with one addition. On its own, that
# call is invisible to autograd: the experts would never receive a gradient, and nothing would
# say so. The backward below is the whole fix: the gradient of a row must go back to where the
# row came from, which is **the same exchange with the two split lists swapped** (exercise 9.2).

# %%
from moe_course.distributed.exchange import _AllToAll

show_source(_AllToAll)

# %% [markdown]
# The split lists are the bookkeeping of the referrals. Take two hospitals and four doctors
# (hospital 0 holds doctors 0 and 1, hospital 1 holds doctors 2 and 3), and a table of how
# many patients each hospital's GP sends to each doctor. Summing each hospital's doctors gives
# the **exchange matrix**: entry [s, q] is the number of rows rank s sends to rank q. Row s is
# what rank s sends (its *input splits*), column q what rank q receives (its *output splits*):
# one is the other's transpose (exercise 9.1).

# %%
from moe_course.distributed.exchange import exchange_matrix

counts = torch.tensor([[3, 1, 0, 2],  # hospital 0's patients for doctors 0, 1, 2, 3
                       [5, 2, 4, 1]])  # hospital 1's
M = exchange_matrix(counts)  # (W, W)
for r in range(2):
    print(f"rank {r} sends {M[r].tolist()} rows to ranks 0 and 1 (row {r}); receives {M[:, r].tolist()} from them (column {r})")

# %% [markdown]
# ### A real run on two processes
#
# Now the real thing. `run_on_processes` starts W = 2 processes from this notebook, joins them
# in a gloo process group, runs a function of the package on each (one thread each) and brings
# back what every rank returned. Starting a group costs seconds, so one launch does four jobs
# (`in_sequence`):
#
# 1. train lesson 08's Switch model (8 experts, 4 per rank) on lesson 08's stream,
#    **dropless**, and record every exchange of every step (`record_traffic`);
# 2. the same with a **capacity factor** of 1.25 (capacity-padded, below);
# 3. compare the distributed layer with one `MoELayer`, output and every gradient, in many
#    settings (`compare_with_one_process`);
# 4. time a layer whose routing we steer, from balanced to lopsided (`imbalance_timings`).
#
# Each process takes half of every global batch; both start from the same seed, so the
# replicated parts start equal, and their gradients are summed after every backward.

# %%
from moe_course.distributed.launch import in_sequence, run_on_processes
from moe_course.distributed.traffic import imbalance_timings, record_traffic
from moe_course.distributed.verify import EquivalenceCase, compare_with_one_process
from moe_course.training import TrainConfig

W = 2
dropless = replace(lesson08, capacity_factor=None)
padded = replace(lesson08, capacity_factor=1.25)
train_config = TrainConfig(steps=20 * SCALE, batch_size=32, lr=1e-2, eval_every=5 * SCALE)  # 32 sequences of 32 characters a step
cases = [EquivalenceCase(seed=seed, router=router, top_k=k, capacity_factor=factor, idle_rank=idle, uneven=uneven)
         for seed in (0, 1, 2) for router, k in (("switch", 1), ("top_k", 2))
         for factor, idle, uneven in ((None, False, False), (None, True, False), (None, False, True), (1.0, False, False), (1.25, False, False))]
SHARES = [0.5, 0.75, 1.0]  # share of every rank's tokens routed to rank 0's experts (0.5: balanced)
jobs = [
    (record_traffic, (dropless, train_config, corpus_config), {}),
    (record_traffic, (padded, train_config, corpus_config), {}),
    (compare_with_one_process, (cases,), {}),
    (imbalance_timings, (SHARES,), dict(tokens_per_rank=4096, d_model=64, d_ff=1024, repeats=5)),
]
start = time.perf_counter()
ranks = run_on_processes(in_sequence, W, jobs, timeout=900)  # ranks[r][j]: rank r's result of job j
traffic_dropless, traffic_padded, equivalence, imbalance = (list(per_rank) for per_rank in zip(*ranks))
print(f"{W} processes did the {len(jobs)} jobs in {time.perf_counter() - start:.1f} s, starting them included")

# %% [markdown]
# #### Who sends how many tokens to whom
#
# Every step, each rank recorded how many rows it sent to each rank. Here is the exchange
# matrix of the dropless run at three steps: the first, the middle one and the last.

# %%
from moe_course.distributed.traffic import exchange_matrices, traffic_table
from moe_course.figures.beyond_plots import exchange_heatmaps

dropless_table, padded_table = traffic_table(traffic_dropless), traffic_table(traffic_padded)
sent = exchange_matrices(dropless_table)[:, 0]  # (steps, W, W): the model's one Switch layer
steps = sorted(dropless_table["step"].unique())
picks = [0, len(steps) // 2, len(steps) - 1]
exchange_heatmaps(sent[picks], [f"step {steps[i]}" for i in picks],
                  suptitle="who sends how many tokens to whom (dropless, rows per step)");
tokens_per_rank = train_config.batch_size * lesson08.block_size // W
off = torch.cat([sent[:, 0, 1], sent[:, 1, 0]]).float()
print(f"every row sums to {sorted(set(sent.sum(-1).flatten().tolist()))}: each rank sends each of its {tokens_per_rank} tokens once (top-1)")
print(f"to the other rank: {off.mean():.0f} rows on average, from {off.min():.0f} to {off.max():.0f}, over {len(steps)} steps and both ranks")
workload = sent.sum(1)  # (steps, W): rows each rank's doctors examine (column sums)
busiest = workload.max(1).values.float() / workload.float().mean(1)  # (steps,) the busiest rank's load over the mean
print(f"what a rank's doctors examine (a column sum) ranged from {workload.min()} to {workload.max()} rows per step; the busiest rank had "
      f"{busiest.max():.2f} times the mean load at worst (step {steps[int(busiest.argmax())]}), {busiest[-1]:.2f} times at the last step")

# %% [markdown]
# Read a matrix by rows and by columns. A **row** is one hospital's outgoing referrals: with
# top-1 and no capacity limit it always adds up to that hospital's own tokens, however the GP
# routes them. The diagonal stays in the building (the doctor works here); only the
# off-diagonal crosses the network. A **column** is the workload of one hospital's doctors:
# it adds up the referrals from every hospital, and it is as uneven as the GP's choices. That
# unevenness is why the dropless exchange needs the count exchange first: nobody knows how many
# rows will arrive until the others say so. A GP that has just started training knows little
# about its doctors: if the busiest rank's load printed above is far from 1 at its worst step,
# the GP sent most patients to one hospital at that step, and the balance loss of lesson 05
# pulls it back over the following steps.
#
# Over the whole run, for both variants (the capacity-padded one is explained below):

# %%
from moe_course.figures.beyond_plots import exchange_over_steps

exchange_over_steps({"dropless": dropless_table, "capacity-padded": padded_table},
                    title="rows each rank sends to the other rank, per step");

# %% [markdown]
# ### What a referral costs: bytes per token
#
# A row is one token's vector: D numbers of four bytes. A dropless top-k layer sends each
# token's vector K times out and K answers back; the backward pass sends the gradients of both,
# in reverse. A capacity-padded layer sends every expert's C slots from every rank, full or
# empty, so its rows per token are K times the capacity factor. `bytes_per_token` is that
# formula. The points are what the run above measured: the bytes each rank sent per step
# (forward, one way), divided by its tokens.

# %%
from moe_course.distributed.exchange import bytes_per_token
from moe_course.figures.beyond_plots import bytes_per_token_lines

widths = [2**i for i in range(4, 14)]  # D from 16 to 8192
settings = {"top-1, dropless": (1, None), "top-2, dropless": (2, None), "top-1, capacity factor 1.25": (1, 1.25),
            "top-1, capacity factor 2.0": (1, 2.0)}
one_way = {label: [bytes_per_token(d, k, cf, backward=False) / 2 for d in widths] for label, (k, cf) in settings.items()}


def measured_per_token(table: pd.DataFrame) -> float:
    per_step = table.groupby(["step", "src"])["bytes"].sum()  # all rows a rank sent in one step (the model's one Switch layer)
    return float(per_step.mean()) / tokens_per_rank


measured = {"dropless": measured_per_token(dropless_table), "capacity-padded": measured_per_token(padded_table)}
bytes_per_token_lines(widths, one_way, [(lesson08.d_model, measured["dropless"], "measured: lesson 08's model, dropless"),
                                        (lesson08.d_model, measured["capacity-padded"], "measured: capacity-padded, factor 1.25")],
                      title="what one token costs each MoE layer to send (forward, one way)", ylabel="bytes per token (log scale)");
for name, cf in (("dropless", None), ("capacity-padded", padded.capacity_factor)):
    print(f"{name}: measured {measured[name]:.1f} bytes per token, formula {bytes_per_token(lesson08.d_model, 1, cf, backward=False) / 2:.1f}")
step_bytes = bytes_per_token(base.d_model, 2, None) * 2**20  # there and back, forward and backward
print(f"at the Base width (D = {base.d_model}), top-2 dropless, a batch of 2**20 tokens moves {step_bytes / 1e9:.1f} GB per MoE layer "
      "per training step (all rows, before the share that stays on its own rank)")

# %% [markdown]
# The cost grows with D and with K, never with E: adding doctors adds memory, not traffic.
# With W ranks and evenly spread routing, a share (W − 1)/W of those bytes crosses the network
# (`bytes_per_token(..., world_size=W)`); the rest stays in the building. Within one machine
# the exchange goes through memory; between machines it goes over the network, usually the
# slowest link of the whole system. That is why large systems place the experts of one layer
# on devices that sit close together.
#
# ### Dropless or capacity-padded?
#
# Two ways to organise the referrals:
#
# - **dropless** (MegaBlocks, torchtitan, Megatron-Core): every assignment travels, so the
#   split sizes change every step. A tiny exchange of counts goes first, and on a GPU reading
#   those sizes makes the host wait for the device.
# - **capacity-padded** (GShard, DeepSpeed-MoE, Tutel): every expert gets C slots from every
#   rank, C = ⌈K·N/E · capacity factor⌉ counted on the rank's own N tokens. All splits are
#   equal and known in advance, so there is no count exchange and every shape is fixed; the
#   price is the empty slots that travel anyway, and the tokens that find no free slot
#   (lesson 05's full waiting rooms).

# %%
def summarise_traffic(table: pd.DataFrame, history: pd.DataFrame) -> dict:
    per_step = table.groupby(["step", "src"]).agg(rows=("rows", "sum"), tokens=("tokens", "sum"), dropped=("dropped", "first"),
                                              exchange=("exchange_seconds", "first"))
    later = per_step[per_step.index.get_level_values("step") > 1]  # step 1 pays one-off costs
    return {"rows sent per rank per step": per_step["rows"].mean(), "of which tokens": per_step["tokens"].mean(),
            "empty slots sent": 1 - per_step["tokens"].sum() / per_step["rows"].sum(),
            "tokens dropped per rank per step": per_step["dropped"].mean(),
            "forward exchange time (ms, median)": 1e3 * later["exchange"].median(),
            "held-out loss at the end": history["val_loss"].iloc[-1]}


compare = pd.DataFrame({"dropless": summarise_traffic(dropless_table, traffic_dropless[0]["history"]),
                        "capacity-padded (1.25)": summarise_traffic(padded_table, traffic_padded[0]["history"])})
compare.style.format("{:,.3f}")

# %%
d, p = compare["dropless"], compare["capacity-padded (1.25)"]
print(f"The padded exchange sent {p['rows sent per rank per step'] / d['rows sent per rank per step']:.2f} times the rows of the dropless one; "
      f"{p['empty slots sent']:.0%} of them were empty slots.")
print(f"It dropped {p['tokens dropped per rank per step']:.0f} of each rank's {tokens_per_rank} tokens per step on average "
      f"({p['tokens dropped per rank per step'] / tokens_per_rank:.0%}); dropless drops none ({d['tokens dropped per rank per step']:.0f}).")
drop_curve = padded_table.groupby("step")["dropped"].mean()
print(f"Dropped per rank: {drop_curve.iloc[0]:.0f} at step {drop_curve.index[0]}, {drop_curve.iloc[-1]:.0f} at step {drop_curve.index[-1]}.")

# %% [markdown]
# Both facts come from the same place: a GP that is still learning sends its patients
# unevenly. Dropless pays for that in time (the busiest rank's doctors work longest, next
# section); padded pays in dropped tokens, which skip the layer and ride the residual. If the
# dropped share falls from the first step to the last, the balance loss of lesson 05 is doing
# its work; a longer run (SCALE) shows how far it falls. Both ran on the same batches, so the
# held-out losses can be compared too, but twenty steps say little about training quality.
#
# ### The same answers as one process
#
# Does spreading the doctors change what the model computes? It should not: every token meets
# the same expert with the same weights. The third job compared `ExpertParallelMoE` on two
# ranks with one `MoELayer` on the whole batch, in every setting below (three seeds each): the
# outputs, the gradient of the input, of the router (after the ranks' gradients are summed)
# and of every expert parameter.

# %%
rows = []
for rank_results in equivalence:
    for r in rank_results:
        case = r["case"]
        setting = ("top-1" if case["router"] == "switch" else f"top-{case['top_k']}") + (
            ", dropless" if case["capacity_factor"] is None else f", padded {case['capacity_factor']}") + (
            ", a rank with no tokens" if case["idle_rank"] else "") + (", uneven ranks" if case["uneven"] else "")
        rows.append({"setting": setting, "rank": r["rank"], "drops as one process": r["dropped_reference"] in (None, r["dropped"]),
                     **{name: value for name, value in r["max_diff"].items()}})
diffs = pd.DataFrame(rows)
quantities = [c for c in diffs.columns if c not in ("setting", "rank", "drops as one process")]
diffs.groupby("setting", sort=False)[quantities].max().style.format("{:.1e}")

# %%
TOLERANCE = 1e-5  # float32 round-off: sums taken in another order
worst = diffs[quantities].max().max()
print(f"largest difference over {len(cases)} settings × {W} ranks and every quantity: {worst:.1e}")
print("verdict: " + ("equal to one process up to float round-off" if worst < TOLERANCE else f"NOT equal: a difference above {TOLERANCE:g}")
      + "; tokens dropped as one process drops them: " + ("in every setting" if diffs["drops as one process"].all() else "NOT in every setting"))
exact = diffs.loc[diffs["setting"].str.contains("dropless"), ["y", "experts.w_in", "experts.w_out"]].max()
print("dropless, largest difference of the outputs and expert weight gradients: " + ", ".join(f"{k} {v:.1e}" for k, v in exact.items()))

# %% [markdown]
# A difference of zero means bit for bit the same. Where it is not zero, the numbers are the
# same sums taken in another order (the router's gradient is a sum over ranks), which float32
# rounds a little differently.
#
# The same holds for training. Here is lesson 08's model trained on one process, with the same
# global batches and seed as the dropless run on two:

# %%
from moe_course.device import seed_everything
from moe_course.training import LMTask, train
from moe_course.transformer import GPT

seed_everything(train_config.seed)
one = train(GPT(dropless), LMTask(corpus, dropless.block_size, eval_rows=32, eval_chunk=train_config.batch_size), train_config, progress=False)
two = traffic_dropless[0]["history"]
side = pd.DataFrame({"step": two["step"], "train loss, 2 processes": two["train_loss"], "train loss, 1 process": one.history["train_loss"],
                     "held-out loss, 2 processes": two["val_loss"], "held-out loss, 1 process": one.history["val_loss"]})
gap = max((two[c] - one.history[c]).abs().max() for c in ("train_loss", "val_loss"))
print(f"largest difference between the two loss curves: {gap:.1e} ("
      + ("equal up to float round-off" if gap < TOLERANCE else "they differ") + ")")
side.style.format({c: "{:.5f}" for c in side.columns if c != "step"}).hide(axis="index")

# %% [markdown]
# ### The busiest hospital sets the pace
#
# An all-to-all is a meeting: nobody leaves before everybody has handed over their rows. If
# one hospital's doctors get most of the patients, the others finish early and wait for it.
# The fourth job steered the routing: every rank sends a share p of its tokens to rank 0's
# experts and the rest to rank 1's (p = 0.5 is balance, p = 1.0 sends everyone to rank 0), and
# timed the layer's forward and backward, five times per share, the shares taking turns. Two
# clocks: the **wall clock** of the whole step, and each rank's **work**, the CPU time it
# spent computing (a rank waiting in an exchange sleeps and uses none).

# %%
from moe_course.figures.beyond_plots import imbalance_bars

timings = pd.DataFrame([row for rank_rows in imbalance for row in rank_rows])
summary = (timings.groupby(["share", "rank"])
           .agg(**{"work (CPU ms)": ("cpu_seconds", "median"), "step (ms)": ("step_seconds", "median"),
                   "rows received": ("received", "median")})
           .reset_index())
summary[["work (CPU ms)", "step (ms)"]] *= 1e3
imbalance_bars(summary, title="one hospital gets more and more of the patients");
summary.style.format({"work (CPU ms)": "{:.0f}", "step (ms)": "{:.0f}", "rows received": "{:,.0f}"}).hide(axis="index")

# %%
import os

at = summary.set_index(["share", "rank"])
lo, hi = min(SHARES), max(SHARES)
rows_ratio = at.loc[(hi, 0), "rows received"] / at.loc[(lo, 0), "rows received"]
print(f"rank 0's doctors received {rows_ratio:.1f} times the rows at share {hi:.0%} as at {lo:.0%}; rank 0's work went from "
      f"{at.loc[(lo, 0), 'work (CPU ms)']:.0f} to {at.loc[(hi, 0), 'work (CPU ms)']:.0f} ms, rank 1's from "
      f"{at.loc[(lo, 1), 'work (CPU ms)']:.0f} to {at.loc[(hi, 1), 'work (CPU ms)']:.0f} ms")
busiest = summary.groupby("share")["work (CPU ms)"].max()
pace = busiest[hi] / busiest[lo]
print(f"the busiest rank's work: {busiest[lo]:.0f} ms balanced, {busiest[hi]:.0f} ms lopsided ({pace:.2f} times). On separate devices, "
      "each rank computing on its own processor, a step cannot be shorter than that.")
wall = at.loc[(hi, 0), "step (ms)"] / at.loc[(lo, 0), "step (ms)"]
load = f" (load average over the last minute: {os.getloadavg()[0]:.1f})" if hasattr(os, "getloadavg") else ""
if wall > 1.2:
    print(f"Here the wall-clock step grew too, {wall:.2f} times: the busiest rank set the pace.")
else:
    print(f"Here the wall-clock step changed by a factor {wall:.2f} only: both processes share this machine's {os.cpu_count()} cores{load}, "
          "so while rank 1 waits, its core is free for rank 0. On a shared machine the imbalance shows in the work, not in the wall clock.")

# %% [markdown]
# On separate devices every idle moment of a waiting rank is paid for, and a model with many
# ranks waits for the slowest of all of them at every layer. This is the second reason for the
# balance loss of lesson 05: not only does an idle doctor waste memory, an overloaded one holds
# up every other hospital. (Capacity-padded exchanges cap the work instead, by dropping tokens.)
#
# ### When one machine is not enough
#
# Everything above ran two processes from a notebook. A training script runs the same model
# with PyTorch's launcher, `torchrun`, one process per device; the course's training command
# takes the same flags as `moe-train` (README: "Training larger models"):
#
# ```bash
# .venv/bin/torchrun --standalone --nproc-per-node 2 -m moe_course.train \
#     --model switch --experts 8 --capacity-factor none --steps 2000 --out runs/switch8-ep2
# ```
#
# Each process builds the model from the same seed, keeps its share of the experts, takes its
# share of every batch and sums the replicated gradients with the others; dropless, its loss
# curve equals one process's (the package's tests compare them step by step). For real scale,
# the README's section **"When one machine is not enough"** maps this model onto the engines
# that do the same two exchanges with more care: **torchtitan** (PyTorch's own; the same token
# dispatcher: sort, count exchange, uneven all-to-all), **Megatron-Core** (dropless by default,
# grouped matrix products for the experts) and **DeepSpeed-MoE** (capacity-padded, equal
# splits). On GPUs the backend is NCCL, the exchange runs over NVLink or InfiniBand, and the
# dropless split sizes cost a host-device synchronisation per layer, which those engines hide
# or avoid by padding.

# %% [markdown]
# ## Part 2 · Soft MoE: no referrals, blended waiting rooms
#
# Routing is a discrete choice, and discrete choices bring all of lessons 05 and 06 with them:
# dropped tokens, balance losses, sorting and exchanges. **Soft MoE** (Puigcerver et al. 2023,
# arXiv:2308.00951) avoids the choice. Each expert owns a few **slots**. Every slot is a
# weighted average of *all* the tokens of the sequence (the **dispatch** weights, a softmax
# over the tokens), the experts run on their slots, and every token gets back a weighted
# average of *all* the slot outputs (the **combine** weights, a softmax over the slots). Both
# come from the same logits, one number per (token, slot) pair (exercise 9.3):

# %%
from moe_course.variants.soft_moe import soft_moe, soft_moe_weights

show_source(soft_moe_weights)
show_source(soft_moe)

# %% [markdown]
# In the hospital: no patient is referred anywhere. Each doctor examines a few composite
# patients, each a blend of everybody in the waiting room, and every patient's diagnosis is a
# blend of all the doctors' findings. Nothing is dropped and nothing needs balancing; every
# weight gets a gradient. The experts' cost is fixed by the number of slots, not by the tokens.
#
# ### Why it cannot write text one token at a time
#
# A language model must not see the future: the output at position i may depend on tokens
# 0 … i only. Lesson 07 checked that for attention by changing one token and watching which
# outputs move. The same test (`influence_matrix`) for three layers on one random sequence of
# 12 tokens: a Soft MoE layer, a token-choice MoE layer and causal self-attention. A coloured
# cell [i, j] means output i moved when token j changed; cells above the diagonal are the
# future changing the past.

# %%
from moe_course.attention import CausalSelfAttention
from moe_course.figures.beyond_plots import influence_maps
from moe_course.moe import MoEConfig, MoELayer
from moe_course.variants.soft_moe import SoftMoE, SoftMoEConfig, influence_matrix

torch.manual_seed(0)
T, D = 12, 16
x = torch.randn(1, T, D)
soft = SoftMoE(SoftMoEConfig(d_model=D, d_ff=32, num_experts=4, slots_per_expert=2))
routed = MoELayer(MoEConfig(d_model=D, d_ff=32, num_experts=4, capacity_factor=None))
attention = CausalSelfAttention(D, n_heads=2)
maps = {"Soft MoE": influence_matrix(lambda s: soft(s).y, x),
        "token-choice MoE (top-1, dropless)": influence_matrix(lambda s: routed(s).y, x),
        "causal self-attention": influence_matrix(attention, x)}
influence_maps(maps, title="which outputs move when one token changes");
for name, m in maps.items():
    future = int((m.triu(diagonal=1) > 1e-6).sum())
    print(f"{name}: {future} of {T * (T - 1) // 2} cells above the diagonal moved"
          + (" — future tokens change earlier outputs: not causal" if future else ""))

# %% [markdown]
# Soft MoE's slots mix the whole sequence, so every output depends on every token, future ones
# included. For images (the paper's setting) that is harmless: all patches of an image are
# there at once. For a language model generating text one token at a time it rules Soft MoE
# out as it stands, the same objection lesson 05 raised against expert choice. A token-choice
# layer only ever looks at the token itself (the diagonal), as long as nothing is dropped.
#
# ### On the clinic
#
# Patients have no sequence, so `ClinicSoftMoE` makes one: every 32 consecutive patients
# share a waiting room (a group), and the slots blend the patients of their group. With 4
# experts and 8 slots each there are as many slots as patients in a group, so the experts do
# the work of one expert pass per patient, as the Switch layer does. The next cell trains the
# clinic models of this part and the next, five seeds each, two at a time in worker processes:
# the Switch layer of lesson 05 (4 experts), Soft MoE, and the two adaptive routers of Part 3.

# %%
from moe_course.data.clinic import make_clinic
from moe_course.experiments.variants import VariantRun, run_variants
from moe_course.training import CLINIC_LR
from moe_course.variants.adaptive import AdaptiveMoEConfig

clinic = make_clinic(num_specialties=4, seed=0)
GROUP = 32  # patients per waiting room (Soft MoE)
MODELS = {
    "Switch": MoEConfig(d_model=32, d_ff=32, num_experts=4),
    "Soft MoE": SoftMoEConfig(d_model=32, d_ff=32, num_experts=4, slots_per_expert=GROUP // 4),
    "top-p": AdaptiveMoEConfig(d_model=32, d_ff=32, num_experts=4, router="top_p", top_p=0.8, entropy_loss_coef=1e-3),
    "null experts": AdaptiveMoEConfig(d_model=32, d_ff=32, num_experts=4, router="null", top_k=2, num_null=2),
}
SEEDS = (0, 1, 2, 3, 4)
clinic_config = TrainConfig(steps=400 * SCALE, batch_size=128, lr=CLINIC_LR, eval_every=400 * SCALE)
results = run_variants(clinic, [VariantRun(label, cfg, seed, group_size=GROUP) for seed in SEEDS for label, cfg in MODELS.items()],
                       clinic_config)
by_label = {label: [r for r in results if r.run.label == label] for label in MODELS}

# %% [markdown]
# Two measurements for Switch and Soft MoE: the held-out accuracy, and the **waiting-room
# test**: seat the held-out patients in random order four times, so that each patient sits
# with different company each time, and count how often a patient's diagnosis differs between
# two seatings (`waiting_room_effect`). A doctor who looks at each patient alone gives the same
# answer whoever else is waiting.

# %%
from moe_course.experiments.variants import waiting_room_effect
from moe_course.flops import moe_layer_flops
from moe_course.variants.soft_moe import soft_moe_flops_per_token

rows = []
for label in ("Switch", "Soft MoE"):
    for r in by_label[label]:
        effect = waiting_room_effect(r.model, clinic.val)
        rows.append({"model": label, "seed": r.run.seed, **effect})
rooms = pd.DataFrame(rows)
rooms.groupby("model", sort=False).agg(["mean", "min", "max"]).drop(columns="seed").style.format("{:.3f}")

# %%
soft_cfg = MODELS["Soft MoE"]
soft_flops = soft_moe_flops_per_token(soft_cfg.d_model, soft_cfg.d_ff, soft_cfg.num_experts, soft_cfg.slots_per_expert, GROUP)
switch_flops = moe_layer_flops(1, 32, 32, 4)
print(f"forward FLOPs per patient in the layer: Switch {switch_flops:,}, Soft MoE {soft_flops['total']:,.0f} "
      f"(of which the experts {soft_flops['experts']:,.0f}, the mixing {soft_flops['mixing']:,.0f})")
m = rooms.groupby("model")[["accuracy", "changed between two waiting rooms"]].agg(["mean", "min", "max"])
for label in ("Switch", "Soft MoE"):
    a, c = m.loc[label, "accuracy"], m.loc[label, "changed between two waiting rooms"]
    print(f"{label}: accuracy {a['mean']:.1%} (seeds {a['min']:.1%}–{a['max']:.1%}); diagnosis differs between two seatings for "
          f"{c['mean']:.1%} of patients (seeds {c['min']:.1%}–{c['max']:.1%})")
ahead = sum(s > w for s, w in zip(rooms.loc[rooms.model == "Soft MoE", "accuracy"], rooms.loc[rooms.model == "Switch", "accuracy"]))
print(f"Soft MoE more accurate than Switch on {ahead} of {len(SEEDS)} seeds")

# %% [markdown]
# If Soft MoE's diagnoses change with the company while the Switch layer's never do, the
# blend is doing what it says: a patient's answer depends on who else was in the waiting room.
# In a clinic, or in a language model, that is a defect; for an image, whose patches always
# arrive together, it is how the layer shares information. The accuracy lines say what the
# blend cost or bought on this task, with the same expert FLOPs per patient as the Switch layer
# (the mixing adds its own, printed above).
#
# What do the weights look like? One waiting room of held-out patients, in the trained Soft
# MoE of the median seed by accuracy, rows sorted by specialty:

# %%
from moe_course.figures.beyond_plots import soft_moe_weight_maps

ranked = sorted(by_label["Soft MoE"], key=lambda r: (r.accuracy, r.run.seed))
median = ranked[len(ranked) // 2]
group = slice(0, GROUP)  # the first waiting room of the held-out patients
with torch.no_grad():
    out = median.model(clinic.val.x[group]).moe  # one group: dispatch and combine (1, GROUP, S)
order = torch.argsort(clinic.val.specialty[group], stable=True)
names = [clinic.specialties[s] for s in clinic.val.specialty[group][order].tolist()]
soft_moe_weight_maps(out.dispatch[0][order], out.combine[0][order], names, slots_per_expert=soft_cfg.slots_per_expert,
                     title=f"Soft MoE's weights in one waiting room (seed {median.run.seed}, the median by accuracy)");
top_share = out.dispatch[0].max(0).values  # (S,) the largest weight in each slot's column
print(f"the largest single patient's weight in a slot: median {top_share.median():.2f} over the {top_share.numel()} slots "
      f"(1/{GROUP} = {1 / GROUP:.3f} would be an even blend)")

# %% [markdown]
# If a slot's column is dark on a few rows only, that slot is close to one or a few patients
# and its doctor examines something near a real patient; an evenly shaded column is a true
# blend of the room. Where the rows of one specialty light up the same slots, the GP-free
# layer has found the departments by itself.
#
# ## Part 3 · Adaptive computation: harder cases get more care
#
# The essay ends by asking for a mixture that spends more on harder problems. Every router so
# far gives every token the same number of experts: k. A **top-p** router (Huang et al. 2024,
# arXiv:2403.07652) gives each token its most likely experts until their probabilities add up
# to p. A GP who is sure sends the patient to one doctor; a GP torn between departments sends
# the patient to several (exercise 9.4):

# %%
from moe_course.variants.adaptive import top_p_routing

show_source(top_p_routing)

# %% [markdown]
# Three patients at p = 0.6: the GP is sure of the first, torn over the second, and sure of
# the third in a different way.

# %%
probs = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.05, 0.9, 0.05]])
picked = top_p_routing(probs.log(), 0.6)
for n in range(len(probs)):
    used = picked.expert_index[n][picked.keep[n]].tolist()
    print(f"patient {n}: probabilities {[round(v, 2) for v in probs[n].tolist()]} → doctors {used} ({len(used)} of them)")

# %% [markdown]
# A second way, AdaMoE's **null experts** (Zeng et al. 2024, arXiv:2406.13233): the router
# picks k of E real experts *and* Z null experts that do nothing and cost nothing. A token
# whose picks include null experts uses fewer real ones, possibly none. Expert choice
# (lesson 05) is a third: each expert picks its tokens, so a token may get zero, one or several
# experts, but that choice reads the whole batch, future tokens included.
#
# Both routers trained in Part 2's training cell. Top-p uses p = 0.8 and, as the paper
# recommends, a small loss on the router's entropy: without it, the GP could buy every patient
# more doctors by simply being unsure. Which patients get more doctors?
#
# A clinic patient's **referral letter** is the context part of its vector, the faint cue that
# tells which department it belongs to. `blur_referrals` moves each letter a fraction of the
# way toward another department's typical letter: at 0 the letter is clear, at 0.5 it sits
# halfway between two departments. The measurements, and so the true diagnosis, stay as they
# were. A GP that spends care where it is unsure should send blurred patients to more doctors.

# %%
from moe_course.experiments.variants import compute_profile
from moe_course.figures.beyond_plots import accuracy_by_experts, compute_vs_ambiguity

BLUR = (0.0, 0.25, 0.5)
profiles = {(label, r.run.seed): compute_profile(r.model, clinic, clinic.val, BLUR)
            for label in ("top-p", "null experts") for r in by_label[label]}
blur_table = pd.DataFrame([{"router": label, "seed": seed, "blur": b, "experts per patient": v,
                            "accuracy": prof["accuracy_by_blur"][b]}
                           for (label, seed), prof in profiles.items() for b, v in prof["by_blur"].items()])
compute_vs_ambiguity(blur_table, title="how many doctors a patient sees, as the referral letter gets less clear");
blur_table.pivot_table(index=["router", "seed"], columns="blur", values="experts per patient").style.format("{:.2f}")

# %%
for label in ("top-p", "null experts"):
    wide = blur_table[blur_table.router == label].pivot(index="seed", columns="blur", values="experts per patient")
    rising = int((wide.diff(axis=1).iloc[:, 1:] > 0).all(axis=1).sum())
    print(f"{label}: {wide[BLUR[0]].mean():.2f} experts per patient with clear letters, {wide[BLUR[-1]].mean():.2f} halfway between "
          f"departments (seeds {wide[BLUR[-1]].min():.2f}–{wide[BLUR[-1]].max():.2f}); rising with the blur on {rising} of {len(wide)} seeds")
acc = blur_table.groupby(["router", "blur"])["accuracy"].mean().unstack()
print("held-out accuracy by blur (mean over seeds): " + "; ".join(f"{r}: " + ", ".join(f"{v:.1%}" for v in acc.loc[r]) for r in acc.index))
falls = bool((acc.diff(axis=1).iloc[:, 1:] < 0).all().all())
print("the accuracy falls with the blur for " + ("every router" if falls else "not every router"))

# %% [markdown]
# Read the verdict lines. If top-p's line rises on every seed, the GP has learned to call in
# more doctors exactly when the letter does not say where the patient belongs: care follows
# uncertainty. If the null-expert router's line stays flat, its extra compute goes elsewhere:
# it decides how many real doctors a patient gets by other means than the letter's clarity.
# If the accuracy falls with the blur for both routers, more doctors soften the damage of a
# letter that points toward the wrong department but cannot undo it.
#
# And for the patients as they come (clear letters): are the ones who get more doctors the
# harder ones?

# %%
rows = []
for (label, seed), prof in profiles.items():
    if label != "top-p":
        continue
    for k in prof["share_by_experts"].index:
        rows.append({"seed": seed, "experts used": k, "share of patients": prof["share_by_experts"][k],
                     "accuracy": prof["accuracy_by_experts"][k]})
by_k = pd.DataFrame(rows)
accuracy_by_experts(by_k[by_k["share of patients"] > 0], title="top-p: accuracy of the patients who saw k doctors");
mean_k = by_k.dropna().groupby("experts used")["accuracy"].mean()
falling = sum(bool((grp.dropna().sort_values("experts used")["accuracy"].diff().dropna() < 0).all()) for _, grp in by_k.groupby("seed"))
print("top-p, accuracy by doctors seen (mean over seeds): " + ", ".join(f"{k}: {v:.1%}" for k, v in mean_k.items()))
print(f"accuracy falls with every extra doctor on {falling} of {len(SEEDS)} seeds")
spec = pd.DataFrame({seed: prof["by_specialty"] for (label, seed), prof in profiles.items() if label == "top-p"})
print("top-p, experts per patient by specialty (mean over seeds): " + ", ".join(f"{s} {v:.2f}" for s, v in spec.mean(axis=1).items()))

# %% [markdown]
# If accuracy falls as the number of doctors rises, the GP's extra care goes to the cases that
# are hard for the whole hospital: even with two or three doctors these patients are diagnosed
# less often than the clear ones with one. That is the essay's last idea at the size of the
# clinic: **parameters are knowledge, compute is intelligence, and an adaptive GP spends the
# compute where the case needs it.** The specialty line shows whether some departments get
# more care on average. The four departments' rules are drawn the same way, so no department
# is harder by design; if their numbers are close, it is the clarity of the individual letter,
# not the department, that decides the care.
#
# ## Recap
#
# - Large MoE models spread their experts over devices (expert parallelism): each rank holds
#   E/W experts and a copy of the rest; tokens travel to their experts and back in two
#   all-to-all exchanges whose split sizes are the transpose of each other, and the backward
#   pass is the same exchange with the splits swapped. It computes what one process computes.
# - The exchange costs bytes in proportion to D and K (and the capacity factor, when padded),
#   and time in proportion to the busiest rank's work: balance matters twice.
# - Soft MoE blends instead of routing: no drops, no balance loss, but every output depends on
#   the whole group, so it is not causal. Adaptive routers give tokens different amounts of
#   compute, and a top-p GP gives more of it to the unclear cases.
#
# **Exercises:** `exercises/09_beyond_one_machine.ipynb`: the split sizes of the exchange, the
# backward of the all-to-all (with W ranks simulated in one process), Soft MoE's dispatch and
# combine weights, and a top-p router's mask.
#
# **Next:** lesson 10, modern MoE practice: top-2 with SwiGLU experts (Mixtral), fine-grained
# and shared experts (DeepSeekMoE), balancing without an auxiliary loss, and upcycling a
# trained dense model.
#
# **Read more:** Lepikhin et al. 2020, *GShard: Scaling Giant Models with Conditional
# Computation and Automatic Sharding*, arXiv:2006.16668 (experts sharded over devices,
# all-to-all dispatch, capacity); Fedus, Zoph and Shazeer 2021, *Switch Transformers*,
# arXiv:2101.03961 (expert, data and model parallelism, capacity factor); Rajbhandari et al.
# 2022, *DeepSpeed-MoE*, arXiv:2201.05596; Gale et al. 2022, *MegaBlocks: Efficient Sparse
# Training with Mixture-of-Experts*, arXiv:2211.15841 (dropless); Hwang et al. 2022, *Tutel*,
# arXiv:2206.03382 (adaptive parallelism and capacity); Puigcerver et al. 2023, *From Sparse to
# Soft Mixtures of Experts*, arXiv:2308.00951; Zhou et al. 2022, *Mixture-of-Experts with
# Expert Choice Routing*, arXiv:2202.09368; Huang et al. 2024, *Harder Tasks Need More
# Experts: Dynamic Routing in MoE Models*, arXiv:2403.07652; Zeng et al. 2024, *AdaMoE:
# Token-Adaptive Routing with Null Experts for Mixture-of-Experts Language Models*,
# arXiv:2406.13233; Graves 2016, *Adaptive Computation Time for Recurrent Neural Networks*,
# arXiv:1603.08983.
