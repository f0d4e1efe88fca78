from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_course.losses import expert_fraction, importance_loss, load_balancing_loss, router_z_loss


def test_load_balancing_loss_is_one_under_uniform_routing():
    e, n = 4, 16
    probs = torch.full((n, e), 1 / e)
    index = torch.arange(n) % e  # every expert gets n/e tokens
    assert load_balancing_loss(probs, index).item() == pytest.approx(1.0, abs=1e-6)
    assert load_balancing_loss(probs, index[:, None]).item() == pytest.approx(1.0, abs=1e-6)


def test_load_balancing_loss_is_one_under_uniform_top_k_routing():
    e, n, k = 4, 8, 2
    probs = torch.full((n, e), 1 / e)
    index = torch.stack([torch.arange(n) % e, (torch.arange(n) + 1) % e], dim=-1)  # (N, K), balanced
    assert index.shape == (n, k)
    assert load_balancing_loss(probs, index).item() == pytest.approx(1.0, abs=1e-6)
    assert expert_fraction(index, e).sum().item() == pytest.approx(1.0)  # f counts N·K assignments


def test_load_balancing_loss_is_e_when_routing_collapses():
    e, n = 4, 16
    probs = F.one_hot(torch.zeros(n, dtype=torch.long), e).float()
    assert load_balancing_loss(probs, torch.zeros(n, dtype=torch.long)).item() == pytest.approx(e)
    g = torch.Generator().manual_seed(0)
    skewed = F.softmax(torch.randn(n, e, generator=g) + torch.tensor([3.0, 0, 0, 0]), dim=-1)
    assert load_balancing_loss(skewed, skewed.argmax(-1)).item() > 1.5


def test_load_balancing_loss_matches_the_formula():
    g = torch.Generator().manual_seed(1)
    probs = F.softmax(torch.randn(10, 3, generator=g), dim=-1)
    index = probs.argmax(-1)
    f = torch.stack([(index == i).float().mean() for i in range(3)])
    torch.testing.assert_close(load_balancing_loss(probs, index), 3 * (f * probs.mean(0)).sum())


def test_load_balancing_loss_gradient_flows_only_through_p():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(12, 4, generator=g).requires_grad_()
    probs = F.softmax(logits, dim=-1)
    index = probs.argmax(-1)
    probs.retain_grad()
    load_balancing_loss(probs, index).backward()
    f = expert_fraction(index, 4)
    # d loss / d probs[n, i] = E · f_i / N: the same for every token, zero for experts no token chose
    torch.testing.assert_close(probs.grad, (4 * f / 12).expand(12, 4))
    assert logits.grad.abs().sum() > 0


def test_load_balancing_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"shape \(N,\) or \(N, K\) with N=5"):
        load_balancing_loss(torch.rand(5, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"router_probs must have shape \(N, E\)"):
        load_balancing_loss(torch.rand(5), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"values must be in \[0, 3\)"):
        load_balancing_loss(torch.rand(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="integer expert ids"):
        load_balancing_loss(torch.rand(2, 3), torch.rand(2, 3))


def test_router_z_loss_on_a_hand_example():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log 2 and log 4 = 2 log 2; mean of squares = (1 + 4) (log 2)² / 2
    expected = 2.5 * math.log(2.0) ** 2
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_router_z_loss_grows_with_the_logit_scale_and_not_with_a_shift_in_probabilities():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 4, generator=g)
    assert router_z_loss(10 * logits) > router_z_loss(logits)
    # same probabilities, larger logits: only the z-loss notices
    torch.testing.assert_close(F.softmax(logits + 5, -1), F.softmax(logits, -1))
    assert router_z_loss(logits + 5) > router_z_loss(logits)
    assert router_z_loss(logits.to(torch.bfloat16)).dtype == torch.float32
    torch.testing.assert_close(router_z_loss(logits.reshape(2, 4, 4)), router_z_loss(logits))


def test_importance_loss_is_zero_when_balanced_and_positive_otherwise():
    balanced = torch.eye(4).repeat(3, 1)  # each expert gets total weight 3
    assert importance_loss(balanced).item() == pytest.approx(0.0, abs=1e-7)
    skewed = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5]])
    imp = torch.tensor([2.5, 0.5])  # CV² = var/mean² with the population variance
    assert importance_loss(skewed).item() == pytest.approx((imp.var(unbiased=False) / imp.mean() ** 2).item(), rel=1e-6)
    assert importance_loss(torch.ones(5, 1)).item() == 0.0


def test_importance_loss_is_differentiable():
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(0)).requires_grad_()
    importance_loss(F.softmax(logits, -1)).backward()
    assert logits.grad.abs().sum() > 0


def test_moe_layer_z_loss_is_the_logsumexp_form_for_every_router():
    from moe_course.moe import MoEConfig, MoELayer

    torch.manual_seed(0)
    x = torch.randn(30, 8)
    for router, k in (("switch", 1), ("top_k", 2), ("noisy_top_k", 2)):
        layer = MoELayer(MoEConfig(8, 16, 4, top_k=k, router=router))
        for training in (True, False):
            layer.train(training)
            out = layer(x)
            torch.testing.assert_close(out.z_loss, router_z_loss(out.router_logits), rtol=1e-5, atol=1e-6)


# -- where the balance is measured (lesson 10) -----------------------------------------


def test_grouped_load_balancing_loss_is_the_mean_of_the_loss_on_each_group():
    g = torch.Generator().manual_seed(0)
    probs = F.softmax(torch.randn(12, 4, generator=g), -1)
    index = torch.randint(0, 4, (12, 2), generator=g)
    per_group = [load_balancing_loss(probs[i : i + 4], index[i : i + 4]) for i in range(0, 12, 4)]
    torch.testing.assert_close(load_balancing_loss(probs, index, group_size=4), torch.stack(per_group).mean())
    torch.testing.assert_close(load_balancing_loss(probs, index, group_size=12), load_balancing_loss(probs, index))


def test_a_batch_balanced_across_groups_is_unbalanced_inside_each_group():
    """Two 'domains', each sent wholly to its own expert: even over the batch, lopsided in every sequence."""
    probs = torch.tensor([[0.9, 0.1]] * 4 + [[0.1, 0.9]] * 4)
    index = torch.tensor([0] * 4 + [1] * 4)
    batch = load_balancing_loss(probs, index)
    per_sequence = load_balancing_loss(probs, index, group_size=4)
    assert batch.item() == pytest.approx(1.0)
    assert per_sequence.item() == pytest.approx(2 * 0.9)  # E · f · P = 2 · 1 · 0.9 in each sequence


def test_load_balancing_loss_rejects_a_group_size_that_does_not_divide_the_tokens():
    with pytest.raises(ValueError, match="group_size must be a positive int that divides the N=10 tokens"):
        load_balancing_loss(torch.full((10, 2), 0.5), torch.zeros(10, dtype=torch.long), group_size=3)


def test_loss_from_counts_equals_the_loss_with_its_own_counts_and_uses_the_global_ones():
    from moe_course.losses import load_balancing_loss_from_counts

    g = torch.Generator().manual_seed(1)
    probs = F.softmax(torch.randn(10, 3, generator=g), -1).requires_grad_()
    index = torch.randint(0, 3, (10, 2), generator=g)
    own = torch.bincount(index.reshape(-1), minlength=3)
    torch.testing.assert_close(load_balancing_loss_from_counts(probs, own), load_balancing_loss(probs, index))
    global_counts = torch.tensor([100, 100, 100])  # an even global batch: f_i = 1/E, so the loss is Σ_i P_i = 1
    loss = load_balancing_loss_from_counts(probs, global_counts)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert probs.grad is not None
    with pytest.raises(ValueError, match="tokens_per_expert must be a tensor of shape"):
        load_balancing_loss_from_counts(probs, torch.ones(4))
