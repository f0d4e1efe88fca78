from __future__ import annotations

import pytest
import torch

from moe_course.dispatch import expert_choice_dispatch, sort_dispatch
from moe_course.experts import Experts
from moe_course.routing import capacity_mask, expert_choice_routing, top_k_routing

from helpers import loop_reference


def _setup(n=10, d=4, e=3, k=2, seed=0):
    torch.manual_seed(seed)
    experts = Experts(e, d, 8)
    x = torch.randn(n, d)
    routing = top_k_routing(torch.randn(n, e), k)
    return x, experts, routing


@pytest.mark.parametrize("k", [1, 2, 3])
def test_sort_dispatch_equals_a_per_token_loop(k):
    x, experts, r = _setup(k=k)
    y = sort_dispatch(x, experts, r.expert_index, r.gates)
    assert y.shape == x.shape
    torch.testing.assert_close(y, loop_reference(x, experts, r.expert_index, r.gates))


def test_sort_dispatch_dropped_assignments_contribute_nothing():
    x, experts, r = _setup(n=12, k=2)
    keep = capacity_mask(r.expert_index, 3, capacity=3).keep
    assert not keep.all() and keep.any()
    y = sort_dispatch(x, experts, r.expert_index, r.gates, keep)
    torch.testing.assert_close(y, loop_reference(x, experts, r.expert_index, r.gates, keep))
    fully_dropped = ~keep.any(-1)
    assert fully_dropped.any()
    assert torch.all(y[fully_dropped] == 0)


def test_sort_dispatch_with_nothing_kept_is_zero():
    x, experts, r = _setup()
    y = sort_dispatch(x, experts, r.expert_index, r.gates, torch.zeros_like(r.expert_index, dtype=torch.bool))
    assert torch.equal(y, torch.zeros_like(x))


def test_sort_dispatch_gradients_reach_gates_experts_and_input():
    x, experts, r = _setup()
    x.requires_grad_()
    gates = r.gates.clone().requires_grad_()
    sort_dispatch(x, experts, r.expert_index, gates).pow(2).sum().backward()
    assert gates.grad.abs().min() > 0 and x.grad.abs().sum() > 0
    assert experts.w_in.grad.abs().sum() > 0


def test_sort_dispatch_rejects_mismatched_shapes():
    x, experts, r = _setup()
    with pytest.raises(ValueError, match=r"must both be \(N, K\) with N=9"):
        sort_dispatch(x[:9], experts, r.expert_index, r.gates)
    with pytest.raises(ValueError, match="keep must be a bool tensor"):
        sort_dispatch(x, experts, r.expert_index, r.gates, torch.ones(10, 2))


def test_expert_choice_dispatch_equals_a_loop():
    torch.manual_seed(0)
    experts = Experts(3, 4, 8)
    x = torch.randn(10, 4)
    r = expert_choice_routing(torch.randn(10, 3), capacity=4)
    y = expert_choice_dispatch(x, experts, r.token_index, r.gates)
    want = torch.zeros_like(x)
    for e in range(3):
        for c in range(4):
            t = int(r.token_index[e, c])
            want[t] += r.gates[e, c] * experts.expert_output(e, x[t : t + 1])[0]
    torch.testing.assert_close(y, want)
    assert torch.all(y[r.experts_per_token == 0] == 0)


# --- the competing implementations (lesson 06, moe_course.bench) ----------------------

from moe_course.dispatch import DEFAULT_METHOD, METHODS, dispatch, onehot_einsum  # noqa: E402


def _grads(method, x, experts, expert_index, gates, keep):
    """Output and gradients for input, gates (the router's path) and every expert parameter."""
    x = x.detach().clone().requires_grad_()
    gates = gates.detach().clone().requires_grad_()
    experts.zero_grad(set_to_none=True)
    y = METHODS[method](x, experts, expert_index, gates, keep)
    weights = torch.linspace(-1, 1, y.numel()).reshape(y.shape)  # a non-trivial upstream gradient
    (y * weights).sum().backward()
    grads = {"y": y.detach(), "x": x.grad, "gates": gates.grad}
    for name, p in experts.named_parameters():
        grads[name] = p.grad if p.grad is not None else torch.zeros_like(p)
    return grads


def _case(name: str, seed: int = 0):
    """(x, experts, expert_index, gates, keep) for a named routing situation."""
    g = torch.Generator().manual_seed(seed)
    n, d, f, e = 24, 8, 16, 4
    torch.manual_seed(seed)
    experts = Experts(e, d, f)
    x = torch.randn(n, d, generator=g)
    k = 2 if "top2" in name else 1
    logits = torch.randn(n, e, generator=g)
    if "empty_expert" in name:
        logits[:, 3] = -1e4  # expert 3 receives no tokens
    if "one_expert" in name:
        logits[:, 1] = 1e4  # every token's first choice is expert 1
    routing = top_k_routing(logits, k)
    keep = capacity_mask(routing.expert_index, e, capacity=4).keep if "capacity" in name else None
    return x, experts, routing.expert_index, routing.gates, keep


CASES = [
    "top1",
    "top2",
    "top1_capacity",
    "top2_capacity",
    "top1_empty_expert",
    "top2_empty_expert",
    "top1_one_expert",
    "top1_one_expert_capacity",
    "top2_one_expert_capacity",
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_implementation_gives_the_same_outputs_and_gradients(method, case):
    x, experts, expert_index, gates, keep = _case(case)
    if keep is not None:
        assert not keep.all(), "the capacity cases must drop something"
    reference = _grads("masks_loop", x, experts, expert_index, gates, keep)
    got = _grads(method, x, experts, expert_index, gates, keep)
    assert reference["x"].abs().sum() > 0 and reference["w_in"].abs().sum() > 0
    for key, want in reference.items():
        torch.testing.assert_close(got[key], want, atol=1e-5, rtol=1e-4, msg=f"{method}, {case}: {key} differs")
    # and all of it equals the readable reference built on expert_output
    torch.testing.assert_close(got["y"], sort_dispatch(x, experts, expert_index, gates, keep), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_dropped_tokens_get_zero_and_empty_experts_get_no_gradient(method):
    x, experts, expert_index, gates, keep = _case("top1_one_expert_capacity")
    grads = _grads(method, x, experts, expert_index, gates, keep)
    dropped = ~keep.any(-1)
    assert dropped.sum() == 20 and torch.all(grads["y"][dropped] == 0)
    unused = [e for e in range(4) if not ((expert_index == e) & keep).any()]
    assert unused and all(grads["w_in"][e].abs().sum() == 0 for e in unused)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_nothing_kept_gives_zeros(method):
    x, experts, expert_index, gates, _ = _case("top2")
    y = METHODS[method](x, experts, expert_index, gates, torch.zeros_like(expert_index, dtype=torch.bool))
    assert torch.equal(y, torch.zeros_like(x))


def test_onehot_einsum_honours_an_explicit_capacity():
    x, experts, expert_index, gates, _ = _case("top1_one_expert")
    keep = capacity_mask(expert_index, 4, capacity=3).keep
    torch.testing.assert_close(
        onehot_einsum(x, experts, expert_index, gates, capacity=3), sort_dispatch(x, experts, expert_index, gates, keep)
    )


def test_grouped_mm_survives_a_stride_zero_gradient():
    """y.sum().backward() hands grouped_mm an expanded gradient, which its CPU backward rejects unless made contiguous."""
    x, experts, expert_index, gates, _ = _case("top1")
    experts16 = Experts(4, 16, 32)
    x16 = torch.randn(24, 16, requires_grad=True)
    METHODS["grouped_mm"](x16, experts16, expert_index, gates).sum().backward()
    assert x16.grad is not None and experts16.w_in.grad.abs().sum() > 0


def test_dispatch_picks_the_default_and_rejects_unknown_methods():
    assert DEFAULT_METHOD in METHODS and DEFAULT_METHOD != "onehot_einsum"  # never the (N, E, C) path
    x, experts, expert_index, gates, _ = _case("top1")
    torch.testing.assert_close(
        dispatch(x, experts, expert_index, gates), METHODS[DEFAULT_METHOD](x, experts, expert_index, gates)
    )
    with pytest.raises(ValueError, match="unknown dispatch method"):
        dispatch(x, experts, expert_index, gates, method="magic")


def test_stacked_implementations_need_stacked_experts_and_matching_shapes():
    x, experts, expert_index, gates, _ = _case("top1")
    with pytest.raises(TypeError, match="stacked"):
        METHODS["sort_split"](x, object(), expert_index, gates)
    with pytest.raises(ValueError, match="x must have shape"):
        METHODS["sort_split"](x[:, :3], experts, expert_index, gates)
    with pytest.raises(ValueError, match="keep must be a bool"):
        METHODS["sort_split"](x, experts, expert_index, gates, keep=torch.ones_like(expert_index))


def test_dispatch_runs_any_expert_bank_through_the_reference():
    x, experts, expert_index, gates, _ = _case("top2")

    class Bank:
        num_experts = 4

        def expert_output(self, e, t):
            return experts.expert_output(e, t) * 2

    torch.testing.assert_close(dispatch(x, Bank(), expert_index, gates), 2 * dispatch(x, experts, expert_index, gates))


def test_sort_by_expert_is_stable_and_counts_idle_experts():
    order, counts = __import__("moe_course.dispatch", fromlist=["x"]).sort_by_expert(torch.tensor([2, 0, 2, 1, 0]), 4)
    assert order.tolist() == [1, 4, 3, 0, 2] and counts.tolist() == [2, 1, 2, 0]


def test_combine_rows_sums_top2_and_leaves_dropped_tokens_at_zero():
    from moe_course.dispatch import combine_rows

    y_sorted = torch.tensor([[1.0], [2.0], [4.0]])
    out = combine_rows(y_sorted, torch.tensor([2, 0, 2]), torch.tensor([0.5, 1.0, 0.25]), num_tokens=4)
    assert out.squeeze(1).tolist() == [2.0, 0.0, 1.5, 0.0]


def test_slot_positions_count_earlier_tokens_of_the_same_expert():
    from moe_course.dispatch import slot_positions

    assert slot_positions(torch.tensor([1, 0, 1, 1, 0, 2]), 3).tolist() == [0, 0, 1, 2, 1, 0]
    keep = capacity_mask(torch.tensor([[1], [0], [1], [1], [0], [2]]), 3, capacity=2).keep.squeeze(1)
    assert torch.equal(keep, slot_positions(torch.tensor([1, 0, 1, 1, 0, 2]), 3) < 2)


@pytest.mark.parametrize("activation,bias", [("gelu", True), ("relu", False)])
def test_sort_split_hand_written_backward_matches_finite_differences(activation, bias):
    from moe_course.dispatch import sort_split

    torch.manual_seed(0)
    experts = Experts(4, 3, 5, activation=activation, bias=bias).double()
    x = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    expert_index = torch.tensor([[0, 2], [2, 0], [0, 1], [1, 2], [2, 1], [0, 2], [1, 0], [2, 0], [0, 1]])  # expert 3 idle
    gates = torch.rand(9, 2, dtype=torch.float64, requires_grad=True)
    keep = torch.ones(9, 2, dtype=torch.bool)
    keep[4, 0] = False  # a dropped assignment
    keep[7, :] = False  # a token dropped entirely
    params = [p for p in (experts.w_in, experts.b_in, experts.w_out, experts.b_out) if p is not None]

    assert torch.autograd.gradcheck(lambda x, g: sort_split(x, experts, expert_index, g, keep), (x, gates))

    def loss() -> torch.Tensor:
        return sort_split(x, experts, expert_index, gates, keep).pow(2).sum()

    grads = torch.autograd.grad(loss(), params)
    eps = 1e-6
    with torch.no_grad():
        for p, grad in zip(params, grads):
            numeric = torch.zeros_like(p).view(-1)
            flat = p.view(-1)
            for i in range(flat.numel()):
                old = flat[i].item()
                flat[i] = old + eps
                up = loss()
                flat[i] = old - eps
                down = loss()
                flat[i] = old
                numeric[i] = (up - down) / (2 * eps)
            assert torch.allclose(grad, numeric.view_as(p), atol=1e-6), f"the gradient of a {tuple(p.shape)} weight differs"
    assert grads[0][3].abs().sum() == 0 and grads[0][:3].abs().sum() > 0  # the idle expert's gradient is zero
