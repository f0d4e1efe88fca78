"""Tests of Soft MoE (moe_course.variants.soft_moe): weights, a hand loop, and why it is not causal."""

from __future__ import annotations

import pytest
import torch

from moe_course.experts import Experts
from moe_course.moe import MoEConfig, MoELayer
from moe_course.variants.soft_moe import (
    SoftMoE,
    SoftMoEConfig,
    influence_matrix,
    soft_moe,
    soft_moe_flops_per_token,
    soft_moe_logits,
    soft_moe_weights,
)


def _layer(seed=0, **kw) -> SoftMoE:
    torch.manual_seed(seed)
    cfg = dict(d_model=8, d_ff=16, num_experts=3, slots_per_expert=2)
    cfg.update(kw)
    return SoftMoE(SoftMoEConfig(**cfg))


def test_soft_moe_shapes_and_weights_that_sum_to_one_along_their_axes():
    layer = _layer()
    x = torch.randn(2, 5, 8)
    out = layer(x)
    assert out.y.shape == (2, 5, 8)
    assert out.dispatch.shape == out.combine.shape == out.router_logits.shape == (2, 5, 6)  # S = E·P = 6
    torch.testing.assert_close(out.dispatch.sum(1), torch.ones(2, 6))  # each slot: a weighted average of the tokens
    torch.testing.assert_close(out.combine.sum(2), torch.ones(2, 5))  # each token: a weighted average of the slots
    assert layer(x[0].clone()).y.shape == (5, 8)  # (N, D): one sequence


def test_soft_moe_equals_a_hand_loop_over_slots_and_tokens():
    torch.manual_seed(1)
    B, T, D, E, P = 2, 4, 6, 2, 2
    experts = Experts(E, D, 10, init_scale=0.5)
    x, phi = torch.randn(B, T, D), torch.randn(D, E * P)
    dispatch, combine = soft_moe_weights(soft_moe_logits(x, phi))
    y = soft_moe(x, dispatch, combine, experts)
    for b in range(B):
        slot_out = []
        for s in range(E * P):
            slot_in = sum(dispatch[b, t, s] * x[b, t] for t in range(T))  # (D,)
            slot_out.append(experts.expert_output(s // P, slot_in[None])[0])
        for t in range(T):
            expected = sum(combine[b, t, s] * slot_out[s] for s in range(E * P))
            torch.testing.assert_close(y[b, t], expected, atol=1e-5, rtol=1e-5)


def test_soft_moe_logits_plain_and_normalised():
    x, phi = torch.randn(1, 3, 4), torch.randn(4, 5)
    torch.testing.assert_close(soft_moe_logits(x, phi), x @ phi)
    cos = soft_moe_logits(x, phi, 1.0)
    assert cos.abs().max() <= 1.0 + 1e-6  # unit vectors: cosines
    torch.testing.assert_close(soft_moe_logits(x, phi, 3.0), 3 * cos)
    with pytest.raises(ValueError, match="same D"):
        soft_moe_logits(x, torch.randn(5, 5))


def test_soft_moe_is_not_causal_a_future_token_changes_the_first_output():
    layer = _layer()
    x = torch.randn(1, 6, 8)
    moved = x.clone()
    moved[0, -1] += 1.0  # change the last token only
    with torch.no_grad():
        assert (layer(moved).y[0, 0] - layer(x).y[0, 0]).abs().max() > 1e-4


def test_influence_matrix_is_full_for_soft_moe_and_diagonal_for_token_choice():
    x = torch.randn(6, 8)
    soft = influence_matrix(lambda s: _layer()(s).y, x)
    assert soft.shape == (6, 6)
    future = torch.ones(6, 6, dtype=torch.bool).triu(diagonal=1)  # (i, j) with j > i: token j comes after output i
    assert soft[future].min() > 1e-5  # every future token moves every earlier output
    torch.manual_seed(0)
    moe = MoELayer(MoEConfig(d_model=8, d_ff=16, num_experts=3))  # token choice, dropless: one token at a time
    token_choice = influence_matrix(lambda s: moe(s).y, x)
    off_diagonal = token_choice - torch.diag(torch.diag(token_choice))
    # (round-off aside: when a token changes expert, the other tokens' blocks change size)
    assert off_diagonal.abs().max() < 1e-6 and torch.diag(token_choice).min() > 1e-3
    with pytest.raises(ValueError, match="one sequence"):
        influence_matrix(lambda s: s, torch.randn(2, 3, 4))


def test_every_soft_moe_parameter_gets_a_gradient():
    layer = _layer()
    layer(torch.randn(2, 5, 8)).y.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_soft_moe_flops_per_token_follow_the_slots_not_the_tokens():
    f = soft_moe_flops_per_token(d_model=64, d_ff=256, num_experts=8, slots_per_expert=1, tokens=64)
    assert f["mixing"] == 3 * 2 * 64 * 8
    assert f["experts"] == 4 * 64 * 256 * 8 / 64
    assert f["total"] == f["mixing"] + f["experts"]
    assert soft_moe_flops_per_token(64, 256, 8, 1, 128)["experts"] == f["experts"] / 2  # twice the tokens share the slots
    with pytest.raises(ValueError, match="tokens"):
        soft_moe_flops_per_token(64, 256, 8, 1, 0)


@pytest.mark.parametrize(
    "bad, name",
    [
        (dict(num_experts=0), "num_experts"),
        (dict(slots_per_expert=0), "slots_per_expert"),
        (dict(activation="tanh"), "activation"),
    ],
)
def test_soft_moe_config_rejects_bad_values_by_name(bad, name):
    with pytest.raises(ValueError, match=name):
        SoftMoEConfig(**{**dict(d_model=8, d_ff=16, num_experts=2), **bad})


def test_soft_moe_rejects_a_wrong_width():
    with pytest.raises(ValueError, match=r"\(B, T, 8\)"):
        _layer()(torch.randn(2, 3, 7))


def test_clinic_soft_moe_mixes_patients_within_a_group_only():
    from moe_course.variants.soft_moe import ClinicSoftMoE

    torch.manual_seed(0)
    model = ClinicSoftMoE(12, 4, SoftMoEConfig(d_model=8, d_ff=16, num_experts=2, slots_per_expert=2), group_size=4)
    x = torch.randn(8, 12)
    with torch.no_grad():
        base = model(x)
        assert base.logits.shape == (8, 4) and base.moe.dispatch.shape == (2, 4, 4) and base.router_loss.item() == 0.0
        same_group, other_group = x.clone(), x.clone()
        same_group[3] += 1.0  # a patient in patient 0's waiting room
        other_group[5] += 1.0  # a patient in the next group
        assert (model(same_group).logits[0] - base.logits[0]).abs().max() > 1e-5
        assert torch.equal(model(other_group).logits[0], base.logits[0])
    with pytest.raises(ValueError, match="multiple"):
        model(torch.randn(6, 12))
