from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_course.experts import FeedForward, feed_forward
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
