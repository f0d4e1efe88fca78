from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moe_course.data.clinic import make_clinic
from moe_course.experiments.ensembles import average_probs
from moe_course.flops import count_parameters, matmul_flops
from moe_course.mixture import (
    DenseMixture,
    DenseMixtureConfig,
    MixtureOutput,
    dense_mixture_flops,
    dense_mixture_param_count,
    mixture_log_probs,
    mixture_probs,
)
from moe_course.training import ClassificationTask, TrainConfig, train


def _random(n=6, e=3, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, e, c, generator=g) * 2, torch.randn(n, e, generator=g) * 2


def test_mixture_probs_is_the_gate_weighted_sum_of_expert_probabilities():
    logits, gate_logits = _random()
    weights = torch.softmax(gate_logits, -1)
    out = mixture_probs(logits, weights)
    manual = torch.zeros(6, 4)
    for n in range(6):
        for e in range(3):
            manual[n] += weights[n, e] * torch.softmax(logits[n, e], -1)
    torch.testing.assert_close(out, manual)
    torch.testing.assert_close(out.sum(-1), torch.ones(6))


def test_a_uniform_gate_is_the_ensemble_average_and_a_one_hot_gate_picks_one_expert():
    logits, _ = _random(e=4)
    uniform = torch.full((6, 4), 0.25)
    torch.testing.assert_close(mixture_probs(logits, uniform), average_probs(logits.transpose(0, 1)))
    one_hot = F.one_hot(torch.tensor([0, 3, 1, 1, 2, 0]), 4).float()
    picked = torch.softmax(logits, -1)[torch.arange(6), torch.tensor([0, 3, 1, 1, 2, 0])]
    torch.testing.assert_close(mixture_probs(logits, one_hot), picked)


def test_mixture_log_probs_equals_the_log_of_the_mixture_and_survives_underflow():
    logits, gate_logits = _random(seed=1)
    torch.testing.assert_close(
        mixture_log_probs(logits, gate_logits), mixture_probs(logits, torch.softmax(gate_logits, -1)).log(), rtol=1e-5, atol=1e-5
    )
    logits = logits.clone()
    logits[:, :, 0] -= 200.0  # every expert is certain class 0 is impossible: exp underflows in float32
    out = mixture_log_probs(logits, gate_logits)
    assert torch.isfinite(out).all()
    reference = torch.logsumexp(
        torch.log_softmax(gate_logits.double(), -1)[:, :, None] + torch.log_softmax(logits.double(), -1), dim=1
    )
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "logits_shape,gate_shape", [((6, 3, 4), (6, 2)), ((6, 3, 4), (5, 3)), ((6, 3), (6, 3)), ((6, 0, 4), (6, 0))]
)
def test_mixture_functions_reject_mismatched_shapes_and_zero_experts(logits_shape, gate_shape):
    with pytest.raises(ValueError):
        mixture_probs(torch.randn(logits_shape), torch.rand(gate_shape))
    with pytest.raises(ValueError):
        mixture_log_probs(torch.randn(logits_shape), torch.randn(gate_shape))


def _config(**kw):
    return DenseMixtureConfig(**{"d_in": 5, "d_ff": 8, "num_classes": 3, "num_experts": 4, **kw})


def test_dense_mixture_returns_typed_normalised_output_consistent_with_its_parts():
    torch.manual_seed(0)
    model = DenseMixture(_config())
    x = torch.randn(9, 5)
    out = model(x)
    assert isinstance(out, MixtureOutput)
    assert out.logits.shape == (9, 3) and out.router_probs.shape == (9, 4) and out.expert_logits.shape == (9, 4, 3)
    torch.testing.assert_close(out.logits.logsumexp(-1), torch.zeros(9), atol=1e-5, rtol=0)  # log-probabilities
    torch.testing.assert_close(out.probs, mixture_probs(out.expert_logits, out.router_probs))
    torch.testing.assert_close(out.expert_logits[:, 2], model.experts[2](x))
    torch.testing.assert_close(out.expert_probs.sum(-1), torch.ones(9, 4))
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    torch.testing.assert_close(F.cross_entropy(out.logits, y), -out.probs[torch.arange(9), y].log().mean())


def test_dense_mixture_sends_gradient_to_the_gate_and_every_expert_and_keeps_no_state():
    torch.manual_seed(0)
    model = DenseMixture(_config())
    before = set(vars(model))
    x = torch.randn(16, 5)
    first = model(x)
    F.cross_entropy(first.logits, torch.randint(0, 3, (16,))).backward()
    assert set(vars(model)) == before  # nothing stashed on self in forward
    assert model.gate.proj.weight.grad.abs().sum() > 0
    assert all(expert.fc_in.weight.grad.abs().sum() > 0 for expert in model.experts)
    torch.testing.assert_close(model(x).logits, first.logits)  # pure: same input, same output


@pytest.mark.parametrize(
    "field,value",
    [("num_experts", 0), ("num_experts", -2), ("d_in", 0), ("d_ff", 1.5), ("num_classes", True), ("num_experts", None)],
)
def test_config_rejects_invalid_values(field, value):
    with pytest.raises(ValueError, match=field):
        _config(**{field: value})


def test_config_is_frozen_and_the_module_validates_its_input():
    config = _config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_experts = 3
    with pytest.raises(TypeError):
        DenseMixture({"d_in": 5})
    with pytest.raises(ValueError, match=r"\(N, 5\)"):
        DenseMixture(config)(torch.randn(4, 6))


def test_flops_and_parameters_match_the_module_and_grow_linearly_with_experts():
    for e in (1, 2, 5):
        assert dense_mixture_param_count(5, 8, 3, e) == count_parameters(DenseMixture(_config(num_experts=e)))
    n, d, f, c = 7, 5, 8, 3
    assert dense_mixture_flops(n, d, f, c, 1) == matmul_flops(n, d, 1) + matmul_flops(n, d, f) + matmul_flops(n, f, c)
    flops = [dense_mixture_flops(n, d, f, c, e) for e in range(1, 6)]
    steps = {b - a for a, b in zip(flops, flops[1:])}
    assert steps == {2 * n * d + 2 * n * d * f + 2 * n * f * c}  # one more expert: its matmuls plus one gate column
    with pytest.raises(ValueError):
        dense_mixture_flops(n, d, f, c, 0)
    with pytest.raises(ValueError):
        dense_mixture_param_count(d, f, c, 0)


def test_dense_mixture_learns_the_clinic_and_beats_chance_clearly():
    clinic = make_clinic(num_specialties=2, n_train=800, n_val=400, seed=3)
    torch.manual_seed(0)
    model = DenseMixture(DenseMixtureConfig(clinic.d_in, 8, clinic.num_diagnoses, 2))
    result = train(
        model,
        ClassificationTask.from_clinic(clinic),
        TrainConfig(steps=200, lr=1e-2, eval_every=100),
        device="cpu",
        progress=False,
    )
    assert result.final["val_acc"] > 2.0 / clinic.num_diagnoses
