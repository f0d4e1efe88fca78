from __future__ import annotations

import pytest
import torch

from moe_course.gating import GateOutput, SoftmaxGate, softmax_gate


def test_softmax_gate_rows_are_positive_and_sum_to_one_over_the_experts():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(7, 5, generator=g), torch.randn(5, 3, generator=g), torch.randn(3, generator=g)
    out = softmax_gate(x, w, b)  # (N, E)
    assert out.shape == (7, 3)
    assert (out > 0).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(7))
    manual = (x @ w + b).exp() / (x @ w + b).exp().sum(-1, keepdim=True)
    torch.testing.assert_close(out, manual)


def test_softmax_gate_treats_every_patient_alone():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(6, 4, generator=g), torch.randn(4, 5, generator=g)
    perm = torch.randperm(6, generator=g)
    torch.testing.assert_close(softmax_gate(x[perm], w), softmax_gate(x, w)[perm])
    torch.testing.assert_close(softmax_gate(x[:1], w), softmax_gate(x, w)[:1])  # a batch of one is the same patient


def test_softmax_gate_is_stable_for_large_scores():
    x = torch.tensor([[100.0, -100.0]])
    w = torch.tensor([[10.0, 0.0, -10.0], [0.0, 1.0, 0.0]])
    out = softmax_gate(x, w)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0, 0.0]]))


def test_softmax_gate_rejects_mismatched_widths_and_zero_experts():
    with pytest.raises(ValueError, match="w_gate"):
        softmax_gate(torch.randn(3, 4), torch.randn(5, 2))
    with pytest.raises(ValueError, match="at least one expert"):
        softmax_gate(torch.randn(3, 4), torch.randn(4, 0))


def test_gate_module_matches_the_function_and_returns_typed_output():
    torch.manual_seed(0)
    gate = SoftmaxGate(6, 4)
    x = torch.randn(5, 6)
    out = gate(x)
    assert isinstance(out, GateOutput) and out.router_logits.shape == out.router_probs.shape == (5, 4)
    torch.testing.assert_close(out.router_probs, softmax_gate(x, gate.proj.weight.T, gate.proj.bias))
    torch.testing.assert_close(out.router_probs, torch.softmax(out.router_logits, -1))


@pytest.mark.parametrize("d_in,num_experts", [(0, 3), (4, 0), (4, -1), (True, 2), (4, 2.0)])
def test_gate_module_rejects_bad_sizes(d_in, num_experts):
    with pytest.raises(ValueError):
        SoftmaxGate(d_in, num_experts)


def test_gate_module_rejects_a_wrong_input_width():
    with pytest.raises(ValueError, match="d_in=6"):
        SoftmaxGate(6, 2)(torch.randn(3, 5))
