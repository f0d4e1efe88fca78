from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_course.experts import Experts, FeedForward, feed_forward
from moe_course.flops import count_parameters, ffn_flops, ffn_param_count, matmul_flops


@pytest.mark.parametrize("shape", [(5, 8), (2, 3, 8), (8,)])
def test_feedforward_keeps_the_shape(shape):
    assert FeedForward(8, 32)(torch.randn(*shape)).shape == shape


def test_feedforward_with_d_out_maps_to_another_width():
    assert FeedForward(8, 16, d_out=3)(torch.randn(4, 8)).shape == (4, 3)


def test_feedforward_equals_the_pure_function():
    torch.manual_seed(0)
    m = FeedForward(6, 10)
    x = torch.randn(4, 6)
    y = feed_forward(x, m.fc_in.weight.T, m.fc_in.bias, m.fc_out.weight.T, m.fc_out.bias)
    torch.testing.assert_close(m(x), y)
    assert not torch.allclose(y, F.relu(x @ m.fc_in.weight.T + m.fc_in.bias) @ m.fc_out.weight.T + m.fc_out.bias)


def test_feedforward_works_token_by_token():
    torch.manual_seed(0)
    m = FeedForward(4, 8)
    x = torch.randn(2, 5, 4)
    x2 = x.clone()
    x2[1, 2] += 1
    changed = (m(x2) - m(x)).abs().sum(-1) > 0
    assert changed.sum() == 1 and changed[1, 2]


def test_feed_forward_without_biases():
    x, w_in, w_out = torch.randn(3, 4), torch.randn(4, 5), torch.randn(5, 4)
    torch.testing.assert_close(feed_forward(x, w_in, None, w_out, None, activation="relu"), F.relu(x @ w_in) @ w_out)


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"d_model": 0, "d_ff": 4}, "d_model must be a positive int"),
        ({"d_model": 4, "d_ff": -1}, "d_ff must be a positive int"),
        ({"d_model": 4, "d_ff": 4, "activation": "swish"}, "unknown activation"),
        ({"d_model": 4, "d_ff": 4, "dropout": 1.0}, "dropout must be"),
        ({"d_model": 4, "d_ff": 4, "d_out": 0}, "d_out must be"),
    ],
)
def test_feedforward_rejects_bad_configs(kwargs, words):
    with pytest.raises(ValueError, match=words):
        FeedForward(**kwargs)


def test_feedforward_names_a_wrong_input_width():
    with pytest.raises(ValueError, match="width d_model=8"):
        FeedForward(8, 16)(torch.randn(2, 7))


@pytest.mark.parametrize("d,f", [(1, 1), (8, 32), (64, 256)])
def test_param_count_matches_the_module(d, f):
    assert ffn_param_count(d, f) == count_parameters(FeedForward(d, f))
    assert ffn_param_count(d, f, bias=False) == count_parameters(FeedForward(d, f, bias=False))


def test_flops_count_two_per_multiply_add():
    assert matmul_flops(2, 3, 4) == 48
    assert ffn_flops(10, 8, 32) == 4 * 10 * 8 * 32
    assert ffn_flops(0, 8, 32) == 0


def test_flop_helpers_reject_negative_sizes():
    with pytest.raises(ValueError, match="num_tokens"):
        ffn_flops(-1, 2, 3)


def test_count_parameters_trainable_only():
    m = FeedForward(4, 8)
    m.fc_in.weight.requires_grad_(False)
    assert count_parameters(m, trainable_only=True) == count_parameters(m) - 32


# -- Experts: E stacked feed-forward experts ----------------------------------


def test_experts_have_the_stacked_layout():
    ex = Experts(3, 4, 6)
    assert ex.w_in.shape == (3, 4, 6) and ex.b_in.shape == (3, 6)
    assert ex.w_out.shape == (3, 6, 4) and ex.b_out.shape == (3, 4)
    assert count_parameters(ex) == 3 * ffn_param_count(4, 6)
    nobias = Experts(3, 4, 6, bias=False)
    assert nobias.b_in is None and nobias.b_out is None
    assert count_parameters(nobias) == 3 * ffn_param_count(4, 6, bias=False)


def test_experts_expert_output_is_one_feed_forward():
    torch.manual_seed(0)
    ex = Experts(3, 4, 6, activation="relu")
    x = torch.randn(5, 4)
    for e in range(3):
        want = F.relu(x @ ex.w_in[e] + ex.b_in[e]) @ ex.w_out[e] + ex.b_out[e]
        torch.testing.assert_close(ex.expert_output(e, x), want)
    assert not torch.allclose(ex.expert_output(0, x), ex.expert_output(1, x))


def test_experts_forward_runs_every_expert_on_every_token():
    torch.manual_seed(0)
    ex = Experts(3, 4, 6)
    x = torch.randn(5, 4)
    y = ex(x)
    assert y.shape == (3, 5, 4)
    for e in range(3):
        torch.testing.assert_close(y[e], ex.expert_output(e, x))


def test_experts_from_feed_forward_copies_the_dense_ffn_into_every_expert():
    torch.manual_seed(0)
    ffn = FeedForward(4, 8, activation="relu")
    ex = Experts.from_feed_forward(ffn, 3)
    x = torch.randn(6, 4)
    for e in range(3):
        torch.testing.assert_close(ex.expert_output(e, x), ffn(x))
    ex.w_in.data[1] += 1.0  # the copies are independent parameters
    torch.testing.assert_close(ex.expert_output(0, x), ffn(x))
    assert Experts.from_feed_forward(FeedForward(4, 8, bias=False), 2).b_in is None


def test_experts_switch_init_has_the_switch_scale():
    torch.manual_seed(0)
    ex = Experts(8, 64, 256, init_scale=0.1)
    for w, fan_in in ((ex.w_in, 64), (ex.w_out, 256)):
        std = (0.1 / fan_in) ** 0.5
        assert w.abs().max() <= 2 * std + 1e-7  # truncated at two standard deviations
        assert 0.8 * std < w.std() < 0.95 * std  # a normal truncated at ±2σ has std ≈ 0.88σ
    assert torch.all(ex.b_in == 0) and torch.all(ex.b_out == 0)


def test_experts_default_init_is_like_nn_linear():
    torch.manual_seed(0)
    ex = Experts(4, 16, 64)
    assert ex.w_in.abs().max() <= 1 / 16**0.5 and ex.w_in.abs().max() > 0.9 / 16**0.5
    assert ex.w_out.abs().max() <= 1 / 64**0.5
    assert ex.b_in.abs().max() > 0


@pytest.mark.parametrize(
    "args,kwargs,words",
    [
        ((0, 4, 8), {}, "num_experts must be a positive int"),
        ((2, 0, 8), {}, "d_model must be a positive int"),
        ((2, 4, -1), {}, "d_ff must be a positive int"),
        ((2, 4, 8), {"activation": "tanh"}, "unknown activation"),
        ((2, 4, 8), {"init_scale": 0.0}, "init_scale must be a positive number"),
    ],
)
def test_experts_reject_bad_arguments(args, kwargs, words):
    with pytest.raises(ValueError, match=words):
        Experts(*args, **kwargs)


def test_experts_expert_output_names_bad_inputs():
    ex = Experts(2, 4, 8)
    with pytest.raises(ValueError, match=r"expert index must be an int in \[0, 2\)"):
        ex.expert_output(2, torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        ex.expert_output(0, torch.randn(3, 5))


# -- SwiGLU (lesson 10) ------------------------------------------------------------


def test_swiglu_feedforward_is_silu_gate_times_up_projection():
    torch.manual_seed(0)
    m = FeedForward(6, 10, activation="swiglu", bias=False)
    x = torch.randn(4, 6)
    want = (F.silu(x @ m.fc_gate.weight.T) * (x @ m.fc_in.weight.T)) @ m.fc_out.weight.T
    torch.testing.assert_close(m(x), want)
    torch.testing.assert_close(
        feed_forward(x, m.fc_in.weight.T, None, m.fc_out.weight.T, None, "swiglu", m.fc_gate.weight.T), want
    )
    assert FeedForward(6, 10).fc_gate is None and m.gated


@pytest.mark.parametrize("bias", [True, False])
def test_swiglu_param_and_flop_counts_match_the_module_and_the_counter(bias):
    from moe_course.flops import measure_flops_per_example

    m = FeedForward(8, 12, activation="swiglu", bias=bias)
    assert count_parameters(m) == ffn_param_count(8, 12, bias, "swiglu") == 3 * 8 * 12 + (2 * 12 + 8 if bias else 0)
    assert measure_flops_per_example(m, torch.randn(5, 8)) == ffn_flops(1, 8, 12, "swiglu") == 6 * 8 * 12
    assert ffn_flops(1, 8, 12, "swiglu") == 3 * ffn_flops(1, 8, 12) // 2


def test_a_plain_ffn_draws_the_same_weights_as_before_gating_existed():
    """The gate is made last, so adding it changed no seeded plain FFN or Experts (lessons keep their numbers)."""
    torch.manual_seed(3)
    plain = FeedForward(4, 6)
    torch.manual_seed(3)
    gated = FeedForward(4, 6, activation="swiglu")
    torch.testing.assert_close(plain.fc_in.weight, gated.fc_in.weight)
    torch.testing.assert_close(plain.fc_out.weight, gated.fc_out.weight)
    torch.manual_seed(3)
    a = Experts(3, 4, 6, init_scale=0.1)
    torch.manual_seed(3)
    b = Experts(3, 4, 6, init_scale=0.1, activation="swiglu")
    torch.testing.assert_close(a.w_in, b.w_in)
    torch.testing.assert_close(a.w_out, b.w_out)
    assert a.w_gate is None and b.w_gate.shape == (3, 4, 6) and b.b_gate.shape == (3, 6)


@pytest.mark.parametrize("bias", [True, False])
def test_swiglu_experts_expert_output_and_forward_are_one_gated_ffn(bias):
    torch.manual_seed(0)
    experts = Experts(3, 6, 10, activation="swiglu", bias=bias)
    x = torch.randn(5, 6)
    every = experts(x)  # (E, N, D)
    for e in range(3):
        pre = x @ experts.w_in[e] + (experts.b_in[e] if bias else 0)
        gate = x @ experts.w_gate[e] + (experts.b_gate[e] if bias else 0)
        want = (F.silu(gate) * pre) @ experts.w_out[e] + (experts.b_out[e] if bias else 0)
        torch.testing.assert_close(experts.expert_output(e, x), want)
        torch.testing.assert_close(every[e], want)


def test_copy_feed_forward_copies_a_swiglu_ffn_and_refuses_a_different_activation():
    torch.manual_seed(0)
    ffn = FeedForward(6, 10, activation="swiglu")
    experts = Experts.from_feed_forward(ffn, 4)
    x = torch.randn(7, 6)
    for e in range(4):
        torch.testing.assert_close(experts.expert_output(e, x), ffn(x))
    with pytest.raises(ValueError, match="activation 'gelu' cannot be copied into experts with activation 'swiglu'"):
        experts.copy_feed_forward_(FeedForward(6, 10))
