"""Tests for moe_course.attention: causal self-attention, its mask, scale and softmax, RoPE."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_course.attention import (
    CausalSelfAttention,
    attention_scores,
    attention_weights,
    causal_mask,
    rotary_embedding,
    scaled_dot_product_attention,
)


def test_causal_mask_allows_the_past_and_the_present_only():
    m = causal_mask(4)
    assert m.dtype == torch.bool
    assert m.tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [True, True, True, False],
        [True, True, True, True],
    ]
    # queries at the end of a longer key sequence (e.g. new tokens after a cached prefix)
    r = causal_mask(2, 5)
    assert r.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    with pytest.raises(ValueError, match="at least as many keys"):
        causal_mask(5, 2)


def test_scores_are_scaled_by_one_over_sqrt_d():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 16, generator=g), torch.randn(5, 16, generator=g)
    assert torch.allclose(attention_scores(q, k), q @ k.T / 4.0)


def test_weights_softmax_over_keys_and_respect_the_mask():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 6, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    w = attention_weights(q, k, causal_mask(6))  # (2, 6, 6)
    assert torch.allclose(w.sum(-1), torch.ones(2, 6))  # every query's weights sum to 1 over keys
    assert (w.triu(1) == 0).all()  # nothing from the future
    assert torch.allclose(w[:, 0, 0], torch.ones(2))  # the first position can only see itself
    # the last query sees every key: a plain softmax of its scaled scores
    expected = torch.softmax((q[:, -1:] @ k.transpose(1, 2)) / math.sqrt(8), dim=-1)[:, 0]
    assert torch.allclose(w[:, -1], expected, atol=1e-6)


def test_explicit_attention_matches_pytorchs_reference():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) for _ in range(3))
    ours = scaled_dot_product_attention(q, k, v, causal_mask(7))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize("fast", [False, True])
def test_self_attention_is_causal(fast: bool):
    torch.manual_seed(0)
    attn = CausalSelfAttention(16, 4, fast=fast).eval()
    x = torch.randn(2, 10, 16)
    y = attn(x)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 4, 16)  # change the future of position 5
    y2 = attn(x2)
    assert torch.allclose(y[:, :6], y2[:, :6], atol=1e-6), "outputs before position 6 must not see positions 6..9"
    assert not torch.allclose(y[:, 6:], y2[:, 6:])
    x3 = x.clone()
    x3[:, 2] += 1.0  # change the past of positions 3..9
    assert not torch.allclose(attn(x3)[:, 3:], y[:, 3:]), "later positions must see earlier ones"


def test_fast_and_explicit_paths_compute_the_same_function_and_gradients():
    torch.manual_seed(0)
    slow = CausalSelfAttention(32, 4, fast=False)
    fast = CausalSelfAttention(32, 4, fast=True)
    fast.load_state_dict(slow.state_dict())
    x = torch.randn(3, 12, 32, requires_grad=True)
    y_slow, y_fast = slow(x), fast(x)
    assert torch.allclose(y_slow, y_fast, atol=1e-6)
    (g_slow,) = torch.autograd.grad(y_slow.square().sum(), x)
    (g_fast,) = torch.autograd.grad(y_fast.square().sum(), x)
    assert torch.allclose(g_slow, g_fast, atol=1e-5)


def test_weights_of_every_head_are_causal_rows_summing_to_one():
    torch.manual_seed(0)
    attn = CausalSelfAttention(16, 2)
    w = attn.weights(torch.randn(1, 5, 16))
    assert w.shape == (1, 2, 5, 5)
    assert torch.allclose(w.sum(-1), torch.ones(1, 2, 5)) and (w.triu(1) == 0).all()


def test_rotary_embedding_keeps_norms_and_makes_scores_depend_on_offsets_only():
    g = torch.Generator().manual_seed(3)
    T, d = 12, 8
    q = torch.randn(d, generator=g).expand(T, d)  # the same query at every position
    k = torch.randn(d, generator=g).expand(T, d)  # the same key at every position
    rq, rk = rotary_embedding(q), rotary_embedding(k)
    assert torch.allclose(rq.norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    assert torch.allclose(rq[0], q[0])  # position 0 is not rotated
    s = rq @ rk.T  # (T, T)
    for offset in range(4):
        diag = torch.diagonal(s, -offset)  # query at i, key at i - offset
        assert torch.allclose(diag, diag[0].expand_as(diag), atol=1e-5)
    assert not torch.allclose(s[5, 4], s[5, 1])
    with pytest.raises(ValueError, match="even"):
        rotary_embedding(torch.randn(3, 5))


def test_learned_positions_variant_has_no_rotation():
    torch.manual_seed(0)
    a, b = CausalSelfAttention(8, 2, rope=False), CausalSelfAttention(8, 2, rope=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 6, 8)
    assert torch.allclose(a(x)[:, 0], b(x)[:, 0], atol=1e-6)  # position 0 is the same either way
    assert not torch.allclose(a(x), b(x))


def test_bad_shapes_and_sizes_give_clear_errors():
    with pytest.raises(ValueError, match="divisible"):
        CausalSelfAttention(10, 3)
    with pytest.raises(ValueError, match="even head width"):
        CausalSelfAttention(12, 4)
    with pytest.raises(ValueError, match=r"\(B, T, 16\)"):
        CausalSelfAttention(16, 4)(torch.randn(4, 16))
