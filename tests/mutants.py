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
    return (((member_probs - y) ** 2).sum(-1).mean(), (mean - y).abs().sum(-1).mean(),
            ((member_probs - mean) ** 2).sum(-1).mean())


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


MUTANTS.update({
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
        ("transposed w_gate", gate_transposed, "raised RuntimeError"),
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
        ("argmax over the patients", score_argmax_over_patients, "raised"),
    ],
    "3.4": [
        ("forgot the gate", mix_flops_no_gate, "gate is missing"),
        ("one expert only", mix_flops_one_expert, "single expert"),
        ("experts map back to D", mix_flops_square_experts, "F × classes"),
        ("multiply-adds, not FLOPs", mix_flops_macs, "multiply-add"),
    ],
})


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


MUTANTS.update({
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
})


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
        keep[rows[len(rows) - capacity:] if len(rows) > capacity else rows] = True
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


MUTANTS.update({
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
})


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


MUTANTS.update({
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
})


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
def _accounting(c, *, all_experts_active=False, no_router=False, untied_head=False, no_mix=False, one_expert_total=False,
                flops_all_experts=False, multiply_add_once=False):
    V, T, D, F_, L, E = c.vocab_size, c.block_size, c.d_model, c.d_ff, c.n_layers, c.num_experts
    n_moe = len(c.moe_layers)
    ffn_one = 2 * D * F_ + F_ + D
    shared = V * D + L * (4 * D * D + 4 * D) + (2 * L + 1) * 2 * D + (0 if no_router else n_moe * D * E)
    if untied_head:
        shared += V * D
    total = shared + (L - n_moe) * ffn_one + n_moe * (1 if one_expert_total else E) * ffn_one
    active = shared + L * ffn_one + (n_moe * (E - 1) * ffn_one if all_experts_active else 0)
    per_layer = 8 * D * D + (0 if no_mix else 4 * T * D) + 4 * D * F_
    flops = L * per_layer + (n_moe * (E - 1) * 4 * D * F_ if flops_all_experts else 0) + (0 if no_router else n_moe * 2 * D * E) + 2 * D * V
    if multiply_add_once:
        flops //= 2
    return {"params_total": total, "params_active": active, "flops_per_token": flops}


MUTANTS.update({
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
})
