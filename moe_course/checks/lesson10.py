"""Checks for lesson 10: the Mixtral gate, DeepSeek-V3's gate and its bias update, shared + routed experts, upcycling."""

from __future__ import annotations

import torch

from ..experts import Experts, FeedForward
from ..moe import MoELayer
from ..routing import expert_bias_update, mixtral_routing, sigmoid_routing
from ._core import Exercise, ExerciseError, Mistake, _close, describe, exercise
from .lesson04 import _check_range, _match_routing, _pair, _sum_hint, _topk_pair

# -- 10.1 the Mixtral gate ------------------------------------------------------------


@exercise("10.1", "mixtral_gate")
def check_mixtral_gate(ex: Exercise, fn) -> str:
    g = ex.generator()
    for n, e, k in [(6, 8, 2), (10, 4, 2), (5, 6, 3), (7, 5, 1), (1, 8, 2), (12, 16, 4)]:
        logits = (torch.randn(n, e, generator=g) * 2.0).requires_grad_(True)
        out = ex.call(fn, logits, k)
        index, gates = _pair(ex, out, n, e, k, f"for {n} tokens, {e} experts and k={k}")
        raw_gates = out[1]  # with its autograd history
        _check_range(ex, index, e)
        with torch.no_grad():
            ref = mixtral_routing(logits, k)
            probs = ref.router_probs
            i, top_logits = _topk_pair(logits, k)
            wrong = [
                (
                    i,
                    probs.gather(-1, i),
                    f"these gates are the top-k of the softmax over all E experts, so they do not sum to 1 ({_sum_hint(gates)}). "
                    "Mixtral takes the softmax over the k chosen logits only: softmax(topk(logits).values).",
                ),
                (i, top_logits, "these gates are the raw logits of the chosen experts: take the softmax over those k logits."),
                (
                    i,
                    torch.sigmoid(top_logits),
                    "you took a sigmoid of each chosen logit (DeepSeek-V3's scores); Mixtral's gates are the softmax over the k chosen logits, so they sum to 1.",
                ),
                (
                    i,
                    top_logits / top_logits.sum(-1, keepdim=True),
                    "you divided the chosen logits by their sum; logits can be negative, so these are not weights. Take the softmax over the k chosen logits.",
                ),
                (
                    i,
                    torch.softmax(probs.gather(-1, i), dim=-1),
                    "you took a softmax of the top-k *probabilities* (a softmax of a softmax); take the softmax of the top-k *logits*.",
                ),
                (
                    i,
                    torch.full((n, k), 1.0 / k),
                    f"every gate is 1/k = {1 / k:.3g}: the gates must follow the chosen logits, softmax(topk(logits).values).",
                ),
                (
                    i.sort(-1).values,
                    torch.softmax(top_logits, dim=-1),
                    "you sorted the expert ids but not their gates, so ids and gates no longer pair up: keep each gate with its expert.",
                ),
            ]
            low, low_logits = _topk_pair(logits, k, largest=False)
            wrong.append(
                (
                    low,
                    torch.softmax(low_logits, dim=-1),
                    "you picked the k *smallest* logits: torch.topk returns the largest by default (largest=True).",
                )
            )
            if n > 1:
                wrong.append(
                    (
                        i,
                        torch.softmax(top_logits, dim=0),
                        "the softmax runs over the tokens (dim 0): each token's k gates must sum to 1, a softmax over its own k logits (dim=-1).",
                    )
                )
        _match_routing(
            ex,
            index,
            gates,
            ref.expert_index,
            ref.gates,
            wrong,
            f"{n} tokens, {e} experts, k={k}; compared per token as (expert, gate) pairs in any order",
        )
        if k > 1:
            if not raw_gates.requires_grad:
                ex.fail(
                    "the gates carry no gradient back to the logits, so the router could not learn from them. Compute them with torch operations on router_logits (no .detach() or torch.no_grad())."
                )
            probe = torch.randn(n, k, generator=g)
            got = torch.autograd.grad((raw_gates * probe).sum(), logits, allow_unused=True)[0]
            want = torch.autograd.grad(
                (mixtral_routing(logits, k).gates * probe.gather(-1, _order_like(index, ref.expert_index))).sum(), logits
            )[0]
            if got is None:
                ex.fail("the gates carry no gradient back to the logits; compute them from router_logits without detaching.")
            ex.match(
                got,
                want,
                context=f"{n} tokens, {e} experts, k={k}: the gradient of the gates with respect to the logits",
                name="the gradient",
                atol=1e-4,
                rtol=1e-3,
            )
    return "the k largest logits, softmax over them alone (= softmax over all, top k, renormalised), with gradients to the logits"


def _order_like(index: torch.Tensor, ref_index: torch.Tensor) -> torch.Tensor:
    """For each token, where each reference choice sits in the learner's order: (N, K) positions."""
    return (ref_index[:, :, None] == index[:, None, :]).float().argmax(-1)


# -- 10.2 DeepSeek-V3's gate ----------------------------------------------------------


@exercise("10.2", "deepseek_gate")
def check_deepseek_gate(ex: Exercise, fn) -> str:
    g = ex.generator()
    for n, e, k, bias_scale in [(8, 8, 2, 0.5), (12, 6, 3, 0.3), (6, 4, 1, 1.0), (10, 16, 4, 0.2), (5, 8, 2, 0.0)]:
        logits = torch.randn(n, e, generator=g) * 1.5
        bias = torch.randn(e, generator=g) * bias_scale
        if bias_scale:
            bias[0] = 2.0  # expert 0's bias is so large that every token chooses it: the bias must move the choice
        index, gates = _pair(ex, ex.call(fn, logits, bias, k), n, e, k, f"for {n} tokens, {e} experts and k={k}")
        _check_range(ex, index, e)
        s = torch.sigmoid(logits)
        ref = sigmoid_routing(logits, k, bias=bias)
        i_plain, v_plain = _topk_pair(s, k)
        chosen = s.gather(-1, ref.expert_index)
        with_bias = (s + bias).gather(-1, ref.expert_index)
        wrong = [
            (
                ref.expert_index,
                with_bias / with_bias.sum(-1, keepdim=True),
                "the bias is in the gates: it only decides *who* is chosen (top-k of s + b); the gates use the scores s alone, renormalised over the chosen experts.",
            ),
            (
                ref.expert_index,
                with_bias,
                "the bias is in the gates, and they are not renormalised: gates are s_i / Σ_chosen s_j, without the bias.",
            ),
            (
                ref.expert_index,
                chosen,
                f"the gates are not renormalised ({_sum_hint(gates)}): divide the chosen scores by their sum.",
            ),
            (
                ref.expert_index,
                chosen / s.sum(-1, keepdim=True),
                "you divided the chosen scores by the sum over *all* experts; renormalise over the k chosen ones only.",
            ),
            (
                ref.expert_index,
                torch.softmax(logits.gather(-1, ref.expert_index), dim=-1),
                "the gates are a softmax over the chosen logits (Mixtral's gate); DeepSeek-V3's gates are the sigmoid scores s_i, divided by their sum over the chosen experts.",
            ),
            (
                *_renorm(*_topk_pair(torch.softmax(logits, -1) + bias, k), torch.softmax(logits, -1)),
                "you used a softmax where DeepSeek-V3 uses a sigmoid: each score s_i = sigmoid(logit_i) on its own, no competition between experts.",
            ),
            (
                *_renorm(*_topk_pair(torch.sigmoid(logits + bias), k), torch.sigmoid(logits + bias)),
                "you added the bias to the logits before the sigmoid, so it also changed the gates: add it to the scores s = sigmoid(logits) for the choice only.",
            ),
            (
                *_renorm(*_topk_pair(s - bias, k), s),
                "the bias is subtracted: choose the top k of s + b (a positive bias makes an expert *more* attractive).",
            ),
        ]
        if bias_scale:
            wrong.append(
                (
                    i_plain,
                    v_plain / v_plain.sum(-1, keepdim=True),
                    "the choice ignores the bias: pick the top k of s + b (the scores plus each expert's bias), then take the gates from s.",
                )
            )
        _match_routing(
            ex,
            index,
            gates,
            ref.expert_index,
            ref.gates,
            wrong,
            f"{n} tokens, {e} experts, k={k}, bias {bias_scale and 'non-zero' or 'zero'}; compared per token as (expert, gate) pairs in any order",
        )
    # the bias must not carry a gradient: it is moved by the load, never by the loss
    logits = torch.randn(6, 4, generator=g).requires_grad_(True)
    bias = (torch.randn(4, generator=g) * 0.3).requires_grad_(True)
    out = ex.call(fn, logits, bias, 2)
    _pair(ex, out, 6, 4, 2, "for 6 tokens, 4 experts and k=2")
    gates = out[1]  # with its autograd history
    if not gates.requires_grad:
        ex.fail("the gates carry no gradient back to the logits: compute s = torch.sigmoid(router_logits) without detaching.")
    grad = torch.autograd.grad((gates * torch.arange(1.0, 3.0)).sum(), bias, allow_unused=True)[0]
    if grad is not None and grad.abs().max() > 0:
        ex.fail(
            "the gates depend on the bias (they carry a gradient to it): the bias only decides the choice; take the gates from the scores s alone."
        )
    return "sigmoid scores, the top k of s + b chosen, gates s renormalised over the chosen, no gradient to the bias"


def _renorm(index: torch.Tensor, _values: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, scores at index renormalised over the chosen): the gate a variant would give."""
    picked = scores.gather(-1, index)
    return index, picked / picked.sum(-1, keepdim=True)


# -- 10.3 the bias update ---------------------------------------------------------------


@exercise("10.3", "bias_update")
def check_bias_update(ex: Exercise, fn) -> str:
    g = ex.generator()
    cases = [
        (torch.tensor([10, 2, 4, 4]), 1e-3, "4 experts, loads 10, 2, 4, 4 (the mean 5)"),
        (torch.tensor([3, 3, 3, 3, 3, 3]), 1e-2, "6 experts with equal loads"),
        (torch.tensor([8, 0, 4, 4]), 1e-3, "4 experts, loads 8, 0, 4, 4: expert 2 and 3 sit exactly at the mean 4"),
        (torch.randint(0, 50, (8,), generator=g), 1e-3, "8 experts, random loads"),
        (torch.tensor([100, 1, 1, 1, 1, 1, 1, 1]), 0.05, "8 experts, one of them takes almost everything"),
    ]
    for load, gamma, what in cases:
        bias = torch.randn(load.numel(), generator=g) * 0.1
        try:
            out = ex.call(fn, bias, load, gamma)
        except ExerciseError as err:
            if "could not infer output dtype" in str(err):
                ex.fail(
                    "load holds integer counts (int64), and torch will not average integers: convert with load.float() before taking the mean."
                )
            raise
        ex.expect_tensor(out, shape=tuple(bias.shape), name="the new bias", floating=True)
        want = expert_bias_update(bias, load, gamma)
        lf = load.float()
        mean = lf.mean()
        mistakes = [
            Mistake(
                bias + gamma * torch.sign(lf - mean),
                "the sign is flipped: an expert busier than the mean must become *less* attractive, b_i ← b_i + γ·sign(mean − load_i).",
            ),
            Mistake(
                bias + gamma * (mean - lf),
                "the step is proportional to the difference; DeepSeek-V3 moves every bias by the same fixed step γ, only its sign comes from the load: γ·sign(mean − load_i).",
            ),
            Mistake(gamma * torch.sign(mean - lf), "you returned the step alone: return the new bias b + γ·sign(mean − load)."),
            Mistake(bias + torch.sign(mean - lf), "γ is missing: each step moves a bias by γ·sign(mean − load_i), not by ±1."),
            Mistake(
                bias + gamma * torch.where(lf > mean, -1.0, 1.0),
                "an expert exactly at the mean load should keep its bias (sign(0) = 0); yours moves it up. torch.sign gives 0 there.",
            ),
            Mistake(
                bias + gamma * torch.where(lf >= mean, -1.0, 1.0),
                "an expert exactly at the mean load should keep its bias (sign(0) = 0); yours moves it down. torch.sign gives 0 there.",
            ),
            Mistake(
                bias + gamma * torch.sign(lf.sum() - lf),
                "you compared each load with the *total* load; compare it with the mean load (the total divided by E).",
            ),
            Mistake(
                bias + gamma * torch.sign(lf.median() - lf),
                "you compared with the median load; DeepSeek-V3 compares each load with the mean load.",
            ),
            Mistake(bias - gamma * torch.sign(mean - lf), "the update is subtracted: b ← b + γ·sign(mean − load)."),
        ]
        ex.match(
            out.detach(),
            want,
            mistakes,
            context=what + f", γ = {gamma:g}",
            name="the new bias",
            sizes={"E, the number of experts": load.numel()},
        )
    return "b + γ·sign(mean load − load): busy experts down, idle ones up, the mean left alone, a new tensor"


# -- 10.4 shared + routed experts ---------------------------------------------------------


def _experts(num: int, d: int, f: int, seed: int) -> Experts:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Experts(num, d, f, init_scale=1.0)


def _routed(
    x: torch.Tensor, routed: Experts, index: torch.Tensor, gates: torch.Tensor, choices: int | None = None, gated: bool = True
) -> torch.Tensor:
    y = torch.zeros_like(x)
    for j in range(index.shape[1] if choices is None else choices):
        for e in range(routed.num_experts):
            rows = (index[:, j] == e).nonzero(as_tuple=True)[0]
            if rows.numel():
                w = gates[rows, j, None] if gated else 1.0
                y = y.index_add(0, rows, w * routed.expert_output(e, x[rows]))
    return y


def _shared(x: torch.Tensor, shared: Experts, count: int | None = None) -> torch.Tensor:
    return sum(shared.expert_output(s, x) for s in range(shared.num_experts if count is None else count))


@exercise("10.4", "shared_and_routed")
def check_shared_and_routed(ex: Exercise, fn) -> str:
    g = ex.generator()
    for n, d, f, e, k, ks in [(10, 6, 8, 4, 2, 1), (12, 8, 4, 8, 3, 2), (5, 4, 6, 3, 1, 2), (16, 6, 6, 6, 2, 3)]:
        seed = int(torch.randint(0, 2**31 - 1, (), generator=g))
        shared, routed = _experts(ks, d, f, seed), _experts(e, d, f, seed + 1)
        x = torch.randn(n, d, generator=g)
        logits = torch.randn(n, e, generator=g)
        top = torch.softmax(logits, -1).topk(k, dim=-1)
        index, gates = top.indices, top.values / top.values.sum(-1, keepdim=True)
        out = ex.call(fn, x, shared, routed, index, gates)
        ex.expect_tensor(out, shape=(n, d), name="the output y")
        with torch.no_grad():
            routed_y, shared_y = _routed(x, routed, index, gates), _shared(x, shared)
            want = routed_y + shared_y
            mistakes = [
                Mistake(
                    routed_y,
                    "the shared experts are missing: every token also visits all K_s shared experts, whatever the router chose; add their outputs.",
                ),
                Mistake(
                    shared_y,
                    "the routed experts are missing: add Σ_j gates[:, j] · expert_{expert_index[:, j]}(x) to the shared experts' outputs.",
                ),
                Mistake(routed_y + shared_y / ks, "you averaged the shared experts; each one adds its full output: their sum."),
                Mistake(
                    routed_y + _shared(x, shared, 1),
                    "only shared expert 0 is in: every shared expert adds its output, a sum over all K_s of them.",
                ),
                Mistake(
                    _routed(x, routed, index, gates, gated=False) + shared_y,
                    "the routed outputs are not weighed by their gates: multiply each chosen expert's output by gates[:, j].",
                ),
                Mistake(
                    _routed(x, routed, index, gates, choices=1) + shared_y,
                    "only each token's first choice is used: a token visits all k of its chosen experts (columns of expert_index), each weighed by its gate.",
                ),
                Mistake(
                    routed_y + gates[:, :1] * shared_y,
                    "the shared experts are weighed by the first gate; they are ungated: their outputs are added as they are.",
                ),
                Mistake(
                    _routed(x, routed, index, gates[:, :1].expand(-1, k)) + shared_y,
                    "every choice was weighed by the first gate: choice j takes gates[:, j].",
                ),
                Mistake(
                    x + want,
                    "you added the input x: the residual connection belongs to the block around the layer; return the experts' outputs only.",
                ),
            ]
        ex.match(
            out.detach(),
            want,
            mistakes,
            context=f"{n} tokens of width {d}, {ks} shared and {e} routed experts, k={k}",
            name="the output y",
            sizes={"k, the choices per token": k},
        )
    return "Σ of every shared expert on every token + Σ_j gate_j · routed expert_j, per token"


# -- 10.5 upcycling -------------------------------------------------------------------------


def _dense(d: int, f: int, seed: int, activation: str = "gelu") -> FeedForward:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FeedForward(d, f, activation=activation)


def _snapshot(ffn: FeedForward) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in ffn.named_parameters()}


@exercise("10.5", "upcycle")
def check_upcycle(ex: Exercise, fn) -> str:
    g = ex.generator()
    for d, f, e, k, activation in [(6, 10, 4, 2, "gelu"), (8, 4, 6, 3, "gelu"), (4, 8, 8, 2, "swiglu"), (6, 6, 3, 1, "gelu")]:
        seed = int(torch.randint(0, 2**31 - 1, (), generator=g))
        ffn = _dense(d, f, seed, activation)
        before = _snapshot(ffn)
        what = f"a FeedForward({d}, {f}, activation={activation!r}) into {e} experts, top-{k}"
        layer = ex.call(fn, ffn, e, k)
        if layer is None:
            ex.fail("the result is None. Did you forget to return the layer?")
        if not isinstance(layer, MoELayer):
            ex.fail(f"return an MoELayer (from moe_course.moe), got {describe(layer)}.")
        cfg = layer.config
        if (cfg.num_experts, cfg.top_k) != (e, k):
            ex.fail(
                f"the layer has num_experts={cfg.num_experts}, top_k={cfg.top_k}; asked for {e} experts and top-{k} ({what})."
            )
        if (cfg.d_model, cfg.d_ff, cfg.activation, cfg.bias) != (d, f, activation, True):
            ex.fail(
                f"the layer's experts are {cfg.d_model} → {cfg.d_ff} → {cfg.d_model} with activation {cfg.activation!r} and bias={cfg.bias}; "
                f"they must be the FFN's: {d} → {f} → {d}, activation {activation!r}, with biases ({what}). Build the MoEConfig from ffn.d_model, ffn.d_ff and ffn.activation."
            )
        for name, p in ffn.named_parameters():
            if not torch.equal(p.detach(), before[name]):
                ex.fail(
                    f"the dense FFN's {name} changed: upcycling copies the dense weights into the experts and leaves the dense model as it was."
                )
        if cfg.capacity_factor is not None:
            ex.fail(
                f"the layer has capacity_factor={cfg.capacity_factor}: tokens over capacity would be dropped and the upcycled layer would not reproduce the dense one. Upcycle into a dropless layer (capacity_factor=None)."
            )
        experts = layer.experts
        weights = {"w_in": ffn.fc_in.weight.T, "w_out": ffn.fc_out.weight.T, "b_in": ffn.fc_in.bias, "b_out": ffn.fc_out.bias}
        if ffn.fc_gate is not None:
            weights |= {"w_gate": ffn.fc_gate.weight.T, "b_gate": ffn.fc_gate.bias}
        for name, want in weights.items():
            got = getattr(experts, name)
            same = [bool(torch.equal(got[i].detach(), want.detach())) for i in range(e)]
            if not any(same):
                hint = (
                    " (it is not even the transposed weight: nn.Linear stores W_in as (F, D), the experts as (D, F))"
                    if name.startswith("w")
                    else ""
                )
                ex.fail(
                    f"the experts' {name} is not a copy of the dense FFN's{hint}: every expert must start as the trained FFN ({what}). Copy with experts.copy_feed_forward_(ffn)."
                )
            if not all(same):
                missing = [i for i, s in enumerate(same) if not s]
                ex.fail(
                    f"experts {missing} are not copies of the dense FFN ({name} differs): *every* expert starts as the trained FFN, not only {'expert 0' if same[0] and sum(same) == 1 else 'some of them'}."
                )
            if got.data_ptr() == want.data_ptr() or (got.untyped_storage().data_ptr() == want.untyped_storage().data_ptr()):
                ex.fail(
                    f"the experts' {name} shares memory with the dense FFN: training the MoE would change the dense model too. Copy the values (copy_feed_forward_ copies them)."
                )
        if torch.count_nonzero(layer.w_router) == 0:
            ex.fail(
                "the router is all zeros: every token then ties between all experts and goes to the first k of them. Keep the layer's freshly initialised router."
            )
        x = torch.randn(12, d, generator=g)
        with torch.no_grad():
            y = layer(x).y
            dense = ffn(x)
        if not _close(y, dense, 1e-5, 1e-4):
            probs = torch.softmax(x @ layer.w_router, -1)
            if _close(y, probs.max(-1, keepdim=True).values * dense, 1e-5, 1e-4):
                ex.fail(
                    f"the output is the dense output times p_max, the router's top probability: that is Switch's raw gate (router='switch'). With renormalised gates (router='top_k'), the upcycled layer equals the dense layer exactly at the start ({what})."
                )
            if not cfg.renormalize:
                ex.fail(
                    "the gates are not renormalised (renormalize=False), so the output is the dense output times the sum of the chosen probabilities. Renormalised top-k gates sum to 1, and the upcycled layer then equals the dense one."
                )
            ex.fail(
                f"at the start the upcycled layer must equal the dense FFN on every token (every expert a copy, gates summing to 1); the largest difference is {(y - dense).abs().max().item():.3g} ({what}).",
                named=False,
            )
    return "every expert a separate copy of the trained FFN, a fresh router, renormalised top-k gates: the dense output exactly at the start"
