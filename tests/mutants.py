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
    return torch.stack(
        [correct[specialty == s].mean() if (specialty == s).any() else torch.tensor(0.0) for s in range(num_specialties)]
    )


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
        ("transposed weights", ffn_transposed, "(32, 8) is `w_in` transposed; drop the .T"),
    ],
    "1.2": [
        ("forgot biases", params_no_bias, "forgot the biases"),
        ("one weight matrix", params_one_matrix, "only one weight matrix"),
        ("no output bias", params_no_output_bias, "output bias is missing"),
        ("float tensor", params_as_float_tensor, "should be a Python int"),
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


# == lessons 02-03 ==================================================================
import math  # noqa: E402


# -- 2.1 average_probs ---------------------------------------------------------
def avg_logits_then_softmax(member_logits):
    return torch.softmax(member_logits.mean(dim=0), dim=-1)


def avg_softmax_over_members(member_logits):
    return torch.softmax(member_logits, dim=0).mean(dim=0)


def avg_sum_not_mean(member_logits):
    return torch.softmax(member_logits, dim=-1).sum(dim=0)


def avg_over_patients(member_logits):
    return torch.softmax(member_logits, dim=-1).mean(dim=1)


def avg_naive_exp(member_logits):
    e = member_logits.exp()
    return (e / e.sum(-1, keepdim=True)).mean(dim=0)


# -- 2.2 bias_variance ---------------------------------------------------------
def bv_unbiased_variance(member_probs, targets):
    y = F.one_hot(targets, member_probs.shape[-1]).float()
    mean = member_probs.mean(0)
    error = ((member_probs - y) ** 2).sum(-1).mean()
    bias = ((mean - y) ** 2).sum(-1).mean()
    variance = ((member_probs - mean) ** 2).sum(-1).sum(0).mean() / (member_probs.shape[0] - 1)
    return error, bias, variance


def bv_mean_over_classes(member_probs, targets):
    y = F.one_hot(targets, member_probs.shape[-1]).float()
    mean = member_probs.mean(0)
    return ((member_probs - y) ** 2).mean(), ((mean - y) ** 2).mean(), ((member_probs - mean) ** 2).mean()


def bv_variance_around_truth(member_probs, targets):
    y = F.one_hot(targets, member_probs.shape[-1]).float()
    mean = member_probs.mean(0)
    error = ((member_probs - y) ** 2).sum(-1).mean()
    return error, ((mean - y) ** 2).sum(-1).mean(), ((member_probs - y) ** 2).sum(-1).mean()


def bv_bias_not_squared(member_probs, targets):
    y = F.one_hot(targets, member_probs.shape[-1]).float()
    mean = member_probs.mean(0)
    return (
        ((member_probs - y) ** 2).sum(-1).mean(),
        (mean - y).abs().sum(-1).mean(),
        ((member_probs - mean) ** 2).sum(-1).mean(),
    )


def bv_per_patient(member_probs, targets):
    y = F.one_hot(targets, member_probs.shape[-1]).float()
    mean = member_probs.mean(0)
    return ((member_probs - y) ** 2).sum(-1).mean(0), ((mean - y) ** 2).sum(-1), ((member_probs - mean) ** 2).sum(-1).mean(0)


# -- 2.3 ensemble_log_loss -----------------------------------------------------
def ll_members_average(member_logits, targets):
    r, n, c = member_logits.shape
    return F.cross_entropy(member_logits.reshape(r * n, c), targets.repeat(r))


def ll_average_logits(member_logits, targets):
    return F.cross_entropy(member_logits.mean(0), targets)


def ll_naive_log(member_logits, targets):
    probs = torch.softmax(member_logits, dim=-1).mean(0)
    return -probs[torch.arange(len(targets)), targets].log().mean()


def ll_forgot_log_r(member_logits, targets):
    log_mean = torch.logsumexp(torch.log_softmax(member_logits, dim=-1), dim=0)
    return F.nll_loss(log_mean, targets)


def ll_sum_over_patients(member_logits, targets):
    log_mean = torch.logsumexp(torch.log_softmax(member_logits, dim=-1), dim=0) - math.log(member_logits.shape[0])
    return F.nll_loss(log_mean, targets, reduction="sum")


# -- 3.1 softmax_gate ----------------------------------------------------------
def gate_softmax_over_patients(x, w_gate):
    return torch.softmax(x @ w_gate, dim=0)


def gate_no_softmax(x, w_gate):
    return x @ w_gate


def gate_sigmoid(x, w_gate):
    return torch.sigmoid(x @ w_gate)


def gate_naive_exp(x, w_gate):
    e = (x @ w_gate).exp()
    return e / e.sum(-1, keepdim=True)


def gate_transposed(x, w_gate):
    return torch.softmax(x @ w_gate.T, dim=-1)


# -- 3.2 dense_mixture ---------------------------------------------------------
def mix_logits(x, gate, experts):
    weights = torch.softmax(gate(x), dim=-1)
    logits = torch.stack([e(x) for e in experts], dim=1)
    return torch.softmax((weights[:, :, None] * logits).sum(1), dim=-1)


def mix_no_gate(x, gate, experts):
    return torch.stack([torch.softmax(e(x), dim=-1) for e in experts], dim=1).mean(1)


def mix_gate_over_patients(x, gate, experts):
    weights = torch.softmax(gate(x), dim=0)
    probs = torch.stack([torch.softmax(e(x), dim=-1) for e in experts], dim=1)
    return (weights[:, :, None] * probs).sum(1)


def mix_expert_softmax_over_experts(x, gate, experts):
    weights = torch.softmax(gate(x), dim=-1)
    probs = torch.softmax(torch.stack([e(x) for e in experts], dim=1), dim=1)
    return (weights[:, :, None] * probs).sum(1)


def mix_raw_gate(x, gate, experts):
    probs = torch.stack([torch.softmax(e(x), dim=-1) for e in experts], dim=1)
    return (gate(x)[:, :, None] * probs).sum(1)


def mix_no_sum(x, gate, experts):
    weights = torch.softmax(gate(x), dim=-1)
    probs = torch.stack([torch.softmax(e(x), dim=-1) for e in experts], dim=1)
    return weights[:, :, None] * probs


# -- 3.3 specialisation_score --------------------------------------------------
def _joint(gate_weights, specialty, num_specialties):
    top = gate_weights.argmax(dim=-1)
    joint = torch.zeros(num_specialties, gate_weights.shape[1])
    joint.index_put_((specialty, top), torch.ones(len(top)), accumulate=True)
    return joint / joint.sum()


def _entropy(p):
    p = p[p > 0]
    return -(p * p.log()).sum()


def _mi(joint):
    ps, pe = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nz = joint > 0
    return (joint[nz] * (joint / (ps * pe))[nz].log()).sum()


def score_raw_mi(gate_weights, specialty, num_specialties):
    return float(_mi(_joint(gate_weights, specialty, num_specialties)))


def score_by_specialty_entropy(gate_weights, specialty, num_specialties):
    joint = _joint(gate_weights, specialty, num_specialties)
    return float(_mi(joint) / _entropy(joint.sum(1)))


def score_nan_for_empty(gate_weights, specialty, num_specialties):
    joint = _joint(gate_weights, specialty, num_specialties)
    ps, pe = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    mi = (joint * (joint / (ps * pe)).log()).sum()
    h = -(ps * ps.log()).sum() - (pe * pe.log()).sum()
    return float(2 * mi / h)


def score_by_min_entropy(gate_weights, specialty, num_specialties):
    joint = _joint(gate_weights, specialty, num_specialties)
    return float(_mi(joint) / torch.minimum(_entropy(joint.sum(1)), _entropy(joint.sum(0))))


def score_soft_counts(gate_weights, specialty, num_specialties):
    joint = torch.zeros(num_specialties, gate_weights.shape[1]).index_add_(0, specialty, gate_weights)
    joint = joint / joint.sum()
    return float(2 * _mi(joint) / (_entropy(joint.sum(1)) + _entropy(joint.sum(0))))


def score_argmax_over_patients(gate_weights, specialty, num_specialties):
    top = gate_weights.argmax(dim=0)  # (E,): the wrong axis
    joint = torch.zeros(num_specialties, gate_weights.shape[1])
    joint.index_put_((specialty, top), torch.ones(len(top)), accumulate=True)
    joint = joint / joint.sum()
    return float(2 * _mi(joint) / (_entropy(joint.sum(1)) + _entropy(joint.sum(0))))


# -- 3.4 dense_mixture_flops ---------------------------------------------------
def mix_flops_no_gate(num_tokens, d_in, d_ff, num_classes, num_experts):
    return num_experts * (2 * num_tokens * d_in * d_ff + 2 * num_tokens * d_ff * num_classes)


def mix_flops_one_expert(num_tokens, d_in, d_ff, num_classes, num_experts):
    return 2 * num_tokens * d_in * num_experts + 2 * num_tokens * d_in * d_ff + 2 * num_tokens * d_ff * num_classes


def mix_flops_square_experts(num_tokens, d_in, d_ff, num_classes, num_experts):
    return 2 * num_tokens * d_in * num_experts + num_experts * 4 * num_tokens * d_in * d_ff


def mix_flops_macs(num_tokens, d_in, d_ff, num_classes, num_experts):
    return num_tokens * d_in * num_experts + num_experts * (num_tokens * d_in * d_ff + num_tokens * d_ff * num_classes)


MUTANTS.update(
    {
        "2.1": [
            ("averaged logits, then softmax", avg_logits_then_softmax, "averaged the logits"),
            ("softmax over the members", avg_softmax_over_members, "softmax over the members"),
            ("sum instead of mean", avg_sum_not_mean, "summed the members"),
            ("mean over the patients", avg_over_patients, "averaged over the patients"),
            ("exp without subtracting the max", avg_naive_exp, "overflows"),
        ],
        "2.2": [
            ("variance divides by R - 1", bv_unbiased_variance, "R - 1"),
            ("mean over the classes", bv_mean_over_classes, "sum* over the classes"),
            ("variance around the truth", bv_variance_around_truth, "spread around the truth"),
            ("bias not squared", bv_bias_not_squared, "bias is not squared"),
            ("per-patient values", bv_per_patient, "return one number"),
        ],
        "2.3": [
            ("members' average loss", ll_members_average, "members' average cross-entropy"),
            ("averaged logits", ll_average_logits, "averaged the logits"),
            ("log of an underflowed probability", ll_naive_log, "logsumexp"),
            ("forgot log R", ll_forgot_log_r, "log R"),
            ("summed over patients", ll_sum_over_patients, "summed over the"),
        ],
        "3.1": [
            ("softmax over the patients", gate_softmax_over_patients, "softmax over the patients"),
            ("no softmax", gate_no_softmax, "raw scores"),
            ("sigmoid", gate_sigmoid, "sigmoid"),
            ("exp without subtracting the max", gate_naive_exp, "overflows"),
            ("transposed w_gate", gate_transposed, "`w_gate` transposed; drop the .T"),
        ],
        "3.2": [
            ("mixed logits, then softmax", mix_logits, "mixed the experts' logits"),
            ("forgot the gate", mix_no_gate, "forgot to weight by the gate"),
            ("gate softmax over the patients", mix_gate_over_patients, "over the patients"),
            ("expert softmax over the experts", mix_expert_softmax_over_experts, "runs over the experts"),
            ("raw gate scores as weights", mix_raw_gate, "raw scores"),
            ("no sum over the experts", mix_no_sum, "separate answers"),
        ],
        "3.3": [
            ("raw mutual information", score_raw_mi, "mutual information itself"),
            ("divided by H(specialty) only", score_by_specialty_entropy, "H(specialty) alone"),
            ("0 · log 0 gives NaN", score_nan_for_empty, "0 · log 0"),
            ("divided by the smaller entropy", score_by_min_entropy, "smaller or larger of the two entropies"),
            ("soft counts", score_soft_counts, "soft counts"),
            ("argmax over the patients", score_argmax_over_patients, "argmax or a sum over the wrong axis"),
        ],
        "3.4": [
            ("forgot the gate", mix_flops_no_gate, "gate is missing"),
            ("one expert only", mix_flops_one_expert, "single expert"),
            ("experts map back to D", mix_flops_square_experts, "F × classes"),
            ("multiply-adds, not FLOPs", mix_flops_macs, "multiply-add"),
        ],
    }
)


# -- 6.1 sort_by_expert ------------------------------------------------------
def sort_no_minlength(expert_index, num_experts):
    return torch.argsort(expert_index, stable=True), torch.bincount(expert_index)


def sort_descending(expert_index, num_experts):
    return torch.argsort(expert_index, descending=True, stable=True), torch.bincount(expert_index, minlength=num_experts)


def sort_unstable(expert_index, num_experts):
    n = len(expert_index)
    key = expert_index * n + (n - 1 - torch.arange(n))  # later tokens first within an expert
    return torch.argsort(key), torch.bincount(expert_index, minlength=num_experts)


def sort_values_not_indices(expert_index, num_experts):
    return torch.sort(expert_index).values, torch.bincount(expert_index, minlength=num_experts)


# -- 6.2 combine_rows ----------------------------------------------------------
def combine_no_gate(y_sorted, token, gates, num_tokens):
    return torch.zeros(num_tokens, y_sorted.shape[1]).index_add(0, token, y_sorted)


def combine_assign(y_sorted, token, gates, num_tokens):
    out = torch.zeros(num_tokens, y_sorted.shape[1])
    out[token] = y_sorted * gates[:, None]
    return out


def combine_gather(y_sorted, token, gates, num_tokens):
    return (y_sorted * gates[:, None])[token]


def combine_keep_sorted(y_sorted, token, gates, num_tokens):
    return y_sorted * gates[:, None]


# -- 6.3 slot_positions ------------------------------------------------------
def slots_from_one(expert_index, num_experts):
    one_hot = F.one_hot(expert_index, num_experts)
    return torch.cumsum(one_hot, 0).gather(1, expert_index[:, None]).squeeze(1)


def slots_all_tokens(expert_index, num_experts):
    return torch.arange(len(expert_index))


def slots_total(expert_index, num_experts):
    return torch.bincount(expert_index, minlength=num_experts)[expert_index]


def slots_float(expert_index, num_experts):
    one_hot = F.one_hot(expert_index, num_experts).float()
    return (torch.cumsum(one_hot, 0) - one_hot).gather(1, expert_index[:, None]).squeeze(1)


MUTANTS.update(
    {
        "6.1": [
            ("counts without minlength", sort_no_minlength, "still needs its 0"),
            ("descending", sort_descending, "descending"),
            ("unstable within an expert", sort_unstable, "stable sort"),
            ("sorted values, not the permutation", sort_values_not_indices, "sorted expert ids"),
        ],
        "6.2": [
            ("forgot the gate", combine_no_gate, "gate weights are missing"),
            ("assignment instead of add (top-2)", combine_assign, "sum of both"),
            ("gather instead of scatter", combine_gather, "wrong permutation"),
            ("left in sorted order / lost dropped tokens", combine_keep_sorted, "still in sorted order"),
        ],
        "6.3": [
            ("starts at 1", slots_from_one, "off by one"),
            ("counts every earlier token", slots_all_tokens, "all earlier tokens"),
            ("expert totals", slots_total, "total number of tokens"),
            ("float positions", slots_float, "integer tensor"),
        ],
    }
)


# == lessons 04-05 ==================================================================


# -- 4.1 top_k_routing -----------------------------------------------------------
def topk_no_renormalisation(router_logits, k):
    probs = torch.softmax(router_logits, dim=-1)
    gates, expert_index = torch.topk(probs, k, dim=-1)
    return expert_index, gates


def topk_softmax_over_tokens(router_logits, k):
    probs = torch.softmax(router_logits, dim=0)
    top, expert_index = torch.topk(probs, k, dim=-1)
    return expert_index, top / top.sum(-1, keepdim=True)


def topk_renormalised_logits(router_logits, k):
    top, expert_index = torch.topk(router_logits, k, dim=-1)
    return expert_index, top / top.sum(-1, keepdim=True)


def topk_smallest(router_logits, k):
    probs = torch.softmax(router_logits, dim=-1)
    top, expert_index = torch.topk(probs, k, dim=-1, largest=False)
    return expert_index, top / top.sum(-1, keepdim=True)


def topk_swapped(router_logits, k):
    probs = torch.softmax(router_logits, dim=-1)
    top, expert_index = torch.topk(probs, k, dim=-1)
    return top / top.sum(-1, keepdim=True), expert_index


def topk_over_tokens(router_logits, k):
    probs = torch.softmax(router_logits, dim=-1)
    top, expert_index = torch.topk(probs, k, dim=0)
    return expert_index, top / top.sum(0, keepdim=True)


# -- 4.2 noisy_top_k -------------------------------------------------------------
def _keep_top_k_softmax(h, k):
    top, expert_index = torch.topk(h, k, dim=-1)
    return expert_index, torch.softmax(top, dim=-1)


def noisy_unscaled(clean_logits, noise_logits, noise, k):
    return _keep_top_k_softmax(clean_logits + noise, k)


def noisy_no_softplus(clean_logits, noise_logits, noise, k):
    return _keep_top_k_softmax(clean_logits + noise * noise_logits, k)


def noisy_choice_on_clean(clean_logits, noise_logits, noise, k):
    h = clean_logits + noise * F.softplus(noise_logits)
    _, expert_index = torch.topk(clean_logits, k, dim=-1)
    return expert_index, torch.softmax(h.gather(-1, expert_index), dim=-1)


def noisy_softmax_over_all(clean_logits, noise_logits, noise, k):
    h = clean_logits + noise * F.softplus(noise_logits)
    gates, expert_index = torch.topk(torch.softmax(h, dim=-1), k, dim=-1)
    return expert_index, gates


def noisy_gates_from_clean(clean_logits, noise_logits, noise, k):
    h = clean_logits + noise * F.softplus(noise_logits)
    _, expert_index = torch.topk(h, k, dim=-1)
    return expert_index, torch.softmax(clean_logits.gather(-1, expert_index), dim=-1)


# -- 4.3 switch_layer --------------------------------------------------------------
def switch_no_gate(x, w_router, experts):
    index = torch.softmax(x @ w_router, dim=-1).argmax(dim=-1)
    y = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        mask = index == e
        y[mask] = expert(x[mask])
    return y


def switch_renormalised_gate(x, w_router, experts):
    probs = torch.softmax(x @ w_router, dim=-1)
    top, index = torch.topk(probs, 1, dim=-1)
    gate = (top / top.sum(-1, keepdim=True))[:, 0]  # top-1 renormalised: always 1.0
    y = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        mask = index[:, 0] == e
        y[mask] = gate[mask, None] * expert(x[mask])
    return y


def switch_logit_gate(x, w_router, experts):
    logits = x @ w_router
    gate, index = logits.max(dim=-1)
    y = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        mask = index == e
        y[mask] = gate[mask, None] * expert(x[mask])
    return y


def switch_softmax_over_tokens(x, w_router, experts):
    probs = torch.softmax(x @ w_router, dim=0)
    gate, index = probs.max(dim=-1)
    y = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        mask = index == e
        y[mask] = gate[mask, None] * expert(x[mask])
    return y


def switch_dense(x, w_router, experts):
    probs = torch.softmax(x @ w_router, dim=-1)
    return sum(probs[:, e, None] * expert(x) for e, expert in enumerate(experts))


def switch_every_expert_then_pick(x, w_router, experts):
    probs = torch.softmax(x @ w_router, dim=-1)
    gate, index = probs.max(dim=-1)
    outs = torch.stack([expert(x) for expert in experts], dim=1)  # (N, E, D): every expert on every token
    return gate[:, None] * outs[torch.arange(len(x)), index]


def switch_detached_gate(x, w_router, experts):
    probs = torch.softmax(x @ w_router, dim=-1).detach()
    gate, index = probs.max(dim=-1)
    y = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        mask = index == e
        y[mask] = gate[mask, None] * expert(x[mask])
    return y


# -- 5.1 load_balancing_loss ---------------------------------------------------------
def lb_f_from_probs(router_probs, expert_index):
    num_experts = router_probs.shape[1]
    p = router_probs.mean(dim=0)
    return num_experts * torch.sum(p * p)


def lb_no_factor_e(router_probs, expert_index):
    num_tokens, num_experts = router_probs.shape
    f = torch.bincount(expert_index, minlength=num_experts).float() / num_tokens
    return torch.sum(f * router_probs.mean(dim=0))


def lb_counts_not_fractions(router_probs, expert_index):
    num_experts = router_probs.shape[1]
    counts = torch.bincount(expert_index, minlength=num_experts).float()
    return num_experts * torch.sum(counts * router_probs.mean(dim=0))


def lb_no_minlength(router_probs, expert_index):
    num_tokens, num_experts = router_probs.shape
    f = torch.bincount(expert_index).float() / num_tokens
    return num_experts * torch.sum(f * router_probs.mean(dim=0))


def lb_item(router_probs, expert_index):
    num_tokens, num_experts = router_probs.shape
    f = torch.bincount(expert_index, minlength=num_experts).float() / num_tokens
    return torch.tensor(num_experts * torch.sum(f * router_probs.mean(dim=0)).item())


def lb_sum_of_probs(router_probs, expert_index):
    num_tokens, num_experts = router_probs.shape
    f = torch.bincount(expert_index, minlength=num_experts).float() / num_tokens
    return num_experts * torch.sum(f * router_probs.sum(dim=0))


def lb_both_from_counts(router_probs, expert_index):
    num_tokens, num_experts = router_probs.shape
    f = torch.bincount(expert_index, minlength=num_experts).float() / num_tokens
    return num_experts * torch.sum(f * f) + 0 * router_probs.sum()


# -- 5.2 router_z_loss -----------------------------------------------------------------
def z_on_probabilities(router_logits):
    return (torch.logsumexp(torch.softmax(router_logits, dim=-1), dim=-1) ** 2).mean()


def z_not_squared(router_logits):
    return torch.logsumexp(router_logits, dim=-1).mean()


def z_sum_over_tokens(router_logits):
    return (torch.logsumexp(router_logits, dim=-1) ** 2).sum()


def z_over_tokens(router_logits):
    return (torch.logsumexp(router_logits, dim=0) ** 2).mean()


def z_naive(router_logits):
    return (torch.log(torch.exp(router_logits).sum(dim=-1)) ** 2).mean()


def z_squared_logits(router_logits):
    return (router_logits**2).mean()


# -- 5.3 capacity_keep -----------------------------------------------------------------
def keep_last_tokens(expert_index, num_experts, capacity):
    keep = torch.zeros(len(expert_index), dtype=torch.bool)
    for e in range(num_experts):
        rows = (expert_index == e).nonzero(as_tuple=True)[0]
        keep[rows[len(rows) - capacity :] if len(rows) > capacity else rows] = True
    return keep


def keep_off_by_one(expert_index, num_experts, capacity):
    keep = torch.zeros(len(expert_index), dtype=torch.bool)
    for e in range(num_experts):
        rows = (expert_index == e).nonzero(as_tuple=True)[0]
        keep[rows[: capacity + 1]] = True
    return keep


def keep_global_capacity(expert_index, num_experts, capacity):
    return torch.arange(len(expert_index)) < capacity


def keep_everything(expert_index, num_experts, capacity):
    return torch.ones(len(expert_index), dtype=torch.bool)


def keep_inverted(expert_index, num_experts, capacity):
    dropped = torch.zeros(len(expert_index), dtype=torch.bool)
    for e in range(num_experts):
        rows = (expert_index == e).nonzero(as_tuple=True)[0]
        dropped[rows[capacity:]] = True
    return dropped  # True where dropped: the mask the exercise asks for, upside down


def keep_cumsum_from_one(expert_index, num_experts, capacity):
    one_hot = F.one_hot(expert_index, num_experts)
    position = torch.cumsum(one_hot, dim=0).gather(1, expert_index[:, None])[:, 0]  # 1-based
    return position < capacity


# -- 5.4 expert_choice -------------------------------------------------------------------
def choice_softmax_over_tokens(router_logits, capacity):
    scores = torch.softmax(router_logits, dim=0)
    gates, token_index = torch.topk(scores.T, capacity, dim=-1)
    return token_index, gates


def choice_raw_logits(router_logits, capacity):
    gates, token_index = torch.topk(router_logits.T, capacity, dim=-1)
    return token_index, gates


def choice_lowest(router_logits, capacity):
    scores = torch.softmax(router_logits, dim=-1)
    gates, token_index = torch.topk(scores.T, capacity, dim=-1, largest=False)
    return token_index, gates


def choice_transposed(router_logits, capacity):
    scores = torch.softmax(router_logits, dim=-1)
    gates, token_index = torch.topk(scores, capacity, dim=0)  # (C, E)
    return token_index, gates


def choice_ranked_by_logits(router_logits, capacity):
    scores = torch.softmax(router_logits, dim=-1)
    token_index = torch.topk(router_logits.T, capacity, dim=-1).indices
    return token_index, scores.T.gather(-1, token_index)


MUTANTS.update(
    {
        "4.1": [
            ("no renormalisation after top-k", topk_no_renormalisation, "renormalise"),
            ("softmax over tokens instead of experts", topk_softmax_over_tokens, "over the tokens (dim 0)"),
            ("renormalised raw logits", topk_renormalised_logits, "renormalised the raw logits"),
            ("the k least likely experts", topk_smallest, "least"),
            ("results swapped", topk_swapped, "swapped"),
            ("top-k over the tokens", topk_over_tokens, "over the tokens"),
        ],
        "4.2": [
            ("noise not scaled", noisy_unscaled, "not scaled"),
            ("scale without softplus", noisy_no_softplus, "softplus"),
            ("choice on the clean logits", noisy_choice_on_clean, "picked on the clean logits"),
            ("softmax over all experts (no KeepTopK)", noisy_softmax_over_all, "KeepTopK"),
            ("gates from the clean logits", noisy_gates_from_clean, "gates come from the clean logits"),
        ],
        "4.3": [
            ("no gate", switch_no_gate, "router gets no gradient"),
            ("top-1 gate renormalised to 1", switch_renormalised_gate, "renormalised to 1.0"),
            ("gate is the raw logit", switch_logit_gate, "raw router logit"),
            ("softmax over tokens", switch_softmax_over_tokens, "over the tokens (dim 0)"),
            ("dense mixture", switch_dense, "dense mixture"),
            ("every expert on every token, then pick", switch_every_expert_then_pick, "E times the cost"),
            ("detached gate", switch_detached_gate, "no gradient"),
        ],
        "5.1": [
            ("f from probabilities instead of counts", lb_f_from_probs, "f is computed from the probabilities"),
            ("no factor E", lb_no_factor_e, "factor E is missing"),
            ("counts, not fractions", lb_counts_not_fractions, "N times too large"),
            ("bincount without minlength", lb_no_minlength, "minlength"),
            ("loss through .item()", lb_item, "no gradient"),
            ("P summed, not averaged", lb_sum_of_probs, "N times too large"),
            ("P from the counts as well", lb_both_from_counts, "both factors are computed from the counts"),
        ],
        "5.2": [
            ("z-loss on probabilities instead of logits", z_on_probabilities, "on the probabilities"),
            ("not squared", z_not_squared, "square is missing"),
            ("sum over tokens", z_sum_over_tokens, "not the sum"),
            ("logsumexp over tokens", z_over_tokens, "over the tokens (dim 0)"),
            ("naive log-sum-exp overflows", z_naive, "overflows"),
            ("mean squared logit", z_squared_logits, "mean squared logit"),
        ],
        "5.3": [
            ("the wrong tokens dropped (keeps the last)", keep_last_tokens, "dropped the wrong tokens"),
            ("off by one", keep_off_by_one, "C + 1"),
            ("capacity for the whole batch", keep_global_capacity, "per expert"),
            ("no dropping", keep_everything, "nothing is dropped"),
            ("mask inverted", keep_inverted, "other way round"),
            ("1-based positions", keep_cumsum_from_one, "C - 1"),
        ],
        "5.4": [
            ("softmax over tokens", choice_softmax_over_tokens, "over the tokens (dim 0)"),
            ("raw logits", choice_raw_logits, "raw logits"),
            ("lowest scores", choice_lowest, "lowest"),
            ("transposed", choice_transposed, "transposed"),
            ("ranked by the logits", choice_ranked_by_logits, "picked each expert's tokens by their raw logits"),
        ],
    }
)


# == lesson 07 ======================================================================


# -- 7.1 causal_attention ------------------------------------------------------------
def _scores(q, k):
    return q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5


def _future(t, diagonal=1):
    return torch.ones(t, t, dtype=torch.bool).triu(diagonal)  # True where masked


def attn_correct_but(q, k, v, *, scores=None, masked=None, dim=-1, fill=float("-inf")):
    t = q.shape[-2]
    scores = _scores(q, k) if scores is None else scores
    masked = _future(t) if masked is None else masked
    return torch.softmax(scores.masked_fill(masked, fill), dim=dim) @ v


def attn_no_mask(q, k, v):
    return torch.softmax(_scores(q, k), dim=-1) @ v


def attn_diagonal_masked(q, k, v):
    return attn_correct_but(q, k, v, masked=_future(q.shape[-2], diagonal=0))


def attn_one_future_key(q, k, v):
    return attn_correct_but(q, k, v, masked=_future(q.shape[-2], diagonal=2))


def attn_mask_wrong_way(q, k, v):
    return attn_correct_but(q, k, v, masked=_future(q.shape[-2]).T)


def attn_no_scale(q, k, v):
    return attn_correct_but(q, k, v, scores=q @ k.transpose(-2, -1))


def attn_scale_by_d(q, k, v):
    return attn_correct_but(q, k, v, scores=q @ k.transpose(-2, -1) / q.shape[-1])


def attn_softmax_over_queries(q, k, v):
    return attn_correct_but(q, k, v, dim=-2)


def attn_zero_fill(q, k, v):
    return attn_correct_but(q, k, v, fill=0.0)


def attn_mask_after_softmax(q, k, v):
    w = torch.softmax(_scores(q, k), dim=-1)
    return w.masked_fill(_future(q.shape[-2]), 0.0) @ v


def attn_returns_weights(q, k, v):
    return torch.softmax(_scores(q, k).masked_fill(_future(q.shape[-2]), float("-inf")), dim=-1)


def attn_returns_both(q, k, v):
    w = torch.softmax(_scores(q, k).masked_fill(_future(q.shape[-2]), float("-inf")), dim=-1)
    return w @ v, w


def attn_forgot_return(q, k, v):
    torch.softmax(_scores(q, k).masked_fill(_future(q.shape[-2]), float("-inf")), dim=-1) @ v


# -- 7.2 block_forward ---------------------------------------------------------------
def block_no_attention_residual(block, x):
    x = block.attn(block.ln_1(x))
    return x + block.ffn(block.ln_2(x))


def block_no_ffn_residual(block, x):
    x = x + block.attn(block.ln_1(x))
    return block.ffn(block.ln_2(x))


def block_post_norm(block, x):
    x = block.ln_1(x + block.attn(x))
    return block.ln_2(x + block.ffn(x))


def block_ln_1_twice(block, x):
    x = x + block.attn(block.ln_1(x))
    return x + block.ffn(block.ln_1(x))


def block_norms_swapped(block, x):
    x = x + block.attn(block.ln_2(x))
    return x + block.ffn(block.ln_1(x))


def block_parallel(block, x):
    return x + block.attn(block.ln_1(x)) + block.ffn(block.ln_2(x))


def block_no_norms(block, x):
    x = x + block.attn(x)
    return x + block.ffn(x)


def block_calls_the_block(block, x):
    return block(x).x


def block_in_place(block, x):
    x += block.attn(block.ln_1(x))
    return x + block.ffn(block.ln_2(x))


def block_flattened(block, x):
    x = x + block.attn(block.ln_1(x))
    x = x + block.ffn(block.ln_2(x))
    return x.reshape(-1, x.shape[-1])


MUTANTS.update(
    {
        "7.1": [
            ("no causal mask", attn_no_mask, "causal mask is missing"),
            ("diagonal masked too", attn_diagonal_masked, "mask off by one"),
            ("one future key allowed", attn_one_future_key, "one future key"),
            ("mask the wrong way round (triu)", attn_mask_wrong_way, "wrong way round"),
            ("no 1/sqrt(d)", attn_no_scale, "1/sqrt(d) scale is missing"),
            ("scaled by 1/d", attn_scale_by_d, "1/d"),
            ("softmax over queries", attn_softmax_over_queries, "over the queries (dim=-2)"),
            ("masked with 0, not -inf", attn_zero_fill, "not -inf"),
            ("masked after the softmax", attn_mask_after_softmax, "after the softmax"),
            ("returns the weights", attn_returns_weights, "returned the attention weights"),
            ("returns output and weights", attn_returns_both, "return only the output"),
            ("forgot return", attn_forgot_return, "forget a `return`"),
        ],
        "7.2": [
            ("attention residual missing", block_no_attention_residual, "attention residual is missing"),
            ("FFN residual missing", block_no_ffn_residual, "FFN residual is missing"),
            ("post-norm", block_post_norm, "post-norm"),
            ("ln_1 used twice", block_ln_1_twice, "ln_1 was used twice"),
            ("norms swapped", block_norms_swapped, "norms are swapped"),
            ("parallel block", block_parallel, "in parallel"),
            ("no layer norms", block_no_norms, "layer norms are missing"),
            ("calls the package's block", block_calls_the_block, "build the block from its parts"),
            ("adds into the input in place", block_in_place, "in place"),
            ("flattened output", block_flattened, "expected (2, 5, 8)"),
        ],
    }
)


# -- 8.1 switch_block_forward ---------------------------------------------------
def switch_right(block, x):
    x = x + block.attn(block.ln_1(x))
    moe = block.ffn(block.ln_2(x))
    return x + moe.y, moe.router_loss


def switch_no_moe_residual(block, x):
    x = x + block.attn(block.ln_1(x))
    moe = block.ffn(block.ln_2(x))
    return moe.y, moe.router_loss


def switch_no_attention_residual(block, x):
    x = block.attn(block.ln_1(x))
    moe = block.ffn(block.ln_2(x))
    return x + moe.y, moe.router_loss


def switch_no_ln_2(block, x):
    x = x + block.attn(block.ln_1(x))
    moe = block.ffn(x)
    return x + moe.y, moe.router_loss


def switch_unweighted_balance(block, x):
    x = x + block.attn(block.ln_1(x))
    moe = block.ffn(block.ln_2(x))
    return x + moe.y, moe.aux_loss


def switch_forgets_aux(block, x):
    x = x + block.attn(block.ln_1(x))
    moe = block.ffn(block.ln_2(x))
    return x + moe.y, 0.0


def switch_detached_aux(block, x):
    x = x + block.attn(block.ln_1(x))
    moe = block.ffn(block.ln_2(x))
    return x + moe.y, torch.tensor(moe.router_loss.item())


def switch_returns_moe_output(block, x):
    x = x + block.attn(block.ln_1(x))
    moe = block.ffn(block.ln_2(x))
    return moe, moe.router_loss


def switch_calls_the_block(block, x):
    out = block(x)
    return out.x, out.moe.router_loss


# -- 8.2 lm_accounting -------------------------------------------------------------
def _accounting(
    c,
    *,
    all_experts_active=False,
    no_router=False,
    untied_head=False,
    no_mix=False,
    one_expert_total=False,
    flops_all_experts=False,
    multiply_add_once=False,
):
    V, T, D, F_, L, E = c.vocab_size, c.block_size, c.d_model, c.d_ff, c.n_layers, c.num_experts
    n_moe = len(c.moe_layers)
    ffn_one = 2 * D * F_ + F_ + D
    shared = V * D + L * (4 * D * D + 4 * D) + (2 * L + 1) * 2 * D + (0 if no_router else n_moe * D * E)
    if untied_head:
        shared += V * D
    total = shared + (L - n_moe) * ffn_one + n_moe * (1 if one_expert_total else E) * ffn_one
    active = shared + L * ffn_one + (n_moe * (E - 1) * ffn_one if all_experts_active else 0)
    per_layer = 8 * D * D + (0 if no_mix else 4 * T * D) + 4 * D * F_
    flops = (
        L * per_layer
        + (n_moe * (E - 1) * 4 * D * F_ if flops_all_experts else 0)
        + (0 if no_router else n_moe * 2 * D * E)
        + 2 * D * V
    )
    if multiply_add_once:
        flops //= 2
    return {"params_total": total, "params_active": active, "flops_per_token": flops}


MUTANTS.update(
    {
        "8.1": [
            ("Switch residual missing", switch_no_moe_residual, "residual around the Switch layer is missing"),
            ("attention residual missing", switch_no_attention_residual, "residual around attention is missing"),
            ("Switch layer reads the raw stream", switch_no_ln_2, "reads ln_2(x)"),
            ("unweighted balance loss", switch_unweighted_balance, "unweighted balance loss"),
            ("forgot the router loss", switch_forgets_aux, "router loss is missing"),
            ("router loss detached", switch_detached_aux, "carries no gradient"),
            ("returns the MoEOutput", switch_returns_moe_output, "MoEOutput itself"),
            ("calls the package's block", switch_calls_the_block, "build the block from its parts"),
        ],
        "8.2": [
            ("every expert counted as active", lambda c: _accounting(c, all_experts_active=True), "uses only the one expert"),
            ("routers forgotten", lambda c: _accounting(c, no_router=True), "routers"),
            ("head counted twice", lambda c: _accounting(c, untied_head=True), "tied to the token embedding"),
            ("attention mix forgotten", lambda c: _accounting(c, no_mix=True), "4·T·D"),
            ("one expert in the total", lambda c: _accounting(c, one_expert_total=True), "holds all E experts"),
            ("FLOPs of every expert", lambda c: _accounting(c, flops_all_experts=True), "visits one expert"),
            ("a multiply-add as one FLOP", lambda c: _accounting(c, multiply_add_once=True), "2 FLOPs"),
            ("returns a tuple", lambda c: tuple(_accounting(c).values()), "return a dict"),
        ],
    }
)


# == more wrong answers (issue 19): for every exercise, typical mistakes written as a learner would, =================
# first without looking at the checks, then each check was taught the ones it only called "does not match".
# Words None: a mutant caught with a generic message (tests/test_mutants.py counts them).


# 0.1 ------------------------------------------------------------------------------
def count_loop_stops_early(specialty, num_specialties):
    counts = torch.zeros(num_specialties, dtype=torch.long)
    for s in range(num_specialties - 1):
        counts[s] = (specialty == s).sum()
    return counts


def count_unique(specialty, num_specialties):
    return torch.unique(specialty, return_counts=True)[1]


def count_one_hot_wrong_axis(specialty, num_specialties):
    return F.one_hot(specialty, num_specialties).sum(dim=1)


def count_python_list(specialty, num_specialties):
    return [int((specialty == s).sum()) for s in range(num_specialties)]


def count_labels_from_one(specialty, num_specialties):
    return torch.stack([(specialty == s).sum() for s in range(1, num_specialties + 1)])


def count_float_loop(specialty, num_specialties):
    counts = torch.zeros(num_specialties)
    for s in specialty:
        counts[s] += 1
    return counts


def count_histc(specialty, num_specialties):
    return torch.histc(specialty.float(), bins=num_specialties, min=0, max=num_specialties - 1)


def count_minlength_short(specialty, num_specialties):
    return torch.bincount(specialty, minlength=num_specialties - 1)


# 1.1 --------------------------------------------------------------------------------
def ffn_sigmoid(x, w_in, b_in, w_out, b_out):
    return torch.sigmoid(x @ w_in + b_in) @ w_out + b_out


def ffn_silu(x, w_in, b_in, w_out, b_out):
    return F.silu(x @ w_in + b_in) @ w_out + b_out


def ffn_biases_swapped(x, w_in, b_in, w_out, b_out):
    return F.gelu(x @ w_in + b_out) @ w_out + b_in


def ffn_gelu_twice(x, w_in, b_in, w_out, b_out):
    return F.gelu(F.gelu(x @ w_in + b_in)) @ w_out + b_out


def ffn_operands_swapped(x, w_in, b_in, w_out, b_out):
    return (w_out @ F.gelu(w_in @ x + b_in)) + b_out


def ffn_hidden_only(x, w_in, b_in, w_out, b_out):
    return F.gelu(x @ w_in + b_in)


def ffn_bias_multiplied(x, w_in, b_in, w_out, b_out):
    return F.gelu(x @ w_in * b_in) @ w_out + b_out


def ffn_tanh(x, w_in, b_in, w_out, b_out):
    return torch.tanh(x @ w_in + b_in) @ w_out + b_out


def ffn_output_doubled(x, w_in, b_in, w_out, b_out):
    h = F.gelu(x @ w_in + b_in)
    return h @ w_out + b_out + (h @ w_out + b_out)


# 1.2 --------------------------------------------------------------------------------
def params_float(d_model, d_ff):
    return 2.0 * d_model * d_ff + d_ff + d_model


def params_true_division(d_model, d_ff):
    return int(2 * d_model * d_ff + d_ff + d_model) / 1


def params_off_by_one(d_model, d_ff):
    return 2 * d_model * d_ff + d_ff + d_model + 1


def params_flops_formula(d_model, d_ff):
    return 4 * d_model * d_ff


def params_biases_only(d_model, d_ff):
    return d_model + d_ff


def params_numel_tensor(d_model, d_ff):
    return torch.tensor(d_model * d_ff * 2 + d_ff + d_model)


def params_square(d_model, d_ff):
    return 2 * d_model * d_model + d_ff + d_model


# 1.3 --------------------------------------------------------------------------------
def flops_training(num_tokens, d_model, d_ff):
    return 6 * num_tokens * d_model * d_ff


def flops_float(num_tokens, d_model, d_ff):
    return 4.0 * num_tokens * d_model * d_ff


def flops_exact_adds(num_tokens, d_model, d_ff):
    return num_tokens * (d_ff * (2 * d_model - 1) + d_model * (2 * d_ff - 1))


def flops_d_ff_squared(num_tokens, d_model, d_ff):
    return 4 * num_tokens * d_ff * d_ff


def flops_with_activation(num_tokens, d_model, d_ff):
    return 4 * num_tokens * d_model * d_ff + num_tokens * d_ff


def flops_one_matmul_four(num_tokens, d_model, d_ff):
    return 2 * num_tokens * d_model * d_ff * 4


def flops_per_token(num_tokens, d_model, d_ff):
    return 4 * d_model * d_ff * num_tokens // num_tokens


# 1.4 --------------------------------------------------------------------------------
def acc_loop_stops_early(logits, diagnosis, specialty, num_specialties):
    correct = (logits.argmax(-1) == diagnosis).float()
    acc = torch.full((num_specialties,), float("nan"))
    for s in range(num_specialties - 1):
        if (specialty == s).any():
            acc[s] = correct[specialty == s].mean()
    return acc


def acc_against_specialty(logits, diagnosis, specialty, num_specialties):
    correct = (logits.argmax(-1) == specialty).float()
    return torch.stack([correct[specialty == s].mean() for s in range(num_specialties)])


def acc_percent(logits, diagnosis, specialty, num_specialties):
    correct = (logits.argmax(-1) == diagnosis).float()
    return 100 * torch.stack([correct[specialty == s].mean() for s in range(num_specialties)])


def acc_integer_division(logits, diagnosis, specialty, num_specialties):
    correct = (logits.argmax(-1) == diagnosis).long()
    hits = torch.zeros(num_specialties, dtype=torch.long).index_add_(0, specialty, correct)
    counts = torch.bincount(specialty, minlength=num_specialties)
    return (hits // counts.clamp(min=1)).float().where(counts > 0, torch.tensor(float("nan")))


def acc_bincount_no_minlength(logits, diagnosis, specialty, num_specialties):
    correct = logits.argmax(-1) == diagnosis
    return torch.bincount(specialty[correct]).float() / torch.bincount(specialty).float()


def acc_argmax_wrong_axis(logits, diagnosis, specialty, num_specialties):
    correct = (logits.argmax(0) == diagnosis).float()
    return torch.stack([correct[specialty == s].mean() for s in range(num_specialties)])


def acc_probability_of_truth(logits, diagnosis, specialty, num_specialties):
    p = torch.softmax(logits, -1)[torch.arange(len(diagnosis)), diagnosis]
    return torch.stack([p[specialty == s].mean() for s in range(num_specialties)])


def acc_error_rate(logits, diagnosis, specialty, num_specialties):
    wrong = (logits.argmax(-1) != diagnosis).float()
    return torch.stack([wrong[specialty == s].mean() for s in range(num_specialties)])


# 2.1 --------------------------------------------------------------------------------
def avg_softmax_over_patients(member_logits):
    return torch.softmax(member_logits, dim=1).mean(dim=0)


def avg_keepdim(member_logits):
    return torch.softmax(member_logits, dim=-1).mean(dim=0, keepdim=True)


def avg_median(member_logits):
    return torch.softmax(member_logits, dim=-1).median(dim=0).values


def avg_max_member(member_logits):
    return torch.softmax(member_logits, dim=-1).max(dim=0).values


def avg_log_probs(member_logits):
    return torch.log_softmax(member_logits, dim=-1).mean(dim=0)


def avg_summed_logits(member_logits):
    return torch.softmax(member_logits.sum(dim=0), dim=-1)


def avg_everything(member_logits):
    return torch.softmax(member_logits, dim=-1).mean()


def avg_first_member(member_logits):
    return torch.softmax(member_logits[0], dim=-1)


# 2.2 --------------------------------------------------------------------------------
def _bv_parts(member_probs, targets):
    y = F.one_hot(targets, member_probs.shape[-1]).float()
    mean = member_probs.mean(0)
    return y, mean


def bv_order(member_probs, targets):
    y, mean = _bv_parts(member_probs, targets)
    return ((mean - y) ** 2).sum(-1).mean(), ((member_probs - y) ** 2).sum(-1).mean(), ((member_probs - mean) ** 2).sum(-1).mean()


def bv_std(member_probs, targets):
    y, mean = _bv_parts(member_probs, targets)
    return (
        ((member_probs - y) ** 2).sum(-1).mean(),
        ((mean - y) ** 2).sum(-1).mean(),
        member_probs.std(0, unbiased=False).sum(-1).mean(),
    )


def bv_variance_summed_over_members(member_probs, targets):
    y, mean = _bv_parts(member_probs, targets)
    return (
        ((member_probs - y) ** 2).sum(-1).mean(),
        ((mean - y) ** 2).sum(-1).mean(),
        ((member_probs - mean) ** 2).sum(-1).sum(0).mean(),
    )


def bv_no_one_hot(member_probs, targets):
    mean = member_probs.mean(0)
    y = targets[:, None].float()
    return (
        ((member_probs - y) ** 2).sum(-1).mean(),
        ((mean - y) ** 2).sum(-1).mean(),
        ((member_probs - mean) ** 2).sum(-1).mean(),
    )


def bv_dict(member_probs, targets):
    y, mean = _bv_parts(member_probs, targets)
    return {
        "error": ((member_probs - y) ** 2).sum(-1).mean(),
        "bias": ((mean - y) ** 2).sum(-1).mean(),
        "variance": ((member_probs - mean) ** 2).sum(-1).mean(),
    }


def bv_two_values(member_probs, targets):
    y, mean = _bv_parts(member_probs, targets)
    return ((mean - y) ** 2).sum(-1).mean(), ((member_probs - mean) ** 2).sum(-1).mean()


def bv_error_is_bias_plus_var_wrong(member_probs, targets):
    y, mean = _bv_parts(member_probs, targets)
    bias = ((mean - y) ** 2).sum(-1).mean()
    var = ((member_probs - mean) ** 2).sum(-1).mean()
    return ((mean - y) ** 2).sum(-1).mean(), bias, var


# 2.3 --------------------------------------------------------------------------------
def ll_log2(member_logits, targets):
    log_mean = torch.logsumexp(torch.log_softmax(member_logits, dim=-1), dim=0) - math.log(member_logits.shape[0])
    return F.nll_loss(log_mean, targets) / math.log(2)


def ll_probs_as_logits(member_logits, targets):
    probs = torch.softmax(member_logits, dim=-1).mean(0)
    return F.cross_entropy(probs, targets)


def ll_nll_on_probs(member_logits, targets):
    probs = torch.softmax(member_logits, dim=-1).mean(0)
    return F.nll_loss(probs, targets)


def ll_plus_log_r(member_logits, targets):
    log_mean = torch.logsumexp(torch.log_softmax(member_logits, dim=-1), dim=0) + math.log(member_logits.shape[0])
    return F.nll_loss(log_mean, targets)


def ll_per_patient(member_logits, targets):
    log_mean = torch.logsumexp(torch.log_softmax(member_logits, dim=-1), dim=0) - math.log(member_logits.shape[0])
    return F.nll_loss(log_mean, targets, reduction="none")


def ll_positive_log(member_logits, targets):
    log_mean = torch.logsumexp(torch.log_softmax(member_logits, dim=-1), dim=0) - math.log(member_logits.shape[0])
    return log_mean[torch.arange(len(targets)), targets].mean()


def ll_logsumexp_over_classes(member_logits, targets):
    log_mean = torch.logsumexp(torch.log_softmax(member_logits, dim=-1), dim=-1) - math.log(member_logits.shape[0])
    return -log_mean.mean()


def ll_first_member(member_logits, targets):
    return F.cross_entropy(member_logits[0], targets)


# 3.1 --------------------------------------------------------------------------------
def gate_normalise_everything(x, w_gate):
    e = torch.exp(x @ w_gate - (x @ w_gate).max())
    return e / e.sum()


def gate_w_first(x, w_gate):
    return torch.softmax(w_gate.T @ x.T, dim=0)


def gate_softmax_on_input(x, w_gate):
    return torch.softmax(x, dim=-1) @ w_gate


def gate_log_softmax(x, w_gate):
    return torch.log_softmax(x @ w_gate, dim=-1)


def gate_temperature(x, w_gate):
    return torch.softmax(x @ w_gate / x.shape[-1] ** 0.5, dim=-1)


def gate_divide_by_max(x, w_gate):
    s = x @ w_gate
    return s / s.max(dim=-1, keepdim=True).values


def gate_argmax_one_hot(x, w_gate):
    return F.one_hot((x @ w_gate).argmax(-1), w_gate.shape[1]).float()


def gate_abs_normalised(x, w_gate):
    s = (x @ w_gate).abs()
    return s / s.sum(-1, keepdim=True)


# 3.2 --------------------------------------------------------------------------------
def mix_top_expert_only(x, gate, experts):
    weights = torch.softmax(gate(x), dim=-1)
    probs = torch.stack([torch.softmax(e(x), dim=-1) for e in experts], dim=1)
    top = weights.argmax(-1)
    return probs[torch.arange(len(x)), top]


def mix_log_probs(x, gate, experts):
    weights = torch.softmax(gate(x), dim=-1)
    probs = torch.stack([torch.log_softmax(e(x), dim=-1) for e in experts], dim=1)
    return (weights[:, :, None] * probs).sum(1)


def mix_same_weight(x, gate, experts):
    weights = torch.softmax(gate(x), dim=-1)
    return sum(weights[:, 0:1] * torch.softmax(e(x), dim=-1) for e in experts)


def mix_gate_transposed(x, gate, experts):
    weights = torch.softmax(gate(x), dim=-1)
    probs = torch.stack([torch.softmax(e(x), dim=-1) for e in experts], dim=0)  # (E, N, C)
    return (weights.T[:, :, None] * probs).sum(0) / len(experts)


def mix_weights_on_logits_sum(x, gate, experts):
    weights = torch.softmax(gate(x), dim=-1)
    return sum(weights[:, i : i + 1] * e(x) for i, e in enumerate(experts))


def mix_keepdim(x, gate, experts):
    weights = torch.softmax(gate(x), dim=-1)
    probs = torch.stack([torch.softmax(e(x), dim=-1) for e in experts], dim=1)
    return (weights[:, :, None] * probs).sum(1, keepdim=True)


def mix_sigmoid_gate(x, gate, experts):
    weights = torch.sigmoid(gate(x))
    probs = torch.stack([torch.softmax(e(x), dim=-1) for e in experts], dim=1)
    return (weights[:, :, None] * probs).sum(1)


# 3.3 --------------------------------------------------------------------------------
def _joint_counts(gate_weights, specialty, num_specialties):
    top = gate_weights.argmax(dim=-1)
    joint = torch.zeros(num_specialties, gate_weights.shape[1])
    joint.index_put_((specialty, top), torch.ones(len(top)), accumulate=True)
    return joint


def _nmi(joint):
    joint = joint / joint.sum()
    ps, pe = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nz = joint > 0
    mi = (joint[nz] * (joint / (ps * pe))[nz].log()).sum()
    h = lambda p: -(p[p > 0] * p[p > 0].log()).sum()  # noqa: E731
    return mi, h(ps), h(pe)


def score_one_minus(gate_weights, specialty, num_specialties):
    mi, hs, he = _nmi(_joint_counts(gate_weights, specialty, num_specialties))
    return float(1 - 2 * mi / (hs + he))


def score_counts_not_probs(gate_weights, specialty, num_specialties):
    joint = _joint_counts(gate_weights, specialty, num_specialties)
    ps, pe = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nz = joint > 0
    mi = (joint[nz] * (joint / (ps * pe))[nz].log()).sum()
    h = lambda p: -(p[p > 0] * p[p > 0].log()).sum()  # noqa: E731
    return float(2 * mi / (h(ps) + h(pe)))


def score_missing_factor_two(gate_weights, specialty, num_specialties):
    mi, hs, he = _nmi(_joint_counts(gate_weights, specialty, num_specialties))
    return float(mi / (hs + he))


def score_log2_mi_only(gate_weights, specialty, num_specialties):
    mi, hs, he = _nmi(_joint_counts(gate_weights, specialty, num_specialties))
    return float(2 * (mi / math.log(2)) / (hs + he))


def score_max_entropy(gate_weights, specialty, num_specialties):
    mi, hs, he = _nmi(_joint_counts(gate_weights, specialty, num_specialties))
    return float(mi / torch.maximum(hs, he))


def score_accuracy_like(gate_weights, specialty, num_specialties):
    joint = _joint_counts(gate_weights, specialty, num_specialties)
    return float(joint.max(dim=1).values.sum() / joint.sum())


# 3.4 --------------------------------------------------------------------------------
def mflops_float(num_tokens, d_in, d_ff, num_classes, num_experts):
    return 2.0 * num_tokens * d_in * num_experts + num_experts * (
        2 * num_tokens * d_in * d_ff + 2 * num_tokens * d_ff * num_classes
    )


def mflops_gate_no_tokens(num_tokens, d_in, d_ff, num_classes, num_experts):
    return 2 * d_in * num_experts + num_experts * (2 * num_tokens * d_in * d_ff + 2 * num_tokens * d_ff * num_classes)


def mflops_classes_for_ff(num_tokens, d_in, d_ff, num_classes, num_experts):
    return 2 * num_tokens * d_in * num_experts + num_experts * (
        2 * num_tokens * d_in * num_classes + 2 * num_tokens * num_classes * num_classes
    )


def mflops_training(num_tokens, d_in, d_ff, num_classes, num_experts):
    return 3 * (
        2 * num_tokens * d_in * num_experts + num_experts * (2 * num_tokens * d_in * d_ff + 2 * num_tokens * d_ff * num_classes)
    )


def mflops_plus_mixing(num_tokens, d_in, d_ff, num_classes, num_experts):
    base = 2 * num_tokens * d_in * num_experts + num_experts * (
        2 * num_tokens * d_in * d_ff + 2 * num_tokens * d_ff * num_classes
    )
    return base + 2 * num_tokens * num_experts * num_classes


def mflops_top1(num_tokens, d_in, d_ff, num_classes, num_experts):
    return 2 * num_tokens * d_in * num_experts + 2 * num_tokens * d_in * d_ff + 2 * num_tokens * d_ff * num_classes


def mflops_experts_squared(num_tokens, d_in, d_ff, num_classes, num_experts):
    return 2 * num_tokens * d_in * num_experts + num_experts**2 * (
        2 * num_tokens * d_in * d_ff + 2 * num_tokens * d_ff * num_classes
    )


# 4.1 --------------------------------------------------------------------------------
def topk_squeezed(router_logits, k):
    probs = torch.softmax(router_logits, dim=-1)
    gates, index = torch.topk(probs, k, dim=-1)
    gates = gates / gates.sum(-1, keepdim=True)
    return index.squeeze(), gates.squeeze()


def topk_renorm_over_tokens(router_logits, k):
    probs = torch.softmax(router_logits, dim=-1)
    gates, index = torch.topk(probs, k, dim=-1)
    return index, gates / gates.sum(0, keepdim=True)


def topk_renorm_by_all(router_logits, k):
    probs = torch.softmax(router_logits, dim=-1)
    gates, index = torch.topk(probs, k, dim=-1)
    return index, gates / probs.sum(-1, keepdim=True)


def topk_index_float(router_logits, k):
    probs = torch.softmax(router_logits, dim=-1)
    gates, index = torch.topk(probs, k, dim=-1)
    return index.float(), gates / gates.sum(-1, keepdim=True)


def topk_argsort_ascending(router_logits, k):
    probs = torch.softmax(router_logits, dim=-1)
    index = probs.argsort(dim=-1)[:, :k]
    gates = probs.gather(-1, index)
    return index, gates / gates.sum(-1, keepdim=True)


def topk_log_probs(router_logits, k):
    logp = torch.log_softmax(router_logits, dim=-1)
    gates, index = torch.topk(logp, k, dim=-1)
    return index, gates


def topk_uniform_gates(router_logits, k):
    probs = torch.softmax(router_logits, dim=-1)
    _, index = torch.topk(probs, k, dim=-1)
    return index, torch.full(index.shape, 1.0 / k)


def topk_k_plus_one(router_logits, k):
    probs = torch.softmax(router_logits, dim=-1)
    gates, index = torch.topk(probs, min(k + 1, probs.shape[-1]), dim=-1)
    return index, gates / gates.sum(-1, keepdim=True)


# 4.2 --------------------------------------------------------------------------------
def noisy_forgot_epsilon(clean_logits, noise_logits, noise, k):
    h = clean_logits + F.softplus(noise_logits)
    top, index = torch.topk(h, k, dim=-1)
    return index, torch.softmax(top, dim=-1)


def noisy_roles_swapped(clean_logits, noise_logits, noise, k):
    h = clean_logits + noise_logits * F.softplus(noise)
    top, index = torch.topk(h, k, dim=-1)
    return index, torch.softmax(top, dim=-1)


def noisy_multiplied(clean_logits, noise_logits, noise, k):
    h = clean_logits * noise * F.softplus(noise_logits)
    top, index = torch.topk(h, k, dim=-1)
    return index, torch.softmax(top, dim=-1)


def noisy_sigmoid_scale(clean_logits, noise_logits, noise, k):
    h = clean_logits + noise * torch.sigmoid(noise_logits)
    top, index = torch.topk(h, k, dim=-1)
    return index, torch.softmax(top, dim=-1)


def noisy_no_softmax_renorm(clean_logits, noise_logits, noise, k):
    h = clean_logits + noise * F.softplus(noise_logits)
    top, index = torch.topk(h, k, dim=-1)
    return index, top / top.sum(-1, keepdim=True)


def noisy_masked_zero(clean_logits, noise_logits, noise, k):
    h = clean_logits + noise * F.softplus(noise_logits)
    top, index = torch.topk(h, k, dim=-1)
    masked = torch.zeros_like(h).scatter(-1, index, top)  # zeros, not -inf, outside the top k
    probs = torch.softmax(masked, dim=-1)
    return index, probs.gather(-1, index)


def noisy_subtracted(clean_logits, noise_logits, noise, k):
    h = clean_logits - noise * F.softplus(noise_logits)
    top, index = torch.topk(h, k, dim=-1)
    return index, torch.softmax(top, dim=-1)


# 4.3 --------------------------------------------------------------------------------
def switch_adds_residual(x, w_router, experts):
    probs = torch.softmax(x @ w_router, dim=-1)
    gate, index = probs.max(dim=-1)
    y = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        rows = index == e
        y[rows] = gate[rows, None] * expert(x[rows])
    return x + y


def switch_argmin(x, w_router, experts):
    probs = torch.softmax(x @ w_router, dim=-1)
    index = probs.argmin(dim=-1)
    gate = probs.gather(-1, index[:, None])
    y = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        rows = index == e
        y[rows] = gate[rows] * expert(x[rows])
    return y


def switch_gate_squared(x, w_router, experts):
    probs = torch.softmax(x @ w_router, dim=-1)
    gate, index = probs.max(dim=-1)
    y = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        rows = index == e
        y[rows] = gate[rows, None] ** 2 * expert(x[rows])
    return y


def switch_router_transposed(x, w_router, experts):
    probs = torch.softmax(x @ w_router.T, dim=-1)
    gate, index = probs.max(dim=-1)
    y = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        rows = index == e
        y[rows] = gate[rows, None] * expert(x[rows])
    return y


def switch_wrong_expert_order(x, w_router, experts):
    probs = torch.softmax(x @ w_router, dim=-1)
    gate, index = probs.max(dim=-1)
    y = torch.zeros_like(x)
    for e, expert in enumerate(reversed(experts)):
        rows = index == e
        y[rows] = gate[rows, None] * expert(x[rows])
    return y


def switch_gate_after_sum_mean(x, w_router, experts):
    probs = torch.softmax(x @ w_router, dim=-1)
    gate, index = probs.max(dim=-1)
    y = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        rows = index == e
        y[rows] = expert(x[rows])
    return y * gate.mean()


def switch_no_grad_router(x, w_router, experts):
    with torch.no_grad():
        probs = torch.softmax(x @ w_router, dim=-1)
    gate, index = probs.max(dim=-1)
    y = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        rows = index == e
        y[rows] = gate[rows, None] * expert(x[rows])
    return y


# 5.1 --------------------------------------------------------------------------------
def lb_ignores_expert_index(router_probs, expert_index):
    n, e = router_probs.shape
    f = torch.bincount(router_probs.argmax(-1), minlength=e).float() / n
    return e * (f * router_probs.mean(0)).sum()


def lb_e_squared(router_probs, expert_index):
    n, e = router_probs.shape
    f = torch.bincount(expert_index, minlength=e).float() / n
    return e * e * (f * router_probs.mean(0)).sum()


def lb_p_over_experts(router_probs, expert_index):
    n, e = router_probs.shape
    f = torch.bincount(expert_index, minlength=e).float() / n
    return e * (f * router_probs.mean(1)[:e]).sum() if n >= e else e * f.sum()


def lb_one_hot_mean_wrong_axis(router_probs, expert_index):
    n, e = router_probs.shape
    f = F.one_hot(expert_index, e).float().mean(1)
    return e * (f[:e] * router_probs.mean(0)).sum() if n >= e else e * f.sum()


def lb_times_alpha(router_probs, expert_index):
    n, e = router_probs.shape
    f = torch.bincount(expert_index, minlength=e).float() / n
    return 0.01 * e * (f * router_probs.mean(0)).sum()


def lb_f_from_max_prob(router_probs, expert_index):
    n, e = router_probs.shape
    f = torch.zeros(e).index_add(0, expert_index, router_probs.max(-1).values) / n
    return e * (f * router_probs.mean(0)).sum()


def lb_squared(router_probs, expert_index):
    n, e = router_probs.shape
    f = torch.bincount(expert_index, minlength=e).float() / n
    return e * ((f * router_probs.mean(0)) ** 2).sum()


def lb_int_division(router_probs, expert_index):
    n, e = router_probs.shape
    f = torch.bincount(expert_index, minlength=e) // n
    return e * (f * router_probs.mean(0)).sum()


# 5.2 --------------------------------------------------------------------------------
def z_max_not_lse(router_logits):
    return (router_logits.max(dim=-1).values ** 2).mean()


def z_square_then_lse(router_logits):
    return torch.logsumexp(router_logits**2, dim=-1).mean()


def z_times_coef(router_logits):
    return 1e-3 * (torch.logsumexp(router_logits, dim=-1) ** 2).mean()


def z_lse_all(router_logits):
    return torch.logsumexp(router_logits.flatten(), dim=0) ** 2


def z_abs(router_logits):
    return torch.logsumexp(router_logits, dim=-1).abs().mean()


def z_item(router_logits):
    return torch.tensor((torch.logsumexp(router_logits, dim=-1) ** 2).mean().item())


def z_sum_exp_squared(router_logits):
    return (router_logits.exp().sum(-1) ** 2).mean()


def z_per_token(router_logits):
    return torch.logsumexp(router_logits, dim=-1) ** 2


# 5.3 --------------------------------------------------------------------------------
def keep_int_mask(expert_index, num_experts, capacity):
    one_hot = F.one_hot(expert_index, num_experts)
    position = (torch.cumsum(one_hot, 0) - one_hot).gather(1, expert_index[:, None])[:, 0]
    return (position < capacity).long()


def keep_float_mask(expert_index, num_experts, capacity):
    one_hot = F.one_hot(expert_index, num_experts)
    position = (torch.cumsum(one_hot, 0) - one_hot).gather(1, expert_index[:, None])[:, 0]
    return (position < capacity).float()


def keep_indices(expert_index, num_experts, capacity):
    one_hot = F.one_hot(expert_index, num_experts)
    position = (torch.cumsum(one_hot, 0) - one_hot).gather(1, expert_index[:, None])[:, 0]
    return torch.nonzero(position < capacity).squeeze(1)


def keep_global_cumsum(expert_index, num_experts, capacity):
    return torch.arange(len(expert_index)) < capacity * num_experts


def keep_less_equal(expert_index, num_experts, capacity):
    one_hot = F.one_hot(expert_index, num_experts)
    position = (torch.cumsum(one_hot, 0) - one_hot).gather(1, expert_index[:, None])[:, 0]
    return position <= capacity


def keep_loop_stops_early(expert_index, num_experts, capacity):
    keep = torch.zeros(len(expert_index), dtype=torch.bool)
    for e in range(num_experts - 1):
        rows = (expert_index == e).nonzero(as_tuple=True)[0]
        keep[rows[:capacity]] = True
    return keep


def keep_one_hot_mask(expert_index, num_experts, capacity):
    one_hot = F.one_hot(expert_index, num_experts)
    position = torch.cumsum(one_hot, 0) - one_hot
    return (position < capacity) & one_hot.bool()


def keep_drops_first(expert_index, num_experts, capacity):
    counts = torch.bincount(expert_index, minlength=num_experts)
    one_hot = F.one_hot(expert_index, num_experts)
    position = (torch.cumsum(one_hot, 0) - one_hot).gather(1, expert_index[:, None])[:, 0]
    return position >= counts[expert_index] - capacity


# 5.4 --------------------------------------------------------------------------------
def choice_renormalised(router_logits, capacity):
    scores = torch.softmax(router_logits, dim=-1)
    gates, token_index = torch.topk(scores.T, capacity, dim=-1)
    return token_index, gates / gates.sum(-1, keepdim=True)


def choice_token_choice(router_logits, capacity):
    scores = torch.softmax(router_logits, dim=-1)
    gates, expert_index = torch.topk(scores, capacity, dim=-1)
    return expert_index, gates


def choice_swapped(router_logits, capacity):
    scores = torch.softmax(router_logits, dim=-1)
    gates, token_index = torch.topk(scores.T, capacity, dim=-1)
    return gates, token_index


def choice_index_float(router_logits, capacity):
    scores = torch.softmax(router_logits, dim=-1)
    gates, token_index = torch.topk(scores.T, capacity, dim=-1)
    return token_index.float(), gates


def choice_first_c_tokens(router_logits, capacity):
    scores = torch.softmax(router_logits, dim=-1)
    e = scores.shape[1]
    token_index = torch.arange(capacity).repeat(e, 1)
    return token_index, scores.T.gather(-1, token_index)


def choice_log_scores(router_logits, capacity):
    scores = torch.log_softmax(router_logits, dim=-1)
    gates, token_index = torch.topk(scores.T, capacity, dim=-1)
    return token_index, gates


def choice_sorted_ascending(router_logits, capacity):
    scores = torch.softmax(router_logits, dim=-1)
    order = scores.T.argsort(dim=-1)[:, :capacity]
    return order, scores.T.gather(-1, order)


# 6.1 --------------------------------------------------------------------------------
def sort_loop_stops_early(expert_index, num_experts):
    order = torch.cat([(expert_index == e).nonzero(as_tuple=True)[0] for e in range(num_experts - 1)])
    counts = torch.tensor([(expert_index == e).sum() for e in range(num_experts)])
    return order, counts


def sort_swapped(expert_index, num_experts):
    return torch.bincount(expert_index, minlength=num_experts), torch.argsort(expert_index, stable=True)


def sort_counts_float(expert_index, num_experts):
    return torch.argsort(expert_index, stable=True), torch.bincount(expert_index, minlength=num_experts).float()


def sort_offsets(expert_index, num_experts):
    return torch.argsort(expert_index, stable=True), torch.bincount(expert_index, minlength=num_experts).cumsum(0)


def sort_default_sort(expert_index, num_experts):
    return torch.sort(expert_index, descending=True).indices.flip(0), torch.bincount(expert_index, minlength=num_experts)


def sort_inverse_permutation(expert_index, num_experts):
    order = torch.argsort(expert_index, stable=True)
    return torch.argsort(order), torch.bincount(expert_index, minlength=num_experts)


def sort_counts_one_hot_wrong_axis(expert_index, num_experts):
    return torch.argsort(expert_index, stable=True), F.one_hot(expert_index, num_experts).sum(1)


def sort_list_order(expert_index, num_experts):
    order = [i for e in range(num_experts) for i in range(len(expert_index)) if expert_index[i] == e]
    return order, torch.bincount(expert_index, minlength=num_experts)


# 6.2 --------------------------------------------------------------------------------
def combine_gates_no_broadcast(y_sorted, token, gates, num_tokens):
    return torch.zeros(num_tokens, y_sorted.shape[1]).index_add(0, token, y_sorted * gates)


def combine_divide_gate(y_sorted, token, gates, num_tokens):
    return torch.zeros(num_tokens, y_sorted.shape[1]).index_add(0, token, y_sorted / gates[:, None])


def combine_index_copy(y_sorted, token, gates, num_tokens):
    return torch.zeros(num_tokens, y_sorted.shape[1]).index_copy(0, token, y_sorted * gates[:, None])


def combine_long_zeros(y_sorted, token, gates, num_tokens):
    out = torch.zeros(num_tokens, y_sorted.shape[1], dtype=torch.long)
    return out.index_add(0, token, y_sorted * gates[:, None])


def combine_mean_top2(y_sorted, token, gates, num_tokens):
    out = torch.zeros(num_tokens, y_sorted.shape[1]).index_add(0, token, y_sorted * gates[:, None])
    counts = torch.bincount(token, minlength=num_tokens).clamp(min=1)
    return out / counts[:, None]


def combine_in_place_on_input(y_sorted, token, gates, num_tokens):
    y_sorted *= gates[:, None]
    return torch.zeros(num_tokens, y_sorted.shape[1]).index_add(0, token, y_sorted)


def combine_sorted_token(y_sorted, token, gates, num_tokens):
    return torch.zeros(num_tokens, y_sorted.shape[1]).index_add(0, token.sort().values, y_sorted * gates[:, None])


# 6.3 --------------------------------------------------------------------------------
def slots_cumsum_total(expert_index, num_experts):
    return torch.cumsum(F.one_hot(expert_index, num_experts), 0).sum(1) - 1


def slots_rank_in_sort(expert_index, num_experts):
    order = torch.argsort(expert_index, stable=True)
    return torch.argsort(order)


def slots_sorted_order(expert_index, num_experts):
    order = torch.argsort(expert_index, stable=True)
    one_hot = F.one_hot(expert_index, num_experts)
    pos = (torch.cumsum(one_hot, 0) - one_hot).gather(1, expert_index[:, None]).squeeze(1)
    return pos[order]


def slots_loop_stops_early(expert_index, num_experts):
    pos = torch.zeros(len(expert_index), dtype=torch.long)
    for e in range(num_experts - 1):
        rows = (expert_index == e).nonzero(as_tuple=True)[0]
        pos[rows] = torch.arange(len(rows))
    return pos


def slots_one_hot_matrix(expert_index, num_experts):
    one_hot = F.one_hot(expert_index, num_experts)
    return torch.cumsum(one_hot, 0) - one_hot


def slots_counted_from_end(expert_index, num_experts):
    one_hot = F.one_hot(expert_index, num_experts)
    from_end = torch.flip(torch.cumsum(torch.flip(one_hot, [0]), 0), [0]) - 1
    return from_end.gather(1, expert_index[:, None]).squeeze(1)


def slots_python_list(expert_index, num_experts):
    seen = [0] * num_experts
    out = []
    for e in expert_index.tolist():
        out.append(seen[e])
        seen[e] += 1
    return out


# 7.1 --------------------------------------------------------------------------------
def _causal(q, k, v, scores=None, masked=None, dim=-1, fill=float("-inf")):
    t = q.shape[-2]
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5 if scores is None else scores
    masked = torch.ones(t, t, dtype=torch.bool).triu(1) if masked is None else masked
    return torch.softmax(scores.masked_fill(masked, fill), dim=dim) @ v


def attn_k_T(q, k, v):
    return _causal(q, k, v, scores=q @ k.T / q.shape[-1] ** 0.5)


def attn_scale_by_sqrt_t(q, k, v):
    return _causal(q, k, v, scores=q @ k.transpose(-2, -1) / q.shape[-2] ** 0.5)


def attn_q_and_k_swapped(q, k, v):
    return _causal(q, k, v, scores=k @ q.transpose(-2, -1) / q.shape[-1] ** 0.5)


def attn_weights_times_q(q, k, v):
    t = q.shape[-2]
    w = torch.softmax(
        (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")), -1
    )
    return w @ q


def attn_transposed_output(q, k, v):
    return _causal(q, k, v).transpose(1, 2)


def attn_mask_upper_kept(q, k, v):
    t = q.shape[-2]
    return _causal(q, k, v, masked=torch.ones(t, t, dtype=torch.bool).tril(-1))


def attn_v_first(q, k, v):
    t = q.shape[-2]
    w = torch.softmax(
        (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")), -1
    )
    return (v.transpose(-2, -1) @ w).transpose(-2, -1)


def attn_large_negative(q, k, v):
    return _causal(q, k, v, fill=-1.0)


# 7.2 --------------------------------------------------------------------------------
def block_ffn_first(block, x):
    x = x + block.ffn(block.ln_2(x))
    return x + block.attn(block.ln_1(x))


def block_final_norm(block, x):
    x = x + block.attn(block.ln_1(x))
    x = x + block.ffn(block.ln_2(x))
    return block.ln_2(x)


def block_returns_tuple(block, x):
    h = x + block.attn(block.ln_1(x))
    return h + block.ffn(block.ln_2(h)), h


def block_norm_of_sum(block, x):
    x = x + block.attn(block.ln_1(x))
    return block.ln_2(x + block.ffn(x))


def block_residual_doubled(block, x):
    x = x + x + block.attn(block.ln_1(x))
    return x + block.ffn(block.ln_2(x))


def block_attn_twice(block, x):
    x = x + block.attn(block.ln_1(x))
    return x + block.attn(block.ln_2(x))


def block_ffn_on_normalised_residual(block, x):
    x = block.ln_1(x) + block.attn(block.ln_1(x))
    return x + block.ffn(block.ln_2(x))


# 8.1 --------------------------------------------------------------------------------
def sw_moe_on_ln_1(block, x):
    x = x + block.attn(block.ln_1(x))
    moe = block.ffn(block.ln_1(x))
    return x + moe.y, moe.router_loss


def sw_moe_first(block, x):
    moe = block.ffn(block.ln_2(x))
    x = x + moe.y
    return x + block.attn(block.ln_1(x)), moe.router_loss


def sw_z_loss_only(block, x):
    x = x + block.attn(block.ln_1(x))
    moe = block.ffn(block.ln_2(x))
    return x + moe.y, moe.z_loss


def sw_sum_unweighted(block, x):
    x = x + block.attn(block.ln_1(x))
    moe = block.ffn(block.ln_2(x))
    return x + moe.y, moe.aux_loss + moe.z_loss


def sw_swapped(block, x):
    x = x + block.attn(block.ln_1(x))
    moe = block.ffn(block.ln_2(x))
    return moe.router_loss, x + moe.y


def sw_only_x(block, x):
    x = x + block.attn(block.ln_1(x))
    moe = block.ffn(block.ln_2(x))
    return x + moe.y


def sw_moe_reads_input(block, x):
    h = x + block.attn(block.ln_1(x))
    moe = block.ffn(block.ln_2(x))
    return h + moe.y, moe.router_loss


def sw_loss_float(block, x):
    x = x + block.attn(block.ln_1(x))
    moe = block.ffn(block.ln_2(x))
    return x + moe.y, float(moe.router_loss)


# 8.2 --------------------------------------------------------------------------------
def _books(c, **kw):
    V, T, D, F_, L, E = c.vocab_size, c.block_size, c.d_model, c.d_ff, c.n_layers, c.num_experts
    n_moe = len(c.moe_layers)
    ffn_one = 2 * D * F_ + F_ + D
    shared = V * D + L * (4 * D * D + 4 * D) + (2 * L + 1) * 2 * D + n_moe * D * E
    total = shared + (L - n_moe) * ffn_one + n_moe * E * ffn_one
    active = shared + L * ffn_one
    flops = L * (8 * D * D + 4 * T * D + 4 * D * F_) + n_moe * 2 * D * E + 2 * D * V
    out = {"params_total": total, "params_active": active, "flops_per_token": flops}
    return out


def books_floats(c):
    return {k: float(v) for k, v in _books(c).items()}


def books_wrong_keys(c):
    a = _books(c)
    return {"total": a["params_total"], "active": a["params_active"], "flops": a["flops_per_token"]}


def books_no_norms(c):
    a = _books(c)
    a["params_total"] -= (2 * c.n_layers + 1) * 2 * c.d_model
    return a


def books_training_flops(c):
    a = _books(c)
    a["flops_per_token"] *= 3
    return a


def books_no_head_flops(c):
    a = _books(c)
    a["flops_per_token"] -= 2 * c.d_model * c.vocab_size
    return a


def books_position_table(c):
    a = _books(c)
    a["params_total"] += c.block_size * c.d_model
    a["params_active"] += c.block_size * c.d_model
    return a


def books_no_attn_bias(c):
    a = _books(c)
    a["params_total"] -= c.n_layers * 4 * c.d_model
    return a


def books_tensors(c):
    return {k: torch.tensor(v) for k, v in _books(c).items()}


for _ex_id, _rows in {
    "0.1": [
        ("loop stops one specialty early", count_loop_stops_early, "the last specialty's count is 0 although"),
        ("torch.unique counts", count_unique, "its count (0) is missing"),
        ("one_hot summed over the wrong axis", count_one_hot_wrong_axis, "you returned one number per patient, shape"),
        ("a Python list", count_python_list, "the counts should be one torch.Tensor, but"),
        ("labels counted from 1", count_labels_from_one, "the counts: shifted by one place along"),
        ("float counts from a loop", count_float_loop, "counts should be whole numbers (an integer"),
        ("histc", count_histc, "counts should be whole numbers (an integer"),
        ("minlength one short", count_minlength_short, "its count (0) is missing"),
    ],
    "1.1": [
        ("sigmoid", ffn_sigmoid, "you used a sigmoid; this course's feed-forward"),
        ("SiLU", ffn_silu, "you used SiLU (swish); this course's feed-forward"),
        ("biases swapped", ffn_biases_swapped, "two tensors combined entry by entry (+,"),
        ("GELU twice", ffn_gelu_twice, "GELU is applied twice: once on the"),
        ("operands swapped", ffn_operands_swapped, "a matrix product (@ or torch.matmul) got"),
        ("hidden layer returned", ffn_hidden_only, "the output has the hidden width F"),
        ("bias multiplied", ffn_bias_multiplied, "b_in is multiplied; a bias is *added*:"),
        ("tanh", ffn_tanh, "you used tanh; this course's feed-forward block"),
        ("output doubled", ffn_output_doubled, "the output: exactly twice the expected value,"),
    ],
    "1.2": [
        ("float", params_float, "the count should be an int, but"),
        ("true division", params_true_division, "the count should be an int, but"),
        ("off by one", params_off_by_one, "off by one"),
        ("the FLOP formula", params_flops_formula, "4·D·F is the FLOP count of one"),
        ("biases only", params_biases_only, "you counted only the biases (F +"),
        ("int tensor", params_numel_tensor, "the count should be a Python int,"),
        ("d_model for d_ff", params_square, "you used d_model where the hidden width"),
    ],
    "1.3": [
        ("training FLOPs", flops_training, "these are training FLOPs (forward + backward"),
        ("float", flops_float, "the FLOP count should be an int,"),
        ("D - 1 additions", flops_exact_adds, "you counted D - 1 additions per"),
        ("d_ff squared", flops_d_ff_squared, "you used d_ff where the model width"),
        ("activation counted", flops_with_activation, "you also counted the activation (one per"),
        ("one matmul times four", flops_one_matmul_four, "the FLOP count: exactly twice the expected"),
        ("per token", flops_per_token, "the number of tokens is missing: every"),
    ],
    "1.4": [
        ("loop stops early", acc_loop_stops_early, "every specialty is right except the last"),
        ("against specialty", acc_against_specialty, "you compared the predictions with the specialty;"),
        ("percent", acc_percent, "these are percentages; return fractions between 0"),
        ("integer division", acc_integer_division, "the accuracies: rounded down to whole numbers;"),
        ("bincount without minlength", acc_bincount_no_minlength, "the accuracies should have one entry per"),
        ("argmax over the patients", acc_argmax_wrong_axis, "two tensors combined entry by entry (+,"),
        ("probability of the truth", acc_probability_of_truth, "this is the mean probability of the"),
        ("error rate", acc_error_rate, "these are error rates (the fraction of"),
    ],
    "2.1": [
        ("softmax over the patients", avg_softmax_over_patients, "the ensemble's probabilities: the values sum to"),
        ("keepdim", avg_keepdim, "extra dim 0 of size 1"),
        ("median", avg_median, "you took the median over the members;"),
        ("max over members", avg_max_member, "you kept each class's largest probability over"),
        ("mean log-probabilities", avg_log_probs, "you averaged log-probabilities (log_softmax): return the mean"),
        ("summed logits", avg_summed_logits, "you summed the logits and then took"),
        ("mean of everything", avg_everything, "a single number"),
        ("first member only", avg_first_member, "this is the first member's prediction alone;"),
    ],
    "2.2": [
        ("order (bias, error, variance)", bv_order, "you returned (bias, error, variance): return them"),
        ("std for variance", bv_std, "your variance is a standard deviation (a"),
        ("variance summed over members", bv_variance_summed_over_members, "your variance sums over the R"),
        ("targets not one-hot", bv_no_one_hot, "you compared the probabilities with the class"),
        ("a dict", bv_dict, "return a tuple (error, bias, variance), not"),
        ("two values", bv_two_values, "return three numbers, (error, bias, variance); got"),
        ("error is the bias", bv_error_is_bias_plus_var_wrong, "your error is the bias: the error"),
    ],
    "2.3": [
        ("in bits", ll_log2, "this is the loss in bits (log"),
        ("probabilities as logits", ll_probs_as_logits, "you passed the averaged probabilities to F.cross_entropy,"),
        ("nll_loss on probabilities", ll_nll_on_probs, "F.nll_loss expects log-probabilities, and you passed probabilities:"),
        ("+ log R", ll_plus_log_r, "you added log R instead of subtracting"),
        ("per patient", ll_per_patient, "return one number (the mean over the"),
        ("positive log", ll_positive_log, "the sign is flipped: the loss is"),
        ("logsumexp over classes", ll_logsumexp_over_classes, "the logsumexp runs over the classes; it"),
        ("first member", ll_first_member, "this is the first member's loss alone;"),
    ],
    "3.1": [
        ("normalised over everything", gate_normalise_everything, "the gate weights: all entries together sum"),
        ("w first", gate_w_first, "one row per patient, one column per expert"),
        ("softmax on input", gate_softmax_on_input, "you took the softmax of the patients'"),
        ("log_softmax", gate_log_softmax, "the gate weights: log-probabilities (log_softmax, or a"),
        ("temperature", gate_temperature, "you divided the scores by sqrt(D) (a"),
        ("divide by max", gate_divide_by_max, "you divided the scores by their maximum:"),
        ("argmax one-hot", gate_argmax_one_hot, "a hard choice of the top expert"),
        ("abs normalised", gate_abs_normalised, "you normalised the absolute scores; a negative"),
    ],
    "3.2": [
        ("top expert only", mix_top_expert_only, "you kept only each patient's top expert;"),
        ("log probs", mix_log_probs, "you mixed the experts' log-probabilities; mix their"),
        ("same weight", mix_same_weight, "every expert got the weight of expert"),
        ("gate transposed and mean", mix_gate_transposed, "the gate weights already sum to 1"),
        ("weights on logits", mix_weights_on_logits_sum, "you returned the gate-weighted sum of the"),
        ("keepdim", mix_keepdim, "extra dim 1 of size 1"),
        ("sigmoid gate", mix_sigmoid_gate, "you used a sigmoid for the gate:"),
    ],
    "3.3": [
        ("1 - score", score_one_minus, "you returned 1 - score: 1 means"),
        ("counts not probabilities", score_counts_not_probs, "you computed with counts, not probabilities: divide"),
        ("factor 2 missing", score_missing_factor_two, "the score: exactly half the expected value,"),
        ("MI in bits", score_log2_mi_only, "the mutual information is in bits and"),
        ("max entropy", score_max_entropy, "you divided the mutual information by H(expert)"),
        ("purity", score_accuracy_like, "this is the fraction of patients whose"),
    ],
    "3.4": [
        ("float", mflops_float, "the FLOP count should be an int,"),
        ("gate without tokens", mflops_gate_no_tokens, "the gate's FLOPs lack the number of"),
        ("classes for d_ff", mflops_classes_for_ff, "you used num_classes where the hidden width"),
        ("training", mflops_training, "these are training FLOPs (forward + backward"),
        ("plus mixing", mflops_plus_mixing, "you also counted the weighted sum of"),
        ("top-1", mflops_top1, "you counted a single expert: in a"),
        ("E squared", mflops_experts_squared, "E² experts: every patient goes through each"),
    ],
    "4.1": [
        ("squeezed for k=1", topk_squeezed, "keep the k dimension"),
        ("renormalised over the tokens", topk_renorm_over_tokens, "you renormalised over the tokens (dim 0):"),
        ("divided by the sum of all probabilities", topk_renorm_by_all, "the gates are not renormalised: each token's"),
        ("float index", topk_index_float, "expert_index should hold integer expert ids (e.g."),
        ("argsort ascending", topk_argsort_ascending, "you picked the k *least* likely experts:"),
        ("log-probabilities", topk_log_probs, "these gates are log-probabilities: take the softmax"),
        ("uniform gates", topk_uniform_gates, "the gates must follow the router"),
        ("k + 1 experts", topk_k_plus_one, "should both have shape (N, k)"),
    ],
    "4.2": [
        ("forgot epsilon", noisy_forgot_epsilon, "ε is missing: the noise is ε"),
        ("roles swapped", noisy_roles_swapped, "the roles are swapped: softplus goes on"),
        ("multiplied", noisy_multiplied, "the noise is *added* to the clean"),
        ("sigmoid scale", noisy_sigmoid_scale, "the noise scale is softplus(noise_logits); you used"),
        ("renormalised, no softmax", noisy_no_softmax_renorm, "you divided the kept noisy scores by"),
        ("masked with zeros", noisy_masked_zero, "outside the top k you set the"),
        ("subtracted noise", noisy_subtracted, "the noise is added with a minus"),
    ],
    "4.3": [
        ("adds the residual", switch_adds_residual, "you added the input x to the"),
        ("argmin", switch_argmin, "each token went to its *least* likely"),
        ("gate squared", switch_gate_squared, "the gate is squared: multiply each expert"),
        ("router transposed", switch_router_transposed, "a matrix product (@ or torch.matmul) got"),
        ("experts reversed", switch_wrong_expert_order, "the experts are in the wrong order:"),
        ("mean gate", switch_gate_after_sum_mean, "every token got the same gate (the"),
        ("router under no_grad", switch_no_grad_router, "w_router receives no gradient: multiply each expert"),
    ],
    "5.1": [
        ("ignores expert_index", lb_ignores_expert_index, "f is counted from router_probs.argmax, not from"),
        ("E squared", lb_e_squared, "you multiplied by E twice"),
        ("P over the experts", lb_p_over_experts, None),
        ("one-hot mean over the wrong axis", lb_one_hot_mean_wrong_axis, None),
        ("times alpha", lb_times_alpha, "you multiplied by α = 0.01: the"),
        ("f from max probabilities", lb_f_from_max_prob, "f_i sums the chosen tokens' top probabilities;"),
        ("squared products", lb_squared, "you squared each product f_i · P_i;"),
        ("integer division", lb_int_division, "the loss is 0: is f all"),
    ],
    "5.2": [
        ("max not logsumexp", z_max_not_lse, "you squared each token's largest logit; the"),
        ("square then logsumexp", z_square_then_lse, "you squared the logits before the logsumexp;"),
        ("times coefficient", z_times_coef, "you multiplied by the coefficient 1e-3: it"),
        ("logsumexp over everything", z_lse_all, "one logsumexp over every logit of the"),
        ("abs", z_abs, "the square is missing: the z-loss is"),
        ("item", z_item, "the z-loss carries no gradient back to"),
        ("sum exp squared", z_sum_exp_squared, "the log is missing: logsumexp is log(Σ"),
        ("per token", z_per_token, "the z-loss should be one number (a"),
    ],
    "5.3": [
        ("int mask", keep_int_mask, "a mask must be a bool tensor"),
        ("float mask", keep_float_mask, "expected bool"),
        ("indices", keep_indices, "the indices of the kept tokens?"),
        ("global C·E", keep_global_cumsum, "you kept the first C·E = 8"),
        ("<= capacity", keep_less_equal, "each expert keeps C + 1 ="),
        ("loop stops early", keep_loop_stops_early, "keeps nobody: does your loop"),
        ("(N, E) mask", keep_one_hot_mask, "one entry per token *and expert*"),
        ("drops the first", keep_drops_first, "you dropped the wrong tokens: your mask"),
    ],
    "5.4": [
        ("gates renormalised", choice_renormalised, "you renormalised each expert's C gates to"),
        ("token choice", choice_token_choice, "torch.topk was asked for more entries than"),
        ("swapped", choice_swapped, "the two results are swapped: return (token_index,"),
        ("float index", choice_index_float, "token_index should hold integer token ids (e.g."),
        ("first C tokens", choice_first_c_tokens, "the first C in order"),
        ("log scores", choice_log_scores, "these gates are log-scores (log_softmax): use the"),
        ("ascending", choice_sorted_ascending, "each expert picked its C *lowest*-scoring tokens:"),
    ],
    "6.1": [
        ("loop stops early", sort_loop_stops_early, "some experts' tokens are missing"),
        ("swapped", sort_swapped, "the two results are swapped: return (order,"),
        ("float counts", sort_counts_float, "counts are numbers of tokens: return an"),
        ("offsets", sort_offsets, "these are cumulative counts (where each expert's"),
        ("descending then flipped", sort_default_sort, "within one expert the tokens are not"),
        ("inverse permutation", sort_inverse_permutation, "this is the inverse permutation (for each"),
        ("one-hot summed over the wrong axis", sort_counts_one_hot_wrong_axis, "counts has one entry per token, shape"),
        ("list order", sort_list_order, "order should be one torch.Tensor of token"),
    ],
    "6.2": [
        ("gates without [:, None]", combine_gates_no_broadcast, "two tensors combined entry by entry (+,"),
        ("divided by the gate", combine_divide_gate, "you divided by the gates: multiply each"),
        ("index_copy", combine_index_copy, "a token with two experts (top-2) must"),
        ("long zeros", combine_long_zeros, "two tensors of different dtypes met (e.g."),
        ("mean of top-2", combine_mean_top2, "the combined output: exactly half the expected"),
        ("in place on y_sorted", combine_in_place_on_input, "changed its input `y_sorted`"),
        ("sorted token", combine_sorted_token, "the rows are still in sorted order:"),
    ],
    "6.3": [
        ("cumsum of everything", slots_cumsum_total, "you counted all earlier tokens; count only"),
        ("rank in the sort", slots_rank_in_sort, "that is each token's place in the"),
        ("in sorted order", slots_sorted_order, "these are the slots in sorted order;"),
        ("loop stops early", slots_loop_stops_early, "does a loop over the experts stop one early?"),
        ("(N, E) matrix", slots_one_hot_matrix, "a count for every token and every expert"),
        ("counted from the end", slots_counted_from_end, "you counted the later tokens; a token's"),
        ("python list", slots_python_list, "the positions should be one torch.Tensor, but"),
    ],
    "7.1": [
        ("k.T on 4-D", attn_k_T, "`.T` on a tensor with more than"),
        ("scaled by sqrt(T)", attn_scale_by_sqrt_t, "you scaled the scores by 1/sqrt(T) (T"),
        ("q and k swapped", attn_q_and_k_swapped, "q and k are swapped: the scores"),
        ("weights times q", attn_weights_times_q, "the weights multiply q; the output is"),
        ("output transposed", attn_transposed_output, "right sizes in another order"),
        ("upper triangle kept", attn_mask_upper_kept, "the mask is the wrong way round:"),
        ("v first", attn_v_first, "the product is in the wrong order:"),
        ("masked with -1", attn_large_negative, "the masked scores got a finite value"),
    ],
    "7.2": [
        ("FFN first", block_ffn_first, "the FFN comes first: in the block,"),
        ("final norm", block_final_norm, "the output is normalised at the end:"),
        ("returns a tuple", block_returns_tuple, "the block's output should be one torch.Tensor,"),
        ("norm of the sum", block_norm_of_sum, "the FFN half is post-norm (ln_2 after"),
        ("residual doubled", block_residual_doubled, "x is added twice in the attention"),
        ("attention twice", block_attn_twice, "attention ran twice: the second half of"),
        ("normalised residual", block_ffn_on_normalised_residual, "the residual adds the normalised stream ln_1(x);"),
    ],
    "8.1": [
        ("MoE on ln_1", sw_moe_on_ln_1, "the Switch layer reads ln_1 of the"),
        ("MoE first", sw_moe_first, "the Switch layer comes first: attention first"),
        ("z-loss only", sw_z_loss_only, "you returned moe.z_loss alone; return moe.router_loss, the"),
        ("unweighted sum", sw_sum_unweighted, "you added the unweighted losses; moe.router_loss already"),
        ("swapped", sw_swapped, "the two results are swapped: return (x,"),
        ("only x", sw_only_x, "return two things, `(x, router_loss)`: the stream"),
        ("MoE reads the input", sw_moe_reads_input, "the Switch layer reads the block's input"),
        ("loss as float", sw_loss_float, "float() or .item() cut it off"),
    ],
    "8.2": [
        ("floats", books_floats, "out['params_total'] should be an int, but it"),
        ("wrong keys", books_wrong_keys, "the dict lacks the key(s) ['params_total', 'params_active',"),
        ("no norms", books_no_norms, "the layer norms are missing (2 per"),
        ("training FLOPs", books_training_flops, "these are training FLOPs (forward + backward"),
        ("no head FLOPs", books_no_head_flops, "the head's logits (2·D·V FLOPs) are missing."),
        ("position table", books_position_table, "a learned position table is counted, but"),
        ("no attention biases", books_no_attn_bias, "the attention biases are missing (q, k,"),
        ("tensors", books_tensors, "out['params_total'] should be a Python int, but"),
    ],
}.items():
    MUTANTS.setdefault(_ex_id, []).extend(_rows)


# == a second batch (issue 19), written after the checks had been taught the first; run against them as they were,
# 10 of these 52 got a message naming the mistake. Then three general symptoms (an input added or missing, a softmax
# applied twice, sorted values) and some exercise-specific mistakes were added; words None: still a generic message.


def b_count_sum_bool(specialty, num_specialties):  # sums a bool table over patients -> right; variant: uses max+1
    return torch.bincount(specialty, minlength=int(specialty.max()) + 1)


def b_count_sorted(specialty, num_specialties):
    return torch.bincount(specialty, minlength=num_specialties).sort(descending=True).values


def b_ffn_residual(x, w_in, b_in, w_out, b_out):
    return x + F.gelu(x @ w_in + b_in) @ w_out + b_out


def b_ffn_no_b_in_activation_after_bias_out(x, w_in, b_in, w_out, b_out):
    return F.gelu(x @ w_in + b_in) @ w_out - b_out


def b_params_squared_sum(d_model, d_ff):
    return (d_model + d_ff) ** 2


def b_params_three_matrices(d_model, d_ff):
    return 3 * d_model * d_ff + d_ff + d_model


def b_flops_plus_one(num_tokens, d_model, d_ff):
    return 4 * num_tokens * d_model * d_ff + 1


def b_flops_sum_dims(num_tokens, d_model, d_ff):
    return 4 * num_tokens * (d_model + d_ff)


def b_acc_normalised(logits, diagnosis, specialty, num_specialties):
    correct = (logits.argmax(-1) == diagnosis).float()
    hits = torch.zeros(num_specialties).index_add_(0, specialty, correct)
    return hits / hits.sum()


def b_acc_counts_over_total_correct(logits, diagnosis, specialty, num_specialties):
    correct = (logits.argmax(-1) == diagnosis).float()
    counts = torch.bincount(specialty, minlength=num_specialties).float()
    return correct.sum() / counts


def b_avg_weighted_first(member_logits):
    probs = torch.softmax(member_logits, dim=-1)
    return (probs * torch.linspace(1, 2, probs.shape[0])[:, None, None]).sum(0) / torch.linspace(1, 2, probs.shape[0]).sum()


def b_avg_sigmoid(member_logits):
    return torch.sigmoid(member_logits).mean(0)


def b_bv_bias_with_abs(member_probs, targets):
    y = F.one_hot(targets, member_probs.shape[-1]).float()
    mean = member_probs.mean(0)
    return (
        ((member_probs - y) ** 2).sum(-1).mean(),
        ((mean - y) ** 2).mean(-1).mean(),
        ((member_probs - mean) ** 2).sum(-1).mean(),
    )


def b_bv_variance_first_member(member_probs, targets):
    y = F.one_hot(targets, member_probs.shape[-1]).float()
    mean = member_probs.mean(0)
    return (
        ((member_probs - y) ** 2).sum(-1).mean(),
        ((mean - y) ** 2).sum(-1).mean(),
        ((member_probs[0] - mean) ** 2).sum(-1).mean(),
    )


def b_ll_max_member(member_logits, targets):
    logp = torch.log_softmax(member_logits, dim=-1)
    return -logp.max(0).values[torch.arange(len(targets)), targets].mean()


def b_ll_mean_of_log_probs_of_mean_logits(member_logits, targets):
    return F.cross_entropy(member_logits.sum(0), targets)


def b_gate_softmax_twice(x, w_gate):
    return torch.softmax(torch.softmax(x @ w_gate, dim=-1), dim=-1)


def b_gate_plus_bias(x, w_gate):
    return torch.softmax(x @ w_gate + 1.0, dim=-1) * 0.5 + 0.5 / w_gate.shape[1]


def b_mix_weights_squared(x, gate, experts):
    w = torch.softmax(gate(x), -1) ** 2
    probs = torch.stack([torch.softmax(e(x), -1) for e in experts], 1)
    return (w[:, :, None] * probs).sum(1)


def b_mix_gate_on_expert_output(x, gate, experts):
    w = torch.softmax(gate(x), -1)
    probs = torch.stack([torch.softmax(e(x), -1) for e in experts], 1)
    return (w[:, :, None] * probs).sum(1) * 0 + probs.max(1).values


def b_score_without_argmax(gate_weights, specialty, num_specialties):
    joint = torch.zeros(num_specialties, gate_weights.shape[1]).index_add_(0, specialty, (gate_weights > 0.5).float())
    joint = joint / joint.sum().clamp(min=1)
    ps, pe = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nz = joint > 0
    mi = (joint[nz] * (joint / (ps * pe))[nz].log()).sum()
    h = lambda p: -(p[p > 0] * p[p > 0].log()).sum()  # noqa: E731
    return float(2 * mi / (h(ps) + h(pe)))


def b_score_sqrt(gate_weights, specialty, num_specialties):
    top = gate_weights.argmax(-1)
    joint = torch.zeros(num_specialties, gate_weights.shape[1])
    joint.index_put_((specialty, top), torch.ones(len(top)), accumulate=True)
    joint = joint / joint.sum()
    ps, pe = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nz = joint > 0
    mi = (joint[nz] * (joint / (ps * pe))[nz].log()).sum()
    h = lambda p: -(p[p > 0] * p[p > 0].log()).sum()  # noqa: E731
    return float((2 * mi / (h(ps) + h(pe))) ** 0.5)


def b_mflops_no_classes(num_tokens, d_in, d_ff, num_classes, num_experts):
    return 2 * num_tokens * d_in * num_experts + num_experts * 2 * num_tokens * d_in * d_ff


def b_mflops_gate_is_ffn(num_tokens, d_in, d_ff, num_classes, num_experts):
    return 2 * num_tokens * d_in * d_ff + num_experts * (2 * num_tokens * d_in * d_ff + 2 * num_tokens * d_ff * num_classes)


def b_topk_softmax_after_mask_zero(router_logits, k):
    probs = torch.softmax(router_logits, -1)
    g, i = torch.topk(probs, k, -1)
    return i, torch.softmax(g, -1)


def b_topk_sorted_index(router_logits, k):
    probs = torch.softmax(router_logits, -1)
    g, i = torch.topk(probs, k, -1)
    g = g / g.sum(-1, keepdim=True)
    return i.sort(-1).values, g


def b_noisy_noise_on_gates(clean_logits, noise_logits, noise, k):
    top, index = torch.topk(clean_logits, k, dim=-1)
    gates = torch.softmax(top, dim=-1) + 0.1 * noise.gather(-1, index) * F.softplus(noise_logits.gather(-1, index))
    return index, gates


def b_noisy_softplus_of_sum(clean_logits, noise_logits, noise, k):
    h = F.softplus(clean_logits + noise * noise_logits)
    top, index = torch.topk(h, k, dim=-1)
    return index, torch.softmax(top, dim=-1)


def b_switch_top2(x, w_router, experts):
    probs = torch.softmax(x @ w_router, -1)
    g, i = torch.topk(probs, min(2, probs.shape[-1]), -1)
    y = torch.zeros_like(x)
    for slot in range(i.shape[1]):
        for e, expert in enumerate(experts):
            rows = i[:, slot] == e
            y[rows] += g[rows, slot, None] * expert(x[rows])
    return y


def b_switch_gate_logit_softmax_over_all(x, w_router, experts):
    probs = torch.softmax(x @ w_router, -1)
    gate, index = probs.max(-1)
    y = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        rows = index == e
        y[rows] = (1 - gate[rows, None]) * expert(x[rows])
    return y


def b_lb_f_times_p_mean(router_probs, expert_index):
    n, e = router_probs.shape
    f = torch.bincount(expert_index, minlength=e).float() / n
    return e * f.mean() * router_probs.mean()


def b_lb_cv_squared(router_probs, expert_index):
    imp = router_probs.sum(0)
    return (imp.std() / imp.mean()) ** 2


def b_z_mean_logits_squared(router_logits):
    return router_logits.mean(-1).pow(2).mean()


def b_z_lse_minus_max(router_logits):
    return ((torch.logsumexp(router_logits, -1) - router_logits.max(-1).values) ** 2).mean()


def b_keep_random_order(expert_index, num_experts, capacity):
    keep = torch.zeros(len(expert_index), dtype=torch.bool)
    for e in range(num_experts):
        rows = (expert_index == e).nonzero(as_tuple=True)[0].flip(0)
        keep[rows[:capacity]] = True
    return keep


def b_keep_capacity_minus_one_global(expert_index, num_experts, capacity):
    counts = torch.bincount(expert_index, minlength=num_experts)
    return counts[expert_index] <= capacity


def b_choice_softmax_after_topk(router_logits, capacity):
    g, i = torch.topk(router_logits.T, capacity, dim=-1)
    return i, torch.softmax(g, dim=-1)


def b_choice_no_softmax_tokens_by_probs(router_logits, capacity):
    scores = torch.softmax(router_logits, -1)
    i = torch.topk(scores.T, capacity, -1).indices
    return i, router_logits.T.gather(-1, i)


def b_sort_counts_cumsum_prepend(expert_index, num_experts):
    counts = torch.bincount(expert_index, minlength=num_experts)
    return torch.argsort(expert_index, stable=True), torch.cat([torch.zeros(1, dtype=counts.dtype), counts[:-1]])


def b_sort_by_value_then_index(expert_index, num_experts):
    n = len(expert_index)
    return torch.argsort(expert_index * n - torch.arange(n)), torch.bincount(expert_index, minlength=num_experts)


def b_combine_add_without_zero(y_sorted, token, gates, num_tokens):
    out = torch.ones(num_tokens, y_sorted.shape[1])
    return out.index_add(0, token, y_sorted * gates[:, None])


def b_combine_gate_squared(y_sorted, token, gates, num_tokens):
    return torch.zeros(num_tokens, y_sorted.shape[1]).index_add(0, token, y_sorted * gates[:, None] ** 2)


def b_slots_per_expert_totals_minus(expert_index, num_experts):
    one_hot = F.one_hot(expert_index, num_experts)
    return (torch.cumsum(one_hot, 0)).gather(1, expert_index[:, None]).squeeze(1) - 2


def b_slots_float_division(expert_index, num_experts):
    one_hot = F.one_hot(expert_index, num_experts)
    pos = (torch.cumsum(one_hot, 0) - one_hot).gather(1, expert_index[:, None]).squeeze(1)
    return pos / 1


def b_attn_mask_with_triu_diag0(q, k, v):
    t = q.shape[-2]
    s = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    return torch.softmax(s.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 0), -1e9), -1) @ v


def b_attn_dropout_like(q, k, v):
    t = q.shape[-2]
    s = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    w = torch.softmax(s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")), -1)
    return 0.9 * w @ v


def b_block_half_residual(block, x):
    x = x + 0.5 * block.attn(block.ln_1(x))
    return x + block.ffn(block.ln_2(x))


def b_block_shared_norm_input(block, x):
    n = block.ln_1(x)
    x = x + block.attn(n)
    return x + block.ffn(block.ln_2(n))


def b_sw_moe_y_times_gate(block, x):
    x = x + block.attn(block.ln_1(x))
    moe = block.ffn(block.ln_2(x))
    return x + 2 * moe.y, moe.router_loss


def b_sw_loss_mean_of_two(block, x):
    x = x + block.attn(block.ln_1(x))
    moe = block.ffn(block.ln_2(x))
    return x + moe.y, moe.router_loss / 2


def _books2(c):
    V, T, D, F_, L, E = c.vocab_size, c.block_size, c.d_model, c.d_ff, c.n_layers, c.num_experts
    n_moe = len(c.moe_layers)
    ffn_one = 2 * D * F_ + F_ + D
    shared = V * D + L * (4 * D * D + 4 * D) + (2 * L + 1) * 2 * D + n_moe * D * E
    return dict(V=V, T=T, D=D, F=F_, L=L, E=E, n_moe=n_moe, ffn_one=ffn_one, shared=shared)


def b_books_every_layer_switch(c):
    b = _books2(c)
    total = b["shared"] + b["L"] * b["E"] * b["ffn_one"] if b["n_moe"] else b["shared"] + b["L"] * b["ffn_one"]
    active = b["shared"] + b["L"] * b["ffn_one"]
    flops = (
        b["L"] * (8 * b["D"] ** 2 + 4 * b["T"] * b["D"] + 4 * b["D"] * b["F"])
        + b["n_moe"] * 2 * b["D"] * b["E"]
        + 2 * b["D"] * b["V"]
    )
    return {"params_total": total, "params_active": active, "flops_per_token": flops}


def b_books_mix_t_squared(c):
    b = _books2(c)
    total = b["shared"] + (b["L"] - b["n_moe"]) * b["ffn_one"] + b["n_moe"] * b["E"] * b["ffn_one"]
    active = b["shared"] + b["L"] * b["ffn_one"]
    flops = (
        b["L"] * (8 * b["D"] ** 2 + 4 * b["T"] ** 2 * b["D"] + 4 * b["D"] * b["F"])
        + b["n_moe"] * 2 * b["D"] * b["E"]
        + 2 * b["D"] * b["V"]
    )
    return {"params_total": total, "params_active": active, "flops_per_token": flops}


for _ex_id, _rows in {
    "0.1": [
        ("minlength from the largest label", b_count_sum_bool, "with 3 specialties you returned 2 counts:"),
        ("counts sorted", b_count_sorted, "the counts: the right values, sorted along"),
    ],
    "1.1": [
        ("residual added", b_ffn_residual, "the output: the expected result plus `x`:"),
        ("b_out subtracted", b_ffn_no_b_in_activation_after_bias_out, "the output: the expected result minus 2"),
    ],
    "1.2": [
        ("(D + F)²", b_params_squared_sum, "(D + F)² is not how the"),
        ("three matrices", b_params_three_matrices, "three weight matrices: this block has two,"),
    ],
    "1.3": [
        ("plus one", b_flops_plus_one, "the FLOP count: off by one"),
        ("D + F", b_flops_sum_dims, "you added d_model and d_ff where they"),
    ],
    "1.4": [
        ("share of all hits", b_acc_normalised, "each specialty's share of all correct answers;"),
        ("all hits over each count", b_acc_counts_over_total_correct, None),
    ],
    "2.1": [
        ("weighted members", b_avg_weighted_first, None),
        ("sigmoid", b_avg_sigmoid, "a sigmoid treats each class on its"),
    ],
    "2.2": [
        ("bias averaged over classes", b_bv_bias_with_abs, "your bias (the other two are right):"),
        ("variance of one member", b_bv_variance_first_member, "your variance uses only the first member:"),
    ],
    "2.3": [
        ("best member per class", b_ll_max_member, None),
        ("summed logits", b_ll_mean_of_log_probs_of_mean_logits, "you summed the members' logits before the"),
    ],
    "3.1": [
        ("softmax twice", b_gate_softmax_twice, "the gate weights: a softmax applied twice"),
        ("mixed with uniform", b_gate_plus_bias, None),
    ],
    "3.2": [
        ("gate squared", b_mix_weights_squared, "the gate weights are squared: weigh each"),
        ("most confident expert", b_mix_gate_on_expert_output, None),
    ],
    "3.3": [
        ("threshold, not argmax", b_score_without_argmax, None),
        ("square root", b_score_sqrt, "you took a square root: the score"),
    ],
    "3.4": [
        ("second matmul missing", b_mflops_no_classes, "each expert's second matmul (F × classes,"),
        ("gate as big as an FFN", b_mflops_gate_is_ffn, "the gate is a D × E"),
    ],
    "4.1": [
        ("softmax of top probabilities", b_topk_softmax_after_mask_zero, "you took a softmax of the top-k"),
        ("index sorted, gates not", b_topk_sorted_index, "you sorted the expert ids but not"),
    ],
    "4.2": [
        ("noise on the gates", b_noisy_noise_on_gates, None),
        ("softplus of the sum", b_noisy_softplus_of_sum, None),
    ],
    "4.3": [
        ("top-2", b_switch_top2, "each token went to its top-2 experts;"),
        ("1 - gate", b_switch_gate_logit_softmax_over_all, "you scaled by 1 - p_i; the"),
    ],
    "5.1": [
        ("means of f and P", b_lb_f_times_p_mean, "you multiplied the means of f and"),
        ("importance CV²", b_lb_cv_squared, "this is the importance loss of Shazeer"),
    ],
    "5.2": [
        ("mean logit squared", b_z_mean_logits_squared, "you squared each token's mean logit; the"),
        ("logsumexp minus max", b_z_lse_minus_max, None),
    ],
    "5.3": [
        ("keeps the last in reverse", b_keep_random_order, "you dropped the wrong tokens: your mask"),
        ("experts with at most C tokens", b_keep_capacity_minus_one_global, "you dropped every token of an expert"),
    ],
    "5.4": [
        ("softmax over the picked logits", b_choice_softmax_after_topk, "you took a softmax over each expert's"),
        ("gates are logits", b_choice_no_softmax_tokens_by_probs, "the right tokens, but the gates are"),
    ],
    "6.1": [
        ("counts shifted", b_sort_counts_cumsum_prepend, "counts: shifted by one place along dim"),
        ("later tokens first", b_sort_by_value_then_index, "within one expert the tokens are not"),
    ],
    "6.2": [
        ("ones instead of zeros", b_combine_add_without_zero, "the combined output: off by +1 everywhere"),
        ("gate squared", b_combine_gate_squared, "the gates are applied twice (squared): multiply"),
    ],
    "6.3": [
        ("minus 2", b_slots_per_expert_totals_minus, "the positions: off by -1 everywhere (off"),
        ("float from division", b_slots_float_division, "positions are slot numbers: return an integer"),
    ],
    "7.1": [
        ("triu with diagonal 0", b_attn_mask_with_triu_diag0, "mask off by one: each query must"),
        ("times 0.9", b_attn_dropout_like, None),
    ],
    "7.2": [
        ("half the attention", b_block_half_residual, None),
        ("one norm for both", b_block_shared_norm_input, "the FFN reads a normalised copy of"),
    ],
    "8.1": [
        ("moe.y doubled", b_sw_moe_y_times_gate, "the Switch layer's output is added twice:"),
        ("half the loss", b_sw_loss_mean_of_two, "router_loss: exactly half the expected value, a"),
    ],
    "8.2": [
        ("every layer a Switch layer", b_books_every_layer_switch, None),
        ("T² in the attention mix", b_books_mix_t_squared, None),
    ],
}.items():
    MUTANTS.setdefault(_ex_id, []).extend(_rows)


# -- 10.1 mixtral_gate -----------------------------------------------------------------
def mix_softmax_all_no_renorm(router_logits, k):
    values, index = torch.topk(torch.softmax(router_logits, -1), k, dim=-1)
    return index, values


def mix_raw_logits(router_logits, k):
    values, index = torch.topk(router_logits, k, dim=-1)
    return index, values


def mix_sigmoid(router_logits, k):
    values, index = torch.topk(router_logits, k, dim=-1)
    return index, torch.sigmoid(values)


def mix_softmax_of_probs(router_logits, k):
    values, index = torch.topk(torch.softmax(router_logits, -1), k, dim=-1)
    return index, torch.softmax(values, -1)


def mix_smallest(router_logits, k):
    values, index = torch.topk(router_logits, k, dim=-1, largest=False)
    return index, torch.softmax(values, -1)


def mix_detached(router_logits, k):
    values, index = torch.topk(router_logits.detach(), k, dim=-1)
    return index, torch.softmax(values, -1)


def mix_swapped(router_logits, k):
    values, index = torch.topk(router_logits, k, dim=-1)
    return torch.softmax(values, -1), index


def mix_softmax_over_tokens(router_logits, k):
    values, index = torch.topk(router_logits, k, dim=-1)
    return index, torch.softmax(values, 0)


# -- 10.2 deepseek_gate ----------------------------------------------------------------
def ds_bias_in_gates(router_logits, bias, k):
    scores = torch.sigmoid(router_logits) + bias
    index = torch.topk(scores, k, dim=-1).indices
    chosen = scores.gather(-1, index)
    return index, chosen / chosen.sum(-1, keepdim=True)


def ds_no_bias(router_logits, bias, k):
    scores = torch.sigmoid(router_logits)
    values, index = torch.topk(scores, k, dim=-1)
    return index, values / values.sum(-1, keepdim=True)


def ds_no_renorm(router_logits, bias, k):
    scores = torch.sigmoid(router_logits)
    index = torch.topk(scores + bias, k, dim=-1).indices
    return index, scores.gather(-1, index)


def ds_softmax(router_logits, bias, k):
    scores = torch.softmax(router_logits, -1)
    index = torch.topk(scores + bias, k, dim=-1).indices
    chosen = scores.gather(-1, index)
    return index, chosen / chosen.sum(-1, keepdim=True)


def ds_bias_on_logits(router_logits, bias, k):
    scores = torch.sigmoid(router_logits + bias)
    index = torch.topk(scores, k, dim=-1).indices
    chosen = scores.gather(-1, index)
    return index, chosen / chosen.sum(-1, keepdim=True)


def ds_minus_bias(router_logits, bias, k):
    scores = torch.sigmoid(router_logits)
    index = torch.topk(scores - bias, k, dim=-1).indices
    chosen = scores.gather(-1, index)
    return index, chosen / chosen.sum(-1, keepdim=True)


def ds_renorm_over_all(router_logits, bias, k):
    scores = torch.sigmoid(router_logits)
    index = torch.topk(scores + bias, k, dim=-1).indices
    return index, scores.gather(-1, index) / scores.sum(-1, keepdim=True)


def ds_mixtral_gates(router_logits, bias, k):
    index = torch.topk(torch.sigmoid(router_logits) + bias, k, dim=-1).indices
    return index, torch.softmax(router_logits.gather(-1, index), -1)


# -- 10.3 bias_update ------------------------------------------------------------------
def bu_flipped(bias, load, gamma):
    load = load.float()
    return bias + gamma * torch.sign(load - load.mean())


def bu_proportional(bias, load, gamma):
    load = load.float()
    return bias + gamma * (load.mean() - load)


def bu_step_only(bias, load, gamma):
    load = load.float()
    return gamma * torch.sign(load.mean() - load)


def bu_no_gamma(bias, load, gamma):
    load = load.float()
    return bias + torch.sign(load.mean() - load)


def bu_total(bias, load, gamma):
    load = load.float()
    return bias + gamma * torch.sign(load.sum() - load)


def bu_ties_up(bias, load, gamma):
    load = load.float()
    return bias + gamma * torch.where(load > load.mean(), -1.0, 1.0)


def bu_in_place(bias, load, gamma):
    load = load.float()
    bias += gamma * torch.sign(load.mean() - load)
    return bias


def bu_median(bias, load, gamma):
    load = load.float()
    return bias + gamma * torch.sign(load.median() - load)


def bu_int_mean(bias, load, gamma):
    return bias + gamma * torch.sign(load.mean() - load)


# -- 10.4 shared_and_routed ------------------------------------------------------------
def _routed_part(x, routed, expert_index, gates, gated=True, choices=None):
    y = torch.zeros_like(x)
    for j in range(expert_index.shape[1] if choices is None else choices):
        for e in range(routed.num_experts):
            rows = (expert_index[:, j] == e).nonzero(as_tuple=True)[0]
            if rows.numel():
                w = gates[rows, j, None] if gated else 1.0
                y = y.index_add(0, rows, w * routed.expert_output(e, x[rows]))
    return y


def sr_no_shared(x, shared, routed, expert_index, gates):
    return _routed_part(x, routed, expert_index, gates)


def sr_shared_mean(x, shared, routed, expert_index, gates):
    s = sum(shared.expert_output(i, x) for i in range(shared.num_experts)) / shared.num_experts
    return s + _routed_part(x, routed, expert_index, gates)


def sr_first_shared(x, shared, routed, expert_index, gates):
    return shared.expert_output(0, x) + _routed_part(x, routed, expert_index, gates)


def sr_ungated(x, shared, routed, expert_index, gates):
    s = sum(shared.expert_output(i, x) for i in range(shared.num_experts))
    return s + _routed_part(x, routed, expert_index, gates, gated=False)


def sr_first_choice(x, shared, routed, expert_index, gates):
    s = sum(shared.expert_output(i, x) for i in range(shared.num_experts))
    return s + _routed_part(x, routed, expert_index, gates, choices=1)


def sr_gated_shared(x, shared, routed, expert_index, gates):
    s = sum(shared.expert_output(i, x) for i in range(shared.num_experts))
    return gates[:, :1] * s + _routed_part(x, routed, expert_index, gates)


def sr_residual(x, shared, routed, expert_index, gates):
    s = sum(shared.expert_output(i, x) for i in range(shared.num_experts))
    return x + s + _routed_part(x, routed, expert_index, gates)


def sr_only_shared(x, shared, routed, expert_index, gates):
    return sum(shared.expert_output(i, x) for i in range(shared.num_experts))


# -- 10.5 upcycle ------------------------------------------------------------------------
def _up_config(ffn, num_experts, top_k, **kw):
    from moe_course.moe import MoEConfig

    base = dict(top_k=top_k, router="top_k", capacity_factor=None, activation=ffn.activation)
    base.update(kw)
    return MoEConfig(ffn.d_model, ffn.d_ff, num_experts, **base)


def up_no_copy(ffn, num_experts, top_k):
    from moe_course.moe import MoELayer

    return MoELayer(_up_config(ffn, num_experts, top_k))


def up_first_expert_only(ffn, num_experts, top_k):
    from moe_course.moe import MoELayer

    layer = MoELayer(_up_config(ffn, num_experts, top_k))
    with torch.no_grad():
        layer.experts.w_in[0].copy_(ffn.fc_in.weight.T)
        layer.experts.w_out[0].copy_(ffn.fc_out.weight.T)
        layer.experts.b_in[0].copy_(ffn.fc_in.bias)
        layer.experts.b_out[0].copy_(ffn.fc_out.bias)
        if ffn.fc_gate is not None:
            layer.experts.w_gate[0].copy_(ffn.fc_gate.weight.T)
            layer.experts.b_gate[0].copy_(ffn.fc_gate.bias)
    return layer


def up_no_biases(ffn, num_experts, top_k):
    from moe_course.moe import MoELayer

    layer = MoELayer(_up_config(ffn, num_experts, top_k))
    with torch.no_grad():
        layer.experts.w_in.copy_(ffn.fc_in.weight.T.expand_as(layer.experts.w_in))
        layer.experts.w_out.copy_(ffn.fc_out.weight.T.expand_as(layer.experts.w_out))
        if ffn.fc_gate is not None:
            layer.experts.w_gate.copy_(ffn.fc_gate.weight.T.expand_as(layer.experts.w_gate))
    return layer


def up_switch_gate(ffn, num_experts, top_k):
    from moe_course.moe import MoELayer

    if top_k == 1:
        layer = MoELayer(_up_config(ffn, num_experts, 1, router="switch"))
    else:
        layer = MoELayer(_up_config(ffn, num_experts, top_k))
    layer.experts.copy_feed_forward_(ffn)
    return layer


def up_raw_gates(ffn, num_experts, top_k):
    from moe_course.moe import MoELayer

    layer = MoELayer(_up_config(ffn, num_experts, top_k, renormalize=False))
    layer.experts.copy_feed_forward_(ffn)
    return layer


def up_zero_router(ffn, num_experts, top_k):
    from moe_course.moe import MoELayer

    layer = MoELayer(_up_config(ffn, num_experts, top_k))
    layer.experts.copy_feed_forward_(ffn)
    with torch.no_grad():
        layer.w_router.zero_()
    return layer


def up_capacity(ffn, num_experts, top_k):
    from moe_course.moe import MoELayer

    layer = MoELayer(_up_config(ffn, num_experts, top_k, capacity_factor=1.0))
    layer.experts.copy_feed_forward_(ffn)
    return layer


def up_shared_memory(ffn, num_experts, top_k):
    from moe_course.moe import MoELayer

    layer = MoELayer(_up_config(ffn, num_experts, top_k))
    layer.experts.copy_feed_forward_(ffn)
    e, d, f = layer.experts.w_in.shape
    layer.experts.w_in = torch.nn.Parameter(ffn.fc_in.weight.T.expand(e, d, f))
    return layer


def up_gelu_always(ffn, num_experts, top_k):
    from moe_course.moe import MoEConfig, MoELayer

    layer = MoELayer(MoEConfig(ffn.d_model, ffn.d_ff, num_experts, top_k=top_k, router="top_k", capacity_factor=None))
    if ffn.activation == "gelu":
        layer.experts.copy_feed_forward_(ffn)
    return layer


def up_changes_ffn(ffn, num_experts, top_k):
    from moe_course.moe import MoELayer

    layer = MoELayer(_up_config(ffn, num_experts, top_k))
    layer.experts.copy_feed_forward_(ffn)
    with torch.no_grad():
        ffn.fc_in.weight.mul_(0.5)  # "free" the dense model's memory by shrinking it
    return layer


MUTANTS.update(
    {
        "10.1": [
            ("softmax over all E, no renormalising", mix_softmax_all_no_renorm, "the top-k of the softmax over all E experts"),
            ("raw logits as gates", mix_raw_logits, "raw logits of the chosen experts"),
            ("sigmoid of the chosen logits", mix_sigmoid, "you took a sigmoid of each chosen logit"),
            ("softmax of the top probabilities", mix_softmax_of_probs, "a softmax of a softmax"),
            ("the k smallest logits", mix_smallest, "you picked the k *smallest* logits"),
            ("gates detached", mix_detached, "carry no gradient back to the logits"),
            ("results swapped", mix_swapped, "the two results are swapped"),
            ("softmax over the tokens", mix_softmax_over_tokens, "the softmax runs over the tokens (dim 0)"),
        ],
        "10.2": [
            ("bias in the gates", ds_bias_in_gates, "the bias is in the gates"),
            ("bias ignored", ds_no_bias, "the choice ignores the bias"),
            ("no renormalising", ds_no_renorm, "the gates are not renormalised"),
            ("softmax scores", ds_softmax, "you used a softmax where DeepSeek-V3 uses a sigmoid"),
            ("bias on the logits", ds_bias_on_logits, "you added the bias to the logits before the sigmoid"),
            ("bias subtracted", ds_minus_bias, "the bias is subtracted"),
            ("renormalised over all experts", ds_renorm_over_all, "divided the chosen scores by the sum over *all* experts"),
            ("Mixtral's gates", ds_mixtral_gates, "a softmax over the chosen logits (Mixtral's gate)"),
        ],
        "10.3": [
            ("sign flipped", bu_flipped, "the sign is flipped"),
            ("proportional step", bu_proportional, "the step is proportional to the difference"),
            ("the step alone", bu_step_only, "you returned the step alone"),
            ("no gamma", bu_no_gamma, "γ is missing"),
            ("the total load", bu_total, "compared each load with the *total* load"),
            ("ties move up", bu_ties_up, "an expert exactly at the mean load should keep its bias"),
            ("in place", bu_in_place, "changed its input `bias`"),
            ("the median", bu_median, "you compared with the median load"),
            ("integer mean", bu_int_mean, "load holds integer counts (int64)"),
        ],
        "10.4": [
            ("no shared experts", sr_no_shared, "the shared experts are missing"),
            ("shared experts averaged", sr_shared_mean, "you averaged the shared experts"),
            ("only shared expert 0", sr_first_shared, "only shared expert 0 is in"),
            ("routed ungated", sr_ungated, "the routed outputs are not weighed by their gates"),
            ("first choice only", sr_first_choice, "only each token's first choice is used"),
            ("shared gated", sr_gated_shared, "the shared experts are weighed by the first gate"),
            ("residual added", sr_residual, "you added the input x"),
            ("shared only", sr_only_shared, "the routed experts are missing"),
        ],
        "10.5": [
            ("experts not copied", up_no_copy, "is not a copy of the dense FFN"),
            ("only expert 0 copied", up_first_expert_only, "are not copies of the dense FFN"),
            ("biases not copied", up_no_biases, "the experts' b_in is not a copy"),
            ("Switch's raw gate for top-1", up_switch_gate, "times p_max"),
            ("raw top-k gates", up_raw_gates, "the gates are not renormalised"),
            ("router zeroed", up_zero_router, "the router is all zeros"),
            ("a capacity limit", up_capacity, "capacity_factor=1.0"),
            ("shares memory with the FFN", up_shared_memory, "shares memory with the dense FFN"),
            ("activation always gelu", up_gelu_always, "activation"),
            ("changes the dense FFN", up_changes_ffn, "the dense FFN's fc_in.weight changed"),
        ],
    }
)


# == lesson 09 =======================================================================================
from moe_course.distributed.exchange import simulate_all_to_all  # noqa: E402


# -- 9.1 split_sizes ---------------------------------------------------------------------------------
def split_no_transpose(counts, rank):
    W, E = counts.shape
    sent = counts[rank].view(W, E // W).sum(-1).tolist()
    return sent, sent


def split_swapped(counts, rank):
    W, E = counts.shape
    per = counts.view(W, W, E // W).sum(-1)
    return per[:, rank].tolist(), per[rank].tolist()


def split_round_robin(counts, rank):
    W, E = counts.shape
    per = counts.view(W, E // W, W).sum(1)  # expert e on rank e % W
    return per[rank].tolist(), per[:, rank].tolist()


def split_tensors(counts, rank):
    W, E = counts.shape
    per = counts.view(W, W, E // W).sum(-1)
    return per[rank], per[:, rank]


def split_per_expert(counts, rank):
    return counts[rank].tolist(), counts[:, rank].tolist()


def split_single_expert_column(counts, rank):
    W, E = counts.shape
    per = counts.view(W, W, E // W).sum(-1)
    return per[rank].tolist(), counts[:, rank].tolist()


def split_column_sums(counts, rank):
    W, E = counts.shape
    per = counts.view(W, W, E // W).sum(-1)
    return per[rank].tolist(), per.sum(0).tolist()


def split_float_mean(counts, rank):
    W, E = counts.shape
    per = counts.float().view(W, W, E // W).sum(-1)
    return per[rank].tolist(), per[:, rank].tolist()


def split_everyones_sends(counts, rank):
    W, E = counts.shape
    per = counts.view(W, W, E // W).sum(-1)
    return per.sum(0).tolist(), per[:, rank].tolist()


# -- 9.2 all_to_all_backward --------------------------------------------------------------------------
def a2a_same_splits(grad_received, splits):
    return simulate_all_to_all(grad_received, splits)


def a2a_identity(grad_received, splits):
    return list(grad_received)


def a2a_averaged(grad_received, splits):
    return [g / splits.shape[0] for g in simulate_all_to_all(grad_received, splits.T)]


def a2a_reversed_ranks(grad_received, splits):
    return simulate_all_to_all(grad_received, splits.T)[::-1]


def a2a_blocks_reversed(grad_received, splits):
    W = splits.shape[0]
    blocks = [torch.split(g, splits[:, q].tolist()) for q, g in enumerate(grad_received)]
    return [torch.cat([blocks[q][s] for q in reversed(range(W))]) for s in range(W)]


def a2a_one_tensor(grad_received, splits):
    return torch.cat(simulate_all_to_all(grad_received, splits.T))


def a2a_zeros(grad_received, splits):
    return [torch.zeros(int(n), grad_received[0].shape[1]) for n in splits.sum(1)]


def a2a_rows_by_hand_wrong_split(grad_received, splits):
    W = splits.shape[0]
    blocks = [
        torch.split(g, splits[q].tolist()) for q, g in enumerate(grad_received)
    ]  # split by what q sent, not what it received
    return [torch.cat([blocks[q][s] for q in range(W)]) for s in range(W)]


# -- 9.3 soft_moe_weights -----------------------------------------------------------------------------
def smw_axes_swapped(logits):
    return torch.softmax(logits, dim=2), torch.softmax(logits, dim=1)


def smw_both_over_slots(logits):
    return torch.softmax(logits, dim=2), torch.softmax(logits, dim=2)


def smw_dispatch_over_batch(logits):
    return torch.softmax(logits, dim=0), torch.softmax(logits, dim=2)


def smw_dispatch_all_tokens(logits):
    B, T, S = logits.shape
    return torch.softmax(logits.reshape(B * T, S), dim=0).reshape(B, T, S), torch.softmax(logits, dim=-1)


def smw_raw_combine(logits):
    return torch.softmax(logits, dim=1), logits


def smw_detached(logits):
    with torch.no_grad():
        return torch.softmax(logits, dim=1), torch.softmax(logits, dim=2)


def smw_order_swapped(logits):
    return torch.softmax(logits, dim=2), torch.softmax(logits, dim=1)[..., :]  # the right tensors, returned in the wrong order


def smw_log_dispatch(logits):
    return torch.log_softmax(logits, dim=1), torch.softmax(logits, dim=2)


def smw_combine_over_everything(logits):
    B, T, S = logits.shape
    return torch.softmax(logits, dim=1), torch.softmax(logits.reshape(B, T * S), dim=-1).reshape(B, T, S)


# -- 9.4 top_p_mask -----------------------------------------------------------------------------------
def topp_without_crossing(router_probs, p):
    top, index = router_probs.sort(dim=-1, descending=True)
    return torch.zeros_like(router_probs, dtype=torch.bool).scatter(1, index, top.cumsum(-1) < p)


def topp_sorted_order(router_probs, p):
    top, _ = router_probs.sort(dim=-1, descending=True)
    return (top.cumsum(-1) - top) < p


def topp_unsorted(router_probs, p):
    return (router_probs.cumsum(-1) - router_probs) < p


def topp_ascending(router_probs, p):
    top, index = router_probs.sort(dim=-1)
    return torch.zeros_like(router_probs, dtype=torch.bool).scatter(1, index, (top.cumsum(-1) - top) < p)


def topp_threshold(router_probs, p):
    return router_probs >= p


def topp_long_mask(router_probs, p):
    top, index = router_probs.sort(dim=-1, descending=True)
    keep = ((top.cumsum(-1) - top) < p).long()
    return torch.zeros_like(router_probs, dtype=torch.long).scatter(1, index, keep)


def topp_counts(router_probs, p):
    top, _ = router_probs.sort(dim=-1, descending=True)
    return ((top.cumsum(-1) - top) < p).sum(-1)


def topp_fixed_k(router_probs, p):
    E = router_probs.shape[-1]
    index = router_probs.topk(max(1, round(p * E)), dim=-1).indices
    return torch.zeros_like(router_probs, dtype=torch.bool).scatter(1, index, True)


MUTANTS.update(
    {
        "9.1": [
            ("output = input", split_no_transpose, "output_splits equals your input_splits"),
            ("swapped", split_swapped, "the two results are swapped"),
            ("round robin experts", split_round_robin, "round robin"),
            ("tensors, not lists", split_tensors, "Python list of ints"),
            ("per expert", split_per_expert, "one per expert"),
            ("one expert's column", split_single_expert_column, "counts only expert"),
            ("column sums", split_column_sums, "what each rank receives from everybody"),
            ("floats", split_float_mean, "holds floats"),
            ("everyone's sends", split_everyones_sends, "counts every rank's rows"),
        ],
        "9.2": [
            ("same splits", a2a_same_splits, "with the same splits"),
            ("identity", a2a_identity, "kept the gradients of the rows it received"),
            ("averaged over ranks", a2a_averaged, "divided by the number of ranks"),
            ("ranks reversed", a2a_reversed_ranks, "the ranks are in reverse order"),
            ("blocks reversed", a2a_blocks_reversed, "blocks are in reverse order"),
            ("one tensor", a2a_one_tensor, "return a list of"),
            ("zeros", a2a_zeros, "every gradient is zero"),
            ("split by what was sent, by hand", a2a_rows_by_hand_wrong_split, "with the same splits"),
        ],
        "9.3": [
            ("axes swapped", smw_axes_swapped, "the results are in the wrong order"),
            ("both over the slots", smw_both_over_slots, "dispatch and combine are the same tensor"),
            ("dispatch over the batch", smw_dispatch_over_batch, "over the sequences of the batch"),
            ("dispatch over all tokens", smw_dispatch_all_tokens, "over the tokens of every sequence at once"),
            ("raw combine", smw_raw_combine, "raw logits"),
            ("detached", smw_detached, "carry no gradient"),
            ("log dispatch", smw_log_dispatch, "log-weights"),
            ("combine over everything", smw_combine_over_everything, "over all tokens and slots together"),
        ],
        "9.4": [
            ("crossing expert left out", topp_without_crossing, "the expert that crosses p is left out"),
            ("sorted order", topp_sorted_order, "the mask is in sorted order"),
            ("unsorted cumsum", topp_unsorted, "sort each token's probabilities first"),
            ("ascending", topp_ascending, "from smallest to largest"),
            ("threshold", topp_threshold, "p is a total"),
            ("long mask", topp_long_mask, "must be a bool tensor"),
            ("counts", topp_counts, "one number per token"),
            ("fixed k", topp_fixed_k, "the same number of experts"),
        ],
    }
)
