"""The language-model task: next-character prediction on the corpus, measured per domain.

Shape legend (used across the package): B batch, T time, D model width,
F hidden width, E experts, K top-k, C capacity, N = B·T tokens; V vocabulary,
S domains.

``LMTask(corpus, block_size)`` plugs into ``moe_course.training.train``:

* ``sample_batch``: B fresh rows of T characters from the corpus stream;
* ``loss``: the mean cross-entropy of the next character plus the model's
  ``router_loss`` (the Switch layers' weighted balance and z-losses; 0 for dense);
* ``evaluate``: on a fixed held-out set (fresh samples, same fact table)
  ``val_loss`` overall and ``val_loss_<domain>`` for every domain (mean over
  the domain's target characters); for domains with answers
  ``val_exact_<domain>`` (the share of complete held-out samples whose whole
  answer the model gets right, character by character: exactly what greedy
  decoding from the prompt would produce) and ``val_answer_loss_<domain>``
  (the mean loss over answer characters only, leaving out the prompt's own
  characters); ``val_recall_facts`` and ``val_table_loss_facts``
  (``fact_recall``: every record of the table asked once); and for Switch
  models ``val_dropped`` (share of token-expert assignments beyond an
  expert's capacity) and ``val_balance`` (the balance loss E·Σ f·P averaged
  over layers, 1.0 when perfectly even).

Evaluation never drops tokens (``without_dropping``): a Switch layer counts
its capacity per forward call, so what it drops depends on which rows happen
to share a call, and a record asked alone must not fare differently from one
asked in a crowd. Training keeps the model's capacity factor.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..data.corpus import ANSWER_DOMAINS, Corpus, LMBatch
from ..moe import MoELayer
from ..routing import expert_capacity
from ..transformer import GPT
from .loop import model_logits

__all__ = [
    "token_losses",
    "loss_by_domain",
    "exact_match_by_domain",
    "LMEvaluation",
    "evaluate_lm",
    "without_dropping",
    "FactRecall",
    "fact_recall",
    "LMTask",
    "complete",
]


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every target: logits (B, T, V), targets (B, T) → (B, T), in nats."""
    if logits.ndim != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"expected logits (B, T, V) and targets (B, T), got {tuple(logits.shape)} and {tuple(targets.shape)}")
    V = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1), reduction="none").reshape(targets.shape)


def loss_by_domain(token_loss: torch.Tensor, domain: torch.Tensor, num_domains: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of losses and number of targets per domain: (B, T), (B, T) → (S,) float64 sums, (S,) int64 counts.

    The mean loss of domain s is sums[s] / counts[s] (NaN when it has no
    targets); sums.sum() / counts.sum() is the overall mean.
    """
    if token_loss.shape != domain.shape:
        raise ValueError(
            f"token_loss and domain must have the same shape, got {tuple(token_loss.shape)} and {tuple(domain.shape)}"
        )
    d = domain.reshape(-1).cpu()
    if d.numel() and (d.min() < 0 or d.max() >= num_domains):
        raise ValueError(f"domain ids must lie in [0, {num_domains}), got values in [{int(d.min())}, {int(d.max())}]")
    sums = torch.zeros(num_domains, dtype=torch.float64).index_add_(0, d, token_loss.detach().reshape(-1).double().cpu())
    counts = torch.bincount(d, minlength=num_domains)
    return sums, counts


def exact_match_by_domain(correct: torch.Tensor, batch: LMBatch, num_domains: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Complete samples whose every answer character is right, per domain: → (S,) right, (S,) total (int64).

    correct (B, T) bool: the model's most likely next character is the target.
    Under teacher forcing, "every answer character right" is the same as
    "greedy decoding from the prompt writes the answer". Samples cut by the
    end of a row (sample id −1) and samples without an answer are left out.
    """
    B, T = batch.y.shape
    keep = batch.answer & (batch.sample >= 0)  # (B, T) answer characters of complete samples
    rows = torch.arange(B, device=batch.y.device)[:, None].expand(B, T)
    key = (rows * (T + 1) + batch.sample.clamp_min(0))[keep].cpu()  # a unique id per (row, sample)
    wrong = (~correct[keep]).cpu().long()
    dom = batch.domain[keep].cpu()
    uniq, inverse = torch.unique(key, return_inverse=True)
    any_wrong = torch.zeros(len(uniq), dtype=torch.int64).index_add_(0, inverse, wrong)  # per sample
    sample_domain = torch.zeros(len(uniq), dtype=torch.int64).scatter_(0, inverse, dom)
    total = torch.bincount(sample_domain, minlength=num_domains)
    right = torch.bincount(sample_domain[any_wrong == 0], minlength=num_domains)
    return right, total


@dataclass(frozen=True)
class LMEvaluation:
    """A model's held-out results; ``as_dict()`` gives the flat metrics ``train`` logs."""

    domains: tuple[str, ...]
    loss_sum: torch.Tensor  # (S,) float64 summed cross-entropy per domain
    count: torch.Tensor  # (S,) int64 target characters per domain
    exact_right: torch.Tensor  # (S,) int64 complete answers fully right
    exact_total: torch.Tensor  # (S,) int64 complete samples with an answer
    dropped: list[float] = field(default_factory=list)  # per Switch layer: share of assignments over capacity (see evaluate_lm)
    balance: list[float] = field(default_factory=list)  # per Switch layer: mean load-balancing loss
    answer_loss_sum: torch.Tensor | None = None  # (S,) float64 summed cross-entropy over answer characters only
    answer_count: torch.Tensor | None = None  # (S,) int64 answer characters per domain

    @property
    def loss(self) -> float:
        return float(self.loss_sum.sum() / self.count.sum())

    def domain_loss(self, name: str) -> float:
        i = self.domains.index(name)
        return float(self.loss_sum[i] / self.count[i]) if self.count[i] else float("nan")

    def answer_loss(self, name: str) -> float:
        """Mean loss over the answer characters of ``name`` (NaN without answers)."""
        i = self.domains.index(name)
        if self.answer_count is None or not self.answer_count[i]:
            return float("nan")
        return float(self.answer_loss_sum[i] / self.answer_count[i])

    def exact(self, name: str) -> float:
        i = self.domains.index(name)
        return float(self.exact_right[i] / self.exact_total[i]) if self.exact_total[i] else float("nan")

    def as_dict(self) -> dict[str, float]:
        out = {"val_loss": self.loss}
        out.update({f"val_loss_{d}": self.domain_loss(d) for d in self.domains})
        out.update({f"val_exact_{d}": self.exact(d) for d in self.domains if d in ANSWER_DOMAINS})
        if self.answer_count is not None:
            out.update({f"val_answer_loss_{d}": self.answer_loss(d) for d in self.domains if d in ANSWER_DOMAINS})
        if self.dropped:
            out["val_dropped"] = sum(self.dropped) / len(self.dropped)
            out["val_balance"] = sum(self.balance) / len(self.balance)
        return out


@torch.no_grad()
def evaluate_lm(
    model: nn.Module,
    batch: LMBatch,
    domains: tuple[str, ...],
    *,
    chunk: int = 32,
    device: torch.device | str | None = None,
    dropless: bool = True,
) -> LMEvaluation:
    """Run ``model`` on ``batch`` in chunks of ``chunk`` rows (eval mode) and tally losses per domain.

    dropless: judge the model without dropping tokens (``without_dropping``);
    ``dropped`` then counts, per Switch layer, the share of assignments the
    model's own capacity (C slots per expert for ``chunk`` rows) would have
    turned away: those beyond an expert's C-th. With ``dropless=False`` the
    model runs as configured and ``dropped`` counts what it did drop.
    """
    if device is None:
        device = next(model.parameters()).device
    config = getattr(model, "config", None)
    factor = getattr(config, "capacity_factor", None)
    if dropless:
        model = without_dropping(model)
    was_training = model.training
    model.eval()
    S = len(domains)
    loss_sum = torch.zeros(S, dtype=torch.float64)
    count = torch.zeros(S, dtype=torch.int64)
    right = torch.zeros(S, dtype=torch.int64)
    total = torch.zeros(S, dtype=torch.int64)
    answer_sum = torch.zeros(S, dtype=torch.float64)
    answer_count = torch.zeros(S, dtype=torch.int64)
    dropped: dict[int, list[float]] = {}
    balance: dict[int, list[float]] = {}
    for start in range(0, len(batch), chunk):
        part = batch.rows(start, start + chunk).to(device)
        out = model(part.x)
        logits, _ = model_logits(out)
        tl = token_losses(logits, part.y)  # (b, T)
        s, c = loss_by_domain(tl, part.domain, S)
        loss_sum += s
        count += c
        s, c = loss_by_domain(tl[part.answer], part.domain[part.answer], S)  # answer characters only
        answer_sum += s
        answer_count += c
        r, t = exact_match_by_domain(logits.argmax(-1) == part.y, part, S)
        right += r
        total += t
        for i, m in enumerate(getattr(out, "moe", ()) or ()):
            if m is None:
                continue
            N, K = m.expert_index.shape
            if dropless and factor is not None:  # what C slots per expert would have turned away
                E = m.router_logits.shape[-1]
                C = expert_capacity(N, E, factor, top_k=K)
                share = float((m.tokens_per_expert - C).clamp_min(0).sum()) / (N * K)
            else:
                share = float((~m.keep).sum()) / (N * K)
            dropped.setdefault(i, []).append(share)
            balance.setdefault(i, []).append(float(m.aux_loss))
    model.train(was_training)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return LMEvaluation(
        domains,
        loss_sum,
        count,
        right,
        total,
        [mean(dropped[i]) for i in sorted(dropped)],
        [mean(balance[i]) for i in sorted(balance)],
        answer_sum,
        answer_count,
    )


def without_dropping(model: nn.Module) -> nn.Module:
    """``model`` itself if none of its layers can drop tokens, else a copy whose Switch layers are dropless.

    The copy (same weights, same device, eval mode) sends every token to its
    chosen expert whatever the others chose: its answers do not depend on
    which rows share a forward call. Works for a ``GPT`` (its config's and its
    expert layers' ``capacity_factor`` set to None), including one whose
    expert layers are spread over processes (``moe_course.distributed``): the
    copy keeps each layer's own class and experts. Other models are returned
    as they are.
    """
    if not isinstance(model, GPT) or model.config.ffn != "switch" or model.config.capacity_factor is None:
        return model
    copy = deepcopy(model)
    copy.config = replace(model.config, capacity_factor=None)
    for layer in copy.modules():
        if isinstance(layer, MoELayer):
            layer.config = replace(layer.config, capacity_factor=None)  # read at every forward
    return copy.eval()


@dataclass(frozen=True)
class FactRecall:
    """Every record of the table asked once (``fact_recall``); P records."""

    patients: tuple[int, ...]  # (P,) the patients, in the table's order
    recalled: torch.Tensor  # (P,) bool: every answer character (the ward and the closing newline) is the top choice
    answer_loss: torch.Tensor  # (P,) float64 mean cross-entropy over the answer characters, nats

    @property
    def recall(self) -> float:
        """The share of the table the model answers right."""
        return float(self.recalled.double().mean())

    @property
    def loss(self) -> float:
        """The mean answer loss over the table (every record weighs the same)."""
        return float(self.answer_loss.mean())

    def known(self) -> list[int]:
        """The patients whose ward the model writes."""
        return [p for p, r in zip(self.patients, self.recalled.tolist()) if r]


@torch.no_grad()
def fact_recall(model: nn.Module, corpus: Corpus, *, chunk: int = 256, device: torch.device | str | None = None) -> FactRecall:
    """Ask ``model`` for every patient of ``corpus.facts``: one row per record, "\n" + prompt + ward + "\n".

    Teacher-forced: a record counts as recalled when the model's most likely
    next character is right at every answer position, which is exactly what
    greedy decoding from the prompt would write. Rows start like training
    rows (with "\n"); evaluation never drops tokens (``without_dropping``).
    Rows: ``chunk`` per forward call.
    """
    if not isinstance(corpus, Corpus):
        raise TypeError(f"fact_recall expects a Corpus, got {type(corpus).__name__}")
    model = without_dropping(model)
    device = device if device is not None else next(model.parameters()).device
    patients = tuple(corpus.facts)
    rows = ["\n" + corpus.fact_prompt(p) + corpus.facts[p] + "\n" for p in patients]
    starts = [1 + len(corpus.fact_prompt(p)) for p in patients]  # index of the first answer character in the row
    length = max(len(r) for r in rows)
    block = getattr(getattr(model, "config", None), "block_size", length)
    if length - 1 > block:
        raise ValueError(f"fact_recall: a record takes {length - 1} positions but the model reads at most block_size={block}")
    ids = torch.zeros(len(rows), length, dtype=torch.int64)  # padded with "\n" (id 0); the padding is never scored
    answer = torch.zeros(len(rows), length - 1, dtype=torch.bool)  # (P, L-1) over targets y = ids[:, 1:]
    for i, (row, start) in enumerate(zip(rows, starts)):
        ids[i, : len(row)] = corpus.encode(row)
        answer[i, start - 1 : len(row) - 1] = True
    was_training = model.training
    model.eval()
    recalled, losses = [], []
    for lo in range(0, len(rows), chunk):
        x = ids[lo : lo + chunk, :-1].to(device)  # (b, L-1)
        y = ids[lo : lo + chunk, 1:].to(device)
        mask = answer[lo : lo + chunk].to(device)
        logits, _ = model_logits(model(x))
        tl = token_losses(logits, y)  # (b, L-1)
        wrong = (logits.argmax(-1) != y) & mask
        recalled.append(~wrong.any(1).cpu())
        losses.append(((tl * mask).sum(1) / mask.sum(1)).double().cpu())
    model.train(was_training)
    return FactRecall(patients, torch.cat(recalled), torch.cat(losses))


@dataclass
class LMTask:
    """Next-character prediction on ``corpus`` for ``train``; see the module docstring.

    The held-out set (``eval_rows`` rows of ``block_size`` characters) is made
    once, from the corpus's held-out stream, and is the same for every model
    trained on this corpus: comparisons between models use identical text.
    """

    corpus: Corpus
    block_size: int  # T, characters per row (at most the model's block_size)
    eval_rows: int = 128  # held-out rows
    eval_chunk: int = 32  # rows per forward call during evaluation (match the training batch size)
    eval_seed: int = 0  # which held-out set
    table_recall: bool = True  # also ask for every record at each evaluation (val_recall_facts), if records fit in block_size
    held_out: LMBatch = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.corpus, Corpus):
            raise TypeError(f"LMTask expects a Corpus, got {type(self.corpus).__name__}")
        for name in ("block_size", "eval_rows", "eval_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LMTask.{name} must be a positive int, got {value!r}")
        self.held_out = self.corpus.held_out(self.eval_rows, self.block_size, seed=self.eval_seed)

    @property
    def domains(self) -> tuple[str, ...]:
        return self.corpus.domains

    @property
    def records_fit(self) -> bool:
        """Whether a whole record ("\\n", prompt, ward, "\\n") fits in block_size + 1 characters (needed by ``fact_recall``)."""
        longest = max(len(self.corpus.fact_prompt(p) + w) for p, w in self.corpus.facts.items()) + 2
        return longest - 1 <= self.block_size

    def sample_batch(self, batch_size: int, generator: torch.Generator, device: torch.device) -> LMBatch:
        return self.corpus.batch(batch_size, self.block_size, generator).to(device)

    def loss(self, model: nn.Module, batch: LMBatch) -> tuple[torch.Tensor, dict[str, float]]:
        logits, router_loss = model_logits(model(batch.x))
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch.y.reshape(-1))
        metrics = {"train_loss": ce.item()}
        if router_loss is None:
            return ce, metrics
        metrics["router_loss"] = router_loss.detach().item() if isinstance(router_loss, torch.Tensor) else float(router_loss)
        return ce + router_loss, metrics

    def evaluation(self, model: nn.Module, device: torch.device | str | None = None) -> LMEvaluation:
        """The full held-out result (per-domain sums and counts, per-layer routing numbers), without dropping tokens."""
        return evaluate_lm(model, self.held_out, self.corpus.domains, chunk=self.eval_chunk, device=device)

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        metrics = self.evaluation(model, device).as_dict()
        if self.table_recall and self.corpus.mix.get("facts", 0) > 0 and self.records_fit:
            table = fact_recall(model, self.corpus, device=device)
            metrics["val_recall_facts"] = table.recall
            metrics["val_table_loss_facts"] = table.loss
        return metrics


def complete(
    model: nn.Module,
    corpus: Corpus,
    prompt: str,
    *,
    max_new_tokens: int = 40,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    stop_at_newline: bool = True,
) -> str:
    """Continue ``prompt`` with ``model``: greedy by default; stops after a newline (the end of a sample).

    Returns only the generated characters (without the prompt). A prompt
    starts after the implicit "\\n" that begins every training row.
    """
    device = next(model.parameters()).device
    idx = corpus.encode("\n" + prompt)[None].to(device)  # (1, T0)
    newline = corpus.tokenizer.chars.index("\n")
    out = model.generate(
        idx,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        generator=generator,
        stop_token=newline if stop_at_newline else None,
    )
    text = corpus.decode(out[0, idx.shape[1] :].cpu())
    if stop_at_newline and "\n" in text:
        text = text[: text.index("\n") + 1]
    return text
