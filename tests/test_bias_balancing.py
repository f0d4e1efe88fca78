"""DeepSeek-V3's loss-free balancing: the pure rule (routing.expert_bias_update), the hook (training.bias), the measure (analysis.load)."""

from __future__ import annotations

import pytest
import torch

from moe_course.analysis.load import max_over_mean_load
from moe_course.moe import MoEConfig, MoELayer
from moe_course.routing import expert_bias_update, sigmoid_routing
from moe_course.training.bias import update_expert_biases_


def test_the_rule_lowers_busy_experts_raises_idle_ones_and_leaves_the_mean_alone():
    bias = torch.tensor([0.0, 0.5, -0.5, 0.0])
    load = torch.tensor([10, 2, 4, 4])  # mean 5
    new = expert_bias_update(bias, load, 1e-3)
    torch.testing.assert_close(new, bias + 1e-3 * torch.tensor([-1.0, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(expert_bias_update(bias, torch.tensor([5, 5, 5, 5]), 0.1), bias)  # at the mean: no move
    torch.testing.assert_close(bias, torch.tensor([0.0, 0.5, -0.5, 0.0]))  # pure: the input is untouched


@pytest.mark.parametrize(
    "args,words",
    [
        ((torch.zeros(4), torch.ones(3), 1e-3), "load must be a tensor of the bias's shape"),
        ((torch.zeros(4), torch.ones(4), -1.0), "rate γ must be a number >= 0"),
        ((torch.zeros(4, dtype=torch.long), torch.ones(4), 1e-3), "bias must be a float tensor"),
    ],
)
def test_the_rule_names_bad_inputs(args, words):
    with pytest.raises(ValueError, match=words):
        expert_bias_update(*args)


def test_the_bias_balances_a_fixed_skewed_router():
    """A router that prefers expert 0: the bias alone brings the busiest expert close to the mean."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(512, 8, generator=g) + torch.linspace(1.0, -1.0, 8)  # (N, E) skewed towards low ids
    bias = torch.zeros(8)
    start = max_over_mean_load(sigmoid_routing(logits, 2).tokens_per_expert())
    for _ in range(1000):
        bias = expert_bias_update(bias, sigmoid_routing(logits, 2, bias=bias).tokens_per_expert(), 1e-3)
    end = max_over_mean_load(sigmoid_routing(logits, 2, bias=bias).tokens_per_expert())
    assert start > 1.5 and end < 1.1, (start, end)


def test_the_hook_moves_only_sigmoid_layers_with_a_rate_from_their_reported_loads():
    torch.manual_seed(0)
    moving = MoELayer(MoEConfig(8, 16, 4, router="sigmoid", top_k=2, bias_update_rate=0.01))
    fixed = MoELayer(MoEConfig(8, 16, 4, router="sigmoid", top_k=2))
    plain = MoELayer(MoEConfig(8, 16, 4))
    model = torch.nn.ModuleList([moving, fixed, plain])
    x = torch.randn(32, 8)
    outs = [layer(x) for layer in model]
    assert torch.equal(moving.expert_bias, torch.zeros(4))  # forward changed nothing
    assert update_expert_biases_(model, outs) == 1
    load = outs[0].tokens_per_expert.float()
    torch.testing.assert_close(moving.expert_bias, 0.01 * torch.sign(load.mean() - load))
    assert torch.equal(fixed.expert_bias, torch.zeros(4)) and plain.expert_bias is None
    with pytest.raises(ValueError, match="3 MoE layer"):
        update_expert_biases_(model, outs[:2])


def test_the_hook_on_a_gpt_takes_its_moe_outputs_in_block_order():
    from moe_course.transformer import GPT, GPTConfig

    torch.manual_seed(0)
    gpt = GPT(
        GPTConfig(
            vocab_size=20,
            block_size=8,
            d_model=16,
            n_layers=4,
            n_heads=2,
            d_ff=32,
            ffn="switch",
            num_experts=4,
            router="sigmoid",
            top_k=2,
            bias_update_rate=0.5,
            moe_every=2,
        )
    )
    out = gpt(torch.randint(20, (4, 8)))
    assert update_expert_biases_(gpt, [m for _, m in out.moe_outputs]) == 2
    for layer, (_, m) in zip(gpt.moe_layers, out.moe_outputs):
        load = m.tokens_per_expert.float()
        torch.testing.assert_close(layer.expert_bias, 0.5 * torch.sign(load.mean() - load))


def test_max_over_mean_load():
    assert max_over_mean_load(torch.tensor([2, 2, 2, 2])) == 1.0
    assert max_over_mean_load(torch.tensor([8, 0, 0, 0])) == 4.0
    with pytest.raises(ValueError, match="positive total"):
        max_over_mean_load(torch.zeros(3))
