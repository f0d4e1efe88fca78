"""The fused Switch layer, the router softmax and the busy-machine arrangement compute what the readable layer computes.

Each fast path is compared with the readable one on the same weights and
input: every ``MoEOutput`` field, and the gradients of a loss that uses every
differentiable output, for the input and every parameter. Each test also
checks that the fast path really ran (else it would compare the readable
layer with itself and could not fail).
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moe_course import fast
from moe_course.fast import fused_switch, grouped_blocks, shared_cores, sorted_experts
from moe_course.fast.activations import ACTIVATION_GRADS
from moe_course.fast.router_matmul import FEW_EXPERTS

from helpers import randn, small_layer

DIFFERENTIABLE = ("y", "router_loss", "aux_loss", "z_loss", "router_logits", "router_probs", "gates")


def _run(layer, x, **readable):
    """Every output field, and the gradients of a fixed weighting of every differentiable one for x and the parameters.

    ``readable``: config fields to change for this call (e.g. dispatch="masks_loop", which the fused op never takes).
    """
    saved = layer.config
    layer.config = dataclasses.replace(saved, **readable)
    try:
        x = x.detach().clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        out = layer(x)
        loss = 0
        for i, name in enumerate(DIFFERENTIABLE):
            value = getattr(out, name)
            loss = loss + (value * torch.linspace(-1, 1 + i, value.numel()).reshape(value.shape)).sum()
        loss.backward()
    finally:
        layer.config = saved
    fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
    grads = {"x": x.grad} | {name: p.grad for name, p in layer.named_parameters()}
    return fields, grads


def _assert_same(got, want):
    for part_got, part_want in zip(got, want):
        assert part_got.keys() == part_want.keys()
        for name, value in part_want.items():
            if isinstance(value, torch.Tensor):
                assert part_got[name] is not None, name
                torch.testing.assert_close(part_got[name].detach(), value.detach(), atol=1e-5, rtol=1e-4, msg=name)
            else:
                assert part_got[name] == value, name


def _fused_calls(monkeypatch) -> list:
    calls = []
    real = fused_switch._SwitchLayer.apply
    monkeypatch.setattr(fused_switch._SwitchLayer, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("experts", [2, FEW_EXPERTS - 1, FEW_EXPERTS + 4])  # the (E, N) layout, and the (N, E) one
@pytest.mark.parametrize("capacity_factor", [None, 1.0, 0.5], ids=["dropless", "cf1", "cf0.5"])
@pytest.mark.parametrize(
    "activation,bias,arrangement",
    [("gelu", True, "grouped"), ("relu", False, "grouped"), ("gelu", True, "batched"), ("relu", False, "blocked")],
)
@pytest.mark.parametrize("carry", [True, False], ids=["carry", "compact"])
def test_fused_switch_layer_gives_every_output_and_gradient_of_the_readable_layer(
    monkeypatch, experts, capacity_factor, activation, bias, arrangement, carry
):
    if arrangement == "grouped" and not grouped_blocks.HAS_GROUPED_MM:
        pytest.skip("this torch has no grouped_mm")
    monkeypatch.setattr(sorted_experts, "BATCHED_ELEMENTS", 0 if arrangement == "blocked" else 2**40)
    monkeypatch.setattr(sorted_experts, "GROUPED", arrangement == "grouped")
    monkeypatch.setattr(fused_switch, "CARRY_FLOPS", 2**62 if carry else 0)  # dropped rows carried with gate 0, or compacted
    chosen, rows = [], []

    def record(xs, *a):
        rows.append(xs.shape[0])
        chosen.append(sorted_experts.arrangement(xs, *a))
        return chosen[-1]

    monkeypatch.setattr(fused_switch, "arrangement", record)
    layer = small_layer(num_experts=experts, capacity_factor=capacity_factor, activation=activation, bias=bias).train()
    x = randn(3, 20, 8, seed=2)
    calls = _fused_calls(monkeypatch)
    got = _run(layer, x)
    assert calls, "the fused op did not run"
    assert chosen == [arrangement]
    calls.clear()
    want = _run(layer, x, dispatch="masks_loop")  # the readable forward, masks loop dispatch
    assert not calls
    if capacity_factor == 0.5:
        assert int(want[0]["num_dropped"]) > 0  # the case with drops really drops
        assert (rows == [60]) is carry  # carried: every one of the 60 rows; compacted: only the kept ones
    _assert_same(got, want)


@pytest.mark.parametrize("experts", [4, FEW_EXPERTS + 4])  # both layouts of the router's tensors
@pytest.mark.parametrize("capacity_factor", [None, 1.0, 0.5], ids=["dropless", "cf1", "cf0.5"])
@pytest.mark.parametrize("used", ["y+router_loss", "y", "router_loss", "y+aux"])
def test_fused_switch_layer_gives_the_gradients_of_the_readable_layer_when_only_some_outputs_are_used(
    monkeypatch, experts, capacity_factor, used
):
    """Only some outputs reach the loss (as in training: y and the router loss): the others' gradients are None
    inside the op, and its backward takes the shortcut that never builds the gradient at every probability."""
    layer = small_layer(num_experts=experts, capacity_factor=capacity_factor).train()
    x = randn(40, 8, seed=3)
    calls = _fused_calls(monkeypatch)
    grads = []
    for readable in ({}, {"dispatch": "masks_loop"}):
        layer.config = dataclasses.replace(layer.config, **readable)
        layer.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        out = layer(xg)
        loss = {
            "y+router_loss": lambda: out.y.square().sum() + out.router_loss,
            "y": lambda: out.y.square().sum(),
            "router_loss": lambda: 10 * out.router_loss,
            "y+aux": lambda: out.y.square().sum() + out.aux_loss,
        }[used]()
        loss.backward()
        grads.append([xg.grad] + [p.grad for p in layer.parameters()])
    assert len(calls) == 1
    for g, w in zip(*grads):
        if w is None:  # router_loss alone: the experts get no gradient either way
            assert g is None or not g.any()
            continue
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("change", ["top_k", "shared", "jitter", "dispatch", "replaced_router", "disabled", "swiglu", "float64"])
def test_fused_switch_layer_steps_aside_for_anything_but_the_plain_switch_layer(monkeypatch, change):
    overrides = {
        "top_k": dict(router="top_k", top_k=2),
        "shared": dict(num_shared_experts=1),
        "jitter": dict(router_jitter=0.1),
        "dispatch": dict(dispatch="masks_loop"),
        "swiglu": dict(activation="swiglu"),
    }.get(change, {})
    layer = small_layer(**overrides).train()
    x = randn(16, 8)
    if change == "float64":
        layer, x = layer.double(), x.double()
    if change == "replaced_router":
        layer.router = lambda tokens: tokens @ layer.w_router  # an instance's own step: the op must not skip it
    calls = _fused_calls(monkeypatch)
    with fast.enabled(change != "disabled"):
        layer(x)
    assert not calls
    plain = small_layer().train()
    plain(randn(16, 8))
    assert calls  # and the plain layer does take it


@pytest.mark.parametrize("experts", [3, FEW_EXPERTS, 40])
def test_router_softmax_has_the_value_and_gradient_of_softmax(experts):
    logits = randn(50, experts, seed=4).requires_grad_()
    probs = fast.softmax(logits)
    want_logits = logits.detach().clone().requires_grad_()
    want = F.softmax(want_logits, dim=-1)
    torch.testing.assert_close(probs, want)
    grad = randn(50, experts, seed=5)
    probs.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(logits.grad, want_logits.grad)
    # few experts: computed along the first dimension of the (E, N) transpose, so the result is that view
    assert probs.stride() == ((1, 50) if experts < FEW_EXPERTS else (experts, 1))


def test_contended_counts_other_programs_tasks_against_the_cores():
    assert not shared_cores.contended(2, cores=2, threads=2)  # our two threads alone
    assert shared_cores.contended(4, cores=2, threads=2)  # two more tasks want the two cores
    assert not shared_cores.contended(9, cores=2, threads=1)  # one thread waits for nobody
    assert not shared_cores.contended(None, cores=2, threads=2)  # unknown load counts as quiet


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_busy_follows_the_pin_of_contention(two_threads):
    with fast.contention(True):
        assert shared_cores.busy() and not shared_cores.busy(1)
        with fast.enabled(False):
            assert not shared_cores.busy()
    with fast.contention(False):
        assert not shared_cores.busy()


@pytest.mark.parametrize("experts", [4, 40])
@pytest.mark.parametrize("dispatch", [None, "masks_loop"], ids=["default", "masks_loop"])
def test_the_layer_on_a_busy_machine_gives_the_same_outputs_and_gradients_on_one_thread(
    two_threads, monkeypatch, experts, dispatch
):
    """contention(True): the layer's forward and backward run on one intra-op thread, the caller's count comes back."""
    from moe_course.fast import threads

    monkeypatch.setattr(threads, "MIN_BLOCK_FLOPS", 0)  # tiny experts still go to the one-thread workers
    layer = small_layer(num_experts=experts, dispatch=dispatch).train()
    x = randn(2, 40, 8, seed=6)
    seen = []  # the intra-op thread count inside the layer's forward (and, fused, its backward)

    def spy(real):
        return lambda *a: seen.append(torch.get_num_threads()) or real(*a)

    if dispatch == "masks_loop":
        monkeypatch.setattr(layer, "route", spy(layer.route))
    else:  # sort_split (fused or not) asks for its arrangement in the forward, for the activation's derivative in the backward
        monkeypatch.setattr(fused_switch, "arrangement", spy(fused_switch.arrangement))
        monkeypatch.setattr(sorted_experts, "arrangement", spy(sorted_experts.arrangement))
        forward, derivative = ACTIVATION_GRADS["gelu"]
        monkeypatch.setitem(ACTIVATION_GRADS, "gelu", (forward, spy(derivative)))
    calls = 2 if dispatch is None else 1
    with fast.contention(False):
        quiet = _run(layer, x)
    assert seen == [2] * calls
    seen.clear()
    with fast.contention(True):
        busy = _run(layer, x)
        assert torch.get_num_threads() == 2  # restored after the forward and the backward
    assert seen == [1] * calls
    _assert_same(busy, quiet)


def test_a_busy_backward_that_stops_inside_the_layer_still_restores_the_thread_count(two_threads):
    """autograd.grad for the experts' weights only never reaches the layer's input: the count comes back anyway."""
    layer = small_layer().train()
    x = randn(30, 8).requires_grad_()
    with fast.contention(True):
        out = layer(x)
        torch.autograd.grad(out.y.sum(), layer.experts.w_in)
        assert torch.get_num_threads() == 2
