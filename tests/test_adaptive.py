"""Tests of adaptive computation (moe_course.variants.adaptive): top-p and null-expert routing."""

from __future__ import annotations

import math

import pytest
import torch

from moe_course.data.clinic import make_clinic
from moe_course.training import ClassificationTask, TrainConfig, train
from moe_course.variants.adaptive import (
    AdaptiveMoE,
    AdaptiveMoEConfig,
    ClinicAdaptiveMoE,
    adaptive_balance_loss,
    blur_referrals,
    compute_by_group,
    null_expert_routing,
    router_entropy,
    top_p_routing,
)


def _logits_of(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs).log()


def test_top_p_takes_experts_until_their_probabilities_reach_p():
    r = top_p_routing(_logits_of([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.05, 0.9, 0.05]]), 0.6)
    assert r.experts_per_token.tolist() == [1, 2, 1]  # 0.7 ≥ 0.6; 0.4 < 0.6 so 0.35 joins; 0.9
    assert r.expert_index[r.keep].tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(r.gates, torch.tensor([[0.7, 0, 0], [0.4, 0.35, 0], [0.9, 0, 0]]))  # raw probabilities
    assert top_p_routing(_logits_of([[0.4, 0.35, 0.25]]), 1.0).experts_per_token.item() == 3
    assert top_p_routing(_logits_of([[0.4, 0.35, 0.25]]), 1e-6).experts_per_token.item() == 1  # always at least one


def test_top_p_max_k_caps_the_experts_and_the_columns():
    r = top_p_routing(_logits_of([[0.3, 0.3, 0.2, 0.2]]), 0.9, max_k=2)
    assert r.keep.shape == (1, 2) and r.experts_per_token.item() == 2
    with pytest.raises(ValueError, match="max_k"):
        top_p_routing(torch.zeros(1, 4), 0.5, max_k=5)
    with pytest.raises(ValueError, match="p must be"):
        top_p_routing(torch.zeros(1, 4), 0.0)


def test_null_expert_routing_gives_fewer_real_experts_to_tokens_that_choose_null_ones():
    # E=3 real + Z=2 null experts, k=2
    probs = [
        [0.5, 0.3, 0.1, 0.05, 0.05],  # two real experts
        [0.4, 0.05, 0.05, 0.45, 0.05],  # one null, one real
        [0.05, 0.05, 0.05, 0.45, 0.4],
    ]  # two nulls: no real expert
    r = null_expert_routing(_logits_of(probs), k=2, num_null=2)
    assert r.experts_per_token.tolist() == [2, 1, 0]
    torch.testing.assert_close(r.gates[1], torch.tensor([0.0, 0.4 / 0.85]))  # the null choice (best) contributes 0
    assert r.choice_index[2].tolist() == [3, 4]
    assert (r.expert_index < 3).all()  # unused choices point at a valid expert, masked by keep
    with pytest.raises(ValueError, match="num_null"):
        null_expert_routing(torch.zeros(1, 3), 1, 3)


def test_router_entropy_and_the_balance_loss_over_used_choices():
    uniform = torch.full((4, 4), 0.25)
    assert router_entropy(uniform).item() == pytest.approx(math.log(4))
    assert router_entropy(torch.eye(4)).item() == pytest.approx(0.0, abs=1e-6)
    r = top_p_routing(torch.zeros(8, 4), 0.25)  # uniform: one expert each (ties broken by topk)
    assert adaptive_balance_loss(r).item() == pytest.approx(4 * 0.25)  # f sums to 1, P = 1/4: E·Σ f·P = 1
    skewed = top_p_routing(_logits_of([[0.97, 0.01, 0.01, 0.01]] * 8), 0.5)
    assert adaptive_balance_loss(skewed).item() == pytest.approx(4 * 0.97)


def test_compute_by_group_means_per_group_and_nan_for_empty_groups():
    out = compute_by_group(torch.tensor([1, 3, 2, 2]), torch.tensor([0, 0, 2, 2]), 3)
    assert out[0].item() == 2.0 and math.isnan(out[1].item()) and out[2].item() == 2.0
    with pytest.raises(ValueError, match="groups"):
        compute_by_group(torch.tensor([1]), torch.tensor([5]), 3)


@pytest.mark.parametrize("router", ["top_p", "null"])
def test_adaptive_moe_equals_a_hand_loop_over_the_used_choices(router):
    torch.manual_seed(0)
    layer = AdaptiveMoE(
        AdaptiveMoEConfig(d_model=8, d_ff=16, num_experts=4, router=router, top_p=0.5, top_k=2, num_null=2, init_scale=2.0)
    )
    x = torch.randn(2, 5, 8)
    out = layer(x)
    tokens = x.reshape(-1, 8)
    r = out.routing
    expected = torch.zeros_like(tokens)
    for n in range(tokens.shape[0]):
        for j in range(r.keep.shape[1]):
            if r.keep[n, j]:
                expected[n] += r.gates[n, j] * layer.experts.expert_output(int(r.expert_index[n, j]), tokens[n : n + 1])[0]
    torch.testing.assert_close(out.y.reshape(-1, 8), expected, atol=1e-5, rtol=1e-5)
    assert out.experts_per_token.shape == (10,) and len(set(out.experts_per_token.tolist())) > 1  # compute varies
    out.router_loss.backward()
    assert layer.w_router.grad is not None


def test_clinic_adaptive_moe_trains_and_reports_compute_per_specialty():
    clinic = make_clinic(4, n_train=512, n_val=256, seed=0)
    torch.manual_seed(0)
    model = ClinicAdaptiveMoE(
        clinic.d_in,
        clinic.num_diagnoses,
        AdaptiveMoEConfig(d_model=16, d_ff=32, num_experts=4, top_p=0.6, entropy_loss_coef=1e-3),
    )
    result = train(
        model, ClassificationTask.from_clinic(clinic), TrainConfig(steps=30, batch_size=64, eval_every=30), progress=False
    )
    assert result.final["val_acc"] > 1 / clinic.num_diagnoses  # it learned something
    with torch.no_grad():
        used = model(clinic.val.x).moe.experts_per_token
    per = compute_by_group(used, clinic.val.specialty, clinic.num_specialties)
    assert per.shape == (4,) and ((per >= 1) & (per <= 4)).all()


@pytest.mark.parametrize(
    "bad, name",
    [
        (dict(router="top_z"), "router"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_k=9), "max_k"),
        (dict(router="null", top_k=9, num_null=2), "top_k"),
        (dict(entropy_loss_coef=-1.0), "entropy"),
    ],
)
def test_adaptive_config_rejects_bad_values_by_name(bad, name):
    with pytest.raises(ValueError, match=name):
        AdaptiveMoEConfig(**{**dict(d_model=8, d_ff=16, num_experts=4), **bad})


def test_blur_referrals_moves_only_the_context_toward_the_next_specialty():
    clinic = make_clinic(4, n_train=64, n_val=256, seed=0)
    val = clinic.val
    assert torch.equal(blur_referrals(clinic, val, 0.0), val.x)
    half = blur_referrals(clinic, val, 0.5)
    assert torch.equal(clinic.measurements(half), clinic.measurements(val.x))  # the diagnosis is untouched
    full = blur_referrals(clinic, val, 1.0)
    ctx = clinic.context(full)
    for s in range(4):  # every letter now reads like the next department's average letter
        mean_next = clinic.context(val.x)[val.specialty == (s + 1) % 4].mean(0)
        torch.testing.assert_close(ctx[val.specialty == s], mean_next.expand_as(ctx[val.specialty == s]))
    with pytest.raises(ValueError, match="amount"):
        blur_referrals(clinic, val, 1.5)
