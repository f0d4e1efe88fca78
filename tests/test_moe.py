from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moe_course.experts import Experts, FeedForward
from moe_course.moe import MoEConfig, MoELayer, MoEOutput

from helpers import loop_reference, randn, small_layer

_layer, _x = small_layer, randn


def _loop_reference(layer: MoELayer, x: torch.Tensor, out: MoEOutput) -> torch.Tensor:
    """Token by token, from the layer's own routing: x (B, T, D) or (N, D) → the same shape."""
    tokens = x.reshape(-1, layer.config.d_model)
    return loop_reference(tokens, layer, out.expert_index, out.gates, out.keep).reshape(x.shape)


# -- config ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,words",
    [
        ({"top_k": 5, "router": "top_k"}, "top_k=5 is more than num_experts=4"),
        ({"capacity_factor": 0.0}, "capacity_factor must be > 0"),
        ({"capacity_factor": -1.0}, "capacity_factor must be > 0"),
        ({"d_model": 0}, "d_model must be a positive int"),
        ({"d_ff": 0}, "d_ff must be a positive int"),
        ({"num_experts": 0}, "num_experts must be a positive int"),
        ({"router": "hash"}, "unknown router type 'hash'"),
        ({"top_k": 2}, "router='switch' routes each token to one expert"),
        ({"aux_loss_coef": -0.1}, "aux_loss_coef must be a number >= 0"),
        ({"router_jitter": 1.0}, r"router_jitter must be in \[0, 1\)"),
        ({"init_scale": 0.0}, "init_scale must be > 0 or None"),
        ({"activation": "swish"}, "unknown activation 'swish'"),
        ({"min_capacity": 0}, "min_capacity must be a positive int"),
    ],
)
def test_moeconfig_rejects_bad_values_with_clear_messages(overrides, words):
    kwargs = dict(d_model=8, d_ff=16, num_experts=4)
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=words):
        MoEConfig(**kwargs)


def test_moeconfig_is_frozen():
    config = MoEConfig(8, 16, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.top_k = 2  # type: ignore[misc]


# -- shapes and fields -----------------------------------------------------------


@pytest.mark.parametrize("router,k", [("switch", 1), ("top_k", 2), ("noisy_top_k", 2)])
def test_moelayer_shapes_and_dtypes(router, k):
    layer = _layer(router=router, top_k=k)
    out = layer(_x(2, 5, 8))
    assert out.y.shape == (2, 5, 8)
    assert out.router_logits.shape == (10, 4) and out.router_logits.dtype == torch.float32
    assert out.router_probs.shape == (10, 4) and out.router_probs.dtype == torch.float32
    assert out.expert_index.shape == (10, k) and out.expert_index.dtype == torch.int64
    assert out.gates.shape == (10, k) and out.keep.shape == (10, k) and out.keep.dtype == torch.bool
    assert out.aux_loss.ndim == out.z_loss.ndim == out.router_loss.ndim == out.num_dropped.ndim == 0
    assert out.tokens_per_expert.shape == (4,) and int(out.tokens_per_expert.sum()) == 10 * k
    assert out.capacity is None and int(out.num_dropped) == 0 and out.keep.all()
    torch.testing.assert_close(out.router_probs, F.softmax(out.router_logits, -1))
    assert layer(_x(6, 8)).y.shape == (6, 8)


def test_moelayer_loss_is_the_weighted_sum_of_aux_and_z():
    layer = _layer(aux_loss_coef=0.5, z_loss_coef=0.25)
    out = layer(_x(12, 8))
    torch.testing.assert_close(out.router_loss, 0.5 * out.aux_loss + 0.25 * out.z_loss)
    assert out.aux_loss.item() >= 1.0 - 1e-6  # at least 1 in practice, 1.0 when perfectly balanced


def test_moelayer_router_and_expert_output_methods():
    layer = _layer()
    x = _x(7, 8)
    out = layer(x)
    torch.testing.assert_close(layer.router(x), out.router_logits)
    torch.testing.assert_close(layer.router(x), x @ layer.w_router)
    assert layer.expert_output(2, x).shape == (7, 8)
    with pytest.raises(ValueError, match=r"router expects tokens of shape \(N, 8\)"):
        layer.router(_x(2, 3, 8))
    with pytest.raises(ValueError, match=r"MoELayer expects x of shape \(B, T, 8\) or \(N, 8\)"):
        layer(_x(7, 5))


def test_moelayer_with_one_expert_is_the_dense_ffn():
    torch.manual_seed(0)
    ffn = FeedForward(8, 16)
    layer = _layer(num_experts=1)
    layer.experts = Experts.from_feed_forward(ffn, 1)
    x = _x(2, 5, 8)
    out = layer(x)
    assert torch.all(out.gates == 1.0)  # softmax over one expert
    torch.testing.assert_close(out.y, ffn(x))


def test_moelayer_with_upcycled_experts_is_the_dense_ffn_times_the_gate():
    torch.manual_seed(0)
    ffn = FeedForward(8, 16)
    x = _x(10, 8)
    switch = _layer()
    switch.experts = Experts.from_feed_forward(ffn, 4)
    out = switch(x)
    torch.testing.assert_close(out.y, out.gates * ffn(x))  # Switch: raw gate, < 1
    top2 = _layer(router="top_k", top_k=2)
    top2.experts = Experts.from_feed_forward(ffn, 4)
    torch.testing.assert_close(top2(x).y, ffn(x))  # renormalised gates sum to 1


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"router": "top_k", "top_k": 2},
        {"router": "top_k", "top_k": 3, "bias": False, "activation": "relu"},
        {"capacity_factor": 1.0},
        {"router": "top_k", "top_k": 2, "capacity_factor": 0.5},
        {"router": "noisy_top_k", "top_k": 2, "capacity_factor": 1.25},
    ],
)
def test_moelayer_equals_a_naive_per_token_loop(overrides):
    layer = _layer(**overrides)
    x = _x(3, 6, 8)
    out = layer(x)
    torch.testing.assert_close(out.y, _loop_reference(layer, x, out))


# -- capacity and dropping ---------------------------------------------------------


def test_moelayer_drops_over_capacity_tokens_and_they_get_zero_output():
    layer = _layer(capacity_factor=0.5)
    with torch.no_grad():
        layer.w_router.zero_()
        layer.w_router[:, 0] = 1.0  # make most tokens want expert 0
    x = _x(16, 8).abs()  # positive features: expert 0 wins for every token
    out = layer(x)
    assert out.capacity == 2  # ceil(16 / 4 · 0.5)
    assert out.expert_index[:, 0].tolist() == [0] * 16
    assert out.keep[:, 0].tolist() == [True, True] + [False] * 14  # the earliest tokens get the slots
    assert int(out.num_dropped) == 14
    assert torch.all(out.y[2:] == 0)  # x + y = x: a dropped token passes through the residual unchanged
    assert out.tokens_per_expert.tolist() == [16, 0, 0, 0]  # what the router chose, before dropping


def test_moelayer_capacity_counts_all_tokens_of_the_call():
    out = _layer(router="top_k", top_k=2, capacity_factor=1.0)(_x(4, 8, 8))
    assert out.capacity == 16  # ceil(2 · 32 / 4 · 1.0)
    kept = torch.bincount(out.expert_index[out.keep], minlength=4)
    assert torch.equal(kept, out.tokens_per_expert.clamp(max=16))


# -- precision, noise, gradients --------------------------------------------------


def test_moelayer_router_runs_in_float32_under_bfloat16_autocast():
    layer = _layer()
    x = _x(2, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        assert (x @ layer.w_router).dtype == torch.bfloat16  # autocast is really on
    assert out.router_logits.dtype == torch.float32 and out.router_probs.dtype == torch.float32
    torch.testing.assert_close(out.router_logits, layer.router(x.reshape(-1, 8)))  # float32 values, not bf16-rounded
    assert out.gates.dtype == torch.float32


def test_moelayer_jitter_only_in_training():
    layer = _layer(router_jitter=0.5)
    x = _x(20, 8)
    layer.eval()
    a, b = layer(x), layer(x)
    assert torch.equal(a.router_logits, b.router_logits)
    torch.testing.assert_close(a.router_logits, layer.router(x))
    layer.train()
    torch.manual_seed(0)
    c = layer(x)
    assert not torch.allclose(c.router_logits, layer.router(x))
    torch.testing.assert_close(c.y, _loop_reference(layer, x, c))  # experts see the clean tokens


def test_moelayer_noisy_router_is_deterministic_in_eval_and_random_in_training():
    layer = _layer(router="noisy_top_k", top_k=2)
    assert torch.all(layer.w_noise == 0)  # Shazeer et al. initialise W_noise to zero
    x = _x(30, 8)
    layer.eval()
    ev = layer(x)
    clean_top2 = layer.router(x).topk(2, dim=-1).indices
    assert torch.equal(ev.expert_index, clean_top2)
    layer.train()
    torch.manual_seed(0)
    tr1 = layer(x)
    torch.manual_seed(1)
    tr2 = layer(x)
    assert not torch.equal(tr1.expert_index, tr2.expert_index)
    (tr1.y.pow(2).sum()).backward()
    assert layer.w_noise.grad.abs().sum() > 0


def test_moelayer_router_gets_a_gradient_through_the_gate():
    layer = _layer(aux_loss_coef=0.0, z_loss_coef=0.0)
    out = layer(_x(12, 8))
    out.y.pow(2).sum().backward()  # the task loss alone: its only path to the router is the gate
    # a renormalised top-1 gate (always 1.0) would leave only round-off here (~1e-8)
    assert layer.w_router.grad is not None and layer.w_router.grad.abs().max() > 1e-3
    assert layer.experts.w_in.grad.abs().sum() > 0


def test_moelayer_balance_loss_gradient_reaches_the_router():
    layer = _layer()
    layer(_x(12, 8)).aux_loss.backward()
    assert layer.w_router.grad.abs().sum() > 0
    assert layer.experts.w_in.grad is None  # the aux loss does not touch the experts


def test_moelayer_switch_init_scale_of_the_router():
    layer = _layer(d_model=256, num_experts=64)
    std = (0.1 / 256) ** 0.5
    assert layer.w_router.abs().max() <= 2 * std + 1e-7
    assert 0.8 * std < layer.w_router.std() < 0.95 * std


def test_moelayer_forward_stashes_no_state():
    layer = _layer(router="noisy_top_k", top_k=2, capacity_factor=1.0, router_jitter=0.1)
    before_attrs, before_state = set(vars(layer)), set(layer.state_dict())
    before_modules = {k: set(vars(m)) for k, m in layer.named_modules()}
    layer(_x(2, 5, 8))
    assert set(vars(layer)) == before_attrs and set(layer.state_dict()) == before_state
    assert {k: set(vars(m)) for k, m in layer.named_modules()} == before_modules


def test_moe_layer_default_dispatch_never_builds_an_n_by_e_by_c_tensor():
    """Record every tensor the forward and backward create: none is (N, E, C)-shaped (the GShard one-hot)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    shapes = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            shapes.extend(tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
            return out

    torch.manual_seed(0)
    n, e = 64, 8
    for dispatch in (None, "onehot_einsum"):
        shapes.clear()
        layer = MoELayer(MoEConfig(d_model=16, d_ff=32, num_experts=e, capacity_factor=1.25, dispatch=dispatch))
        with Record():
            layer(torch.randn(n, 16, requires_grad=True)).y.sum().backward()
        three_d = [s for s in shapes if len(s) == 3 and s[:2] == (n, e)]
        if dispatch is None:
            assert not three_d, three_d
        else:
            assert three_d  # the recorder does see it when it is there


def test_moe_config_rejects_an_unknown_dispatch():
    with pytest.raises(ValueError, match="unknown dispatch method"):
        MoEConfig(d_model=4, d_ff=8, num_experts=2, dispatch="carrier pigeon")


# -- modern options (lesson 10) ----------------------------------------------------


@pytest.mark.parametrize(
    "overrides,words",
    [
        ({"router": "mixtral", "top_k": 2, "renormalize": False}, "router 'mixtral' takes a softmax over the k chosen logits"),
        ({"num_shared_experts": -1}, "num_shared_experts must be an int >= 0"),
        ({"shared_expert_gate": True}, "shared_expert_gate=True needs shared experts"),
        ({"bias_update_rate": 1e-3}, "the selection bias belongs to router='sigmoid'"),
        ({"router": "sigmoid", "bias_update_rate": -1e-3}, "bias_update_rate must be a number >= 0"),
        ({"balance_scope": "micro"}, "balance_scope must be one of"),
        ({"renormalize": 1}, "renormalize must be True or False"),
        ({"activation": "geglu"}, "unknown activation 'geglu'"),
    ],
)
def test_moeconfig_rejects_bad_modern_options_with_clear_messages(overrides, words):
    kwargs = dict(d_model=8, d_ff=16, num_experts=4)
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=words):
        MoEConfig(**kwargs)


def test_mixtral_router_layer_gives_the_top_k_layer_output():
    x = _x(3, 5, 8)
    a = _layer(router="top_k", top_k=2, activation="swiglu", bias=False)
    b = _layer(router="mixtral", top_k=2, activation="swiglu", bias=False)
    b.load_state_dict(a.state_dict())
    out_a, out_b = a(x), b(x)
    torch.testing.assert_close(out_a.y, out_b.y)
    assert torch.equal(out_a.expert_index, out_b.expert_index)


def test_shared_experts_add_their_sum_to_every_token():
    layer = _layer(router="top_k", top_k=2, num_shared_experts=2)
    x = _x(10, 8)
    out = layer(x)
    shared = sum(layer.shared_experts.expert_output(s, x) for s in range(2))
    routed = loop_reference(x, layer, out.expert_index, out.gates, out.keep)
    torch.testing.assert_close(out.y, routed + shared)
    torch.testing.assert_close(layer.shared_output(x), shared)
    assert layer.shared_experts.num_experts == 2 and layer.experts.num_experts == 4


def test_a_dropped_token_still_gets_the_shared_experts():
    layer = _layer(num_shared_experts=1, capacity_factor=0.25)  # 1 slot per expert for 8 tokens: most are dropped
    x = _x(8, 8)
    out = layer(x)
    dropped = ~out.keep.any(-1)
    assert dropped.any()
    torch.testing.assert_close(out.y[dropped], layer.shared_output(x)[dropped])


def test_the_shared_expert_gate_scales_the_shared_sum_by_a_sigmoid_per_token():
    layer = _layer(router="top_k", top_k=2, num_shared_experts=1, shared_expert_gate=True)
    x = _x(6, 8)
    gate = torch.sigmoid(x @ layer.w_shared_gate)  # (N, 1)
    torch.testing.assert_close(layer.shared_output(x), gate * layer.shared_experts.expert_output(0, x))
    assert layer.w_shared_gate.shape == (8, 1)


def test_fine_grained_config_keeps_parameters_and_flops_and_shares_k_s():
    from moe_course.flops import count_parameters, measure_flops_per_example, moe_layer_flops, moe_layer_param_count

    base = MoEConfig(16, 32, 4, top_k=1, router="switch", bias=False)
    fine = base.fine_grained(4, num_shared_experts=1)
    assert (fine.d_ff, fine.num_experts, fine.top_k, fine.num_shared_experts) == (8, 15, 3, 1)
    assert (fine.router, fine.renormalize) == ("top_k", False)  # Switch's raw gate becomes DeepSeekMoE's raw top-k
    expert_params = lambda c: count_parameters(MoELayer(c)) - 16 * c.num_experts  # noqa: E731  (without the router)
    assert expert_params(fine) == expert_params(base) == 4 * 2 * 16 * 32
    assert count_parameters(MoELayer(fine)) == moe_layer_param_count(16, 8, 15, bias=False, num_shared_experts=1)
    torch.manual_seed(0)
    x = torch.randn(24, 16)
    layer = MoELayer(dataclasses.replace(fine, dispatch="sort_split"))
    flops = measure_flops_per_example(lambda t: layer(t), x)
    assert flops == moe_layer_flops(1, 16, 8, 15, 3, num_shared_experts=1) == 2 * 16 * 15 + 4 * 4 * 16 * 8
    assert moe_layer_flops(1, 16, 8, 15, 3, num_shared_experts=1) - 2 * 16 * 15 == moe_layer_flops(1, 16, 32, 4, 1) - 2 * 16 * 4


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(segments=3), "d_ff=16 cannot be cut into 3 equal segments"),
        (dict(segments=2, num_shared_experts=2), "leave none of the m·K = 2 active experts"),
        (dict(segments=0), "segments must be a positive int"),
    ],
)
def test_fine_grained_rejects_impossible_cuts(kwargs, words):
    with pytest.raises(ValueError, match=words):
        MoEConfig(8, 16, 4).fine_grained(**kwargs)


def test_sigmoid_layer_reads_its_bias_buffer_and_never_changes_it_in_forward():
    layer = _layer(router="sigmoid", top_k=2, bias_update_rate=1e-3)
    assert "expert_bias" in dict(layer.named_buffers()) and "expert_bias" not in dict(layer.named_parameters())
    x = _x(20, 8)
    before = layer(x)
    torch.testing.assert_close(layer.expert_bias, torch.zeros(4))  # forward left it alone
    with torch.no_grad():
        layer.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    after = layer(x)
    assert (after.expert_index == 3).any(-1).all() and not (before.expert_index == 3).any(-1).all()  # everyone now visits 3
    torch.testing.assert_close(after.router_probs, before.router_probs)  # scores unchanged, only the choice moved
    s = torch.sigmoid(after.router_logits)
    chosen = s.gather(-1, after.expert_index)
    torch.testing.assert_close(after.gates, chosen / chosen.sum(-1, keepdim=True))
    assert "expert_bias" in layer.state_dict()


def test_sequence_balance_scope_measures_each_sequence():
    from moe_course.losses import load_balancing_loss

    layer = _layer(router="top_k", top_k=2, balance_scope="sequence")
    x = _x(3, 6, 8)
    out = layer(x)
    probs, index = out.router_probs.view(3, 6, 4), out.expert_index.view(3, 6, 2)
    want = torch.stack([load_balancing_loss(probs[b], index[b]) for b in range(3)]).mean()
    torch.testing.assert_close(out.aux_loss, want)
    torch.testing.assert_close(layer(x.reshape(18, 8)).aux_loss, load_balancing_loss(out.router_probs, out.expert_index))


@pytest.mark.parametrize("router,k", [("top_k", 2), ("mixtral", 2), ("sigmoid", 3), ("top_k", 1)])
def test_upcycled_layer_with_gates_that_sum_to_one_equals_the_dense_ffn_exactly(router, k):
    from moe_course.moe import upcycle

    torch.manual_seed(0)
    ffn = FeedForward(8, 16, activation="swiglu")
    layer = upcycle(ffn, MoEConfig(8, 16, 6, top_k=k, router=router, activation="swiglu"))
    x = _x(2, 9, 8)
    torch.testing.assert_close(layer(x).y, ffn(x), atol=1e-6, rtol=1e-5)


def test_upcycled_switch_layer_is_the_dense_output_scaled_by_p_max():
    from moe_course.moe import upcycle

    torch.manual_seed(0)
    ffn = FeedForward(8, 16)
    layer = upcycle(ffn, MoEConfig(8, 16, 4, router="switch"))
    x = _x(12, 8)
    out = layer(x)
    p_max = out.router_probs.max(-1, keepdim=True).values  # (N, 1)
    torch.testing.assert_close(out.y, p_max * ffn(x), atol=1e-6, rtol=1e-5)
    assert (p_max < 1).all() and not torch.allclose(out.y, ffn(x))


def test_upcycle_refuses_shared_experts_and_a_mismatched_ffn():
    from moe_course.moe import upcycle

    with pytest.raises(ValueError, match="shared experts would add a second copy"):
        upcycle(FeedForward(8, 16), MoEConfig(8, 16, 4, num_shared_experts=1))
    with pytest.raises(ValueError, match="does not fit"):
        upcycle(FeedForward(8, 32), MoEConfig(8, 16, 4))
    with pytest.raises(TypeError, match="expects a trained FeedForward"):
        upcycle(torch.nn.Linear(8, 8), MoEConfig(8, 16, 4))


def test_moelayer_names_nan_or_inf_input_and_mismatched_dtypes():
    layer = MoELayer(MoEConfig(d_model=8, d_ff=16, num_experts=4))
    x = torch.randn(2, 5, 8)
    x[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf in its input x \(first at token 7, feature 3\)"):
        layer(x)
    x[1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        layer(x)
    with pytest.raises(
        TypeError, match=r"experts hold float32 weights but x is float64: convert one to the other, e\.g\. x\.to\(float32\)"
    ):
        layer(torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="x is int64"):
        layer(torch.ones(3, 8, dtype=torch.int64))
    # float64 all the way through works, and agrees with float32
    x = torch.randn(6, 8)
    twin = MoELayer(MoEConfig(d_model=8, d_ff=16, num_experts=4))
    twin.load_state_dict(layer.state_dict())
    y64 = twin.double()(x.double()).y
    assert y64.dtype == torch.float64 and torch.allclose(y64.float(), layer(x).y, atol=1e-5)
