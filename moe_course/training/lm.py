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
  the domain's target characters), ``val_exact_<domain>`` for domains with
  answers (the share of complete held-out samples whose whole answer the model
  gets right, character by character: exactly what greedy decoding from the
  prompt would produce), and for Switch models ``val_dropped`` (share of
  token-layer assignments dropped for lack of capacity) and ``val_balance``
  (the balance loss E·Σ f·P averaged over layers, 1.0 when perfectly even).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.corpus import ANSWER_DOMAINS, Corpus, LMBatch
from .loop import model_logits

__all__ = ["token_losses", "loss_by_domain", "exact_match_by_domain", "LMEvaluation", "evaluate_lm", "LMTask", "complete"]


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
        raise ValueError(f"token_loss and domain must have the same shape, got {tuple(token_loss.shape)} and {tuple(domain.shape)}")
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
    dropped: list[float] = field(default_factory=list)  # per Switch layer: share of tokens dropped
    balance: list[float] = field(default_factory=list)  # per Switch layer: mean load-balancing loss

    @property
    def loss(self) -> float:
        return float(self.loss_sum.sum() / self.count.sum())

    def domain_loss(self, name: str) -> float:
        i = self.domains.index(name)
        return float(self.loss_sum[i] / self.count[i]) if self.count[i] else float("nan")

    def exact(self, name: str) -> float:
        i = self.domains.index(name)
        return float(self.exact_right[i] / self.exact_total[i]) if self.exact_total[i] else float("nan")

    def as_dict(self) -> dict[str, float]:
        out = {"val_loss": self.loss}
        out.update({f"val_loss_{d}": self.domain_loss(d) for d in self.domains})
        out.update({f"val_exact_{d}": self.exact(d) for d in self.domains if d in ANSWER_DOMAINS})
        if self.dropped:
            out["val_dropped"] = sum(self.dropped) / len(self.dropped)
            out["val_balance"] = sum(self.balance) / len(self.balance)
        return out


@torch.no_grad()
def evaluate_lm(model: nn.Module, batch: LMBatch, domains: tuple[str, ...], *, chunk: int = 32, device: torch.device | str | None = None) -> LMEvaluation:
    """Run ``model`` on ``batch`` in chunks of ``chunk`` rows (eval mode) and tally losses per domain.

    Switch layers compute their capacity per forward call, so ``chunk`` rows
    per call should match the training batch size for comparable dropping.
    """
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    S = len(domains)
    loss_sum = torch.zeros(S, dtype=torch.float64)
    count = torch.zeros(S, dtype=torch.int64)
    right = torch.zeros(S, dtype=torch.int64)
    total = torch.zeros(S, dtype=torch.int64)
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
        r, t = exact_match_by_domain(logits.argmax(-1) == part.y, part, S)
        right += r
        total += t
        for i, m in enumerate(getattr(out, "moe", ()) or ()):
            if m is not None:
                dropped.setdefault(i, []).append(float(m.num_dropped) / m.expert_index.shape[0])
                balance.setdefault(i, []).append(float(m.aux_loss))
    model.train(was_training)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return LMEvaluation(domains, loss_sum, count, right, total,
                        [mean(dropped[i]) for i in sorted(dropped)], [mean(balance[i]) for i in sorted(balance)])


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
        """The full held-out result (per-domain sums and counts, per-layer routing numbers)."""
        return evaluate_lm(model, self.held_out, self.corpus.domains, chunk=self.eval_chunk, device=device)

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        return self.evaluation(model, device).as_dict()


def complete(model: nn.Module, corpus: Corpus, prompt: str, *, max_new_tokens: int = 40, temperature: float = 0.0,
             top_k: int | None = None, generator: torch.Generator | None = None, stop_at_newline: bool = True) -> str:
    """Continue ``prompt`` with ``model``: greedy by default; stops after a newline (the end of a sample).

    Returns only the generated characters (without the prompt). A prompt
    starts after the implicit "\\n" that begins every training row.
    """
    device = next(model.parameters()).device
    idx = corpus.encode("\n" + prompt)[None].to(device)  # (1, T0)
    newline = corpus.tokenizer.chars.index("\n")
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator,
                         stop_token=newline if stop_at_newline else None)
    text = corpus.decode(out[0, idx.shape[1]:].cpu())
    if stop_at_newline and "\n" in text:
        text = text[: text.index("\n") + 1]
    return text
