"""Checks for lesson 08: the Switch block forward, and what a language model knows and costs."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..transformer import Block, GPTConfig, flops_per_token, param_count
from . import _symptoms
from ._core import Exercise, Mistake, describe, exercise
from .lesson07 import _no_shortcut


def _switch_block(seed: int, **kw) -> Block:
    base = dict(
        vocab_size=20,
        block_size=8,
        d_model=16,
        n_layers=2,
        n_heads=2,
        d_ff=24,
        ffn="switch",
        num_experts=4,
        capacity_factor=1.0,
        aux_loss_coef=0.01,
        z_loss_coef=0.001,
    )
    base.update(kw)
    torch.manual_seed(seed)
    block = Block(GPTConfig(**base), layer=0)
    with torch.no_grad():  # wake the layer norms and biases up, so that skipping one shows
        for name, p in block.named_parameters():
            if name.startswith(("ln_", "attn.qkv.bias", "attn.proj.bias")) or "b_" in name.split(".")[-1]:
                p.add_(0.3 * torch.randn_like(p))
    return block.eval()


@torch.no_grad()
def _switch_mistakes(block: Block, x: torch.Tensor) -> list[Mistake]:
    attn, ln1, ln2, moe = block.attn, block.ln_1, block.ln_2, block.ffn
    a = x + attn(ln1(x))
    ra = attn(ln1(x))  # no attention residual
    return [
        Mistake(
            ra + moe(ln2(ra)).y,
            "the residual around attention is missing: the stream after attention is x + attn(ln_1(x)), not attn(ln_1(x)) alone.",
        ),
        Mistake(
            moe(ln2(a)).y,
            "the residual around the Switch layer is missing: return x + moe.y, not moe.y alone (a dropped token must ride the residual unchanged).",
        ),
        Mistake(
            a + moe(a).y, "the Switch layer reads the stream itself; in a pre-norm block it reads ln_2(x), the normalised stream."
        ),
        Mistake(
            a + moe(ln1(a)).y, "the Switch layer reads ln_1 of the stream; the second half of the block has its own norm, ln_2."
        ),
        Mistake(
            x + moe(ln2(x)).y,
            "the attention half is missing: first x = x + attn(ln_1(x)), then the Switch layer on that updated stream.",
        ),
        Mistake(a + moe(ln2(x)).y, "the Switch layer reads the block's input x instead of the stream after attention."),
        Mistake(
            ln2(ln1(x + attn(x)) + moe(ln1(x + attn(x))).y),
            "this is a post-norm block (norm after the residual add); the course's blocks are pre-norm: x + attn(ln_1(x)), then x + moe(ln_2(x)).y.",
        ),
        Mistake(a + 2 * moe(ln2(a)).y, "the Switch layer's output is added twice: x + moe.y, once."),
        Mistake(
            (lambda m: m + attn(ln1(m)))(x + moe(ln2(x)).y),
            "the Switch layer comes first: attention first (tokens read each other), then the Switch layer on the updated stream.",
        ),
    ]


@exercise("8.1", "switch_block_forward")
def check_switch_block_forward(ex: Exercise, fn) -> str:
    g = ex.generator()
    for seed, (B, T) in enumerate([(2, 8), (3, 5)]):
        block = _switch_block(seed)
        D = block.ln_1.normalized_shape[0]
        x = torch.randn(B, T, D, generator=g)
        with torch.no_grad():
            ref = block(x)
        mistakes = _switch_mistakes(block, x)
        block.forward = _no_shortcut(ex)  # the exercise is to build the block from its parts
        out = ex.call(fn, block, x)
        if out is None:
            ex.fail("the result is None. Did you forget a `return` statement?")
        if isinstance(out, torch.Tensor) or not isinstance(out, (tuple, list)) or len(out) != 2:
            ex.fail(
                f"return two things, `(x, router_loss)`: the stream after the block (B, T, D) and the Switch layer's weighted router loss; got {describe(out)}."
            )
        y, aux = out
        if isinstance(y, torch.Tensor) and isinstance(aux, torch.Tensor) and y.ndim == 0 and aux.ndim == 3:
            ex.fail("the two results are swapped: return (x, router_loss), the stream (B, T, D) first, then the loss.")
        if hasattr(y, "y") and hasattr(y, "router_loss"):
            ex.fail("the first result is the MoEOutput itself; return the updated stream x + moe.y, a tensor of shape (B, T, D).")
        ex.expect_tensor(y, shape=(B, T, D), name="the stream after the block")
        ex.match(
            y.detach(),
            ref.x,
            mistakes,
            context=f"x of shape {(B, T, D)}, {block.ffn.config.num_experts} experts, capacity factor 1.0",
            name="the stream after the block",
        )
        if aux is None or (isinstance(aux, (int, float)) and not isinstance(aux, bool) and aux == 0):
            ex.fail(
                "the router loss is missing: return moe.router_loss, the weighted balance and z-losses the training loss needs, so the GP learns to spread the patients."
            )
        if isinstance(aux, float):
            ex.fail(
                f"router_loss is a Python float ({aux:.4g}): float() or .item() cut it off from the graph, so the router gets "
                "no gradient from it. Return moe.router_loss itself, a 0-dim tensor."
            )
        ex.expect_tensor(aux, name="router_loss")
        if aux.numel() != 1:
            ex.fail(f"router_loss should be one number (a 0-dim tensor), got shape {tuple(aux.shape)}.")
        aux = aux.reshape(())
        m = ref.moe
        mistakes = [
            Mistake(
                m.aux_loss,
                "you returned moe.aux_loss, the unweighted balance loss; return moe.router_loss, which weights it by α and adds the weighted z-loss.",
            ),
            Mistake(
                m.z_loss,
                "you returned moe.z_loss alone; return moe.router_loss, the weighted balance loss plus the weighted z-loss.",
            ),
            Mistake(
                m.aux_loss + m.z_loss,
                "you added the unweighted losses; moe.router_loss already weights them by their coefficients (α for balance, 1e-3 for z).",
            ),
            Mistake(
                block.ffn.config.aux_loss_coef * m.aux_loss,
                "the z-loss is missing from the router loss; moe.router_loss holds both weighted terms.",
            ),
        ]
        ex.match(aux.detach(), m.router_loss, mistakes, name="router_loss", atol=1e-7, rtol=1e-5)
    block = _switch_block(5)
    block.forward = _no_shortcut(ex)
    x = torch.randn(2, 6, block.ln_1.normalized_shape[0], generator=g, requires_grad=True)
    y, aux = ex.call(fn, block, x)
    if not (isinstance(aux, torch.Tensor) and aux.requires_grad):
        ex.fail(
            "router_loss carries no gradient (did you call .item() or .detach()?); the router learns to balance only through it."
        )
    return "attention, then the Switch layer on ln_2 of the stream, both with residuals; the router loss is moe.router_loss"


# --- 8.2: what a language model knows and what a token costs ------------------------


_KEYS = ("params_total", "params_active", "flops_per_token")


def _accounting_configs() -> list[GPTConfig]:
    base = GPTConfig(vocab_size=97, block_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=48)
    return [
        base,
        base.switch_twin(8),
        replace(base.switch_twin(4), n_layers=4, moe_every=2, block_size=32),
        replace(base, d_model=48, d_ff=96, n_layers=3),
        replace(base.switch_twin(16), d_model=16, n_heads=2, d_ff=64, n_layers=1),
    ]


def _accounting_mistakes(c: GPTConfig) -> list[tuple[str, dict[str, int], str]]:
    """(key, wrong values, message) for the typical slips; values computed from the reference counts."""
    p, f = param_count(c), flops_per_token(c)
    D, F_, E, V, T = c.d_model, c.d_ff, c.num_experts, c.vocab_size, c.block_size
    n_moe = len(c.moe_layers)
    out = []
    if n_moe:
        out += [
            (
                "params_total",
                {"params_total": p.total - p.ffn + p.ffn_active},
                "the total counts one expert per Switch layer; the model holds all E experts (E × the FFN's parameters).",
            ),
            (
                "params_active",
                {"params_active": p.total},
                "the active count includes every expert; a token uses only the one expert the router picked (top-1).",
            ),
            (
                "params_total",
                {"params_total": p.total - p.router},
                "the routers' parameters (D·E per Switch layer) are missing from the total.",
            ),
            (
                "params_active",
                {"params_active": p.active - p.router},
                "the routers are missing from the active count; every token uses its layer's router.",
            ),
            (
                "flops_per_token",
                {"flops_per_token": f.total + (E - 1) * n_moe * 4 * D * F_},
                "the FLOPs count every expert; a token visits one expert per Switch layer (top-1), so the FFN costs the same as in the dense model.",
            ),
            (
                "flops_per_token",
                {"flops_per_token": f.total - f.router},
                "the router's FLOPs (2·D·E per Switch layer) are missing.",
            ),
            (
                "params_total",
                {"params_total": p.total - n_moe * E * (F_ + D)},
                "the experts' biases are missing from the total (each expert has F + D bias parameters).",
            ),
        ]
    out += [
        (
            "params_total",
            {"params_total": p.total + V * D},
            "the head is counted separately, but it is tied to the token embedding: the same (V, D) matrix, counted once.",
        ),
        (
            "params_total",
            {"params_total": p.total + (c.n_layers - n_moe) * (E - 1) * (2 * D * F_ + F_ + D) + (c.n_layers - n_moe) * D * E}
            if n_moe and c.n_layers > n_moe
            else {},
            f"every block got a Switch layer, but moe_every={c.moe_every}: only the blocks in config.moe_layers have experts (and routers); the others keep a dense FFN.",
        ),
        (
            "params_total",
            {"params_total": p.total - p.norms},
            "the layer norms are missing (2 per block plus the final one, each with D weights and D biases).",
        ),
        (
            "params_total",
            {"params_total": p.total - c.n_layers * 4 * D},
            "the attention biases are missing (q, k, v and the output projection each have D).",
        ),
        (
            "params_total",
            {"params_total": p.total + T * D},
            "a learned position table is counted, but this model uses rotary embeddings (RoPE), which have no parameters.",
        ),
        ("flops_per_token", {"flops_per_token": f.total // 2}, "the FLOPs are half the reference: one multiply-add is 2 FLOPs."),
        (
            "flops_per_token",
            {"flops_per_token": f.total - f.attention_mix},
            "the attention scores and the weighted sum of values are missing: 4·T·D FLOPs per layer for T = block_size keys.",
        ),
        ("flops_per_token", {"flops_per_token": f.total - f.head}, "the head's logits (2·D·V FLOPs) are missing."),
        (
            "flops_per_token",
            {"flops_per_token": 3 * f.total},
            "these are training FLOPs (forward + backward ≈ 3 × forward); count the forward pass only.",
        ),
        (
            "flops_per_token",
            {"flops_per_token": 2 * p.active},
            "2 × the active parameters leaves out the attention mix over T keys and counts the embedding lookup and biases; count the matmuls.",
        ),
    ]
    return out


@exercise("8.2", "lm_accounting")
def check_lm_accounting(ex: Exercise, fn) -> str:
    for c in _accounting_configs():
        what = f"{'Switch, E=' + str(c.num_experts) + ', moe_every=' + str(c.moe_every) if c.ffn == 'switch' else 'dense'}, D={c.d_model}, F={c.d_ff}, {c.n_layers} layers, T={c.block_size}, V={c.vocab_size}"
        out = ex.call(fn, c)
        if out is None:
            ex.fail("the result is None. Did you forget a `return` statement?")
        if not isinstance(out, dict):
            ex.fail(f"return a dict with the keys {list(_KEYS)}; got {describe(out)}.")
        missing = [k for k in _KEYS if k not in out]
        if missing:
            ex.fail(f"the dict lacks the key(s) {missing}; it needs {list(_KEYS)}.")
        got = {k: ex.expect_int(out[k], name=f"out[{k!r}]") for k in _KEYS}
        p, f = param_count(c), flops_per_token(c)
        want = {"params_total": p.total, "params_active": p.active, "flops_per_token": f.total}
        for key in _KEYS:
            if got[key] == want[key]:
                continue
            for mkey, values, message in _accounting_mistakes(c):
                if mkey == key and values.get(key) == got[key]:
                    ex.fail(f"{message}\n  ({what}: you have {got[key]:,}, expected {want[key]:,})")
            said = _symptoms.numbers(got[key], want[key], {}, key)
            if said and not said.startswith(_symptoms.WEAK):
                ex.fail(f"{said}\n  ({what}: you have {got[key]:,}, expected {want[key]:,})")
            ex.fail(f"{key} is {got[key]:,}, expected {want[key]:,} ({what}).", named=False)
    return "total and active parameters and forward FLOPs per token match the model, dense and Switch"
