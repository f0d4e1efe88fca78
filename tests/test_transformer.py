"""Tests for moe_course.transformer: the pre-norm block, the dense and Switch GPT, their accounting."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moe_course.flops import count_parameters, ffn_flops, ffn_param_count
from moe_course.moe import MoEOutput
from moe_course.transformer import (
    GPT,
    Block,
    GPTConfig,
    GPTOutput,
    copy_dense_into_switch,
    flops_per_token,
    param_count,
)

from helpers import forced_expert

V = 96


def _cfg(**kw) -> GPTConfig:
    base = dict(vocab_size=V, block_size=16, d_model=32, n_layers=2, n_heads=4, d_ff=64)
    base.update(kw)
    return GPTConfig(**base)


def _ids(b: int = 2, t: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(V, (b, t), generator=torch.Generator().manual_seed(seed))


# --- configs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"ffn": "moe"}, "ffn must be one of"),
        ({"num_experts": 4}, "dense model has no experts"),
        ({"n_heads": 5}, "divisible by n_heads"),
        ({"ffn": "switch", "num_experts": 4, "moe_every": 3}, "no Switch block"),
        ({"ffn": "switch", "num_experts": 4, "capacity_factor": 0.0}, "capacity_factor"),
        ({"ffn": "switch", "num_experts": 4, "aux_loss_coef": -1.0}, "aux_loss_coef"),
        ({"d_model": 0}, "d_model"),
        ({"position": "sinusoid"}, "position"),
        ({"d_model": 12, "n_heads": 4}, "even head width"),
        ({"dropout": 1.0}, "dropout"),
        ({"top_k": 2}, "dense model routes nothing"),
        ({"ffn": "switch", "num_experts": 4, "top_k": 2}, "router='top_k'"),
        ({"ffn": "switch", "num_experts": 4, "router": "expert_choice"}, "unknown router type"),
        ({"ffn": "switch", "num_experts": 2, "router": "top_k", "top_k": 3}, "more than num_experts"),
        ({"top_k": 0}, "top_k"),
        ({"ffn": "switch", "num_experts": 4, "router": "hash"}, "drops no tokens"),
        ({"ffn": "switch", "num_experts": 4, "router": "hash", "top_k": 2, "capacity_factor": None}, "one expert"),
    ],
)
def test_config_rejects_bad_values_with_clear_messages(kwargs, words):
    with pytest.raises(ValueError, match=words):
        _cfg(**kwargs)


def test_twins_and_moe_layer_placement():
    sw = _cfg(ffn="switch", num_experts=4, n_layers=4, moe_every=2)
    assert sw.moe_layers == (1, 3)
    assert sw.dense_twin() == _cfg(n_layers=4, moe_every=2)
    assert _cfg().switch_twin(8).num_experts == 8 and _cfg().switch_twin(8).moe_layers == (0, 1)
    m = sw.moe_config()
    assert (m.num_experts, m.top_k, m.router, m.capacity_factor, m.d_ff) == (4, 1, "switch", 1.25, 64)
    blocks = GPT(sw).blocks
    assert [b.is_moe for b in blocks] == [False, True, False, True]


# --- the block and the model ----------------------------------------------------------------


def test_block_is_pre_norm_with_two_residuals():
    torch.manual_seed(0)
    cfg = _cfg()
    block = Block(cfg, 0).eval()
    x = torch.randn(2, 16, 32)
    h = x + block.attn(block.ln_1(x))
    expected = h + block.ffn(block.ln_2(h))
    out = block(x)
    assert out.moe is None and torch.allclose(out.x, expected, atol=1e-6)
    # with both branches zeroed the block is the identity: the residual path is clean
    for lin in (block.attn.proj, block.ffn.fc_out):
        torch.nn.init.zeros_(lin.weight)
        torch.nn.init.zeros_(lin.bias)
    assert torch.equal(block(x).x, x)


def test_switch_block_adds_the_moe_output_and_reports_it():
    torch.manual_seed(0)
    block = Block(_cfg(ffn="switch", num_experts=4), 0).eval()
    x = torch.randn(2, 16, 32)
    out = block(x)
    h = x + block.attn(block.ln_1(x))
    moe = block.ffn(block.ln_2(h))
    assert isinstance(out.moe, MoEOutput)
    assert torch.allclose(out.x, h + moe.y, atol=1e-6)
    assert out.moe.router_logits.shape == (32, 4)


@pytest.mark.parametrize("ffn,experts", [("dense", 1), ("switch", 4)])
def test_gpt_output_fields_and_shapes(ffn, experts):
    torch.manual_seed(0)
    model = GPT(_cfg(ffn=ffn, num_experts=experts))
    out = model(_ids())
    assert isinstance(out, GPTOutput) and out.logits.shape == (2, 16, V)
    assert len(out.moe) == 2 and out.router_loss.shape == out.aux_loss.shape == out.z_loss.shape == ()
    if ffn == "dense":
        assert out.moe == (None, None) and out.router_loss.item() == out.aux_loss.item() == out.z_loss.item() == 0.0
    else:
        assert all(isinstance(m, MoEOutput) for m in out.moe)
        assert torch.allclose(out.router_loss, out.moe[0].router_loss + out.moe[1].router_loss)
        assert torch.allclose(out.aux_loss, out.moe[0].aux_loss + out.moe[1].aux_loss)
        assert torch.allclose(out.z_loss, out.moe[0].z_loss + out.moe[1].z_loss)
        assert torch.allclose(out.router_loss, 1e-2 * out.aux_loss + 1e-3 * out.z_loss)
        assert [i for i, _ in out.moe_outputs] == [0, 1]
        assert out.router_loss.item() > 0


@pytest.mark.parametrize(
    "kw", [{}, {"position": "learned"}, {"fast_attention": False}, {"ffn": "switch", "num_experts": 4, "capacity_factor": None}]
)
def test_gpt_is_causal(kw):
    torch.manual_seed(0)
    model = GPT(_cfg(**kw)).eval()
    x = _ids()
    x2 = x.clone()
    x2[:, 9:] = (x2[:, 9:] + 1) % V
    a, b = model(x).logits, model(x2).logits
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-5), "logits before position 9 must not depend on later tokens"
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_capacity_makes_routing_depend_on_the_whole_batch():
    # A known property of Switch layers with a capacity: which tokens are dropped
    # depends on every token of the forward call, later ones included.
    torch.manual_seed(0)
    model = GPT(_cfg(ffn="switch", num_experts=4, capacity_factor=0.5)).eval()
    out = model(_ids(4))
    assert all(m.num_dropped > 0 for m in out.moe)


def test_gpt_rejects_bad_inputs():
    model = GPT(_cfg())
    with pytest.raises(ValueError, match="longer than block_size=16"):
        model(_ids(t=17))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(torch.randn(2, 16))
    with pytest.raises(TypeError, match="GPTConfig"):
        GPT({"vocab_size": V})


def test_tied_head_shares_the_embedding_and_untied_does_not():
    tied, untied = GPT(_cfg()), GPT(_cfg(tie_embeddings=False))
    assert tied.head.weight is tied.tok_emb.weight
    assert untied.head.weight is not untied.tok_emb.weight
    assert count_parameters(untied) - count_parameters(tied) == V * 32


# --- E = 1 Switch equals dense ---------------------------------------------------------------


def _twins(num_experts: int = 1, **kw):
    torch.manual_seed(0)
    dense = GPT(_cfg(**kw))
    torch.manual_seed(1)
    switch = GPT(_cfg(ffn="switch", num_experts=num_experts, capacity_factor=None, **kw))
    return dense, copy_dense_into_switch(dense, switch)


def test_one_expert_switch_equals_its_dense_twin_with_the_router_bypassed():
    dense, switch = _twins(1)
    x = _ids(3)
    ref = dense(x).logits
    with forced_expert(switch, 0):
        assert torch.allclose(switch(x).logits, ref, atol=1e-5)
    # through the router too: a softmax over one expert is exactly 1, so the gate changes nothing
    out = switch(x)
    assert all(torch.equal(m.gates, torch.ones_like(m.gates)) for m in out.moe)
    assert torch.allclose(out.logits, ref, atol=1e-5)
    # the only difference is the router loss: balance = 1 exactly, z-loss = mean of logit²
    z = sum(m.router_logits.square().mean() for m in out.moe)
    assert torch.allclose(out.router_loss, 1e-2 * 2 + 1e-3 * z)


def test_one_expert_switch_gets_the_dense_gradients_when_its_losses_are_off():
    torch.manual_seed(0)
    dense = GPT(_cfg())
    torch.manual_seed(1)
    switch = copy_dense_into_switch(
        dense, GPT(_cfg(ffn="switch", num_experts=1, capacity_factor=None, aux_loss_coef=0.0, z_loss_coef=0.0))
    )
    x, y = _ids(2, seed=1), _ids(2, seed=2)
    for m in (dense, switch):
        out = m(x)
        (torch.nn.functional.cross_entropy(out.logits.reshape(-1, V), y.reshape(-1)) + out.router_loss).backward()
    assert torch.allclose(dense.tok_emb.weight.grad, switch.tok_emb.weight.grad, atol=1e-6)
    for db, sb in zip(dense.blocks, switch.blocks):
        assert torch.allclose(db.attn.qkv.weight.grad, sb.attn.qkv.weight.grad, atol=1e-6)
        assert torch.allclose(db.ffn.fc_in.weight.grad.T, sb.ffn.experts.w_in.grad[0], atol=1e-6)
        assert torch.allclose(db.ffn.fc_out.weight.grad.T, sb.ffn.experts.w_out.grad[0], atol=1e-6)
        assert sb.ffn.w_router.grad is None or sb.ffn.w_router.grad.abs().max() < 1e-8  # a gate of 1 teaches the router nothing


def test_upcycled_experts_each_equal_the_dense_model():
    dense, switch = _twins(4)
    x = _ids()
    ref = dense(x).logits
    for e in range(4):
        with forced_expert(switch, e):
            assert torch.allclose(switch(x).logits, ref, atol=1e-5)
    # routed, each token's output is the dense output times its gate (< 1): not equal any more
    assert not torch.allclose(switch(x).logits, ref, atol=1e-3)


def test_copy_refuses_models_of_different_shapes():
    with pytest.raises(ValueError, match="d_ff: 64 vs 128"):
        copy_dense_into_switch(GPT(_cfg()), GPT(_cfg(ffn="switch", num_experts=2, d_ff=128)))
    with pytest.raises(ValueError, match="dense GPT and a Switch GPT"):
        copy_dense_into_switch(GPT(_cfg(ffn="switch", num_experts=2)), GPT(_cfg()))


# --- parameters and FLOPs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"ffn": "switch", "num_experts": 4},
        {"ffn": "switch", "num_experts": 3, "n_layers": 4, "moe_every": 2},
        {"tie_embeddings": False, "position": "learned"},
        {"bias": False, "ffn": "switch", "num_experts": 2},
        {"ffn": "switch", "num_experts": 4, "router": "top_k", "top_k": 2},
        {"ffn": "switch", "num_experts": 4, "router": "noisy_top_k", "top_k": 2, "n_layers": 4, "moe_every": 2},
    ],
)
def test_param_count_matches_the_model(kw):
    cfg = _cfg(**kw)
    assert param_count(cfg).total == count_parameters(GPT(cfg))


def test_param_count_by_hand():
    # V=96, D=32, F=64, 2 layers, E=4, RoPE (no position table), tied head, biases
    pc = param_count(_cfg(ffn="switch", num_experts=4))
    assert pc.embedding == 96 * 32
    assert pc.attention == 2 * (4 * 32 * 32 + 4 * 32)
    assert pc.norms == 5 * 2 * 32
    one_ffn = 2 * 32 * 64 + 64 + 32
    assert one_ffn == ffn_param_count(32, 64)
    assert pc.ffn == 2 * 4 * one_ffn and pc.ffn_active == 2 * one_ffn
    assert pc.router == 2 * 32 * 4 and pc.head == 0
    assert pc.total == 3072 + 8448 + 320 + 33536 + 256
    assert pc.active == pc.total - 3 * 2 * one_ffn
    dense = param_count(_cfg())
    assert dense.active == dense.total == pc.active - pc.router


def test_flops_per_token_by_hand():
    # T=16, D=32, F=64, V=96, 2 layers, E=4
    fc = flops_per_token(_cfg(ffn="switch", num_experts=4))
    assert fc.attention_proj == 2 * (2 * 32 * 96 + 2 * 32 * 32)  # q,k,v and output projections
    assert fc.attention_mix == 2 * (2 * 16 * 32 + 2 * 16 * 32)  # scores and weighted values over 16 keys
    assert fc.ffn == 2 * ffn_flops(1, 32, 64) == 2 * 4 * 32 * 64
    assert fc.router == 2 * 2 * 32 * 4 and fc.head == 2 * 32 * 96
    assert fc.total == 16384 + 4096 + 16384 + 512 + 6144
    assert fc.training == 3 * fc.total
    dense = flops_per_token(_cfg())
    assert fc.total - dense.total == fc.router  # equal FLOPs per token but for the router
    assert flops_per_token(_cfg(), context=8).attention_mix == dense.attention_mix // 2


def test_hash_layer_routes_each_token_id_to_a_fixed_expert():
    cfg = _cfg(ffn="switch", num_experts=4, router="hash", capacity_factor=None, n_layers=4, moe_every=2)
    model = GPT(cfg)
    assert [type(b.ffn).__name__ for b in model.blocks] == ["FeedForward", "HashLayer", "FeedForward", "HashLayer"]
    table = model.blocks[1].ffn.expert_of
    assert table.shape == (V,) and torch.bincount(table, minlength=4).tolist() == [24, 24, 24, 24]  # balanced
    assert torch.equal(table, GPT(cfg).blocks[3].ffn.expert_of)  # the same fixed assignment every time
    idx = _ids(3)
    out = model(idx)
    for _, m in out.moe_outputs:
        assert torch.equal(m.expert_index[:, 0], table[idx.reshape(-1)])  # decided by the token id alone
        assert torch.equal(m.gates, torch.ones(48, 1)) and float(m.router_loss) == 0.0 and int(m.num_dropped) == 0
        assert torch.equal(m.router_probs.argmax(-1), m.expert_index[:, 0]) and m.aux_loss >= 1.0
    assert float(out.router_loss) == 0.0
    # the block's output: the hashed expert's answer, gate 1
    block, x = model.blocks[1], torch.randn(3, 16, 32)
    a = x + block.attn(block.ln_1(x))
    h = block.ln_2(a).reshape(-1, 32)
    want = torch.stack([block.ffn.expert_output(int(e), h[i : i + 1])[0] for i, e in enumerate(table[idx.reshape(-1)])])
    assert torch.allclose(block(x, token_ids=idx).x, a + want.reshape(3, 16, 32), atol=1e-5)
    with pytest.raises(ValueError, match="routes by token id"):
        block(x)
    pc = param_count(cfg)
    assert pc.router == 0 and pc.total == count_parameters(model) and flops_per_token(cfg).router == 0


def test_top_k_routing_in_the_gpt_counts_k_experts_per_token():
    top2 = _cfg(ffn="switch", num_experts=4, router="top_k", top_k=2, n_layers=4, moe_every=2)
    m = top2.moe_config()
    assert (m.router, m.top_k) == ("top_k", 2)
    out = GPT(top2)(_ids())
    assert [o.expert_index.shape for _, o in out.moe_outputs] == [(32, 2), (32, 2)]
    one = 2 * 32 * 64 + 64 + 32
    pc, dense = param_count(top2), param_count(top2.dense_twin())
    assert pc.ffn_active == dense.ffn_active + 2 * one  # two Switch blocks, one extra expert each
    fc = flops_per_token(top2)
    assert fc.ffn == flops_per_token(top2.dense_twin()).ffn + 2 * 4 * 32 * 64
    noisy = replace(top2, router="noisy_top_k")
    assert param_count(noisy).router == 2 * param_count(top2).router and flops_per_token(noisy).router == 2 * fc.router
    assert top2.dense_twin().top_k == 1 and top2.dense_twin().router == "switch"


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"ffn": "switch", "num_experts": 4},
        {"ffn": "switch", "num_experts": 8, "n_layers": 4, "moe_every": 2},
        {"ffn": "switch", "num_experts": 4, "router": "top_k", "top_k": 2},
    ],
)
def test_flops_per_token_match_pytorchs_flop_counter(kw):
    # explicit attention and a per-expert dispatch, so that every matmul is seen by the counter
    cfg = _cfg(fast_attention=False, dispatch="sort_split", capacity_factor=None, **kw) if kw else _cfg(fast_attention=False)
    model = GPT(cfg)
    x = _ids(3)
    with FlopCounterMode(display=False) as counter:
        model(x)
    assert counter.get_total_flops() == flops_per_token(cfg).total * x.numel()


# --- generation ---------------------------------------------------------------------------


def test_generate_extends_the_prompt_reproducibly_and_crops_long_contexts():
    torch.manual_seed(0)
    model = GPT(_cfg())
    prompt = _ids(2, 4)
    a = model.generate(prompt, 20, generator=torch.Generator().manual_seed(0))
    b = model.generate(prompt, 20, generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 24) and torch.equal(a, b) and torch.equal(a[:, :4], prompt)
    greedy = model.generate(prompt, 3, temperature=0.0)
    assert torch.equal(greedy[:, 4], model(prompt).logits[:, -1].argmax(-1))
    top1 = model.generate(prompt, 3, top_k=1, generator=torch.Generator().manual_seed(7))
    assert torch.equal(top1, greedy)  # top-1 sampling is greedy
    assert model.training  # generate restores the mode it found


def test_generate_stops_at_the_stop_token():
    torch.manual_seed(0)
    model = GPT(_cfg())
    prompt = _ids(1, 3)
    first = model.generate(prompt, 1, temperature=0.0)[0, -1].item()
    out = model.generate(prompt, 10, temperature=0.0, stop_token=first)
    assert out.shape == (1, 4)


def test_forced_expert_helper_bypasses_every_router_and_restores_the_layers():
    dense, switch = _twins(4)
    layers = [b.ffn for b in switch.blocks]
    with forced_expert(switch, 2):
        out = switch(_ids())
        assert out.moe == (None, None) and out.router_loss.item() == 0.0
    assert [b.ffn for b in switch.blocks] == layers and all(b.is_moe for b in switch.blocks)
    with pytest.raises(ValueError, match=r"expert must be in \[0, 4\)"):
        with forced_expert(switch, 4):
            pass
    with pytest.raises(ValueError, match="Switch blocks"):
        with forced_expert(dense, 0):
            pass


# --- modern options (lesson 10) -------------------------------------------------------------

MODERN = [
    {"ffn": "switch", "num_experts": 4, "router": "top_k", "top_k": 2},
    {"ffn": "switch", "num_experts": 4, "router": "mixtral", "top_k": 2, "activation": "swiglu", "bias": False},
    {"activation": "swiglu"},
    {
        "ffn": "switch",
        "num_experts": 15,
        "top_k": 3,
        "router": "top_k",
        "renormalize": False,
        "expert_segments": 4,
        "num_shared_experts": 1,
    },
    {
        "ffn": "switch",
        "num_experts": 7,
        "top_k": 1,
        "router": "top_k",
        "expert_segments": 2,
        "num_shared_experts": 1,
        "shared_expert_gate": True,
        "activation": "swiglu",
        "n_layers": 4,
        "moe_every": 2,
    },
    {"ffn": "switch", "num_experts": 8, "top_k": 2, "router": "sigmoid", "bias_update_rate": 1e-3, "balance_scope": "sequence"},
    {"ffn": "switch", "num_experts": 4, "router": "noisy_top_k", "top_k": 2},
]


@pytest.mark.parametrize("kw", MODERN)
def test_modern_param_count_matches_the_model(kw):
    cfg = _cfg(**kw)
    assert param_count(cfg).total == count_parameters(GPT(cfg))


@pytest.mark.parametrize("kw", MODERN)
def test_modern_flops_per_token_match_pytorchs_flop_counter(kw):
    cfg = _cfg(fast_attention=False, dispatch="sort_split", capacity_factor=None, **kw)
    model = GPT(cfg)
    x = _ids(3)
    with FlopCounterMode(display=False) as counter:
        model(x)
    assert counter.get_total_flops() == flops_per_token(cfg).total * x.numel()


def test_fine_grained_gpt_keeps_parameters_and_flops_but_for_the_routers():
    base = _cfg(ffn="switch", num_experts=4, bias=False)
    fine = base.fine_grained(4, num_shared_experts=1)
    assert (fine.expert_segments, fine.num_experts, fine.top_k, fine.num_shared_experts) == (4, 15, 3, 1)
    assert fine.moe_config().d_ff == 16
    pb, pf = param_count(base), param_count(fine)
    assert pf.ffn == pb.ffn and pf.ffn_active == pb.ffn_active
    assert pf.total - pf.router == pb.total - pb.router
    fb, ff = flops_per_token(base), flops_per_token(fine)
    assert ff.ffn == fb.ffn and ff.total - ff.router == fb.total - fb.router
    assert ff.router == 2 * 2 * 32 * 15


def test_top_2_costs_two_experts_and_swiglu_one_and_a_half_ffns():
    top1, top2 = (
        flops_per_token(_cfg(ffn="switch", num_experts=4)),
        flops_per_token(_cfg(ffn="switch", num_experts=4, router="top_k", top_k=2)),
    )
    assert top2.ffn == 2 * top1.ffn
    assert flops_per_token(_cfg(activation="swiglu")).ffn * 2 == flops_per_token(_cfg()).ffn * 3
    assert (
        param_count(_cfg(ffn="switch", num_experts=4, router="top_k", top_k=2)).ffn_active
        == 2 * param_count(_cfg(ffn="switch", num_experts=4)).ffn_active
    )


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"top_k": 2}, "a dense model routes nothing"),
        ({"ffn": "switch", "num_experts": 4, "top_k": 2}, "router='switch' routes each token to one expert"),
        ({"ffn": "switch", "num_experts": 4, "expert_segments": 3}, "d_ff=64 cannot be cut into expert_segments=3"),
        ({"activation": "swish"}, "unknown activation 'swish'"),
        ({"ffn": "switch", "num_experts": 4, "bias_update_rate": 1e-3}, "selection bias belongs to router='sigmoid'"),
    ],
)
def test_config_rejects_bad_modern_options(kwargs, words):
    with pytest.raises(ValueError, match=words):
        _cfg(**kwargs)


def test_dense_twin_of_a_modern_model_is_plain_dense():
    cfg = _cfg(ffn="switch", num_experts=8, router="sigmoid", top_k=2, bias_update_rate=1e-3, activation="swiglu").fine_grained(
        2, 1
    )
    twin = cfg.dense_twin()
    assert twin.ffn == "dense" and twin.activation == "swiglu" and count_parameters(GPT(twin)) == param_count(twin).total


@pytest.mark.parametrize("moe", [dict(router="top_k", top_k=2), dict(router="mixtral", top_k=2), dict(router="sigmoid", top_k=2)])
def test_upcycled_gpt_with_gates_that_sum_to_one_equals_the_dense_gpt(moe):
    from moe_course.transformer import upcycle_gpt

    torch.manual_seed(0)
    dense = GPT(_cfg(activation="swiglu")).eval()
    moe_gpt = upcycle_gpt(dense, 4, capacity_factor=None, **moe).eval()
    x = _ids()
    torch.testing.assert_close(moe_gpt(x).logits, dense(x).logits, atol=1e-5, rtol=1e-5)
    assert moe_gpt.config.num_experts == 4 and dense.config.ffn == "dense"


def test_upcycled_switch_gpt_differs_from_the_dense_gpt_at_the_start():
    from moe_course.transformer import upcycle_gpt

    torch.manual_seed(0)
    dense = GPT(_cfg()).eval()
    switch = upcycle_gpt(dense, 4, capacity_factor=None).eval()
    x = _ids()
    assert not torch.allclose(switch(x).logits, dense(x).logits, atol=1e-3)


def test_copy_refuses_fine_grained_experts():
    dense = GPT(_cfg())
    fine = GPT(_cfg(ffn="switch", num_experts=4).fine_grained(2))
    with pytest.raises(ValueError, match="expert_segments=1"):
        copy_dense_into_switch(dense, fine)
