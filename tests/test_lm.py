"""Tests for moe_course.training.lm: the language-model task, per-domain bookkeeping, resume with a Switch LM."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_course.data.corpus import Corpus, CorpusConfig, LMBatch
from moe_course.training import TrainConfig, train
from moe_course.training.lm import (
    LMTask,
    complete,
    evaluate_lm,
    exact_match_by_domain,
    fact_recall,
    loss_by_domain,
    token_losses,
    without_dropping,
)
from moe_course.transformer import GPT, GPTConfig


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus(CorpusConfig(num_facts=40))


def _model(corpus: Corpus, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    base = dict(vocab_size=corpus.vocab_size, block_size=32, d_model=32, n_layers=2, n_heads=4, d_ff=64)
    base.update(kw)
    return GPT(GPTConfig(**base))


def test_token_losses_and_loss_by_domain_by_hand():
    logits = torch.zeros(1, 4, 3)
    logits[0, 0, 2] = math.log(3.0)  # p(target 2) = 3/5 at position 0
    targets = torch.tensor([[2, 0, 1, 1]])
    tl = token_losses(logits, targets)
    expected = torch.tensor([[-math.log(0.6), math.log(3.0), math.log(3.0), math.log(3.0)]])  # uniform elsewhere
    assert torch.allclose(tl, expected, atol=1e-6)
    domain = torch.tensor([[0, 0, 2, 2]])
    sums, counts = loss_by_domain(tl, domain, 3)
    assert counts.tolist() == [2, 0, 2]
    assert sums[0].item() == pytest.approx(-math.log(0.6) + math.log(3.0))
    assert sums[1].item() == 0.0 and sums[2].item() == pytest.approx(2 * math.log(3.0))
    assert (sums.sum() / counts.sum()).item() == pytest.approx(tl.mean().item())
    with pytest.raises(ValueError, match=r"domain ids must lie in \[0, 2\)"):
        loss_by_domain(tl, domain, 2)


def test_exact_match_counts_whole_answers_of_complete_samples():
    # row: two complete samples (domains 0 and 1) and a truncated one (-1)
    y = torch.zeros(1, 9, dtype=torch.int64)
    batch = LMBatch(
        x=y,
        y=y,
        domain=torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0, 0]]),
        answer=torch.tensor([[False, True, True, False, True, True, False, True, True]]),
        sample=torch.tensor([[0, 0, 0, 1, 1, 1, -1, -1, -1]]),
    )
    correct = torch.tensor([[False, True, True, True, True, False, True, True, True]])  # prompt errors do not count
    right, total = exact_match_by_domain(correct, batch, 2)
    assert total.tolist() == [1, 1] and right.tolist() == [1, 0]


def test_task_loss_is_cross_entropy_plus_the_models_router_loss(corpus: Corpus):
    task = LMTask(corpus, 32, eval_rows=8)
    batch = task.sample_batch(4, torch.Generator().manual_seed(0), torch.device("cpu"))
    model = _model(corpus, ffn="switch", num_experts=4)
    loss, metrics = task.loss(model, batch)
    out = model(batch.x)
    ce = F.cross_entropy(out.logits.reshape(-1, corpus.vocab_size), batch.y.reshape(-1))
    assert torch.allclose(loss, ce + out.router_loss)
    assert metrics["train_loss"] == pytest.approx(ce.item(), abs=1e-5) and metrics["router_loss"] > 0
    dense_loss, dense_metrics = task.loss(_model(corpus), batch)
    assert "router_loss" in dense_metrics and dense_metrics["router_loss"] == 0.0


def test_evaluation_per_domain_adds_up_to_the_overall_loss(corpus: Corpus):
    task = LMTask(corpus, 32, eval_rows=24, eval_chunk=8)
    model = _model(corpus, ffn="switch", num_experts=4)
    ev = task.evaluation(model)
    metrics = ev.as_dict()
    h = task.held_out
    dropless = without_dropping(model)  # evaluation never drops tokens
    with torch.no_grad():
        logits = torch.cat([dropless(h.x[i : i + 8]).logits for i in range(0, 24, 8)])
    tl = token_losses(logits, h.y)
    assert metrics["val_loss"] == pytest.approx(tl.mean().item(), rel=1e-5)
    weighted = sum(metrics[f"val_loss_{d}"] * int((h.domain == i).sum()) for i, d in enumerate(corpus.domains))
    assert weighted / h.y.numel() == pytest.approx(metrics["val_loss"], rel=1e-6)
    for i, d in enumerate(corpus.domains):
        assert metrics[f"val_loss_{d}"] == pytest.approx(tl[h.domain == i].mean().item(), rel=1e-5)
    assert {f"val_exact_{d}" for d in ("facts", "arithmetic", "reversal", "sorting", "brackets")} <= set(metrics)
    assert "val_exact_grammar" not in metrics and "val_answer_loss_grammar" not in metrics
    for i, d in enumerate(corpus.domains):  # the answer loss: answer characters only
        if d != "grammar":
            assert metrics[f"val_answer_loss_{d}"] == pytest.approx(tl[(h.domain == i) & h.answer].mean().item(), rel=1e-5)
    assert 0.0 <= metrics["val_dropped"] < 1.0 and metrics["val_balance"] >= 1.0 - 1e-6
    assert len(ev.dropped) == len(ev.balance) == 2
    assert "val_dropped" not in task.evaluate(_model(corpus), torch.device("cpu"))


def test_evaluation_is_dropless_and_counts_what_the_capacity_would_turn_away(corpus: Corpus):
    model = _model(corpus, ffn="switch", num_experts=4, capacity_factor=0.5)
    h = corpus.held_out(16, 32)
    judged = evaluate_lm(model, h, corpus.domains, chunk=8)
    as_is = evaluate_lm(model, h, corpus.domains, chunk=8, dropless=False)
    assert judged.dropped == as_is.dropped and min(judged.dropped) > 0.3  # half the slots: many tokens over capacity
    assert judged.loss != pytest.approx(as_is.loss, rel=1e-4)
    free = _model(corpus, ffn="switch", num_experts=4, capacity_factor=None)
    free.load_state_dict(model.state_dict())
    assert judged.loss == pytest.approx(evaluate_lm(free, h, corpus.domains, chunk=8).loss, rel=1e-6)
    assert model.config.capacity_factor == 0.5  # the model itself is left as it was


def test_without_dropping_copies_only_models_that_can_drop(corpus: Corpus):
    dense, free = _model(corpus), _model(corpus, ffn="switch", num_experts=4, capacity_factor=None)
    assert without_dropping(dense) is dense and without_dropping(free) is free
    capped = _model(corpus, ffn="switch", num_experts=4, capacity_factor=1.0)
    copy = without_dropping(capped)
    assert copy is not capped and copy.config.capacity_factor is None and not copy.training
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), capped.state_dict().values()))
    x = corpus.held_out(4, 32).x
    with torch.no_grad():
        assert int(copy(x).moe[0].num_dropped) == 0
        # a row's answer does not depend on which rows share the call
        assert torch.allclose(copy(x[:1]).logits, copy(x).logits[:1], atol=1e-5)


class _Oracle(nn.Module):
    """Writes every record's text, except the first answer character of the patients it does not know."""

    def __init__(self, corpus: Corpus, known: set[int], confidence: float = 5.0) -> None:
        super().__init__()
        self.corpus, self.known, self.confidence = corpus, known, confidence
        self.config = SimpleNamespace(block_size=32)
        self.anchor = nn.Parameter(torch.zeros(()))  # fact_recall reads the device from the parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.shape
        logits = torch.zeros(B, T, self.corpus.vocab_size)
        for b in range(B):
            patient = int(self.corpus.decode(x[b])[1:].split(":")[0].removeprefix("patient "))
            prompt = self.corpus.fact_prompt(patient)
            row = "\n" + prompt + self.corpus.facts[patient] + "\n"
            for t in range(T):
                nxt = row[t + 1] if t + 1 < len(row) else "\n"
                if t + 1 == 1 + len(prompt) and patient not in self.known:
                    nxt = "~"  # a wrong first answer character
                logits[b, t, self.corpus.encode(nxt)[0]] = self.confidence
        return logits


def test_fact_recall_asks_for_every_record_and_scores_its_answer(corpus: Corpus):
    known = set(list(corpus.facts)[::3])
    oracle = _Oracle(corpus, known)
    table = fact_recall(oracle, corpus, chunk=7)
    assert table.patients == tuple(corpus.facts) and table.recalled.shape == (40,)
    assert table.known() == [p for p in corpus.facts if p in known]
    assert table.recall == pytest.approx(len(known) / 40)
    V, c = corpus.vocab_size, 5.0
    right = -math.log(math.exp(c) / (math.exp(c) + V - 1))
    wrong = -math.log(1 / (math.exp(c) + V - 1))
    for p, loss in zip(table.patients, table.answer_loss.tolist()):
        n = len(corpus.facts[p]) + 1  # the ward and the closing newline
        expected = right if p in known else (wrong + (n - 1) * right) / n
        assert loss == pytest.approx(expected, rel=1e-5)
    assert table.loss == pytest.approx(float(table.answer_loss.mean()))


def test_fact_recall_is_what_greedy_decoding_writes(corpus: Corpus):
    model = _model(corpus, ffn="switch", num_experts=2, capacity_factor=1.0)
    task = LMTask(corpus, 32, eval_rows=8)
    train(model, task, TrainConfig(steps=60, batch_size=16, eval_every=60, lr=1e-2), progress=False, device="cpu")
    table = fact_recall(model, corpus)
    free = without_dropping(model)
    greedy = [complete(free, corpus, corpus.fact_prompt(p), max_new_tokens=8) == corpus.facts[p] + "\n" for p in corpus.facts]
    assert table.recalled.tolist() == greedy
    metrics = task.evaluate(model, torch.device("cpu"))
    assert metrics["val_recall_facts"] == table.recall and metrics["val_table_loss_facts"] == pytest.approx(table.loss)
    assert "val_recall_facts" not in LMTask(corpus, 32, eval_rows=8, table_recall=False).evaluate(model, torch.device("cpu"))
    short = LMTask(corpus, 16, eval_rows=8)  # "patient 42: heart" does not fit in 16 characters: no table recall
    assert not short.records_fit and "val_recall_facts" not in short.evaluate(model, torch.device("cpu"))
    with pytest.raises(ValueError, match="block_size"):
        fact_recall(_model(corpus, block_size=8), corpus)


def test_training_on_the_corpus_lowers_the_held_out_loss(corpus: Corpus):
    task = LMTask(corpus, 32, eval_rows=16)
    model = _model(corpus)
    before = task.evaluate(model, torch.device("cpu"))["val_loss"]
    result = train(model, task, TrainConfig(steps=40, batch_size=16, eval_every=20), progress=False, device="cpu")
    after = result.final["val_loss"]
    assert after < before - 1.0, (before, after)
    assert list(result.history["step"]) == [20, 40]
    assert {"train_loss", "router_loss", "val_loss", "val_loss_facts", "val_exact_facts"} <= set(result.history.columns)


def test_resumed_switch_lm_ends_with_exactly_the_same_weights(corpus: Corpus, tmp_path):
    # router jitter and dropout draw from the global RNG: the checkpoint must carry it
    kw = dict(ffn="switch", num_experts=4, router_jitter=0.05, dropout=0.1)
    task = LMTask(corpus, 32, eval_rows=8)
    config = TrainConfig(steps=12, batch_size=8, eval_every=4, warmup_steps=2, lr_min_ratio=0.1)
    whole = train(_model(corpus, **kw), task, config, progress=False, device="cpu")
    ckpt = tmp_path / "lm.pt"
    train(_model(corpus, **kw), task, config, progress=False, device="cpu", checkpoint_path=ckpt, stop_after=6)
    resumed = train(_model(corpus, seed=5, **kw), task, config, progress=False, device="cpu", checkpoint_path=ckpt, resume=True)
    for (name, p), q in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    assert resumed.history["val_loss"].tolist() == whole.history["val_loss"].tolist()


def test_complete_returns_one_line(corpus: Corpus):
    model = _model(corpus)
    text = complete(model, corpus, "patient 1234: ", max_new_tokens=10)
    assert len(text) <= 10 and text.count("\n") <= 1 and (text.endswith("\n") or len(text) == 10)
    with pytest.raises(ValueError, match="not in the tokenizer"):
        complete(model, corpus, "patiént")


def test_task_rejects_bad_settings(corpus: Corpus):
    with pytest.raises(ValueError, match="eval_rows"):
        LMTask(corpus, 32, eval_rows=0)
    with pytest.raises(TypeError, match="Corpus"):
        LMTask("text", 32)


# --- looking inside the routing (moe_course.analysis.lm_routing) -------------------------------------


def test_routing_report_counts_every_token_once_per_layer(corpus: Corpus):
    from moe_course.analysis.lm_routing import routing_report

    model = _model(corpus, ffn="switch", num_experts=4, capacity_factor=1.0)
    batch = corpus.held_out(12, 32)
    reports = routing_report(model, batch, corpus.domains, chunk=4)
    assert [r.layer for r in reports] == [0, 1]
    with torch.no_grad():
        outs = [model(batch.x[i : i + 4]) for i in range(0, 12, 4)]
    for r in reports:
        assert r.domain_expert.shape == (corpus.num_domains, 4) and r.char_expert.shape == (corpus.vocab_size, 4)
        assert r.tokens == batch.x.numel() == int(r.domain_expert.sum()) == int(r.char_expert.sum())
        # per-domain row totals are the number of target characters of each domain
        assert torch.equal(r.domain_expert.sum(1), torch.bincount(batch.domain.reshape(-1), minlength=corpus.num_domains))
        expected_load = sum(o.moe[r.layer].tokens_per_expert for o in outs)
        assert torch.equal(r.tokens_per_expert, expected_load)
        assert r.dropped == sum(int(o.moe[r.layer].num_dropped) for o in outs)
        gates = torch.cat([o.moe[r.layer].gates[:, 0] for o in outs])
        assert r.mean_gate == pytest.approx(float(gates.mean()), rel=1e-6)
        assert 1 / 4 <= r.mean_gate < 0.4  # the chosen expert has the largest probability; untrained, close to uniform 1/E
        assert 0.0 <= r.specialisation <= 1.0
        table = r.domain_table()
        assert list(table.index) == list(corpus.domains) and torch.allclose(
            torch.tensor(table.sum(axis=1).values), torch.ones(6, dtype=torch.float64)
        )
        prefs = r.preferred_chars(corpus.tokenizer, k=3)
        assert set(prefs.columns) == {"expert", "char", "count", "share", "lift"} and (prefs.groupby("expert").size() <= 3).all()


def test_routing_tracker_records_shares_over_training(corpus: Corpus):
    from moe_course.analysis.lm_routing import RoutingTracker

    task = LMTask(corpus, 32, eval_rows=8)
    tracker = RoutingTracker(task.held_out, corpus.domains, chunk=8)
    train(
        _model(corpus, ffn="switch", num_experts=2),
        task,
        TrainConfig(steps=4, batch_size=8, eval_every=2),
        progress=False,
        device="cpu",
        callback=tracker,
    )
    h = tracker.history
    assert sorted(h["step"].unique()) == [2, 4] and len(h) == 2 * 2 * 2
    assert torch.allclose(torch.tensor(h.groupby(["step", "layer"])["share"].sum().values), torch.ones(4, dtype=torch.float64))
    assert list(tracker.summary.columns) == ["step", "layer", "dropped_rate", "specialisation", "mean_gate"]
