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
# # 00 · Welcome to the clinic
#
# This course builds a **Mixture-of-Experts** (MoE) model from scratch, one idea at a
# time, until you have trained a small Switch Transformer language model on your own
# laptop. Every figure in it is computed in front of you, on the CPU, in a minute or two.
#
# **In this lesson you will**
#
# - meet the picture we will use all the way through: *experts are doctors, the router is the GP*;
# - see the map of the course, from one MLP to a full Switch Transformer;
# - check that your environment works (versions, the device, seeding);
# - take a first look at the clinic, the data set the early lessons share;
# - learn how exercises, hidden check cells and `nbval` work, and do a warm-up exercise.

# %% [markdown]
# ## A story about feeling tired
#
# Suppose you have felt worn out for weeks. The real cause is your eyes, but you have
# no way of knowing that. What do you do?
#
# 1. **Ask a second cardiologist.** A friend of yours is a heart doctor and has an
#    opinion; you ask another heart doctor too, and average what they say. Two doctors
#    with the same training make *different random slips*, so averaging makes the
#    advice steadier. But they share the same blind spot: if the problem is not the
#    heart, both are wrong in the same way. Averaging shrinks **variance**, not **bias**.
# 2. **See a generalist.** One doctor who knows a bit of everything. Medicine is huge,
#    and a single head can only hold so much, so the generalist knows each field only
#    superficially.
# 3. **See every specialist and pool their advice.** The eye doctor is in the room, so
#    the right answer is available, but you paid for fifty consultations to use one.
# 4. **See your GP first.** The GP listens for two minutes and sends you to the one
#    specialist (or two) who can actually help. You get expert advice at the price of
#    a single visit.
#
# Option 4 *is* a sparse Mixture-of-Experts layer:
#
# | in the clinic | in the model |
# |---|---|
# | a patient | a token (one vector) |
# | a specialist doctor | an **expert**: a small feed-forward network (MLP) |
# | the GP | the **router**: a tiny linear layer that scores every expert for each token |
# | being referred | **routing**: the token is processed only by its top-scoring expert(s) |
# | the hospital | a transformer whose MLP blocks are replaced by expert layers |
#
# Why bother? In an ordinary ("dense") network every parameter works on every token, so
# adding knowledge (parameters) always adds cost (compute per token). With a GP in front,
# a hospital can hire more specialists without each patient seeing more doctors: an MoE
# grows its parameters while the compute per token stays flat. A handy, if loose, slogan
# from the MoE literature: **parameters hold knowledge; compute per token is effort.**

# %% [markdown]
# Try it: move the sliders. With one specialist per patient (k = 1), adding specialists
# multiplies what the hospital knows, while a visit costs about the same as seeing one
# doctor (plus a tiny GP consultation: the router). Raise k and each visit gets dearer.

# %%
from moe_course.figures.widgets import hospital_explorer

hospital_explorer()

# %% [markdown]
# ## The course map
#
# | lesson | topic | in the clinic |
# |---|---|---|
# | 00 | welcome, set-up, how checks work | the whole story |
# | 01 | the single MLP: the transformer's feed-forward block; parameters vs FLOPs; negative interference | one doctor for every ailment |
# | 02 | ensembles cut variance, not bias; a generalist underfits | approaches 1 and 2 |
# | 03 | the dense mixture: a softmax gate over all experts | approach 3: see every specialist |
# | 04 | sparse top-k routing, noisy gating, compute decoupled from parameters | approach 4: the GP |
# | 05 | expert collapse, load balancing, router z-loss, capacity, expert choice | full waiting rooms |
# | 06 | fast dispatch: masks, one-hot einsum, sort-and-group | running the clinic efficiently |
# | 07 | attention and the transformer block; a small GPT | tokens talking to each other |
# | 08 | the Switch Transformer language model | the whole hospital |
#
# Every lesson has a matching notebook in `exercises/` (you fill in the answers) and in
# `solutions/` (the answers, for when you are stuck). The lessons never use your exercise
# code: they import the tested building blocks of the `moe_course` package, so a stuck
# exercise never blocks the next lesson.

# %% [markdown]
# ## Check your environment
#
# Two helpers start every lesson. `get_device()` picks the fastest device available
# (an NVIDIA GPU, then Apple's MPS, then the CPU) and `seed_everything(seed)` seeds
# Python, NumPy and PyTorch so that every number you see is reproducible.

# %%
import torch

from moe_course import get_device, seed_everything
from moe_course.device import describe_environment

device = get_device()
seed_everything(0)
for name, version in describe_environment().items():
    print(f"{name:>12}: {version}")

# %% [markdown]
# The course is designed for a 2-core laptop CPU; if you have a GPU it will be used
# automatically, and some lessons have a clearly marked knob to train bigger models.
#
# Seeding really does make runs repeatable: the same seed gives the same numbers.

# %%
seed_everything(42)
a = torch.randn(3)
seed_everything(42)
b = torch.randn(3)
print(a, b, "identical:", torch.equal(a, b))

# %% [markdown]
# ## A first look at the clinic
#
# The first lessons use a small synthetic data set, `make_clinic`, made on the spot from
# a seed (nothing is downloaded). Each patient is a vector of numbers:
#
# - **measurements** (think blood pressure, heart rate, ...) that look the same for every
#   specialty, and
# - **context** that says which department the patient walked into: this is what a GP can
#   read.
#
# Each specialty has its *own diagnosis rule* over the same measurements, and the rules
# contradict each other. That is the situation where one doctor for everything should
# struggle and a team of specialists should shine; lesson 01 measures whether they do.

# %%
from moe_course.data.clinic import make_clinic

clinic = make_clinic(num_specialties=4, seed=0)
print(f"{len(clinic.train)} training patients, {len(clinic.val)} held-out patients")
print(f"each patient is a vector of {clinic.d_in} numbers ({clinic.d_measure} measurements + "
      f"{clinic.d_in - clinic.d_measure} context)")
print("specialties:", ", ".join(clinic.specialties))
print("diagnoses per specialty:", clinic.num_diagnoses)

# %% [markdown]
# A picture says more. On the left, the average context of each specialty: every
# department stamps its own code on its patients, so a GP can tell them apart at a glance
# (a straight line separates them; the GP of lesson 03 is exactly such a line). The two panels on the
# right plot two of the measurements for cardiology and ophthalmology patients, coloured
# by diagnosis: the two departments carve up the same kind of measurements into
# diagnoses in different ways. One doctor would have to learn both maps at once, and
# know which one to use.

# %%
from moe_course.figures.plots import plot_clinic, use_course_style

use_course_style()
plot_clinic(clinic);

# %% [markdown]
# ## How exercises work
#
# Open `exercises/00_welcome.ipynb` next to this notebook. You will see:
#
# 1. **Instructions**, then a code cell with a function whose body is a *stub*:
#    `raise NotImplementedError("Exercise 0.1: ...")`. Replace the stub with your code.
# 2. A collapsed **check cell** right after it (click the `⋯` to peek, if you like). It
#    calls `check("0.1", your_function)`, which tests your function on fresh random inputs
#    against the package's reference. It prints one line when you are right:
#
#    `✅ Exercise 0.1 passed: ...`
#
#    and when you are not, it raises an error that names the mistake, for example
#    *"the counts are shifted by one place: specialty labels start at 0"*.
#
# You can also check a whole exercise notebook from a terminal with
# [nbval](https://github.com/computationalmodelling/nbval), which runs every cell and
# fails at the first cell that raises (save the notebook first):
#
# ```bash
# .venv/bin/moe-check 00                       # the friendly wrapper
# .venv/bin/pytest exercises/00_welcome.ipynb  # the same, with pytest and nbval directly
# ```
#
# If you are stuck, `solutions/00_welcome.ipynb` has the answers.
#
# Here is what a check looks like, run on the package's own reference answer and on a
# function with a typical slip:

# %%
from moe_course.checks import ExerciseError, check


def count_patients_with_a_slip(specialty, num_specialties):
    return torch.bincount(specialty)  # forgets specialties that have no patients


try:
    check("0.1", count_patients_with_a_slip)
except ExerciseError as err:
    print("The check says:", err)

# %% [markdown]
# ## Recap
#
# - An MoE layer is a team of specialist MLPs (experts) with a GP (the router) who sends
#   each token to the one or two experts that should handle it.
# - That lets a model grow its knowledge (parameters) without growing the effort (compute)
#   spent on each token.
# - Exercises have hidden checks that say exactly what is wrong; `moe-check NN` runs them
#   from the shell with nbval.
#
# **Next:** lesson 01 looks at a single doctor, the feed-forward block, counts what it
# costs, and measures how badly it does when it has to serve every specialty at once.
# Before that, do the warm-up in `exercises/00_welcome.ipynb`.
#
# **Read more:** the Switch Transformer paper, Fedus, Zoph and Shazeer 2021,
# *Switch Transformers: Scaling to Trillion Parameter Models with Simple and Efficient
# Sparsity*, arXiv:2101.03961, is the destination of this course.
