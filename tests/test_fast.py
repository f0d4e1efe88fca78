"""The fast path computes what the readable core computes: router product, activations, the flag, saved tensors."""

import pytest
import torch
import torch.nn.functional as F

from moe_course import fast
from moe_course.dispatch import METHODS, sort_dispatch, sort_split
from moe_course.experts import ACTIVATIONS, Experts
from moe_course.fast import router_matmul, sorted_experts
from moe_course.fast.activations import ACTIVATION_GRADS
from moe_course.routing import capacity_mask, top_k_routing

from helpers import outputs_and_grads, randn, small_layer

_layer, _x = small_layer, randn


@pytest.mark.parametrize("n,d,e", [(37, 8, 4), (40, 16, 8), (33, 8, 16), (5, 3, 1)])
def test_router_matmul_has_the_value_and_gradients_of_x_at_w(n, d, e):
    """The few-experts product (and plain x @ w from 16 experts on) agrees with autograd's x @ w."""
    x = _x(n, d, seed=2).double().requires_grad_()
    w = _x(d, e, seed=3).double().requires_grad_()
    dlogits = _x(n, e, seed=4).double()
    logits = router_matmul(x, w)
    assert logits.shape == (n, e) and (logits.is_contiguous() or logits.t().is_contiguous())  # few experts: (E, N) transposed
    dx, dw = torch.autograd.grad(logits, (x, w), dlogits)
    ref_x, ref_w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = ref_x @ ref_w
    ref.backward(dlogits)
    torch.testing.assert_close(logits, ref)
    torch.testing.assert_close(dx, ref_x.grad)
    torch.testing.assert_close(dw, ref_w.grad)
    assert torch.autograd.gradcheck(
        router_matmul, (x[:6, :4].detach().clone().requires_grad_(), w[:4].detach().clone().requires_grad_())
    )


def test_router_matmul_with_a_frozen_weight_still_gives_x_its_gradient_and_leaves_a_contiguous_weight_grad():
    layer = _layer(num_experts=8)
    x = _x(20, 8)
    layer(x).y.sum().backward()  # x needs no gradient here
    assert layer.w_router.grad.is_contiguous() and layer.w_router.grad.abs().sum() > 0
    x = _x(20, 8).requires_grad_()
    with torch.no_grad():
        layer.w_router.requires_grad_(False)
    try:
        router_matmul(x, layer.w_router).sum().backward()
    finally:
        layer.w_router.requires_grad_(True)
    torch.testing.assert_close(x.grad, layer.w_router.sum(1).expand(20, 8))


# -- equivalences ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_activation_has_the_forward_and_the_derivative_autograd_gives(name):
    """Each activation of ACTIVATIONS is in the fast table, with the same forward and grad · act'(pre) equal to autograd's."""
    assert name in ACTIVATION_GRADS, f"{name!r} is in experts.ACTIVATIONS but has no derivative in fast.activations"
    act, backward = ACTIVATION_GRADS[name]
    pre = torch.linspace(-4, 4, 401, dtype=torch.float64).reshape(1, -1).repeat(3, 1).requires_grad_()
    grad = _x(3, 401, seed=5).double()
    torch.testing.assert_close(act(pre), ACTIVATIONS[name](pre))
    (want,) = torch.autograd.grad(ACTIVATIONS[name](pre), pre, grad)
    torch.testing.assert_close(backward(grad, pre.detach()), want)


def _routing(n=30, e=4, k=2, capacity=9, seed=0):
    logits = _x(n, e, seed=seed)
    routing = top_k_routing(logits, k)
    keep = capacity_mask(routing.expert_index, e, capacity).keep
    return routing.expert_index, routing.gates, keep


def test_an_activation_without_a_derivative_runs_the_readable_dispatch(monkeypatch):
    """Add "silu" to ACTIVATIONS only: the fast methods must not give it another activation's gradient."""
    monkeypatch.setitem(ACTIVATIONS, "silu", F.silu)
    torch.manual_seed(0)
    experts = Experts(4, 8, 16, activation="silu")
    x = _x(30, 8)
    expert_index, gates, keep = _routing()
    assert not fast.applies(x, experts.w_in, gates, activation="silu")
    want = outputs_and_grads(METHODS["masks_loop"], x, experts, expert_index, gates, keep)
    for name in ("sort_split", "grouped_mm"):
        got = outputs_and_grads(METHODS[name], x, experts, expert_index, gates, keep)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_switching_the_fast_path_off_changes_no_output_or_gradient():
    torch.manual_seed(0)
    experts = Experts(4, 8, 16)
    x = _x(30, 8)
    expert_index, gates, keep = _routing()
    want = outputs_and_grads(sort_split, x, experts, expert_index, gates, keep)
    calls = []
    with fast.enabled(False):
        assert not fast.applies(x)
        got = outputs_and_grads(lambda *a: calls.append(1) or sort_split(*a), x, experts, expert_index, gates, keep)
        torch.testing.assert_close(router_matmul(x, experts.w_in[0]), x @ experts.w_in[0])
    assert fast.applies(x) and calls
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[0], sort_dispatch(x, experts, expert_index, gates, keep).detach(), atol=1e-5, rtol=1e-4)


def _tensors_in(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_in(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors_in(v)]
    return []


@pytest.mark.parametrize("arrangement", ["grouped", "batched", "blocked"])
def test_sorted_experts_keeps_its_activations_with_save_for_backward(monkeypatch, arrangement):
    """No tensor hangs on the autograd context as a plain attribute: all of them go through save_for_backward."""
    if arrangement == "grouped" and not sorted_experts.HAS_GROUPED_MM:
        pytest.skip("this torch has no grouped_mm")
    all_rows = arrangement != "blocked"
    monkeypatch.setattr(sorted_experts, "BATCHED_ELEMENTS", 2**40 if all_rows else 0)
    monkeypatch.setattr(sorted_experts, "GROUPED", arrangement == "grouped")
    torch.manual_seed(0)
    experts = Experts(4, 8, 16)
    x = _x(30, 8).requires_grad_()
    expert_index, gates, keep = _routing(capacity=30)
    y = sort_split(x, experts, expert_index, gates, None)
    ctx = y.grad_fn
    assert type(ctx).__name__ == "_SortedExpertsBackward"
    assert _tensors_in(vars(ctx)) == []
    busy = int((torch.bincount(expert_index.reshape(-1), minlength=4) > 0).sum())
    assert ctx.arrangement == arrangement
    # xs, gate, w_in, w_out, token, expert, inverse; then pre, h, out of all rows (batched) or per busy expert (blocked)
    assert len(ctx.saved_tensors) == 7 + (3 if all_rows else 3 * busy)


@pytest.mark.parametrize("bias", [True, False])
def test_swiglu_experts_run_the_readable_dispatch_with_the_gradients_autograd_gives(bias):
    """The fast ops know two matrices per expert; gated (SwiGLU) experts must fall back, with every gradient right."""
    torch.manual_seed(0)
    experts = Experts(4, 8, 16, activation="swiglu", bias=bias)
    x = _x(30, 8)
    expert_index, gates, keep = _routing()
    assert not fast.applies(x, experts.w_in, gates, activation="swiglu")

    def by_autograd(x, experts, expert_index, gates, keep):  # token by token through expert_output, plain autograd
        y = torch.zeros_like(x)
        for n in range(x.shape[0]):
            for j in range(expert_index.shape[1]):
                if keep[n, j]:
                    y = y.index_add(
                        0, torch.tensor([n]), gates[n, j] * experts.expert_output(int(expert_index[n, j]), x[n : n + 1])
                    )
        return y

    want = outputs_and_grads(by_autograd, x, experts, expert_index, gates, keep)
    assert len(want) == 3 + (6 if bias else 3)  # y, x, gates and every parameter, the gate's too
    for name in ("sort_split", "grouped_mm", "masks_loop", "padded_bmm", "onehot_einsum"):
        got = outputs_and_grads(METHODS[name], x, experts, expert_index, gates, keep)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
