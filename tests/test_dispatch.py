from __future__ import annotations

import pytest
import torch

from moe_course.dispatch import expert_choice_dispatch, sort_dispatch
from moe_course.experts import Experts
from moe_course.routing import capacity_mask, expert_choice_routing, top_k_routing


def _setup(n=10, d=4, e=3, k=2, seed=0):
    torch.manual_seed(seed)
    experts = Experts(e, d, 8)
    x = torch.randn(n, d)
    routing = top_k_routing(torch.randn(n, e), k)
    return x, experts, routing


def _loop_reference(x, experts, expert_index, gates, keep=None):
    y = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(expert_index.shape[1]):
            if keep is None or keep[n, j]:
                e = int(expert_index[n, j])
                y[n] += gates[n, j] * experts.expert_output(e, x[n : n + 1])[0]
    return y


@pytest.mark.parametrize("k", [1, 2, 3])
def test_sort_dispatch_equals_a_per_token_loop(k):
    x, experts, r = _setup(k=k)
    y = sort_dispatch(x, experts, r.expert_index, r.gates)
    assert y.shape == x.shape
    torch.testing.assert_close(y, _loop_reference(x, experts, r.expert_index, r.gates))


def test_sort_dispatch_dropped_assignments_contribute_nothing():
    x, experts, r = _setup(n=12, k=2)
    keep = capacity_mask(r.expert_index, 3, capacity=3).keep
    assert not keep.all() and keep.any()
    y = sort_dispatch(x, experts, r.expert_index, r.gates, keep)
    torch.testing.assert_close(y, _loop_reference(x, experts, r.expert_index, r.gates, keep))
    fully_dropped = ~keep.any(-1)
    assert fully_dropped.any()
    assert torch.all(y[fully_dropped] == 0)


def test_sort_dispatch_with_nothing_kept_is_zero():
    x, experts, r = _setup()
    y = sort_dispatch(x, experts, r.expert_index, r.gates, torch.zeros_like(r.expert_index, dtype=torch.bool))
    assert torch.equal(y, torch.zeros_like(x))


def test_sort_dispatch_gradients_reach_gates_experts_and_input():
    x, experts, r = _setup()
    x.requires_grad_()
    gates = r.gates.clone().requires_grad_()
    sort_dispatch(x, experts, r.expert_index, gates).pow(2).sum().backward()
    assert gates.grad.abs().min() > 0 and x.grad.abs().sum() > 0
    assert experts.w_in.grad.abs().sum() > 0


def test_sort_dispatch_rejects_mismatched_shapes():
    x, experts, r = _setup()
    with pytest.raises(ValueError, match=r"must both be \(N, K\) with N=9"):
        sort_dispatch(x[:9], experts, r.expert_index, r.gates)
    with pytest.raises(ValueError, match="keep must be a bool tensor"):
        sort_dispatch(x, experts, r.expert_index, r.gates, torch.ones(10, 2))


def test_expert_choice_dispatch_equals_a_loop():
    torch.manual_seed(0)
    experts = Experts(3, 4, 8)
    x = torch.randn(10, 4)
    r = expert_choice_routing(torch.randn(10, 3), capacity=4)
    y = expert_choice_dispatch(x, experts, r.token_index, r.gates)
    want = torch.zeros_like(x)
    for e in range(3):
        for c in range(4):
            t = int(r.token_index[e, c])
            want[t] += r.gates[e, c] * experts.expert_output(e, x[t : t + 1])[0]
    torch.testing.assert_close(y, want)
    assert torch.all(y[r.experts_per_token == 0] == 0)
