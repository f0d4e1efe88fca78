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
# # Exercises 00 · Warm-up
#
# This notebook shows how every exercise in the course works, with one small task.
#
# 1. Read the instructions, then replace the stub (`raise NotImplementedError(...)`) in the
#    code cell with your answer.
# 2. Run the code cell, then the **check cell** right after it. The check cell is
#    collapsed (click `⋯` to see it); it tests your code on fresh random inputs. If your
#    answer is right it prints `✅ Exercise 0.1 passed: ...`; if not, it raises an error
#    whose message names the mistake. Fix and run both cells again.
# 3. When all checks pass, save the notebook and run it once more from a terminal:
#    `.venv/bin/moe-check 00` (or `.venv/bin/pytest exercises/00_welcome.ipynb`).
#
# Answers are in `solutions/00_welcome.ipynb`, if you get stuck.

# %%
import torch

from moe_course.data.clinic import make_clinic

clinic = make_clinic(num_specialties=4, seed=0)
clinic.train.specialty[:12]  # the specialty of the first 12 patients: ids 0 .. 3

# %% [markdown]
# ## Exercise 0.1 · How many patients does each specialty see?
#
# Before hiring doctors, a hospital counts its patients. Write `count_patients(specialty,
# num_specialties)`:
#
# - `specialty`: an int64 tensor of shape (N,), the specialty id of each patient, from 0
#   to `num_specialties - 1`;
# - return an **int64 tensor of shape (num_specialties,)** whose entry `s` is the number of
#   patients with specialty `s`.
#
# Careful: a specialty may have no patients at all; it still needs its entry (0).
#
# *Hint:* `torch.bincount` counts how often each value occurs; read about its `minlength`
# argument. A loop over specialties with `(specialty == s).sum()` works too.

# %%
def count_patients(specialty: torch.Tensor, num_specialties: int) -> torch.Tensor:
    """Number of patients per specialty: (N,) int64 → (num_specialties,) int64."""
    ### BEGIN SOLUTION 0.1: return the number of patients of each specialty, shape (num_specialties,)
    return torch.bincount(specialty, minlength=num_specialties)
    ### END SOLUTION


# %% tags=["check"] jupyter={"source_hidden": true}
from moe_course.checks import check

check("0.1", count_patients)

# %% [markdown]
# Well done. The clinic is balanced: each specialty sees about the same number of
# patients. (Lesson 05 returns to counting, when some doctors get far more patients than
# others.) On to `exercises/01_mlp.ipynb` after lesson 01.
