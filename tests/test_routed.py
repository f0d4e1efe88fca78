from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from moe_course.flops import count_parameters
from moe_course.mixture import (
    DenseMixture,
    DenseMixtureConfig,
    RoutedMixture,
    RoutedMixtureConfig,
    dense_mixture_flops,
    dense_mixture_param_count,
    moe_layer_flops,
    moe_layer_param_count,
    routed_mixture_flops,
)
from moe_course.moe import MoEConfig, MoELayer


def _model(seed: int = 0, **overrides) -> RoutedMixture:
    torch.manual_seed(seed)
    return RoutedMixture(RoutedMixtureConfig(d_in=6, d_ff=8, num_classes=3, num_experts=4, **overrides))


def test_routed_mixture_returns_typed_result_with_shapes():
    out = _model()(torch.randn(10, 6))
    assert out.logits.shape == (10, 3)
    assert out.router_logits.shape == out.router_probs.shape == (10, 4)
    assert out.expert_index.shape == out.gates.shape == (10, 1)
    assert out.tokens_per_expert().sum() == 10
    torch.testing.assert_close(out.router_probs.sum(-1), torch.ones(10))


def test_routed_mixture_switch_output_is_the_raw_gate_times_the_chosen_expert():
    model = _model()
    x = torch.randn(12, 6)
    out = model(x)
    probs = torch.softmax(model.gate(x).router_logits, dim=-1)
    gate, index = probs.max(-1)
    want = torch.stack([gate[n] * model.experts[int(index[n])](x[n : n + 1])[0] for n in range(12)])
    torch.testing.assert_close(out.logits, want)
    torch.testing.assert_close(out.gates[:, 0], gate)


def test_routed_mixture_top_k_mixes_k_experts_with_renormalised_gates():
    model = _model(top_k=2, router="top_k")
    x = torch.randn(9, 6)
    out = model(x)
    torch.testing.assert_close(out.gates.sum(-1), torch.ones(9))
    outs = torch.stack([m(x) for m in model.experts], dim=1)  # (N, E, classes)
    want = (out.gates[..., None] * outs.gather(1, out.expert_index[..., None].expand(-1, -1, 3))).sum(1)
    torch.testing.assert_close(out.logits, want)


def test_router_learns_through_the_raw_gate_but_not_through_a_renormalised_top1_gate():
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    grads = {}
    for router in ("switch", "top_k"):
        model = _model(router=router, top_k=1, aux_loss_coef=0.0)
        F.cross_entropy(model(x).logits, y).backward()
        grads[router] = model.gate.proj.weight.grad
    assert grads["switch"].norm() > 1e-3
    # every gate is p / p = 1.0: what reaches the router is float round-off, not a signal
    assert grads["top_k"].norm() < 1e-5 * grads["switch"].norm()


def test_aux_loss_is_the_weighted_balance_and_z_losses():
    model = _model(aux_loss_coef=0.5, z_loss_coef=0.25)
    out = model(torch.randn(20, 6))
    torch.testing.assert_close(out.router_loss, 0.5 * out.aux_loss + 0.25 * out.z_loss)


def test_idle_expert_gets_no_tokens_and_no_work():
    model = _model()
    with torch.no_grad():
        model.gate.proj.bias.copy_(torch.tensor([0.0, 0.0, 0.0, -100.0]))
    x = torch.randn(30, 6)
    out = model(x)
    assert out.tokens_per_expert()[3] == 0
    out.logits.sum().backward()
    assert model.experts[3].fc_in.weight.grad is None


def test_routed_mixture_has_the_dense_mixtures_parameters():
    routed = _model()
    dense = DenseMixture(DenseMixtureConfig(6, 8, 3, 4))
    assert count_parameters(routed) == count_parameters(dense) == dense_mixture_param_count(6, 8, 3, 4)
    assert [p.shape for p in routed.parameters()] == [p.shape for p in dense.parameters()]


@pytest.mark.parametrize("k", [1, 2, 4])
def test_routed_flops_formula_matches_pytorchs_flop_counter(k):
    model = _model(top_k=k, router="switch" if k == 1 else "top_k")
    x = torch.randn(50, 6)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    assert counter.get_total_flops() == routed_mixture_flops(50, 6, 8, 3, 4, k)
    if k == 4:  # every expert: the dense mixture's cost
        assert routed_mixture_flops(50, 6, 8, 3, 4, 4) == dense_mixture_flops(50, 6, 8, 3, 4)


@pytest.mark.parametrize("bias,router", [(True, "switch"), (False, "top_k"), (True, "noisy_top_k")])
def test_moe_layer_param_count_matches_the_module(bias, router):
    k = 1 if router == "switch" else 2
    layer = MoELayer(MoEConfig(d_model=8, d_ff=12, num_experts=5, top_k=k, router=router, bias=bias))
    assert count_parameters(layer) == moe_layer_param_count(8, 12, 5, bias=bias, noisy=router == "noisy_top_k")


def test_moe_layer_flops_grow_with_k_not_with_the_number_of_experts():
    assert moe_layer_flops(10, 16, 64, 4, 1) == 10 * (2 * 16 * 4 + 4 * 16 * 64)
    base = moe_layer_flops(1, 16, 64, 2, 1)
    many = moe_layer_flops(1, 16, 64, 64, 1)
    assert many - base == 2 * 16 * (64 - 2)  # only the router grows with E
    assert moe_layer_flops(1, 16, 64, 8, 2) - moe_layer_flops(1, 16, 64, 8, 1) == 4 * 16 * 64


def test_moe_layer_flops_match_the_flop_counter_on_the_sort_split_dispatch():
    layer = MoELayer(MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2, router="top_k", dispatch="sort_split"))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        layer(torch.randn(24, 16))
    assert counter.get_total_flops() == moe_layer_flops(24, 16, 32, 4, 2)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"top_k": 5}, "more than num_experts"),
        ({"top_k": 2}, "router='switch' sends each patient to one doctor"),
        ({"router": "expert_choice"}, "unknown router type"),
        ({"num_classes": 0}, "num_classes must be a positive int"),
        ({"aux_loss_coef": -1.0}, "aux_loss_coef must be a number >= 0"),
    ],
)
def test_routed_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        RoutedMixtureConfig(**{"d_in": 6, "d_ff": 8, "num_classes": 3, "num_experts": 4, **overrides})


def test_routed_mixture_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"shape \(N, 6\)"):
        _model()(torch.randn(4, 5))
    with pytest.raises(TypeError, match="RoutedMixtureConfig"):
        RoutedMixture(DenseMixtureConfig(6, 8, 3, 4))
    with pytest.raises(ValueError, match="top_k=5 is more than"):
        routed_mixture_flops(1, 6, 8, 3, 4, 5)
