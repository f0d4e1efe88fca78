"""Typical wrong answers to each exercise, written the way a learner would.

Each entry: exercise id → list of (description, wrong function, words the
check's message must contain). tests/test_mutants.py runs them all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# -- 0.1 count_patients -------------------------------------------------------
def count_no_minlength(specialty, num_specialties):
    return torch.bincount(specialty)


def count_fractions(specialty, num_specialties):
    return torch.bincount(specialty, minlength=num_specialties) / len(specialty)


def count_shifted(specialty, num_specialties):
    counts = torch.zeros(num_specialties, dtype=torch.int64)
    for s in specialty.tolist():
        if s + 1 < num_specialties:
            counts[s + 1] += 1
    return counts


def count_float(specialty, num_specialties):
    return torch.tensor([float((specialty == s).sum()) for s in range(num_specialties)])


def count_forget_return(specialty, num_specialties):
    torch.bincount(specialty, minlength=num_specialties)


# -- 1.1 feed_forward ----------------------------------------------------------
def ffn_relu(x, w_in, b_in, w_out, b_out):
    return F.relu(x @ w_in + b_in) @ w_out + b_out


def ffn_no_activation(x, w_in, b_in, w_out, b_out):
    return (x @ w_in + b_in) @ w_out + b_out


def ffn_no_biases(x, w_in, b_in, w_out, b_out):
    return F.gelu(x @ w_in) @ w_out


def ffn_no_output_bias(x, w_in, b_in, w_out, b_out):
    return F.gelu(x @ w_in + b_in) @ w_out


def ffn_activation_on_output(x, w_in, b_in, w_out, b_out):
    return F.gelu((x @ w_in + b_in) @ w_out + b_out)


def ffn_in_place(x, w_in, b_in, w_out, b_out):
    x += 0  # harmless-looking, but it writes into the caller's tensor
    x.mul_(1.5)
    return F.gelu(x @ w_in + b_in) @ w_out + b_out


def ffn_transposed(x, w_in, b_in, w_out, b_out):
    return F.gelu(x @ w_in.T + b_in) @ w_out.T + b_out


# -- 1.2 ffn_param_count -------------------------------------------------------
def params_no_bias(d_model, d_ff):
    return 2 * d_model * d_ff


def params_one_matrix(d_model, d_ff):
    return d_model * d_ff + d_ff + d_model


def params_no_output_bias(d_model, d_ff):
    return 2 * d_model * d_ff + d_ff


def params_as_float_tensor(d_model, d_ff):
    return torch.tensor(2.5 * d_model * d_ff)


# -- 1.3 ffn_flops -------------------------------------------------------------
def flops_macs(num_tokens, d_model, d_ff):
    return 2 * num_tokens * d_model * d_ff


def flops_no_tokens(num_tokens, d_model, d_ff):
    return 4 * d_model * d_ff


def flops_with_bias(num_tokens, d_model, d_ff):
    return 4 * num_tokens * d_model * d_ff + num_tokens * (d_ff + d_model)


def flops_square(num_tokens, d_model, d_ff):
    return 4 * num_tokens * d_model * d_model


# -- 1.4 accuracy_by_specialty ------------------------------------------------
def acc_divide_by_all(logits, diagnosis, specialty, num_specialties):
    correct = (logits.argmax(-1) == diagnosis).float()
    return torch.stack([correct[specialty == s].sum() for s in range(num_specialties)]) / len(diagnosis)


def acc_counts(logits, diagnosis, specialty, num_specialties):
    correct = (logits.argmax(-1) == diagnosis).float()
    return torch.stack([correct[specialty == s].sum() for s in range(num_specialties)])


def acc_zero_for_empty(logits, diagnosis, specialty, num_specialties):
    correct = (logits.argmax(-1) == diagnosis).float()
    return torch.stack([correct[specialty == s].mean() if (specialty == s).any() else torch.tensor(0.0)
                        for s in range(num_specialties)])


def acc_overall(logits, diagnosis, specialty, num_specialties):
    return (logits.argmax(-1) == diagnosis).float().mean().repeat(num_specialties)


def acc_skip_empty(logits, diagnosis, specialty, num_specialties):
    correct = (logits.argmax(-1) == diagnosis).float()
    return torch.stack([correct[specialty == s].mean() for s in specialty.unique()])


MUTANTS: dict[str, list[tuple[str, object, str]]] = {
    "0.1": [
        ("bincount without minlength", count_no_minlength, "minlength"),
        ("fractions instead of counts", count_fractions, "fractions"),
        ("labels shifted by one", count_shifted, "shifted by one"),
        ("float counts", count_float, "whole numbers"),
        ("no return", count_forget_return, "forget a `return`"),
    ],
    "1.1": [
        ("ReLU instead of GELU", ffn_relu, "ReLU"),
        ("no activation", ffn_no_activation, "activation is missing"),
        ("no biases", ffn_no_biases, "both biases are missing"),
        ("no output bias", ffn_no_output_bias, "b_out is missing"),
        ("activation on the output", ffn_activation_on_output, "activation is in the wrong place"),
        ("writes into x", ffn_in_place, "in place"),
        ("transposed weights", ffn_transposed, "raised RuntimeError"),
    ],
    "1.2": [
        ("forgot biases", params_no_bias, "forgot the biases"),
        ("one weight matrix", params_one_matrix, "only one weight matrix"),
        ("no output bias", params_no_output_bias, "output bias is missing"),
        ("float tensor", params_as_float_tensor, "whole number"),
    ],
    "1.3": [
        ("multiply-adds, not FLOPs", flops_macs, "multiply-add"),
        ("forgot the tokens", flops_no_tokens, "number of tokens is missing"),
        ("counted biases", flops_with_bias, "bias additions"),
        ("d_model for d_ff", flops_square, "d_model where the hidden width"),
    ],
    "1.4": [
        ("divided by all patients", acc_divide_by_all, "number of all patients"),
        ("counts, not accuracies", acc_counts, "counts of correct answers"),
        ("0 for an empty specialty", acc_zero_for_empty, "should be NaN"),
        ("overall accuracy everywhere", acc_overall, "overall accuracy"),
        ("skips empty specialties", acc_skip_empty, "one entry per specialty"),
    ],
}
