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
# # 06 · Running the clinic efficiently: fast dispatch
#
# A top-1 MoE layer does exactly as much arithmetic per token as **one** dense
# feed-forward block of an expert's width: each patient sees one doctor. So in principle
# it can run as fast as that dense block. Everything it costs beyond that is
# **dispatch overhead**: the GP's paperwork of sending patients to doctors and the answers
# back. This lesson is about keeping the paperwork cheap.
#
# **In this lesson you will**
#
# - see four ways to move tokens to their experts and back, each with a picture of where
#   the tokens go;
# - check that all four give the same outputs and gradients;
# - benchmark them against a dense FFN of the same active width, as ratios measured side
#   by side in one run;
# - measure why the one-hot formulation is a poor fit for a CPU: its memory grows with
#   E × C.

# %%
import pandas as pd
import torch

from moe_course import get_device, seed_everything
from moe_course.figures.plots import use_course_style

# ---- the one knob of this lesson -------------------------------------------
# 1 benchmarks small layers in well under a minute. 4 uses the standard sizes of
# `python -m moe_course.bench` (takes several minutes): the gaps between the
# implementations widen as the layers grow.
SCALE = 1
# -----------------------------------------------------------------------------

device = get_device()
seed_everything(0)
use_course_style()

# %% [markdown]
# ## Where the tokens go
#
# Eight patients, three doctors, each patient already assigned by the GP. Four ways to
# organise the visits:
#
# 1. **Masks in a loop.** Each doctor walks through the whole waiting room asking "are you
#    mine?" (a boolean mask), sees those patients, and writes the answers back. Easy to
#    write; the loop and the masks cost extra for every doctor.
# 2. **One-hot dispatch and combine** (GShard). A giant seating chart with a seat for every
#    patient at every doctor's every chair: an (N, E, C) tensor that is almost all zeros.
#    Two einsums move patients in and answers out. Elegant on TPUs; on a CPU the chart
#    itself is the cost.
# 3. **A padded buffer.** Every doctor gets the same number of chairs C (the busiest
#    doctor's queue); the rest stay empty but are still "examined" by a batched matmul.
# 4. **Sort by doctor.** Patients line up by doctor, so each doctor's patients form one
#    contiguous block; one grouped matrix multiplication serves all blocks at once, then
#    the answers are put back in the original order.

# %%
from moe_course.figures.plots import dispatch_picture

example = torch.tensor([2, 0, 1, 2, 2, 0, 1, 2])  # the expert of tokens t0 … t7
dispatch_picture(example, num_experts=3);

# %% [markdown]
# Read the picture left to right. Sorting (2) keeps every token exactly once. The padded
# buffer (3) wastes the hatched slots, because the busiest expert sets C for everyone. The
# one-hot tensor (4) has N × E × C entries for N tokens: here 8 × 12, almost all zeros.
#
# The sort-based path is made of three small steps, the ones you write in the exercises:
# sorting the assignments by expert (the order and the block sizes; `sort_by_expert`), the
# expert matmuls on each block, and `combine_rows` (answers back to their tokens, weighted
# by the gate). `sort_dispatch` is that path written to be read, and it is what `MoELayer`
# computes:

# %%
from moe_course import dispatch as D
from moe_course.show import show_source

show_source(D.sort_dispatch)

# %% [markdown]
# For speed, the layer runs the same computation from `moe_course.fast`, the package's fast
# path: the layer's default method (printed below) takes it wherever `fast.applies` says it
# may, and falls back to `sort_dispatch` everywhere else. The fast op computes the same
# blocks with a hand-written backward, and on several cores when there are many small
# blocks (the last part of this lesson). `with fast.enabled(False):` runs the readable code
# instead, to compare or to debug. This is where the fast path plugs in:

# %%
from moe_course import fast

print(f"MoELayer's default dispatch method: {D.DEFAULT_METHOD!r}; the fast path is in moe_course.fast: "
      f"{', '.join(sorted(fast.METHODS))}")
show_source(D._fast_method)

# %% [markdown]
# For comparison, the common loop-over-experts style:

# %%
show_source(D.masks_loop)

# %% [markdown]
# ## Same answers, every way
#
# All implementations must compute the same function, including its gradients: for the
# input, for the router (through the gates) and for every expert weight. Here they are on
# a top-2 routing with a capacity limit, so some assignments are dropped.

# %%
from moe_course.experts import Experts
from moe_course.routing import capacity_mask, top_k_routing

torch.manual_seed(0)
experts = Experts(num_experts=4, d_model=16, d_ff=32)
x = torch.randn(40, 16)
routing = top_k_routing(torch.randn(40, 4), k=2)
keep = capacity_mask(routing.expert_index, 4, capacity=12).keep  # (N, K)
print(f"assignments dropped for lack of capacity: {int((~keep).sum())} of {keep.numel()}")


def outputs_and_grads(method):
    xs = x.clone().requires_grad_()
    gates = routing.gates.clone().requires_grad_()
    experts.zero_grad(set_to_none=True)
    y = method(xs, experts, routing.expert_index, gates, keep)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return [y.detach(), xs.grad, gates.grad, experts.w_in.grad, experts.w_out.grad]


reference = outputs_and_grads(D.masks_loop)
rows = []
for name, method in {**D.METHODS, "sort_dispatch (the readable one)": D.sort_dispatch}.items():
    got = outputs_and_grads(method)
    diff = max((a - b).abs().max().item() for a, b in zip(got, reference))
    rows.append({"implementation": name, "largest difference to masks_loop (y and all gradients)": diff})
print(f"float32 keeps about 7 significant digits: the gap between 1.0 and the next float32 is "
      f"{torch.finfo(torch.float32).eps:.1e}")
pd.DataFrame(rows)

# %% [markdown]
# If the differences are of the order of float32's gap times the size of the values (a few
# of the last digits), the implementations compute the same function and only add up in a
# different order. The package's tests check this for top-1 and top-2, with and without
# capacity, with an idle expert and with every token on one expert.
#
# ## The race
#
# Now time them. The benchmark runs a dense `FeedForward` of the same active width (top-1:
# one expert's width) and a full `MoELayer` (router, routing and balance losses included)
# with each dispatch implementation, plus Hugging Face's Switch layer as an outside peer.
# After a warm-up, every implementation runs in **pairs** with a fresh run of the dense
# layer, and we keep the median of the paired ratios: when a noisy neighbour slows the
# machine for a second, it slows both halves of a pair, and their ratio hardly moves. The
# **ratios** are what to read; the milliseconds depend on your machine and its mood.

# %%
from moe_course.bench import STANDARD, BenchConfig, format_table, run_benchmark

configs = [BenchConfig(2048, 128, 512, 8), BenchConfig(2048, 64, 256, 32)] if SCALE == 1 else list(STANDARD)
results = run_benchmark(configs, repeats=3 * SCALE, warmup=1, memory=False, log=None)
print(format_table(results))

# %%
import matplotlib.pyplot as plt
import seaborn as sns

timed = results[results["mode"] == "forward+backward"]
ax = plt.figure(figsize=(9, 4)).gca()
sns.barplot(timed, y="implementation", x="ratio_to_dense", hue="config", ax=ax)
ax.axvline(1.0, color="black", lw=1, ls="--")
ax.set_xscale("log")
ax.set(title="Forward + backward time, relative to a dense FFN of the same active width",
       xlabel="time ÷ dense time, log scale (1.0 = as fast as the dense layer; lower is better)", ylabel="")
ax.legend(title=None, fontsize=8);

# %% [markdown]
# The ranking of this run, read from the table, and a verdict on `MoELayer`'s default
# dispatch. Two implementations are told apart only when the middle halves of their paired
# ratios do not overlap; otherwise the difference is within this run's noise.

# %%
for config, part in timed.groupby("config", sort=False):
    ranked = part[part["implementation"] != "dense"].sort_values("ratio_to_dense").reset_index(drop=True)
    print(f"{config}, fastest first (time ÷ dense time; middle half of the pairs in brackets):")
    for place, row in ranked.iterrows():
        tag = "   <- MoELayer's default" if row["implementation"] == D.DEFAULT_METHOD else ""
        print(f"  {place + 1}. {row['implementation']:<14}{row['ratio_to_dense']:6.2f}x "
              f"({row['ratio_q1']:.2f}-{row['ratio_q3']:.2f}){tag}")
    best, default = ranked.iloc[0], ranked[ranked["implementation"] == D.DEFAULT_METHOD].iloc[0]
    if best["implementation"] == D.DEFAULT_METHOD:
        verdict = "the default is the fastest"
    elif default["ratio_q1"] <= best["ratio_q3"]:
        verdict = f"the default is within this run's noise of the fastest ({best['implementation']})"
    else:
        verdict = f"the default is clearly behind {best['implementation']} in this run"
    masks = ranked[ranked["implementation"] == "masks_loop"].iloc[0]
    if default["ratio_q3"] < masks["ratio_q1"]:
        verdict += ", and clearly faster than the masks loop"
    elif default["ratio_q1"] > masks["ratio_q3"]:
        verdict += ", and clearly SLOWER than the masks loop (a busy machine, or a size where its bookkeeping dominates)"
    else:
        verdict += ", and not clearly faster than the masks loop"
    print(f"  verdict: {verdict}.\n")

# %% [markdown]
# How to read your numbers. The reasons below are conditions, not results: check each
# against the ranking above.
#
# - The masks loop pays a little for every expert (a mask over all N tokens, a gather and a
#   scatter), so if it falls behind, it should fall further behind as E grows.
# - The one-hot einsum's seating chart grows with N × E × C, so wherever it is far behind,
#   more tokens or more experts make it worse.
# - Every expert adds a cost of its own on top of its arithmetic: Python hands each of its
#   small matmuls to PyTorch separately, a few microseconds each time, and a small matmul
#   runs further from the machine's top speed than a big one. When the dense layer itself
#   takes only a few milliseconds, as here, these costs can outweigh the arithmetic, and
#   then `grouped_mm` or `padded_bmm`, whose loops over the experts run in C++, can lead.
# - A busy machine moves everything: if another program takes a core halfway through a
#   pair, even a paired ratio shifts, and the middle halves widen. Rerun the cell when the
#   verdicts surprise you. If every `MoELayer` row sits far below 1.0, the machine was
#   busy: the MoE layer noticed and changed how it uses the cores (section "When the cores
#   are not yours" below), the dense layer did not.
#
# At the standard sizes (`SCALE = 4`, or `python -m moe_course.bench`) the layers are
# bigger, so the arithmetic weighs more against the per-expert costs and the sort-based
# paths should move towards the dense line; run it and read its table the same way.
#
# ### The GP's own paperwork: one product, two shapes
#
# With 8 experts, what is left above the dense line is small items: sorting, gathering
# the tokens and putting the answers back, and the GP itself. The router is a matmul with
# only E = 8 columns, and its weight gradient x^T · (∂L/∂logits) can be written two ways
# that give the same numbers: as written, or as (∂L/∂logits^T · x)^T, transposed twice.
# The arithmetic is identical; the CPU matmul library handles one arrangement of these
# skinny matrices far better than the other.

# %%
from moe_course.bench import paired_times

x_router = torch.randn(4096, 256)  # (N, D) tokens
dlogits = torch.randn(4096, 8)  # (N, E) gradient at the router logits
as_written = x_router.t() @ dlogits  # (D, E)
transposed_twice = (dlogits.t() @ x_router).t()  # (D, E)
print(f"largest difference {(as_written - transposed_twice).abs().max():.1e}, on values up to "
      f"{as_written.abs().max():.0f}: float32 rounding, the same numbers")


def ten_times(product):
    def run():
        for _ in range(10):
            product()
    return run


shapes = paired_times({"x.T @ dlogits": ten_times(lambda: x_router.t() @ dlogits),
                       "(dlogits.T @ x).T": ten_times(lambda: (dlogits.t() @ x_router).t())},
                      baseline="x.T @ dlogits", repeats=9, warmup=1)
print(f"(dlogits.T @ x).T takes {shapes['(dlogits.T @ x).T'].ratio:.2f}x the time of x.T @ dlogits")

# %% [markdown]
# If the ratio printed above is well below 1, the CPU's matmul library handles the second
# arrangement better on your machine. `MoELayer`'s router computes its weight gradient that
# way when it has fewer than 16 experts (`moe_course.fast.router_matmul`, while the fast path
# is on), and its forward product gets the same treatment: x @ w reads the weight as the transpose of a contiguous
# (E, D) copy. Such savings are small next to the whole layer, but the gap to the dense
# layer is made of such pieces. A matmul's speed depends on its shapes and memory layout,
# not only on its FLOPs: when a product is slow, try it the other way round.
#
# ### How close can a layer get? The GP's consult is not free
#
# The experts do exactly the dense layer's arithmetic per token, but the layer also runs
# the GP: the router's product x · W_r costs 2·D·E FLOPs per token, against 4·D·F for one
# doctor's visit, so the arithmetic floor of a top-1 layer sits E/(2F) above the dense
# line (its backward pass keeps the same proportion).

# %%
from moe_course.flops import ffn_flops, matmul_flops

for cfg in STANDARD[:2]:
    gp = matmul_flops(cfg.num_tokens, cfg.d_model, cfg.num_experts)  # router logits, (N, D) @ (D, E)
    doctors = ffn_flops(cfg.num_tokens, cfg.d_model, cfg.d_ff)  # each token sees one expert
    print(f"{cfg.name}: the GP's product adds {gp / doctors:.1%} to the doctors' arithmetic")

# %% [markdown]
# With 8 wide experts the consult is a sliver of the arithmetic; with 64 narrow ones it is a
# visible share. It can take an even larger share of the *time*: with only E columns, the
# router's matrices are skinny, and a skinny matmul runs further from the machine's top
# speed. Let us measure the rate of the router's product and of an expert's first matmul
# at the 64-expert standard sizes, side by side:

# %%
cfg = STANDARD[1]
x_big = torch.randn(cfg.num_tokens, cfg.d_model)  # (N, D)
w_router = torch.randn(cfg.d_model, cfg.num_experts)  # (D, E)
w_expert = torch.randn(cfg.d_model, cfg.d_ff)  # (D, F): as if every token saw one expert
products = paired_times({"expert (N, D) @ (D, F)": lambda: x_big @ w_expert,
                         "router (N, D) @ (D, E)": lambda: x_big @ w_router},
                        baseline="expert (N, D) @ (D, F)", repeats=7, warmup=1)
rates = {}
for name, t, cols in (("expert (N, D) @ (D, F)", products["expert (N, D) @ (D, F)"], cfg.d_ff),
                      ("router (N, D) @ (D, E)", products["router (N, D) @ (D, E)"], cfg.num_experts)):
    rates[name] = matmul_flops(cfg.num_tokens, cfg.d_model, cols) / min(t.seconds) / 1e9
    print(f"{name}: {rates[name]:.0f} GFLOP/s (its fastest of {len(t.seconds)} runs)")
slower = rates["router (N, D) @ (D, E)"] < rates["expert (N, D) @ (D, F)"]
print("the router's product runs " + ("slower" if slower else "no slower") + " per FLOP than the expert's")

# %% [markdown]
# If the router runs slower per FLOP, its share of the layer's time is larger than its share
# of the arithmetic, and a layer with many experts cannot get as close to the dense line as
# the FLOPs alone suggest. Keep this in mind when you read the benchmark: the distance to
# the dense line is not all dispatch overhead.
#
# ## Two nurses, one clinic: experts on separate cores
#
# Your laptop has several cores, and PyTorch splits every big operation over them. But
# with 64 experts each block holds only a few hundred tokens, and a small matmul split in
# two spends much of its time with one core waiting for the other. Picture two nurses who
# must help with *every* patient together: they spend the day waiting for each other.
# Better: each nurse takes her own doctors' patients.
#
# That is **expert parallelism**, the trick large MoE models use to put different experts
# on different GPUs (GShard, Switch), at the scale of one CPU. The default dispatch starts
# one thread per core, each allowed one core, and each thread takes the next expert off a
# shared queue whenever it is free. The busiest experts go first, so the last blocks to
# start are small ones and the threads finish at about the same time.
# Python threads are enough here, because PyTorch lets go of Python's global lock while
# it multiplies. It only does this when it pays: many busy experts with small blocks
# (`worth_threading`). With eight big blocks, one block at a time already keeps every core
# busy.

# %%
from moe_course.fast import expert_order, expert_threads, worth_threading
from moe_course.moe import MoEConfig, MoELayer

torch.manual_seed(0)
layer = MoELayer(MoEConfig(d_model=128, d_ff=512, num_experts=64))
tokens = torch.randn(4096 * SCALE, 128, requires_grad=True)
counts = layer(tokens).tokens_per_expert.tolist()
threads = torch.get_num_threads()
print(f"{threads} intra-op threads; tokens per expert from {min(counts)} to {max(counts)}")
print(f"the order the threads take them in, busiest first: {expert_order(counts)[:8]} ...")
print(f"worth running them on separate threads: {worth_threading(counts, 2 * 128 * 512)}")


def forward_backward():
    layer.zero_grad(set_to_none=True)
    layer(tokens).y.sum().backward()


def one_block_at_a_time():
    with expert_threads(False):
        forward_backward()


timed = paired_times({"one block at a time": one_block_at_a_time, "experts on separate cores": forward_backward},
                     baseline="one block at a time", repeats=9 * SCALE, warmup=1)
ratio = timed["experts on separate cores"]
print(f"experts on separate cores take {ratio.ratio:.2f}x the time of one block at a time "
      f"(middle half of the pairs: {ratio.ratio_q1:.2f}-{ratio.ratio_q3:.2f})")

# %%
if threads == 1:
    print("one intra-op thread: both ways are the same thing, so the ratio can only be noise around 1")
elif ratio.ratio_q3 < 1:
    print("for most pairs the separate cores were faster: expert parallelism pays at this size on this machine")
elif ratio.ratio_q1 > 1:
    print("for most pairs the separate cores were SLOWER here: the machine may be busy, or the blocks too big to gain")
else:
    print("the pairs go both ways: no clear difference at this size on this machine right now")

# %% [markdown]
# The gain, where there is one, grows with the number of small blocks: the standard
# benchmark's 64-expert layer (`python -m moe_course.bench`) measures it on the whole layer
# against the dense one.
#
# The results do not change: each thread writes only its own experts' rows and gradient
# slices, each expert's arithmetic is the same whichever thread does it, and the tests
# check the threaded layer against the masks loop, gradients included.
#
# ### When the cores are not yours: a busy laptop
#
# Two nurses who wait for each other after every patient are slow; they are slower still
# when one of them keeps being called away. On a laptop with a browser and a second
# notebook running, another program holds a core for a scheduler time slice at a time, and
# an operation split over both cores waits for it at its end. An MoE layer is many small
# operations, so it pays that wait many times; a dense layer is a few big ones. So before
# each call the default layer reads how many tasks want a core right now
# (`moe_course.fast.busy`). If other programs want some, the layer runs its small
# operations on one thread and its experts on one-thread workers that each take the next
# expert off the queue: a worker kept waiting delays only its own experts. The arithmetic
# is the same either way (the tests pin both cases with `moe_course.fast.contention`).

# %%
from moe_course.fast import busy
from moe_course.fast.shared_cores import core_count, runnable_tasks

print(f"tasks running or waiting for a core right now: {runnable_tasks()} on {core_count()} cores; "
      f"the layer would now run as on a {'busy' if busy() else 'quiet'} machine")

# %% [markdown]
# To see what this buys on your machine, `python -m moe_course.bench --busy 2` times the
# layer against its dense twin in interleaved rounds, quietly and with two spinning
# processes, and prints the pooled ratios side by side with the masks loop's.
#
# ## Why the one-hot chart is expensive: memory
#
# `moe_course.bench.memory.peak_bytes` records every tensor a piece of code creates and reports
# the most that were alive at once. We run the forward and backward pass of one layer's
# dispatch, one-hot versus sorted, first with more experts at a fixed number of slots C,
# then with more slots at a fixed number of experts.

# %%
from moe_course.bench.memory import peak_bytes
from moe_course.routing import switch_routing


def dispatch_memory(method, num_experts, capacity, n=1024, d=32, f=64):
    torch.manual_seed(0)
    bank = Experts(num_experts, d, f)
    tokens = torch.randn(n, d, requires_grad=True)
    route = switch_routing(torch.randn(n, num_experts))
    keep = capacity_mask(route.expert_index, num_experts, capacity).keep

    def run():
        if method == "onehot_einsum":
            y = D.onehot_einsum(tokens, bank, route.expert_index, route.gates, keep, capacity=capacity)
        else:
            y = D.METHODS[method](tokens, bank, route.expert_index, route.gates, keep)
        y.sum().backward()

    return peak_bytes(run) / 2**20


rows = []
for e in (2, 4, 8, 16, 32):
    for method in ("onehot_einsum", "grouped_mm"):
        rows.append({"sweep": "more experts (C = 64)", "x": e, "method": method, "MiB": dispatch_memory(method, e, 64)})
for c in (16, 32, 64, 128, 256):
    for method in ("onehot_einsum", "grouped_mm"):
        rows.append({"sweep": "more slots (E = 8)", "x": c, "method": method, "MiB": dispatch_memory(method, 8, c)})
memory = pd.DataFrame(rows)

fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
for ax, (sweep, part) in zip(axes, memory.groupby("sweep", sort=False)):
    sns.lineplot(part, x="x", y="MiB", hue="method", marker="o", ax=ax)
    ax.set(title=sweep, xlabel="experts E" if "experts" in sweep else "capacity C (slots per expert)",
           ylabel="peak extra memory, fwd + bwd (MiB)", xscale="log")
    ax.set_xticks(sorted(part["x"].unique()), labels=[str(v) for v in sorted(part["x"].unique())])
    ax.minorticks_off()
    ax.legend(title=None)
fig.suptitle("1024 tokens: the one-hot tensors grow with E × C; sorted dispatch barely grows", fontweight="bold")
fig.tight_layout()

# %%
memory.pivot_table(index=["sweep", "x"], columns="method", values="MiB", sort=False).round(2)

# %% [markdown]
# The one-hot line climbs with both E and C, because its dispatch and combine tensors are
# N × E × C. The sorted path holds each token once (plus its hidden activations) whatever C
# is; it grows with E only through the experts' own weight gradients. On accelerators built
# for dense einsums the one-hot trade can still pay in time, but its memory grows the same
# way everywhere, which is why dropless MoE libraries such as MegaBlocks sort tokens and
# use grouped (block-sparse) matrix multiplication.
#
# ## Recap
#
# - A top-1 MoE layer does the arithmetic of one dense FFN (plus the router's small
#   product); everything else is dispatch overhead, and the implementation decides how much.
# - Sorting tokens by expert lets each expert work on one contiguous block, with no masks
#   and no empty slots; a loop with masks pays per expert; one-hot dispatch pays N × E × C
#   in memory, and in time wherever that chart is large. Which one wins depends on the sizes
#   and the machine: the ranking of your run says it, not a table from someone else's.
# - All of them compute the same function, gradients included. `MoELayer` computes the
#   readable `sort_dispatch`, by default through the fast path (`DEFAULT_METHOD`, from
#   `moe_course.fast`; `fast.enabled(False)` runs the readable code), and the verdict above
#   says how the default fared in your run.
# - Many small expert blocks can run faster one core each (expert parallelism) than with
#   every core squeezed into each small matmul; the last verdict says whether they did.
#
# **Next:** lesson 07 adds the other half of a transformer block, attention, and trains a
# small GPT; lesson 08 swaps its feed-forward blocks for Switch layers.
#
# **Exercises:** `exercises/06_fast_dispatch.ipynb`: sort tokens by expert, combine the
# answers back, and find each token's slot in its expert's queue.
#
# **Read more:** Lepikhin et al. 2020, *GShard*, arXiv:2006.16668 (the one-hot
# formulation); Gale et al. 2022, *MegaBlocks: Efficient Sparse Training with
# Mixture-of-Experts*, arXiv:2211.15841 (dropless MoE with block-sparse kernels); Fedus,
# Zoph and Shazeer 2021, *Switch Transformers*, arXiv:2101.03961.
