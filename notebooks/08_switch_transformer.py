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
# Lesson 07 built a small GPT: blocks of attention (the ward meeting, where tokens read each
# other's notes) and a feed-forward block (the examination, where each token is seen alone).
# This lesson opens the hospital. The single examination room becomes a **Switch layer**: a
# GP (the router) sends each token to one of E specialists (the experts), each as big as the
# old room. A token still sees exactly one doctor on that floor, so it costs the same FLOPs as
# before; the floor as a whole holds E times the expertise.
#
# That is the bet of the Switch Transformer (Fedus, Zoph and Shazeer 2021, arXiv:2101.03961),
# and the essay this course follows puts it in one line: *parameters are knowledge, compute
# is intelligence*. A hospital with more specialists can **know** more, but each patient gets
# the same amount of **thinking**. This lesson measures both halves of that line, first where
# nothing else gets in the way, then in a language model:
#
# 1. **The phone book.** One layer has to remember which ward each patient belongs to (pure
#    knowledge), or to work the ward out from a rule (a skill). We compare a dense layer with
#    the FLOPs of one expert, a Switch layer, and a dense layer with the Switch layer's
#    parameters.
# 2. **The language model.** A dense GPT and two twins with experts (a Switch layer, and a
#    hash layer whose routing is fixed) race on the same stream of the clinic's records and
#    skills, over five seeds, and a table computed from the seeds gives the verdict per domain.
#
# **In this lesson you will**
#
# - measure, in one layer, whether experts buy memory (records remembered) at fixed FLOPs per
#   patient, and whether they buy skill (a rule applied to new patients);
# - add experts at fixed compute and see how recall follows the parameters;
# - swap the FFN of every second block of a GPT for an expert layer, count what each model
#   knows (parameters) and what a token costs (FLOPs), and race them;
# - look inside: which expert gets which domain, who holds the records, how sure the GP is,
#   and which records each trained model can answer.

# %%
import matplotlib.pyplot as plt
import pandas as pd
import torch

from moe_course.figures.plots import use_course_style

# ---- the one knob of this lesson -------------------------------------------
# SCALE = 1: the phone book trains its one-layer models, then the race trains fifteen small
# GPTs (2 blocks, width 64, 300 steps each); everything two at a time on two CPU cores.
# SCALE = 2, 3, ...: every language model trains SCALE times as many steps on the same table,
# so the race takes about SCALE times as long; the phone book stays as it is. Longer training
# lets every model learn more of the table. If every model ends up knowing the whole table,
# recall can no longer tell them apart and the records' answer loss (how sure each model is)
# carries the comparison; the verdict table says how the race changes.
SCALE = 1
# -----------------------------------------------------------------------------

torch.set_num_threads(1)  # small models run fastest on one thread; the runs below use one each
use_course_style()

# %% [markdown]
# ## Part 1 · The phone book
#
# Picture the clinic's records office. Every patient has a card with a patient key and the
# ward they were admitted to. There is no rule behind the wards: whoever admitted the patient
# decided. To answer "which ward is this patient in?" you must have **stored** the card. That
# is knowledge.
#
# Now picture a second office of the same size, where the ward follows from the patient by
# one rule, the same for everyone: four yes-or-no questions about the patient, whose answers,
# read as four bits, are the ward number. Nothing needs to be stored; the rule must be
# **worked out** for each patient, including patients nobody has seen before. That is a skill.
#
# `moe_course.phonebook` builds both with a single layer. A patient's key is a random vector
# of width D. The model is one feed-forward layer, dense or Switch, followed by a linear
# read-out to the wards:

# %%
from moe_course.experiments.phonebook import PhoneBookModel, rule_wards
from moe_course.show import show_source

show_source(PhoneBookModel.forward)

# %% [markdown]
# The Switch branch is the package's `MoELayer`, the very layer the language model below
# uses: a router in float32, top-1 with the raw gate, the balance and z-losses of lesson 05,
# here without a capacity limit (nobody is turned away). The dense branch is one expert that
# sees every patient.
#
# The rule, for the skill version (question j: is the patient's key far from zero along a
# fixed direction u_j, farther than for half of all patients?):

# %%
show_source(rule_wards)

# %% [markdown]
# Three layers take part. Their cost per patient (forward FLOPs, counting matrix products)
# and their size (parameters, the read-out included):
#
# - **dense, one expert's width**: the FLOPs-matched baseline;
# - **Switch**: E experts of that width; one per patient, so the same FLOPs plus the router's;
# - **dense, E experts' width**: the parameter-matched baseline, which costs E times the FLOPs.

# %%
from moe_course.experiments.phonebook import PhoneBookConfig, phone_book_flops, phone_book_params

RECORDS = PhoneBookConfig(task="records", num_records=1024, d_model=32, num_wards=16)  # 1,024 cards with random wards
RULE = PhoneBookConfig(task="rule", num_records=1024, d_model=32, num_wards=16)  # 1,024 new patients per step, one rule
F_ONE, E_SWITCH = 8, 8  # hidden units of one expert, and experts in the Switch layer
LAYERS = {  # label → (hidden width F, experts E)
    f"dense F={F_ONE}": (F_ONE, 1),
    f"Switch E={E_SWITCH}": (F_ONE, E_SWITCH),
    f"dense F={F_ONE * E_SWITCH}": (F_ONE * E_SWITCH, 1),
}
DENSE, SWITCH, WIDE = LAYERS
D, W = RECORDS.d_model, RECORDS.num_wards
pd.DataFrame({name: {"hidden width F": F, "experts E": E, "parameters": phone_book_params(D, F, E, W),
                     "FLOPs per patient": phone_book_flops(D, F, E, W)} for name, (F, E) in LAYERS.items()}).T

# %%
print(f"the records table holds {RECORDS.num_records:,} × log2({W}) = {RECORDS.bits:,.0f} bits of random wards")

# %% [markdown]
# Every model trains with Adam on the whole table at every step (records), or on a fresh
# batch of new patients at every step (rule). Records are judged by **recall**: every card of
# the table is asked for, and we count the right answers. The rule is judged on patients the
# model never saw. Each of five seeds draws its own table (or rule) and its own starting
# weights. On top of the three layers we train, for the records only and over three seeds,
# Switch layers with 2, 4 and 16 experts and dense layers of intermediate widths: they trace
# how recall grows with parameters.
#
# `run_phone_books` trains the runs two at a time, each in its own process on one thread.

# %%
from moe_course.experiments.phonebook import PhoneBookRun, phone_book_table, run_phone_books

SEEDS_PB = (0, 1, 2, 3, 4)
SEEDS_SWEEP = (0, 1, 2)
STEPS_PB = {"records": 150, "rule": 200}  # full-batch Adam steps: enough for every layer here to stop improving
runs_pb = [PhoneBookRun(name, book, d_ff=F, num_experts=E, seed=seed, steps=STEPS_PB[book.task])
           for seed in SEEDS_PB for book in (RECORDS, RULE) for name, (F, E) in LAYERS.items()]
runs_pb += [PhoneBookRun(f"Switch E={E}", RECORDS, d_ff=F_ONE, num_experts=E, seed=seed, steps=STEPS_PB["records"])
            for seed in SEEDS_SWEEP for E in (2, 4, 16)]
runs_pb += [PhoneBookRun(f"dense F={F}", RECORDS, d_ff=F, seed=seed, steps=STEPS_PB["records"])
            for seed in SEEDS_SWEEP for F in (2 * F_ONE, 4 * F_ONE)]
phone_book = phone_book_table(run_phone_books(runs_pb, workers=2))
records = phone_book[phone_book["task"] == "records"]
rule = phone_book[phone_book["task"] == "rule"]

# %%
from moe_course.figures.lm_plots import phone_book_bars

fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
phone_book_bars(records, list(LAYERS), title="knowledge: records recalled (the whole table)", ylabel="records answered right", ax=left)
phone_book_bars(rule, list(LAYERS), title="skill: the rule on patients never seen", ylabel="new patients answered right", ax=right)
fig.tight_layout()

# %% [markdown]
# The bars are means over the seeds, the dots single seeds. The next cell turns the comparison
# into a verdict, seed by seed: seed s gives every layer the same table (or rule), so layer B
# is compared with layer A on each seed, and a difference counts only if B is ahead **on every
# seed** (column `B won`), or behind on every seed. Otherwise it is "within seed noise".

# %%
from moe_course.experiments.lm_runs import seed_verdict

both = {"accuracy": True, "loss": False}  # higher recall is better, lower loss is better
verdicts_pb = pd.concat({
    "records": pd.concat([seed_verdict(records, DENSE, SWITCH, both), seed_verdict(records, WIDE, SWITCH, both)]),
    "rule": pd.concat([seed_verdict(rule, DENSE, SWITCH, both), seed_verdict(rule, DENSE, WIDE, both)]),
}, names=["task", "metric"])
verdicts_pb.style.format({"B − A": "{:+.3f}"})

# %%
def mean_of(table: pd.DataFrame, label: str, metric: str = "accuracy") -> float:
    return float(table.loc[table["label"] == label, metric].mean())


def verdict_of(table: pd.DataFrame, a: str, b: str) -> str:
    v = seed_verdict(table, a, b, {"accuracy": True})["verdict"].iloc[0]
    return {"B better": f"{b} ahead on every seed", "A better": f"{a} ahead on every seed"}.get(v, "within seed noise")


print(f"Records: {SWITCH} recalls {mean_of(records, SWITCH):.1%} of the table, {DENSE} (the same FLOPs per patient) "
      f"{mean_of(records, DENSE):.1%}: {verdict_of(records, DENSE, SWITCH)}.")
print(f"         {WIDE} (the same parameters, {E_SWITCH} times the FLOPs) recalls {mean_of(records, WIDE):.1%}: "
      f"against {SWITCH}, {verdict_of(records, WIDE, SWITCH)}.")
print(f"Rule:    {SWITCH} answers {mean_of(rule, SWITCH):.1%} of new patients, {DENSE} {mean_of(rule, DENSE):.1%}: "
      f"{verdict_of(rule, DENSE, SWITCH)};")
print(f"         {WIDE}, with {E_SWITCH} times the FLOPs per patient, {mean_of(rule, WIDE):.1%}: "
      f"against {DENSE}, {verdict_of(rule, DENSE, WIDE)}.")
worst = rule.loc[rule["label"] == DENSE, "accuracy"]
print(f"         ({DENSE} on the rule, seed by seed: {', '.join(f'{a:.1%}' for a in worst)})")

# %% [markdown]
# Read the two halves of the essay's line in those numbers.
#
# - **Parameters are knowledge.** If the Switch layer recalls far more records than the dense
#   layer of one expert's width, while costing the same FLOPs per patient, then the extra
#   cards were stored in the extra experts, not bought with extra compute. Compare it with the
#   wide dense layer: if the two recall about the same, what decides how much a layer
#   remembers is how many parameters it holds, not how they are arranged.
# - **Compute is intelligence.** On the rule, extra experts do not add thinking per patient:
#   each patient still passes through one narrow expert. If the Switch layer does no better
#   than the narrow dense layer while the wide dense layer, with E times the FLOPs, does
#   better, then the rule was limited by compute per patient, not by memory.
#
# The last line lists the narrow layer's seeds one by one. If one of them is far below the
# others, that seed got stuck on the rule while the others learned it: a single seed could have
# told either story.
#
# ### More experts at fixed compute
#
# The Switch paper's most famous figure adds experts while the FLOPs per token stay fixed.
# Here is the phone book's version, plotted against what each layer holds. The orange line adds
# experts of width `F_ONE` (its E = 1 point is the narrow dense layer); the blue line widens a
# dense layer, which costs FLOPs in proportion.

# %%
from moe_course.figures.lm_plots import knowledge_vs_parameters

knowledge_vs_parameters(records, title="records recalled against the layer's parameters");
sweep_pb = (records.groupby(["experts", "d_ff"])
            .agg(parameters=("parameters", "first"), flops_per_patient=("flops_per_patient", "first"),
                 recall=("accuracy", "mean"), loss=("loss", "mean"), seeds=("seed", "nunique"))
            .reset_index().sort_values("parameters"))
sweep_pb.style.format({"recall": "{:.1%}", "loss": "{:.3f}", "parameters": "{:,}", "flops_per_patient": "{:,}"}).hide(axis="index")

# %% [markdown]
# If the two lines lie on top of each other, the recall of a layer follows its parameters,
# however they are spent; the Switch line gets there at the FLOPs of one expert. A table of
# random wards can only be remembered, and remembering takes room: each doctor holds a
# volume of the phone book, and the GP's job is to send each patient to the doctor with the
# right volume. Recall stops growing once the experts hold the whole table; after that, more
# experts only lower the loss (the table's `loss` column).

# %% [markdown]
# ## Part 2 · The language model
#
# The phone book hands the router the patient's key directly. In a language model the key is a
# few characters, and the router of a Switch layer reads only the vector of the **current**
# token: whatever the attention before it has gathered into that vector. Two choices of this
# part follow from that:
#
# - **The records are short and the ward follows the patient's code directly**: `#KQeye`. The
#   position that must answer (`Q`) holds a character of the key, and the two letters of the
#   code sit right before it, where attention finds them easily.
# - **The expert layer sits after a dense block** (every second block, as in the Switch paper):
#   by then attention has had a chance to bring the whole key to the answering position.
#
# The stream is mostly records, so that memory matters; the five skills of lesson 07 fill the
# rest.

# %%
import random

from moe_course.data.corpus import Corpus, CorpusConfig

SKILLS = ("arithmetic", "reversal", "sorting", "brackets", "grammar")
corpus_config = CorpusConfig(
    num_facts=400,  # records in the table
    id_digits=2, id_alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ",  # patient codes of two capital letters: up to 676 patients
    fact_prompt="#{}",  # a record reads "#KQeye": the ward right after the code
    mix={"facts": 0.8} | {skill: 0.04 for skill in SKILLS},  # four fifths of the stream are records
)
corpus = Corpus(corpus_config)
rng = random.Random(0)
print([corpus.sample(rng=rng).text for _ in range(8)])

# %% [markdown]
# In the package a `Block` holds either a `FeedForward` (dense) or an expert layer. Here is its
# forward pass; the only expert-specific part is the `MoEOutput` it returns, whose `router_loss`
# (the weighted load-balancing and z-losses of lesson 05) the model adds up over blocks into
# `GPTOutput.router_loss`, and the training loss adds to the cross-entropy.

# %%
from moe_course.transformer import Block

show_source(Block.forward)

# %% [markdown]
# Things to notice:
#
# - the expert layer reads `ln_2(x)`, like the FFN it replaces, and its output is added to the
#   residual stream. A token dropped for lack of capacity gets `y = 0` and rides the residual
#   unchanged to the next floor;
# - with E = 1 the router's softmax over one expert is exactly 1, so a Switch block is exactly
#   the dense block (a test in the package checks it);
# - a Switch layer's router is a `D × E` matrix computed in float32, initialised small (the
#   Switch paper's reduced initialisation scale, `init_scale`), so at the start the GP is nearly
#   indifferent: every expert gets probability close to `1/E`;
# - the other kind of expert layer, `HashLayer`, gets the token ids. It is the subject of the
#   next cells.
#
# ### Three models
#
# A learned GP reads the token's vector. At the position that must answer a record, that vector
# says above all "a ward comes next", the same for every record, and the key is a smaller part
# of it. If the GP therefore sends every records question to the same doctor, the other doctors'
# memory stays unused for records. So the race has a third runner whose GP cannot do that: a
# **hash layer** (Roller et al. 2021, arXiv:2106.04426), whose experts are chosen by a fixed
# table from the current character to a doctor, drawn once at random. The code letter at the
# answering position then decides the doctor: the records are split by that letter, like a phone
# book split into volumes. Nothing about the routing is learned, and the gate is 1.

# %%
from dataclasses import replace

from moe_course.transformer import GPTConfig, HashLayer, flops_per_token, param_count

dense = GPTConfig(
    vocab_size=corpus.vocab_size,
    block_size=32,  # T
    d_model=64,  # D
    n_layers=2,
    n_heads=4,
    d_ff=32,  # F: the dense FFN's width, and each expert's; narrow, so that memory is scarce
)
switch = replace(dense.switch_twin(8), moe_every=2, dispatch="grouped_mm")  # block 2: a Switch layer of 8 experts
hashed = replace(switch, router="hash", capacity_factor=None)  # block 2: 8 experts chosen by the token id
show_source(HashLayer.forward)

# %% [markdown]
# ## What each model knows, and what a token costs
#
# `param_count` and `flops_per_token` count both by formula (the package's tests check them
# against `count_parameters` and PyTorch's FLOP counter). "Active" parameters are those a single
# token actually uses: one expert per expert layer.

# %%
rows = []
for E in (1, 2, 4, 8, 16):
    cfg = dense if E == 1 else replace(switch, num_experts=E)
    p, f = param_count(cfg), flops_per_token(cfg)
    rows.append({"experts": E, "parameters": p.total, "active parameters": p.active, "FFN + router parameters": p.ffn + p.router,
                 "FLOPs per token (forward)": f.total, "of which router": f.router})
accounting = pd.DataFrame(rows).set_index("experts")
accounting.style.format("{:,}")

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
ticks = [str(e) for e in accounting.index]
left.bar(ticks, accounting["parameters"] / 1e3, label="all parameters")
left.bar(ticks, accounting["active parameters"] / 1e3, label="used by one token", alpha=0.9)
left.set(title="what the model knows", xlabel="experts in the Switch layer (1 = dense)", ylabel="parameters (thousands)")
left.legend()
right.bar(ticks, accounting["FLOPs per token (forward)"] / 1e3, color="C2")
right.set(title="what one token costs", xlabel="experts in the Switch layer (1 = dense)", ylabel="forward FLOPs per token (thousands)")
fig.tight_layout()
router_share = accounting["of which router"] / accounting["FLOPs per token (forward)"]
print("the router's share of the FLOPs per token: " + ", ".join(f"E={e}: {s:.2%}" for e, s in router_share.items() if e > 1))
print(f"the hash layer (E={hashed.num_experts}): {param_count(hashed).total:,} parameters, "
      f"{flops_per_token(hashed).total:,} FLOPs per token, {flops_per_token(hashed).router} of them routing")

# %% [markdown]
# Parameters grow linearly with E; FLOPs per token stay flat except for the router's `2·D·E`
# (the printed shares; the hash layer has no router to compute). That is the whole promise: a
# hospital with many more specialists, and each patient still sees one doctor per floor.
#
# ## The race: same stream, same steps, same FLOPs per token
#
# All three models read the same batches (seed s gives every model the same batches in the same
# order), train for the same number of steps with the same optimiser, and are judged on the
# same held-out text. Five seeds each: one run of a small model can be lucky, and the seeds'
# own scatter is the yardstick for every difference. What we measure:
#
# - **records recalled**: every record of the table asked once (`#KQ`: does greedy decoding
#   write the ward and end the line?), the share answered right (`val_recall_facts`);
# - **answer loss per domain**: the loss on the characters a prompt determines (the ward, the
#   sum, the reversed word...), on held-out samples (`val_answer_loss_<domain>`); grammar has no
#   answer and is judged by its loss over whole sentences;
# - evaluation **never drops tokens**: a Switch layer's capacity is counted per forward call,
#   and a record must get the same answer whether it is asked alone or in a crowd.
#
# `run_lms` trains two runs at a time, each in its own process on one CPU thread. This is the
# longest cell of the lesson, with a progress bar.

# %%
from moe_course.experiments.lm_runs import LMRun, results_table, run_lms
from moe_course.training import TrainConfig

STEPS = 300 * SCALE
train_config = TrainConfig(steps=STEPS, batch_size=32, lr=1e-2, warmup_steps=STEPS // 10, lr_min_ratio=0.1, eval_every=STEPS // 5)
SEEDS = (0, 1, 2, 3, 4)
MODELS = {"dense": dense, "switch": switch, "hash": hashed}
runs = [LMRun(label, cfg, train_config, seed, track_routing=(label == "switch")) for seed in SEEDS for label, cfg in MODELS.items()]
results = run_lms(runs, corpus_config, workers=2, eval_rows=64)
table = results_table(results)

# %% [markdown]
# ### Over training
#
# The line is the mean over the five seeds, the band spans the best and the worst seed.

# %%
from moe_course.figures.lm_plots import loss_curves

fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
loss_curves(results, "val_recall_facts", title="records recalled (the whole table)", ylabel="share of the table answered right", ax=left)
left.set_ylim(0, 1)
loss_curves(results, "val_loss", title="held-out loss, all domains", ax=right)
right.set_ylim(bottom=0)
fig.tight_layout()

# %% [markdown]
# ### The verdict, per domain
#
# The same rule as in the phone book, now seed by seed: seed s gave both models the same data,
# so a difference counts only if a model is ahead **on every seed** (column `B won`); else it is
# within seed noise. A is the dense model, B the model with experts; for recall higher is
# better, for every loss lower is better.

# %%
metrics = {"val_recall_facts": True, "val_answer_loss_facts": False}
metrics |= {f"val_answer_loss_{s}": False for s in SKILLS if s != "grammar"} | {"val_loss_grammar": False, "val_loss": False}
verdict = pd.concat({label: seed_verdict(table, "dense", label, metrics) for label in ("switch", "hash")}, names=["B", "metric"])
verdict.drop(columns=["A", "B"]).style.format({"B − A": "{:+.3f}"})

# %%
name = {"B better": "{b} ahead on every seed", "A better": "dense ahead on every seed", "within seed noise": "within seed noise"}
skills = [m for m in metrics if m not in ("val_recall_facts", "val_answer_loss_facts", "val_loss")]
for b in ("switch", "hash"):
    v = verdict.loc[b]
    print(f"{b}: records recalled {v.loc['val_recall_facts', 'B mean ± sd']} against the dense model's {v.loc['val_recall_facts', 'A mean ± sd']}: "
          + name[v.loc["val_recall_facts", "verdict"]].format(b=b))
    calls = v.loc[skills, "verdict"]
    print(f"   skills: {sum(calls == 'within seed noise')} of {len(skills)} within seed noise"
          + "".join(f"; {m.split('_')[-1]}: {name[c].format(b=b)} ({v.loc[m, 'B − A']:+.3f})" for m, c in calls.items() if c != "within seed noise"))
    dense_mean = table[table["label"] == "dense"].mean(numeric_only=True)
    change = {m: v.loc[m, "B − A"] / dense_mean[m] for m in ["val_answer_loss_facts"] + skills}  # relative to the dense model
    print(f"   relative to the dense model, the records' answer loss changed by {change['val_answer_loss_facts']:+.0%}; "
          f"the skills' losses by {min(change[m] for m in skills):+.0%} to {max(change[m] for m in skills):+.0%}")

# %% [markdown]
# How to read it. If a model with experts recalls more records than its dense twin on every
# seed, its experts are doing what they did in the phone book: holding records that do not fit
# in the narrow dense FFN, at the same FLOPs per token. If a skill comes out within seed noise,
# experts did not make the model better at working things out: that takes compute per token,
# and both models have the same. A skill that does differ on every seed is worth a look at its
# size next to the records' (the last printed line puts both relative to the dense model); each
# expert sees only the tokens sent to it, so it learns a skill from a fraction of the examples a
# dense FFN sees.
#
# ### Wall-clock time, separately
#
# Equal FLOPs per token are not equal seconds. Routing, sorting tokens by expert, several small
# matrix products instead of one large one and the auxiliary losses all cost time on a CPU
# (lesson 06 measured the dispatch alone). All models trained side by side in the same two
# worker processes, so their times are comparable, within the noise of a shared machine.

# %%
speed = table.groupby("label", sort=False)["seconds_per_step"].agg(["mean", "min", "max"])
speed["mean relative to dense"] = speed["mean"] / speed.loc["dense", "mean"]
speed.round(4)

# %% [markdown]
# ## Inside the hospital
#
# Now the learned GP at work: one Switch model, picked by a rule, the seed whose recall is the
# **median** of the five. Its routing was recorded at every evaluation. First the end state:
# which share of each domain's characters went to each expert. A row concentrated on one expert
# means that domain has a specialist; a flat row means the GP spreads it over everyone. The
# title gives the specialisation score: the normalised mutual information between domain and
# expert (0: the expert tells you nothing about the domain; 1: each domain has its own experts).

# %%
from moe_course.analysis.lm_routing import routing_report
from moe_course.figures.lm_plots import routing_heatmaps
from moe_course.training.lm import LMTask


def median_run(label: str, metric: str = "val_recall_facts"):
    ranked = table[table["label"] == label].sort_values([metric, "seed"]).reset_index(drop=True)
    seed = int(ranked.loc[len(ranked) // 2, "seed"])
    return next(r for r in results if r.run.label == label and r.run.seed == seed)


watched = median_run("switch")
print(f"the median Switch model by recall: seed {watched.run.seed}")
task = LMTask(corpus, block_size=dense.block_size, eval_rows=64, eval_chunk=train_config.batch_size)
model = watched.model()
layers = routing_report(model, task.held_out, task.domains, chunk=train_config.batch_size)
routing_heatmaps(layers, title="where each domain's characters go, after training");

# %% [markdown]
# Routing decides per *character*, not per sample. So it is worth asking which characters each
# expert prefers: for every expert, the input characters it receives most often *relative to
# how common they are* (lift = P(char | expert) / P(char)).

# %%
prefs = layers[0].preferred_chars(corpus.tokenizer, k=4, min_count=10)
prefs["char"] = prefs["char"].map(repr)
(prefs.assign(pick=lambda t: t["char"] + " (lift " + t["lift"].round(1).astype(str) + ")")
      .groupby("expert")["pick"].apply(", ".join).to_frame("characters this expert gets most"))

# %% [markdown]
# ### Who holds the records?
#
# A record is answered at the code's second letter, so the expert chosen at that position is the
# doctor who must hold it. For every record of the table, the next cell asks the median Switch
# model and the median hash model which expert the answering position goes to, and whether the
# model recalls the record.

# %%
from moe_course.training.lm import fact_recall, without_dropping

patients = list(corpus.facts)
prompts = torch.stack([corpus.encode("\n" + corpus.fact_prompt(p)) for p in patients])  # (P, 4): all the same length


def who_holds(run) -> pd.DataFrame:
    m = without_dropping(run.model())
    with torch.no_grad():
        chosen = m(prompts).moe_outputs[0][1].expert_index[:, 0].reshape(len(patients), -1)[:, -1]  # (P,) at the answering position
    known = fact_recall(m, corpus).recalled
    E = run.run.model.num_experts
    return pd.DataFrame({"records sent here": torch.bincount(chosen, minlength=E).numpy(),
                         "of which recalled": torch.bincount(chosen[known], minlength=E).numpy()},
                        index=[f"expert {e}" for e in range(E)])


holders = pd.concat({f"switch (seed {watched.run.seed})": who_holds(watched),
                     f"hash (seed {median_run('hash').run.seed})": who_holds(median_run("hash"))}, axis=1)
holders

# %%
busiest = {n: int(holders[(n, "records sent here")].max()) for n in holders.columns.levels[0]}
print("records on the busiest expert: " + ", ".join(f"{n}: {c} of {len(patients)}" for n, c in busiest.items()))

# %% [markdown]
# If the records are spread over many experts, each doctor holds a volume of the table, as in
# the phone book. If most of them sit with one or two experts, the GP sends every records
# question to the same clerk, and the extra doctors' memory goes unused for records, whatever
# the parameter count says. The hash layer spreads them by construction; compare the two
# columns with the verdict above.
#
# ### Over training: load, dropped tokens, and the GP's confidence

# %%
from moe_course.figures.lm_plots import expert_share_over_training, routing_over_training

tracker = watched.routing_tracker(task)
expert_share_over_training(tracker.history, title="share of tokens per expert during training (Switch)");

# %% [markdown]
# Each colour is one expert; an even split would give every expert one eighth of the height.
# The load-balancing loss (weight α, the config's `aux_loss_coef`) keeps the GP from sending
# everyone to one doctor, but it counts all tokens together: a GP that sends every records
# question to one doctor and the other tokens elsewhere is perfectly balanced by that measure.

# %%
routing_over_training(tracker.summary, title="routing during training (Switch)");

# %% [markdown]
# Left, the tokens the layer's capacity (capacity factor: the config's `capacity_factor`) would
# have turned away at each evaluation: in training they skip the floor's FFN entirely. Right,
# the specialisation score over training.
#
# One more number explains a lot: how sure the GP is. A Switch layer multiplies the chosen
# expert's output by the router probability of that expert, the **gate**. At the start, with a
# nearly uniform router, the gate is about 1/E: the expert's answer reaches the residual stream
# at an eighth of its size, while the dense FFN's answer arrives in full (and the hash layer's
# too: its gate is 1).

# %%
from moe_course.figures.lm_plots import layer_name

gates = tracker.summary.pivot(index="step", columns="layer", values="mean_gate")
gates.columns = [f"mean gate, {layer_name(c)}" for c in gates.columns]
ax = gates.plot(marker="o", title="how sure the GP is: the mean gate of the chosen expert", ylim=(0, 1))
ax.axhline(1 / switch.num_experts, ls="--", color="gray", lw=1)
ax.annotate("1/E: no preference", (gates.index.min(), 1 / switch.num_experts), xytext=(4, 4), textcoords="offset points", color="gray", fontsize=8)
ax.set(xlabel="training step", ylabel="gate (router probability)");
print(f"mean gate at the last evaluation: {gates.iloc[-1, 0]:.2f} (1/E = {1 / switch.num_experts:.3f})")

# %% [markdown]
# ## The trained models at work
#
# Finally, ask the median dense model and the median hash model for records. Each answers every
# record of the table (greedy decoding, which `fact_recall` scores exactly). The table lists
# records picked by a stated rule: the first six, in the table's order, that the hash model
# answers and the dense model does not; then the first three the other way round.

# %%
from moe_course.training.lm import complete

dense_model, hash_model = (without_dropping(median_run(label).model()) for label in ("dense", "hash"))
hash_knows, dense_knows = fact_recall(hash_model, corpus).recalled.tolist(), fact_recall(dense_model, corpus).recalled.tolist()
only_hash = [p for p, h, d in zip(patients, hash_knows, dense_knows) if h and not d]
only_dense = [p for p, h, d in zip(patients, hash_knows, dense_knows) if d and not h]
print(f"records known: dense {sum(dense_knows)}, hash {sum(hash_knows)} of {len(patients)}; "
      f"only the hash model: {len(only_hash)}, only the dense model: {len(only_dense)}, both: {sum(h and d for h, d in zip(hash_knows, dense_knows))}")
pd.DataFrame([{"prompt": corpus.fact_prompt(p), "ward in the records": corpus.facts[p],
               "dense writes": complete(dense_model, corpus, corpus.fact_prompt(p), max_new_tokens=8).rstrip("\n"),
               "hash writes": complete(hash_model, corpus, corpus.fact_prompt(p), max_new_tokens=8).rstrip("\n"),
               "known by": "hash only" if p in only_hash else "dense only"}
              for p in only_hash[:6] + only_dense[:3]])

# %% [markdown]
# ## Recap
#
# - A Switch layer is a router and E experts: E times the FFN's parameters, the same FLOPs per
#   token (plus a small router), more wall-clock time on a CPU.
# - In the phone book, what a layer remembers follows its parameters, whether they are spent
#   on one wide FFN or on experts, while a rule follows compute per patient: experts add
#   knowledge, not intelligence.
# - In the language model the same comparison, judged seed by seed over five seeds, and the
#   inside view (which expert holds the records, how sure the GP is) tell whether the extra
#   experts were used as extra memory, and what the learned GP did with them.
#
# **Exercises:** `exercises/08_switch_transformer.ipynb`: write the Switch block's forward pass
# (attention, then the Switch layer, both residuals, and the auxiliary loss) and the parameter
# and FLOP accounting of a language model.
#
# **Next:** lesson 09 takes the hospital beyond one machine: experts on different devices,
# tokens sent between them in two all-to-all exchanges; then Soft MoE, and routers that give
# harder cases more doctors.
#
# **Read more:** Fedus, Zoph and Shazeer 2021, *Switch Transformers: Scaling to Trillion
# Parameter Models with Simple and Efficient Sparsity*, arXiv:2101.03961 (top-1 routing,
# capacity factor, the balance loss, float32 routers, the reduced initialisation scale, the
# experts-at-fixed-compute figure); Jelassi et al. 2024, *Mixture of Parrots: Experts improve
# memorization more than reasoning*, arXiv:2410.19034 (with the active parameters fixed, more
# experts keep improving memorisation while reasoning saturates: proved for graph problems,
# measured on memory tasks and pre-trained models); Lepikhin et al. 2020, *GShard*,
# arXiv:2006.16668; Shazeer et al. 2017, *Outrageously Large Neural Networks*,
# arXiv:1701.06538; Zoph et al. 2022, *ST-MoE: Designing
# Stable and Transferable Sparse Expert Models*, arXiv:2202.08906 (the router z-loss); Dai et
# al. 2022, *StableMoE: Stable Routing Strategy for Mixture of Experts*, arXiv:2204.08396
# (routing that keeps changing during training); Roller et al. 2021, *Hash Layers For Large
# Sparse Models*, arXiv:2106.04426 (routing by a fixed hash of the token).
