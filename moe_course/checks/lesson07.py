"""Checks for lesson 07: causal self-attention and the pre-norm transformer block."""

from __future__ import annotations

import math

import torch

from ..attention import causal_mask, scaled_dot_product_attention
from ..transformer import Block, GPTConfig
from ._core import Exercise, Mistake, _close, describe, exercise


def _attend(
    q,
    k,
    v,
    *,
    allowed: torch.Tensor | None,
    scale: float | None = None,
    dim: int = -1,
    fill: float = float("-inf"),
    weights_only: bool = False,
) -> torch.Tensor:
    """Attention with one knob turned: which keys are allowed, the scale, the softmax axis, the fill value."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ k.transpose(-2, -1) * scale  # (B, H, T, T)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, fill)
    w = torch.softmax(scores, dim=dim)  # (B, H, T, T)
    return w if weights_only else w @ v  # (B, H, T, d)


@exercise("7.1", "causal_attention")
def check_causal_attention(ex: Exercise, fn) -> str:
    g = ex.generator()
    # T != d in every case, so that the weights (B, H, T, T) cannot pass for the output (B, H, T, d)
    for b, h, t, d in [(2, 3, 5, 4), (1, 2, 7, 8), (3, 1, 1, 6), (2, 4, 12, 16)]:
        q, k, v = (torch.randn(b, h, t, d, generator=g) for _ in range(3))
        context = f"q, k, v of shape (B, H, T, d) = {(b, h, t, d)}"
        out = ex.call(fn, q, k, v)
        if isinstance(out, (tuple, list)):
            ex.fail(f"return only the output tensor (B, H, T, d); you returned a {describe(out)}.")
        ex.expect_tensor(out, name="the attention output", allow_nan=True)
        if t > 1 and out.shape == (b, h, t, t):
            if _close(out, _attend(q, k, v, allowed=causal_mask(t), weights_only=True), 1e-5, 1e-4):
                ex.fail(
                    f"you returned the attention weights (B, H, T, T); the output is the weighted sum of the values: weights @ v, shape (B, H, T, d).\n  ({context})"
                )
            ex.fail(
                f"the output has shape {tuple(out.shape)}, one column per key; it should be (B, H, T, d) = {(b, h, t, d)}: multiply the weights by v.\n  ({context})"
            )
        ex.expect_tensor(out, shape=(b, h, t, d), name="the attention output", allow_nan=True)
        with torch.no_grad():
            mask = causal_mask(t)  # (T, T) True where key j <= query i
            want = scaled_dot_product_attention(q, k, v, mask)
            no_diagonal = torch.ones(t, t, dtype=torch.bool).tril(-1)  # j < i: the token cannot see itself
            if (
                t > 1
                and _close(out[..., 1:, :], _attend(q, k, v, allowed=no_diagonal)[..., 1:, :], 1e-5, 1e-4)
                and not _close(out, want, 1e-5, 1e-4)
            ):
                ex.fail(
                    "mask off by one: each query must also see its own position (key j <= query i, the diagonal included). "
                    "You masked the diagonal too, so a token cannot look at itself and the first token has no key at all "
                    "(softmax over nothing but -inf gives NaN). Keep j <= i: torch.tril(..., diagonal=0), or mask where j > i."
                    f"\n  ({context})"
                )
            if torch.isnan(out).any():
                where = tuple(int(i) for i in torch.isnan(out).nonzero()[0])
                ex.fail(
                    f"the output contains NaN (first at index {where}). A softmax whose every score is -inf gives NaN: "
                    f"does every query keep at least one key (itself)?\n  ({context})"
                )
            d_scale = 1.0 / d
            mistakes = [
                Mistake(
                    _attend(q, k, v, allowed=None),
                    "the causal mask is missing: every query also looks at the future. "
                    "Set the scores of keys j > i to -inf before the softmax, so that position i sees only positions 0..i.",
                ),
                Mistake(
                    _attend(q, k, v, allowed=torch.ones(t, t, dtype=torch.bool).tril(1)),
                    "mask off by one: each query may also see one future key (j = i + 1). Allow exactly the keys j <= i "
                    "(torch.tril with diagonal=0).",
                ),
                Mistake(
                    _attend(q, k, v, allowed=mask.T),
                    "the mask is the wrong way round: each query sees itself and the "
                    "future (j >= i) instead of itself and the past (j <= i). Use the lower triangle (torch.tril), or mask where j > i.",
                ),
                Mistake(
                    _attend(q, k, v, allowed=mask, scale=1.0),
                    "the 1/sqrt(d) scale is missing: divide the scores q·kᵀ by "
                    f"sqrt(d) = sqrt({d}) before the softmax, so their spread does not grow with the head width.",
                ),
                Mistake(
                    _attend(q, k, v, allowed=mask, scale=d_scale),
                    f"you scaled the scores by 1/d = 1/{d}; the scale is "
                    f"1/sqrt(d) = 1/sqrt({d}) (a dot product of d unit-variance terms has standard deviation sqrt(d)).",
                ),
                Mistake(
                    _attend(q, k, v, allowed=mask, scale=math.sqrt(d)),
                    f"you multiplied the scores by sqrt(d); divide them by sqrt(d) = sqrt({d}) instead.",
                ),
                Mistake(
                    _attend(q, k, v, allowed=mask, dim=-2),
                    "the softmax ran over the queries (dim=-2); it must run over "
                    "the keys (dim=-1), so that each query's weights over the keys it may see sum to 1.",
                ),
                Mistake(
                    _attend(q, k, v, allowed=mask, fill=0.0),
                    "masked scores were set to 0, not -inf: exp(0) = 1, so the "
                    "future still gets weight. Fill the masked scores with float('-inf') before the softmax.",
                ),
                Mistake(
                    _attend(q, k, v, allowed=None, weights_only=True) * mask @ v,
                    "the mask was applied after the softmax: "
                    "zeroing weights afterwards leaves rows that no longer sum to 1. Mask the scores with -inf before the softmax.",
                ),
                Mistake(
                    _attend(q, k, v, allowed=mask, scale=1.0 / math.sqrt(t)),
                    f"you scaled the scores by 1/sqrt(T) (T = {t} positions); "
                    f"the scale is 1/sqrt(d), the width of a head (d = {d}).",
                ),
                Mistake(
                    _attend(k, q, v, allowed=mask),
                    "q and k are swapped: the scores are q @ kᵀ (row i: query i against every key), not k @ qᵀ.",
                ),
                Mistake(
                    _attend(q, k, q, allowed=mask),
                    "the weights multiply q; the output is the weighted sum of the *values*: weights @ v.",
                ),
                Mistake(
                    (v.transpose(-2, -1) @ _attend(q, k, v, allowed=mask, weights_only=True)).transpose(-2, -1),
                    "the product is in the wrong order: weights @ v (each query's weights over the keys, times the values), not vᵀ @ weights.",
                ),
                Mistake(
                    _attend(q, k, v, allowed=mask, fill=-1.0),
                    "the masked scores got a finite value (-1): exp(-1) is not 0, so the future "
                    "still gets weight. Fill them with float('-inf').",
                ),
            ]
        ex.match(out, want, mistakes, context=context, name="the attention output")
    return (
        "scores scaled by 1/sqrt(d), future keys masked with -inf (the diagonal kept), softmax over the keys, weighted sum of v"
    )


def _block_case(g: torch.Generator, d: int, heads: int, f: int) -> Block:
    seed = int(torch.randint(0, 2**31 - 1, (), generator=g))
    config = GPTConfig(vocab_size=8, block_size=16, d_model=d, n_heads=heads, d_ff=f, init_scale=None)
    with torch.random.fork_rng(devices=[]):  # module initialisation must not touch the learner's random state
        torch.manual_seed(seed)
        block = Block(config, 0).eval()
        with torch.no_grad():  # two clearly different norms, so that using the wrong one shows
            for ln in (block.ln_1, block.ln_2):
                ln.weight.copy_(1.0 + 0.5 * torch.randn(d))
                ln.bias.copy_(0.3 * torch.randn(d))
    return block


@exercise("7.2", "block_forward")
def check_block_forward(ex: Exercise, fn) -> str:
    g = ex.generator()
    for b, t, d, heads, f in [(2, 5, 8, 2, 16), (1, 9, 12, 3, 24), (3, 1, 8, 4, 8), (2, 12, 16, 4, 32)]:
        block = _block_case(g, d, heads, f)
        x = 2.0 * torch.randn(b, t, d, generator=g) + torch.randn(d, generator=g)  # not normalised: norms matter
        with torch.no_grad():
            want = block(x).x  # (B, T, D) the package's block
            ln_1, attn, ln_2, ffn = block.ln_1, block.attn, block.ln_2, block.ffn
            h = x + attn(ln_1(x))  # after the attention half
            a = attn(ln_1(x))  # no attention residual
            post = ln_1(x + attn(x))
            swapped = x + attn(ln_2(x))
            bare = x + attn(x)
            mistakes = [
                Mistake(
                    a + ffn(ln_2(a)),
                    "the attention residual is missing: add the attention output to the stream, "
                    "x = x + attn(ln_1(x)), instead of replacing x by it.",
                ),
                Mistake(
                    ffn(ln_2(h)),
                    "the FFN residual is missing: return x + ffn(ln_2(x)) (with x the stream after "
                    "attention), not ffn(ln_2(x)) alone.",
                ),
                Mistake(
                    ffn(ln_2(a)),
                    "both residual connections are missing: each half adds its result to the stream, "
                    "x = x + attn(ln_1(x)), then x = x + ffn(ln_2(x)).",
                ),
                Mistake(h, "the FFN half is missing: after x = x + attn(ln_1(x)), add x = x + ffn(ln_2(x))."),
                Mistake(x + ffn(ln_2(x)), "the attention half is missing: first x = x + attn(ln_1(x)), then the FFN."),
                Mistake(
                    ln_2(post + ffn(post)),
                    "that is a post-norm block (the norm after the add, as in the original "
                    "transformer). This course's block is pre-norm: normalise the input of each branch, x + attn(ln_1(x)), "
                    "and leave the residual stream itself un-normalised.",
                ),
                Mistake(h + ffn(ln_1(h)), "ln_1 was used twice: the FFN branch has its own norm, ln_2: x + ffn(ln_2(x))."),
                Mistake(swapped + ffn(ln_1(swapped)), "the norms are swapped: ln_1 belongs to attention, ln_2 to the FFN."),
                Mistake(
                    swapped + ffn(ln_2(swapped)),
                    "ln_2 was used twice: the attention branch has its own norm, ln_1: x + attn(ln_1(x)).",
                ),
                Mistake(
                    x + attn(ln_1(x)) + ffn(ln_2(x)),
                    "the FFN ran on the block's input, in parallel with attention. "
                    "It must read the stream after attention has added its part: first x = x + attn(ln_1(x)), then "
                    "x + ffn(ln_2(x)) with that new x.",
                ),
                Mistake(
                    bare + ffn(bare),
                    "the layer norms are missing: each branch reads a normalised copy of the stream, "
                    "attn(ln_1(x)) and ffn(ln_2(x)).",
                ),
                Mistake(
                    (lambda f: f + attn(ln_1(f)))(x + ffn(ln_2(x))),
                    "the FFN comes first: in the block, tokens first talk to "
                    "each other (attention), then each is examined alone (FFN): x = x + attn(ln_1(x)), then x = x + ffn(ln_2(x)).",
                ),
                Mistake(
                    ln_2(want),
                    "the output is normalised at the end: a pre-norm block leaves the residual stream itself "
                    "un-normalised (the model's final norm comes once, after the last block).",
                ),
                Mistake(
                    ln_2(h + ffn(h)),
                    "the FFN half is post-norm (ln_2 after the add): normalise the branch's input instead, x + ffn(ln_2(x)).",
                ),
                Mistake(
                    (lambda f: f + ffn(ln_2(f)))(x + x + attn(ln_1(x))),
                    "x is added twice in the attention half: x = x + attn(ln_1(x)) adds the stream once.",
                ),
                Mistake(
                    (lambda f: f + ffn(ln_2(ln_1(x))))(h),
                    "the FFN reads a normalised copy of the block's *input*; it reads ln_2 of the stream after attention: x + ffn(ln_2(x)) with the new x.",
                ),
                Mistake(h + attn(ln_2(h)), "attention ran twice: the second half of the block is the FFN, x + ffn(ln_2(x))."),
                Mistake(
                    (lambda f: f + ffn(ln_2(f)))(ln_1(x) + attn(ln_1(x))),
                    "the residual adds the normalised stream ln_1(x); add the stream itself: x + attn(ln_1(x)).",
                ),
            ]
        block.forward = _no_shortcut(ex)  # the exercise is to build the block from its parts
        out = ex.call(fn, block, x)
        if out is not None and not isinstance(out, torch.Tensor) and hasattr(out, "x"):
            ex.fail("return the tensor (B, T, D) itself, not a result object.")
        ex.expect_tensor(out, shape=(b, t, d), name="the block's output")
        ex.match(out, want, mistakes, context=f"x of shape (B, T, D) = {(b, t, d)}", name="the block's output")
    return "x + attn(ln_1(x)), then x + ffn(ln_2(x)): pre-norm, both residuals, FFN after attention"


def _no_shortcut(ex: Exercise):
    def forward(*args, **kwargs):
        ex.fail(
            "build the block from its parts, block.ln_1, block.attn, block.ln_2 and block.ffn; calling block(x) "
            "itself runs the package's answer."
        )

    return forward
