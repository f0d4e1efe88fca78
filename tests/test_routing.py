from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_course.routing import (
    capacity_mask,
    expert_capacity,
    expert_choice_routing,
    noisy_top_k_routing,
    switch_routing,
    top_k_routing,
)


def _logits(n: int = 12, e: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, e, generator=torch.Generator().manual_seed(seed))


# -- top-k ---------------------------------------------------------------------


def test_top_k_routing_shapes_and_dtypes():
    r = top_k_routing(_logits().to(torch.bfloat16), 2)
    assert r.router_probs.shape == (12, 5) and r.router_probs.dtype == torch.float32
    assert r.expert_index.shape == (12, 2) and r.expert_index.dtype == torch.int64
    assert r.gates.shape == (12, 2) and r.gates.dtype == torch.float32
    assert r.num_experts == 5 and r.top_k == 2


def test_top_k_routing_picks_the_most_probable_experts_best_first():
    logits = _logits()
    r = top_k_routing(logits, 3)
    probs = F.softmax(logits, dim=-1)
    torch.testing.assert_close(r.router_probs, probs)
    chosen = probs.gather(-1, r.expert_index)
    unchosen = probs.scatter(-1, r.expert_index, -1.0)
    assert torch.all(chosen.min(-1).values >= unchosen.max(-1).values)
    assert torch.all(chosen[:, :-1] >= chosen[:, 1:])  # best first


def test_top_k_routing_renormalised_gates_sum_to_one():
    r = top_k_routing(_logits(), 2)
    torch.testing.assert_close(r.gates.sum(-1), torch.ones(12))
    p = r.router_probs.gather(-1, r.expert_index)
    torch.testing.assert_close(r.gates, p / p.sum(-1, keepdim=True))


def test_top_k_routing_without_renormalisation_keeps_the_probabilities():
    r = top_k_routing(_logits(), 2, renormalize=False)
    torch.testing.assert_close(r.gates, r.router_probs.gather(-1, r.expert_index))
    assert torch.all(r.gates.sum(-1) < 1)


def test_top_k_routing_with_k_equal_e_is_the_dense_mixture():
    r = top_k_routing(_logits(), 5)
    torch.testing.assert_close(r.gate_matrix(), r.router_probs)


def test_routing_gate_matrix_and_tokens_per_expert():
    r = top_k_routing(_logits(), 2)
    dense = r.gate_matrix()
    assert dense.shape == (12, 5)
    assert torch.all((dense > 0).sum(-1) == 2)
    torch.testing.assert_close(dense.sum(-1), torch.ones(12))
    counts = r.tokens_per_expert()
    assert counts.shape == (5,) and counts.sum() == 24
    assert torch.equal(counts, (dense > 0).sum(0))


@pytest.mark.parametrize(
    "logits,k,words",
    [
        (torch.randn(4, 3), 4, "k=4 is more than the number of experts E=3"),
        (torch.randn(4, 3), 0, "k must be at least 1"),
        (torch.randn(2, 4, 3), 1, r"shape \(N, E\)"),
        (torch.randn(4), 1, r"shape \(N, E\)"),
        (torch.ones(4, 3, dtype=torch.long), 1, "floating point"),
    ],
)
def test_top_k_routing_rejects_bad_inputs(logits, k, words):
    with pytest.raises(ValueError, match=words):
        top_k_routing(logits, k)


# -- Switch top-1 ----------------------------------------------------------------


def test_switch_routing_gate_is_the_raw_probability():
    logits = _logits()
    r = switch_routing(logits)
    probs = F.softmax(logits, dim=-1)
    assert r.expert_index.shape == (12, 1) and r.gates.shape == (12, 1)
    assert torch.equal(r.expert_index[:, 0], probs.argmax(-1))
    torch.testing.assert_close(r.gates[:, 0], probs.max(-1).values)
    assert torch.all(r.gates < 1)  # not renormalised to 1.0


def test_switch_routing_gives_the_router_a_gradient_and_renormalised_top1_does_not():
    logits = _logits().requires_grad_()
    switch_routing(logits).gates.sum().backward()
    assert logits.grad.abs().sum() > 0
    logits2 = _logits().requires_grad_()
    top_k_routing(logits2, 1).gates.sum().backward()  # every gate is exactly 1.0
    assert logits2.grad.abs().max() < 1e-6


# -- noisy top-k -------------------------------------------------------------------


def test_noisy_top_k_routing_adds_no_noise_in_evaluation():
    clean, noise = _logits(seed=0), _logits(seed=1)
    r = noisy_top_k_routing(clean, noise, 2, training=False)
    ref = top_k_routing(clean, 2)
    assert torch.equal(r.expert_index, ref.expert_index)
    torch.testing.assert_close(r.gates, ref.gates)
    torch.testing.assert_close(r.router_logits, clean)


def test_noisy_top_k_routing_adds_scaled_gaussian_noise_in_training():
    clean, noise = _logits(seed=0), _logits(seed=1)
    r = noisy_top_k_routing(clean, noise, 2, training=True, generator=torch.Generator().manual_seed(7))
    eps = torch.randn(clean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(r.router_logits, clean + eps * F.softplus(noise))
    again = noisy_top_k_routing(clean, noise, 2, training=True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(r.expert_index, again.expert_index)
    other = noisy_top_k_routing(clean, noise, 2, training=True, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(r.router_logits, other.router_logits)


def test_noisy_top_k_routing_gates_are_softmax_over_the_kept_k():
    clean, noise = _logits(seed=0), _logits(seed=1)
    r = noisy_top_k_routing(clean, noise, 3, training=True, generator=torch.Generator().manual_seed(0))
    ref = top_k_routing(r.router_logits, 3)  # renormalised top-k of softmax(H) is the same thing
    assert torch.equal(r.expert_index, ref.expert_index)
    torch.testing.assert_close(r.gates, ref.gates)
    torch.testing.assert_close(r.gates.sum(-1), torch.ones(12))


def test_noisy_top_k_routing_noise_scale_learns_through_softplus():
    clean, noise = _logits(seed=0), _logits(seed=1).requires_grad_()
    r = noisy_top_k_routing(clean, noise, 2, training=True, generator=torch.Generator().manual_seed(0))
    (r.gates * torch.arange(2.0)).sum().backward()
    assert noise.grad.abs().sum() > 0


def test_noisy_top_k_routing_rejects_mismatched_noise():
    with pytest.raises(ValueError, match="must have the shape of clean_logits"):
        noisy_top_k_routing(torch.randn(4, 3), torch.randn(4, 2), 1, training=True)


# -- expert choice ---------------------------------------------------------------


def test_expert_choice_routing_balances_perfectly():
    r = expert_choice_routing(_logits(n=20, e=4), capacity=5)
    assert r.token_index.shape == (4, 5) and r.gates.shape == (4, 5)
    assert r.token_index.dtype == torch.int64
    for e in range(4):
        assert len(set(r.token_index[e].tolist())) == 5  # C distinct tokens each
    assert r.experts_per_token.shape == (20,) and r.experts_per_token.sum() == 20


def test_expert_choice_routing_each_expert_takes_its_highest_scoring_tokens():
    logits = _logits(n=20, e=4)
    r = expert_choice_routing(logits, capacity=3)
    scores = F.softmax(logits, dim=-1)  # softmax over experts, the paper's S
    for e in range(4):
        assert sorted(r.token_index[e].tolist()) == sorted(scores[:, e].argsort(descending=True)[:3].tolist())
        torch.testing.assert_close(r.gates[e], scores[r.token_index[e], e])
    counts = torch.zeros(20, dtype=torch.long)
    for t in r.token_index.reshape(-1).tolist():
        counts[t] += 1
    assert torch.equal(r.experts_per_token, counts)


def test_expert_choice_routing_can_leave_a_token_out_and_give_another_several():
    logits = torch.tensor([[5.0, 5.0], [0.0, 0.0], [-5.0, -5.0]])  # token 0 is everyone's favourite
    r = expert_choice_routing(logits, capacity=1)
    assert r.experts_per_token.tolist() == [2, 0, 0]


@pytest.mark.parametrize("capacity,words", [(0, "capacity must be a positive int"), (21, "more than the number of tokens")])
def test_expert_choice_routing_rejects_bad_capacity(capacity, words):
    with pytest.raises(ValueError, match=words):
        expert_choice_routing(_logits(n=20, e=4), capacity)


# -- capacity --------------------------------------------------------------------


def test_expert_capacity_formula_and_rounding():
    assert expert_capacity(16, 4, 1.0) == 4
    assert expert_capacity(16, 4, 1.25) == 5
    assert expert_capacity(10, 4, 1.0) == 3  # 2.5 rounds up
    assert expert_capacity(16, 4, 1.0, top_k=2) == 8
    assert expert_capacity(10, 1, 1.1) == 11  # 11.000000000000002 is 11, not 12
    assert expert_capacity(4, 8, 0.5) == 1  # 0.25 rounds up to 1
    assert expert_capacity(4, 8, 0.5, min_capacity=4) == 4
    assert expert_capacity(0, 8, 1.0) == 1


@pytest.mark.parametrize(
    "args,kwargs,words",
    [
        ((16, 4, 0.0), {}, "capacity_factor must be a positive number"),
        ((16, 4, -1.0), {}, "capacity_factor must be a positive number"),
        ((16, 0, 1.0), {}, "num_experts must be an int >= 1"),
        ((16, 4, 1.0), {"top_k": 5}, "top_k=5 is more than the number of experts"),
        ((16, 4, 1.0), {"min_capacity": 0}, "min_capacity must be an int >= 1"),
    ],
)
def test_expert_capacity_rejects_bad_arguments(args, kwargs, words):
    with pytest.raises(ValueError, match=words):
        expert_capacity(*args, **kwargs)


def test_capacity_mask_drops_later_tokens_first():
    # Five tokens all want expert 1, which has 2 slots: tokens 0 and 1 get in.
    cm = capacity_mask(torch.tensor([1, 1, 1, 1, 1]), num_experts=3, capacity=2)
    assert cm.keep[:, 0].tolist() == [True, True, False, False, False]
    assert cm.position[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert cm.capacity == 2


def test_capacity_mask_serves_all_first_choices_before_any_second_choice():
    # Expert 0 has 2 slots. Token 0 picks it second; tokens 1 and 2 pick it first.
    expert_index = torch.tensor([[1, 0], [0, 1], [0, 2]])
    cm = capacity_mask(expert_index, num_experts=3, capacity=2)
    assert cm.keep.tolist() == [[True, False], [True, True], [True, True]]
    assert cm.position.tolist() == [[0, 2], [0, 1], [1, 0]]


def test_capacity_mask_a_token_can_lose_its_first_choice_and_keep_its_second():
    # Both want expert 0 first (1 slot): token 1 loses it but still sees its second choice.
    expert_index = torch.tensor([[0, 1], [0, 2]])
    cm = capacity_mask(expert_index, num_experts=3, capacity=1)
    assert cm.keep.tolist() == [[True, True], [False, True]]
    # Same second choice for both: token 0 arrived first at expert 1 as well.
    cm = capacity_mask(torch.tensor([[0, 1], [0, 1]]), num_experts=2, capacity=1)
    assert cm.keep.tolist() == [[True, True], [False, False]]


def _naive_capacity(expert_index: torch.Tensor, num_experts: int, capacity: int):
    n, k = expert_index.shape
    filled = [0] * num_experts
    keep = torch.zeros(n, k, dtype=torch.bool)
    position = torch.zeros(n, k, dtype=torch.long)
    for j in range(k):  # choice level first ...
        for t in range(n):  # ... then token order
            e = int(expert_index[t, j])
            position[t, j] = filled[e]
            keep[t, j] = filled[e] < capacity
            filled[e] += 1
    return keep, position


@pytest.mark.parametrize("seed,k,capacity", [(0, 1, 3), (1, 2, 4), (2, 3, 2), (3, 2, 100)])
def test_capacity_mask_matches_a_first_come_first_served_loop(seed, k, capacity):
    g = torch.Generator().manual_seed(seed)
    expert_index = torch.stack([torch.randperm(5, generator=g)[:k] for _ in range(17)])  # distinct per token
    cm = capacity_mask(expert_index, 5, capacity)
    keep, position = _naive_capacity(expert_index, 5, capacity)
    assert torch.equal(cm.keep, keep) and torch.equal(cm.position, position)
    kept_per_expert = torch.bincount(expert_index[cm.keep], minlength=5)
    routed = torch.bincount(expert_index.reshape(-1), minlength=5)
    assert torch.equal(kept_per_expert, routed.clamp(max=capacity))
    # kept slots are exactly 0..kept-1 in each expert's buffer
    for e in range(5):
        slots = sorted(cm.position[(expert_index == e) & cm.keep].tolist())
        assert slots == list(range(int(kept_per_expert[e])))


@pytest.mark.parametrize(
    "expert_index,capacity,words",
    [
        (torch.tensor([[0], [1]]), 0, "capacity must be a positive int"),
        (torch.tensor([[0], [3]]), 2, r"values must be in \[0, 3\)"),
        (torch.tensor([[0.0], [1.0]]), 2, "integer expert ids"),
        (torch.zeros(2, 2, 2, dtype=torch.long), 2, r"shape \(N, K\) or \(N,\)"),
    ],
)
def test_capacity_mask_rejects_bad_inputs(expert_index, capacity, words):
    with pytest.raises(ValueError, match=words):
        capacity_mask(expert_index, 3, capacity)


# -- Mixtral and DeepSeek-V3 gates (lesson 10) -------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_mixtral_routing_equals_softmax_all_then_top_k_then_renormalise(k):
    from moe_course.routing import mixtral_routing

    logits = _logits(20, 6, seed=k) * 3
    mixtral, renormalised = mixtral_routing(logits, k), top_k_routing(logits, k)
    assert torch.equal(mixtral.expert_index, renormalised.expert_index)
    torch.testing.assert_close(mixtral.gates, renormalised.gates)
    torch.testing.assert_close(mixtral.router_probs, F.softmax(logits, -1))
    top = logits.topk(k, dim=-1).values
    torch.testing.assert_close(mixtral.gates, torch.exp(top) / torch.exp(top).sum(-1, keepdim=True))  # softmax over the k alone


def test_mixtral_routing_top_1_gate_is_one_and_gives_the_router_no_gradient():
    from moe_course.routing import mixtral_routing

    logits = _logits().requires_grad_()
    r = mixtral_routing(logits, 1)
    assert torch.all(r.gates == 1.0)
    (grad,) = torch.autograd.grad(r.gates.sum(), logits)
    assert torch.all(grad == 0)


def test_sigmoid_routing_scores_select_and_weigh_without_a_bias():
    from moe_course.routing import sigmoid_routing

    logits = _logits(16, 6)
    r = sigmoid_routing(logits, 2)
    s = torch.sigmoid(logits)
    top = s.topk(2, dim=-1)
    assert torch.equal(r.expert_index, top.indices)
    torch.testing.assert_close(r.gates, top.values / top.values.sum(-1, keepdim=True))
    torch.testing.assert_close(r.router_probs, s / s.sum(-1, keepdim=True))
    torch.testing.assert_close(sigmoid_routing(logits, 2, renormalize=False).gates, top.values)


def test_sigmoid_routing_bias_moves_the_choice_but_never_the_gate():
    from moe_course.routing import sigmoid_routing

    logits = _logits(40, 4, seed=2)
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])  # expert 3 becomes everyone's first choice
    r = sigmoid_routing(logits, 2, bias=bias, renormalize=False)
    assert torch.all(r.expert_index[:, 0] == 3)
    torch.testing.assert_close(r.gates, torch.sigmoid(logits).gather(-1, r.expert_index))  # the scores, no bias in them
    bias.requires_grad_()
    logits.requires_grad_()
    r = sigmoid_routing(logits, 2, bias=bias)
    r.gates.sum().backward()
    assert bias.grad is None and logits.grad is not None  # the bias is never differentiated


def test_sigmoid_routing_rejects_a_bias_of_the_wrong_shape():
    from moe_course.routing import sigmoid_routing

    with pytest.raises(ValueError, match=r"bias must be a tensor of shape \(E,\) = \(5,\)"):
        sigmoid_routing(_logits(), 2, bias=torch.zeros(4))
