"""Cross-check against Hugging Face transformers (a test-only dependency).

Tiny models built from their config classes with random weights, never
downloaded. Conventions mapped here:

* Shapes. Their Switch losses take (G, T, E) tensors, G groups (sequences) of
  T tokens; ours take (N, E) tokens.
* Switch ``load_balancing_loss_func``: f and P are per-group means and the
  loss is E² · mean over groups and experts of f·P, i.e. the mean over groups
  of E · Σ_i f_i P_i, which is our loss computed on each group separately.
  For one group it is our loss on the same tokens. It returns the unweighted
  loss; α (their ``router_aux_loss_coef``) is our ``aux_loss_coef``. Given
  top-k indices (G, T, K) their f marks "expert i is among the token's
  choices", which sums to K, so their value is K times ours.
* Switch ``router_z_loss_func``: sum over all G·T tokens / (G·T), the same mean
  as ours over the flattened tokens; unweighted (their ``router_z_loss_coef``
  is our ``z_loss_coef``).
* ``SwitchTransformersSparseMLP``: router ``classifier`` is nn.Linear(D, E,
  bias=False), weight (E, D) = our ``w_router.T``; experts are T5 dense ReLU
  FFNs without bias (``wi.weight`` (F, D) = our ``w_in[e].T``, ``wo.weight``
  (D, F) = our ``w_out[e].T``), so our layer uses activation="relu",
  bias=False. Gate = raw top-1 probability, as ours. Their capacity is a fixed
  integer ``expert_capacity`` counted per sequence (cumsum over the T axis,
  first come first served); ours is ceil(N/E · capacity_factor) counted over
  the whole call, so one sequence per call with equal capacities maps one to
  the other. A dropped token gets 0 in both.
* ``MixtralSparseMoeBlock``: router ``gate.weight`` (E, D), softmax in
  float32, top-k, renormalise: our ``top_k_routing``. Its experts are SwiGLU
  FFNs that our ``Experts`` does not have, so we plug THEIR experts into OUR
  layer (an adapter with ``expert_output(e, x)`` that calls their module) and
  compare the routing and the combination. Mixtral's
  ``load_balancing_loss_func`` divides counts of all K choices by N (not
  N·K): its value is K times ours.

Modern blocks (lesson 10), all with OUR SwiGLU experts (``activation="swiglu"``,
``bias=False``) holding their weights: their stacked ``gate_up_proj`` (E, 2F, D)
is [W_gate; W_in] row-wise (the first F rows gate), so ``w_gate[e] =
gate_up_proj[e, :F].T``, ``w_in[e] = gate_up_proj[e, F:].T`` and ``w_out[e] =
down_proj[e].T``. A shared MLP of width K_s·F is K_s of our shared experts of
width F (hidden units s·F..(s+1)·F each: a SwiGLU of concatenated units is the
sum of the parts).

* ``MixtralSparseMoeBlock`` with our experts: router "mixtral" or "top_k".
* ``DeepseekV3MoE``: sigmoid scores, ``e_score_correction_bias`` = our
  ``expert_bias`` (selection only), ``norm_topk_prob`` = our ``renormalize``;
  ``routed_scaling_factor`` set to 1 and one expert group (``n_group=1``,
  ``topk_group=1``): group-limited routing and the scaling factor are not in
  our layer. Their top-k is unsorted, so indices are compared as sets.
* ``Qwen2MoeSparseMoeBlock``: softmax top-k with ``norm_topk_prob`` False (our
  renormalize=False), one shared expert behind a sigmoid gate (our
  ``shared_expert_gate``); their ``load_balancing_loss_func`` over several
  layers' logits is K times ours over all those tokens together.
* ``OlmoeSparseMoeBlock`` (64 experts, top-8 in the paper): softmax top-k,
  raw or renormalised gates.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")
switch_mod = pytest.importorskip("transformers.models.switch_transformers.modeling_switch_transformers")
mixtral_mod = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
deepseek_mod = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
qwen2_moe_mod = pytest.importorskip("transformers.models.qwen2_moe.modeling_qwen2_moe")
olmoe_mod = pytest.importorskip("transformers.models.olmoe.modeling_olmoe")

from moe_course.dispatch import sort_dispatch  # noqa: E402
from moe_course.experts import Experts  # noqa: E402
from moe_course.losses import load_balancing_loss, router_z_loss  # noqa: E402
from moe_course.moe import MoEConfig, MoELayer  # noqa: E402
from moe_course.routing import top_k_routing  # noqa: E402

ATOL = 1e-5
D, F_, E = 8, 16, 4


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=1e-5)


def _randomise(module: nn.Module, seed: int, std: float = 0.3) -> None:
    """Their bare modules may hold uninitialised (torch.empty) weights: fill them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


# -- losses -------------------------------------------------------------------------


def test_hf_switch_z_loss_equals_ours():
    logits = torch.randn(3, 7, E, generator=torch.Generator().manual_seed(0)) * 2  # (G, T, E)
    _close(router_z_loss(logits.reshape(-1, E)), switch_mod.router_z_loss_func(logits))


def test_hf_switch_load_balancing_loss_equals_ours_per_group():
    g = torch.Generator().manual_seed(1)
    probs = F.softmax(torch.randn(3, 10, E, generator=g) * 2, dim=-1)  # (G, T, E)
    index = probs.argmax(-1)  # (G, T)
    theirs = switch_mod.load_balancing_loss_func(probs, index)
    _close(load_balancing_loss(probs[0], index[0]), switch_mod.load_balancing_loss_func(probs[:1], index[:1]))
    per_group = torch.stack([load_balancing_loss(probs[i], index[i]) for i in range(3)])
    _close(per_group.mean(), theirs)  # their value: the mean over groups of ours


def test_hf_switch_load_balancing_loss_with_top_k_indices_is_k_times_ours():
    g = torch.Generator().manual_seed(2)
    probs = F.softmax(torch.randn(1, 12, E, generator=g), dim=-1)
    index = probs.topk(2, dim=-1).indices  # (1, T, 2), distinct experts per token
    _close(2 * load_balancing_loss(probs[0], index[0]), switch_mod.load_balancing_loss_func(probs, index))


def test_hf_mixtral_load_balancing_loss_is_k_times_ours():
    logits = torch.randn(20, E, generator=torch.Generator().manual_seed(3))  # (N, E), one layer
    for k in (1, 2, 3):
        theirs = mixtral_mod.load_balancing_loss_func((logits,), E, top_k=k)
        routing = top_k_routing(logits, k)
        _close(k * load_balancing_loss(routing.router_probs, routing.expert_index), theirs)


# -- Switch top-1 layer ---------------------------------------------------------------


def _switch_pair(expert_capacity: int, seed: int = 0, capacity_factor: float | None = None):
    config = transformers.SwitchTransformersConfig(
        d_model=D,
        d_ff=F_,
        num_experts=E,
        expert_capacity=expert_capacity,
        router_bias=False,
        router_jitter_noise=0.0,
        router_dtype="float32",
        dense_act_fn="relu",
        dropout_rate=0.0,
    )
    theirs = switch_mod.SwitchTransformersSparseMLP(config).eval()
    _randomise(theirs, seed)
    ours = MoELayer(MoEConfig(D, F_, E, router="switch", capacity_factor=capacity_factor, activation="relu", bias=False)).eval()
    with torch.no_grad():
        ours.w_router.copy_(theirs.router.classifier.weight.T)  # (D, E)
        for e in range(E):
            expert = theirs.experts[f"expert_{e}"]
            ours.experts.w_in[e].copy_(expert.wi.weight.T)  # (D, F)
            ours.experts.w_out[e].copy_(expert.wo.weight.T)  # (F, D)
    return theirs, ours


def _their_output(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = module(x)
    return out[0] if isinstance(out, tuple) else out  # older versions also return router tuples


def test_hf_switch_sparse_mlp_without_token_limit_equals_our_layer():
    theirs, ours = _switch_pair(expert_capacity=10_000)
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(4))  # (B, T, D)
    with torch.no_grad():
        out = ours(x)
        expert_mask, top_prob, logits = theirs.router(x)
        _close(out.router_logits, logits.reshape(-1, E))
        assert torch.equal(out.expert_index[:, 0], expert_mask.reshape(-1, E).argmax(-1))
        _close(out.gates, top_prob.reshape(-1, 1))
        _close(out.y, _their_output(theirs, x))
    assert int(out.num_dropped) == 0


def test_hf_switch_sparse_mlp_drops_the_same_tokens_per_sequence():
    """Capacity 2 per expert for 16 tokens: theirs per sequence, ours per call, so one call per sequence."""
    theirs, ours = _switch_pair(expert_capacity=2, seed=5, capacity_factor=0.5)  # ceil(16/4 · 0.5) = 2
    x = torch.randn(3, 16, D, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = _their_output(theirs, x)
        dropped_theirs = theirs.router(x)[0].sum(-1) == 0  # (B, T): rows with no expert left
        for b in range(3):
            out = ours(x[b])
            assert out.capacity == 2
            assert torch.equal(~out.keep[:, 0], dropped_theirs[b])
            _close(out.y, want[b])
        assert dropped_theirs.any()  # the comparison really covers dropping


# -- Mixtral top-2 block -----------------------------------------------------------------


class TheirExperts(nn.Module):
    """Hugging Face Mixtral experts behind our ``expert_output(e, x)`` interface."""

    def __init__(self, block: nn.Module, num_experts: int) -> None:
        super().__init__()
        self.block, self.num_experts = block, num_experts

    def expert_output(self, e: int, x: torch.Tensor) -> torch.Tensor:
        experts = self.block.experts
        if hasattr(experts, "gate_up_proj"):  # transformers >= 5: stacked weights, call their forward with weight 1
            index = torch.full((x.shape[0], 1), e, dtype=torch.long)
            return experts(x, index, torch.ones(x.shape[0], 1, dtype=x.dtype))
        return experts[e](x)  # transformers 4.x: a ModuleList of SwiGLU MLPs


def _mixtral_pair(seed: int = 0, k: int = 2):
    config = transformers.MixtralConfig(
        hidden_size=D, intermediate_size=F_, num_local_experts=E, num_experts_per_tok=k, router_jitter_noise=0.0
    )
    theirs = mixtral_mod.MixtralSparseMoeBlock(config).eval()
    _randomise(theirs, seed)
    ours = MoELayer(MoEConfig(D, F_, E, top_k=k, router="top_k")).eval()
    with torch.no_grad():
        ours.w_router.copy_(theirs.gate.weight.T)  # (D, E)
    ours.experts = TheirExperts(theirs, E)  # their SwiGLU experts inside our layer
    return theirs, ours


def test_hf_mixtral_router_picks_the_same_experts_and_weights():
    theirs, ours = _mixtral_pair(seed=7)
    x = torch.randn(2, 6, D, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        out = ours(x)
        _close(out.router_logits, x.reshape(-1, D) @ theirs.gate.weight.T)
        gate_out = theirs.gate(x.reshape(-1, D))
        if isinstance(gate_out, tuple):  # transformers >= 5: (logits, weights, indices)
            _, weights, indices = gate_out
            assert torch.equal(out.expert_index, indices)
            _close(out.gates, weights)


@pytest.mark.parametrize("k", [1, 2])
def test_hf_mixtral_block_equals_our_routing_and_combine_with_their_experts(k):
    theirs, ours = _mixtral_pair(seed=9, k=k)
    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        want = theirs(x.clone())
        out = ours(x)
        _close(out.y, want)
        # the same through the bare dispatch function
        routing = top_k_routing(x.reshape(-1, D) @ theirs.gate.weight.T, k)
        _close(sort_dispatch(x.reshape(-1, D), ours.experts, routing.expert_index, routing.gates).reshape(x.shape), want)


# -- modern blocks with our SwiGLU experts (lesson 10) ---------------------------------------------


def _copy_swiglu_experts(ours: Experts, gate_up: torch.Tensor, down: torch.Tensor) -> None:
    """Their stacked gate_up_proj (E, 2F, D) and down_proj (E, D, F) into our SwiGLU Experts."""
    f = ours.d_ff
    with torch.no_grad():
        ours.w_gate.copy_(gate_up[:, :f, :].transpose(1, 2))  # (E, D, F)
        ours.w_in.copy_(gate_up[:, f:, :].transpose(1, 2))  # (E, D, F)
        ours.w_out.copy_(down.transpose(1, 2))  # (E, F, D)


def _copy_shared_mlp(ours: Experts, mlp: nn.Module) -> None:
    """Their one shared MLP of width K_s·F into our K_s shared experts of width F."""
    f = ours.d_ff
    with torch.no_grad():
        for s in range(ours.num_experts):
            rows = slice(s * f, (s + 1) * f)
            ours.w_gate[s].copy_(mlp.gate_proj.weight[rows].T)
            ours.w_in[s].copy_(mlp.up_proj.weight[rows].T)
            ours.w_out[s].copy_(mlp.down_proj.weight[:, rows].T)


@pytest.mark.parametrize("router", ["mixtral", "top_k"])
@pytest.mark.parametrize("k", [1, 2])
def test_hf_mixtral_block_equals_our_layer_with_our_swiglu_experts(router, k):
    config = transformers.MixtralConfig(
        hidden_size=D, intermediate_size=F_, num_local_experts=E, num_experts_per_tok=k, router_jitter_noise=0.0
    )
    theirs = mixtral_mod.MixtralSparseMoeBlock(config).eval()
    _randomise(theirs, 11)
    ours = MoELayer(MoEConfig(D, F_, E, top_k=k, router=router, activation="swiglu", bias=False)).eval()
    with torch.no_grad():
        ours.w_router.copy_(theirs.gate.weight.T)
    _copy_swiglu_experts(ours.experts, theirs.experts.gate_up_proj, theirs.experts.down_proj)
    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        _close(ours(x).y, theirs(x.clone()))


def _deepseek_pair(k: int, shared: int, renormalize: bool, seed: int = 0, num_experts: int = 8):
    config = transformers.DeepseekV3Config(
        hidden_size=D,
        moe_intermediate_size=F_,
        n_routed_experts=num_experts,
        num_experts_per_tok=k,
        n_shared_experts=shared,
        n_group=1,
        topk_group=1,
        norm_topk_prob=renormalize,
        routed_scaling_factor=1.0,
        hidden_act="silu",
    )
    theirs = deepseek_mod.DeepseekV3MoE(config).eval()
    _randomise(theirs, seed)
    bias = torch.randn(num_experts, generator=torch.Generator().manual_seed(seed + 100)) * 0.3
    ours = MoELayer(
        MoEConfig(
            D,
            F_,
            num_experts,
            top_k=k,
            router="sigmoid",
            renormalize=renormalize,
            num_shared_experts=shared,
            activation="swiglu",
            bias=False,
        )
    ).eval()
    with torch.no_grad():
        theirs.gate.e_score_correction_bias.copy_(bias)
        ours.expert_bias.copy_(bias)
        ours.w_router.copy_(theirs.gate.weight.T)
    _copy_swiglu_experts(ours.experts, theirs.experts.gate_up_proj, theirs.experts.down_proj)
    _copy_shared_mlp(ours.shared_experts, theirs.shared_experts)
    return theirs, ours


@pytest.mark.parametrize("renormalize", [True, False])
def test_hf_deepseek_v3_gate_selects_by_score_plus_bias_and_weighs_by_score(renormalize):
    theirs, ours = _deepseek_pair(k=3, shared=1, renormalize=renormalize, seed=13)
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        logits, weights, indices = theirs.gate(x)
        out = ours(x)
        _close(out.router_logits, logits)
        # their top-k is unsorted: compare each token's chosen set, and the weight of each chosen expert
        assert torch.equal(out.expert_index.sort(-1).values, indices.sort(-1).values)
        _close(torch.zeros(18, 8).scatter(-1, out.expert_index, out.gates), torch.zeros(18, 8).scatter(-1, indices, weights))
        unbiased = torch.sigmoid(out.router_logits).topk(3, dim=-1).indices.sort(-1).values  # the bias really moved some choices
        assert not torch.equal(out.expert_index.sort(-1).values, unbiased)


@pytest.mark.parametrize("shared", [1, 2])
def test_hf_deepseek_v3_moe_block_equals_our_layer_with_shared_experts(shared):
    theirs, ours = _deepseek_pair(k=2, shared=shared, renormalize=True, seed=15)
    x = torch.randn(2, 8, D, generator=torch.Generator().manual_seed(16))
    with torch.no_grad():
        _close(ours(x).y, theirs(x.clone()))


def _qwen2_pair(k: int, shared: int, renormalize: bool, seed: int):
    config = transformers.Qwen2MoeConfig(
        hidden_size=D,
        moe_intermediate_size=F_,
        shared_expert_intermediate_size=shared * F_,
        num_experts=E,
        num_experts_per_tok=k,
        norm_topk_prob=renormalize,
        hidden_act="silu",
    )
    theirs = qwen2_moe_mod.Qwen2MoeSparseMoeBlock(config).eval()
    _randomise(theirs, seed)
    ours = MoELayer(
        MoEConfig(
            D,
            F_,
            E,
            top_k=k,
            router="top_k",
            renormalize=renormalize,
            num_shared_experts=shared,
            shared_expert_gate=True,
            activation="swiglu",
            bias=False,
        )
    ).eval()
    with torch.no_grad():
        ours.w_router.copy_(theirs.gate.weight.T)
        ours.w_shared_gate.copy_(theirs.shared_expert_gate.weight.T)  # (D, 1)
    _copy_swiglu_experts(ours.experts, theirs.experts.gate_up_proj, theirs.experts.down_proj)
    _copy_shared_mlp(ours.shared_experts, theirs.shared_expert)
    return theirs, ours


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("shared", [1, 2])
def test_hf_qwen2_moe_block_with_a_gated_shared_expert_equals_our_layer(renormalize, shared):
    theirs, ours = _qwen2_pair(k=2, shared=shared, renormalize=renormalize, seed=17)
    x = torch.randn(2, 8, D, generator=torch.Generator().manual_seed(18))
    with torch.no_grad():
        _close(ours(x).y, theirs(x.clone()))
        _, weights, indices = theirs.gate(x.reshape(-1, D))
        out = ours(x)
        assert torch.equal(out.expert_index, indices)
        _close(out.gates, weights)


def test_hf_qwen2_moe_balance_loss_over_layers_is_k_times_ours_over_all_their_tokens():
    g = torch.Generator().manual_seed(19)
    layers = tuple(torch.randn(12, E, generator=g) for _ in range(3))  # (N, E) per layer
    theirs = qwen2_moe_mod.load_balancing_loss_func(layers, E, top_k=2)
    every = torch.cat(layers)  # (3·N, E)
    routing = top_k_routing(every, 2)
    _close(2 * load_balancing_loss(routing.router_probs, routing.expert_index), theirs)


@pytest.mark.parametrize("renormalize", [False, True])
def test_hf_olmoe_block_equals_our_layer(renormalize):
    num_experts, k = 16, 4
    config = transformers.OlmoeConfig(
        hidden_size=D,
        intermediate_size=F_,
        num_experts=num_experts,
        num_experts_per_tok=k,
        norm_topk_prob=renormalize,
        hidden_act="silu",
    )
    theirs = olmoe_mod.OlmoeSparseMoeBlock(config).eval()
    _randomise(theirs, 20)
    ours = MoELayer(
        MoEConfig(D, F_, num_experts, top_k=k, router="top_k", renormalize=renormalize, activation="swiglu", bias=False)
    ).eval()
    with torch.no_grad():
        ours.w_router.copy_(theirs.gate.weight.T)
    _copy_swiglu_experts(ours.experts, theirs.experts.gate_up_proj, theirs.experts.down_proj)
    x = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(21))
    with torch.no_grad():
        _close(ours(x).y, theirs(x.clone()))
