"""The clinic's library: a multi-domain character corpus for the language-model lessons.

Shape legend (used across the package): B batch, T time, D model width,
F hidden width, E experts, K top-k, C capacity, N = B·T tokens.

An endless, seeded stream of short samples, each one line ending in ``"\\n"``
and tagged with its *domain*. Two kinds of domain:

* **knowledge**, ``facts``: the clinic's records, a table of ``num_facts``
  random facts such as ``"patient 48: eye\\n"``. Nothing about the patient
  number predicts the ward: the model has to memorise the table, and a small
  model runs out of room for it; more parameters (experts) should help here.
  Patient numbers have ``id_digits`` digits (2 by default: every patient from
  10 to 99). Longer numbers allow thousands of records, but a toy model then
  needs far more steps, because it must first learn to combine all the digits
  into one key (measured, records only, a 2-layer model of width 64, 300
  steps: 250 records with 4-digit numbers, 17% recalled, chance being 6%;
  90 records with 2-digit numbers written "42:eye", all recalled). With
  ``id_alphabet`` patients get codes of ``id_digits`` characters instead
  ("KQ" from the capital letters: up to 676 patients with two characters),
  and ``fact_prompt`` sets how a record asks for its ward: "patient {}: " by
  default, "#{}" to write the ward right after the code ("#KQeye"), so that
  the position which must answer holds a character of the key.
* **skills**, rules that a small network can learn and more parameters help
  little: ``arithmetic`` (``"37+45=82"``, ``"61-8=53"``), ``reversal``
  (``"rev abcd=dcba"``), ``sorting`` (``"sort dbca=abcd"``), ``brackets``
  (``"close ([{=}])"``: close what is open) and ``grammar`` (short sentences of
  a small English-like grammar with subject-verb agreement:
  ``"the old doctors treat a child."``).
* optionally **text**: windows of a user's own text file (its last tenth is
  held out), tagged as its own domain.

Each sample has a *prompt* and an *answer*: the answer is what the prompt
determines (after ``": "`` or ``"="``, plus the closing ``"\\n"``). Grammar and
text samples have no prompt and no answer; they are judged by their loss alone.

Batches (``Corpus.batch``) are rows of B·(T+1) characters: a ``"\\n"`` that
starts every row, then whole samples one after the other, cut at T+1. Inputs
x are the first T characters, targets y the next T (shifted by one). Every
target character carries the domain of the sample it belongs to, whether it
is part of an answer, and which sample of the row it is in (−1 for the sample
the cut truncated), so losses and routing can be measured per domain.

Determinism: the fact table depends only on ``CorpusConfig.seed`` (and the
table options); a batch depends only on the ``torch.Generator`` passed in.
The held-out set (``Corpus.held_out``) is drawn from its own stream: fresh
samples, the same fact table. Nothing is downloaded.
"""

from __future__ import annotations

import itertools
import math
import random
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "BASE_CHARS",
    "DOMAINS",
    "KNOWLEDGE_DOMAINS",
    "SKILL_DOMAINS",
    "ANSWER_DOMAINS",
    "DEFAULT_MIX",
    "WARDS",
    "CharTokenizer",
    "CorpusConfig",
    "Sample",
    "LMBatch",
    "Corpus",
    "load_text",
]

# Every printable ASCII character, after "\n" (id 0), which ends every sample.
BASE_CHARS: str = "\n" + "".join(chr(c) for c in range(32, 127))

KNOWLEDGE_DOMAINS: tuple[str, ...] = ("facts",)
SKILL_DOMAINS: tuple[str, ...] = ("arithmetic", "reversal", "sorting", "brackets", "grammar")
DOMAINS: tuple[str, ...] = KNOWLEDGE_DOMAINS + SKILL_DOMAINS  # the built-in domains, in id order
TEXT_DOMAIN = "text"  # a user's own text file, appended after the built-in domains
ANSWER_DOMAINS: tuple[str, ...] = ("facts", "arithmetic", "reversal", "sorting", "brackets")

# Half of the stream is the clinic's records; the skills share the other half.
DEFAULT_MIX: dict[str, float] = {
    "facts": 0.5,
    "arithmetic": 0.1,
    "reversal": 0.1,
    "sorting": 0.1,
    "brackets": 0.1,
    "grammar": 0.1,
}

# The wards a patient can be sent to (the answers of the facts domain).
WARDS: tuple[str, ...] = (
    "eye",
    "skin",
    "heart",
    "lung",
    "bone",
    "brain",
    "blood",
    "ear",
    "gut",
    "kidney",
    "liver",
    "teeth",
    "child",
    "mind",
    "nerve",
    "joint",
)

_BRACKETS = {"(": ")", "[": "]", "{": "}", "<": ">"}
_SUBJECTS_SG = ("doctor", "nurse", "patient", "child", "surgeon", "porter", "visitor")
_SUBJECTS_PL = ("doctors", "nurses", "patients", "children", "surgeons", "porters", "visitors")
_VERBS = (("sees", "see"), ("treats", "treat"), ("helps", "help"), ("calls", "call"), ("visits", "visit"), ("thanks", "thank"))
_ADJECTIVES = ("old", "young", "kind", "busy", "tired", "calm", "new")

# Named random streams derived from one seed (as in clinic.py).
_FACTS, _HELD_OUT = 0, 1
_MAX_SEED = 2**40


def _rng(seed: int, stream: int) -> random.Random:
    return random.Random((seed % _MAX_SEED) * 16 + stream)


class CharTokenizer:
    """Characters ↔ integer ids, over a fixed vocabulary.

    ``encode`` raises a ``ValueError`` naming the first character it does not
    know (and where it is); ``decode`` raises on ids outside the vocabulary.
    """

    def __init__(self, chars: str = BASE_CHARS) -> None:
        if not isinstance(chars, str) or not chars:
            raise ValueError("CharTokenizer needs a non-empty string of characters")
        if len(set(chars)) != len(chars):
            dup = sorted({c for c in chars if chars.count(c) > 1})
            raise ValueError(f"CharTokenizer: the vocabulary repeats characters {dup!r}")
        self.chars = chars
        self._index = {c: i for i, c in enumerate(chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def __len__(self) -> int:
        return len(self.chars)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and other.chars == self.chars

    def __hash__(self) -> int:
        return hash(self.chars)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"

    def extended(self, text: str) -> CharTokenizer:
        """A tokenizer that also knows every character of ``text`` (new ones appended, sorted)."""
        extra = "".join(sorted(set(text) - set(self.chars)))
        return CharTokenizer(self.chars + extra)

    def encode(self, text: str) -> torch.Tensor:
        """str → (len(text),) int64 ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        try:
            return torch.tensor([self._index[c] for c in text], dtype=torch.int64)
        except KeyError:
            pos, char = next((i, c) for i, c in enumerate(text) if c not in self._index)
            raise ValueError(
                f"character {char!r} (U+{ord(char):04X}) at position {pos} is not in the tokenizer's "
                f"vocabulary of {self.vocab_size} characters; use CharTokenizer.extended(text) to add it"
            ) from None

    def encode_list(self, text: str) -> list[int]:
        """str → list of ids (no tensor), for fast batch building."""
        try:
            return [self._index[c] for c in text]
        except KeyError:
            self.encode(text)  # raises the explanatory error
            raise

    def decode(self, ids) -> str:
        """ids (a 1-D tensor or a sequence of ints) → str."""
        if isinstance(ids, torch.Tensor):
            if ids.ndim != 1:
                raise ValueError(f"decode expects a 1-D sequence of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        out = []
        for i in ids:
            if not isinstance(i, int) or not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i!r} is outside the vocabulary [0, {self.vocab_size})")
            out.append(self.chars[i])
        return "".join(out)


@dataclass(frozen=True)
class CorpusConfig:
    seed: int = 0  # fixes the fact table (and the held-out stream)
    num_facts: int = 90  # patients in the clinic's records (the knowledge to memorise)
    id_digits: int = 2  # characters of a patient number: at most 9·10^(id_digits-1) patients (A^id_digits with id_alphabet)
    id_alphabet: str | None = None  # None: decimal numbers ("48"); a string: codes of id_digits of its characters ("KQ")
    num_wards: int = 16  # distinct answers of a fact (at most len(WARDS)): log2(num_wards) bits per fact
    fact_prompt: str = "patient {}: "  # a record's prompt, "{}" standing for the patient number; the ward follows it
    mix: Mapping[str, float] | None = None  # sampling weight per domain; None: DEFAULT_MIX (+ text_weight)
    arithmetic_digits: int = 2  # operands have up to this many digits
    max_word: int = 6  # longest word to reverse or sort, and longest bracket prefix
    text_file: str | None = None  # a user's own text file, sampled as the domain "text"
    text_weight: float = 0.25  # share of the stream given to the text file when mix is None
    text_window: int = 64  # characters per text sample
    text_held_out: float = 0.1  # the last fraction of the text file is held out

    def __post_init__(self) -> None:
        for name in ("seed",):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"CorpusConfig.{name} must be an int >= 0, got {value!r}")
        for name in ("num_facts", "id_digits", "arithmetic_digits", "max_word", "text_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"CorpusConfig.{name} must be a positive int, got {value!r}")
        if self.id_digits > 6:
            raise ValueError(f"CorpusConfig.id_digits must be at most 6, got {self.id_digits}")
        if self.id_alphabet is not None:
            if (
                not isinstance(self.id_alphabet, str)
                or len(self.id_alphabet) < 2
                or len(set(self.id_alphabet)) != len(self.id_alphabet)
            ):
                raise ValueError(
                    f"CorpusConfig.id_alphabet must be a string of at least 2 distinct characters (or None for numbers), got {self.id_alphabet!r}"
                )
            if any(c not in BASE_CHARS or c.isspace() for c in self.id_alphabet):
                raise ValueError(
                    f"CorpusConfig.id_alphabet {self.id_alphabet!r} may use printable ASCII characters other than spaces only"
                )
        if self.num_facts > self.max_facts:
            raise ValueError(
                f"CorpusConfig.num_facts={self.num_facts}: patient numbers have {self.id_digits} characters, so at most {self.max_facts} facts; raise id_digits"
            )
        if not isinstance(self.num_wards, int) or not 2 <= self.num_wards <= len(WARDS):
            raise ValueError(f"CorpusConfig.num_wards must be an int in [2, {len(WARDS)}], got {self.num_wards!r}")
        if not isinstance(self.fact_prompt, str) or self.fact_prompt.count("{}") != 1 or "\n" in self.fact_prompt:
            raise ValueError(
                f"CorpusConfig.fact_prompt must be one line with exactly one '{{}}' for the patient number, e.g. 'patient {{}}: ', got {self.fact_prompt!r}"
            )
        before, after = self.fact_prompt.split("{}")
        id_chars = self.id_alphabet or string.digits
        if before[-1:] and before[-1] in id_chars or after[:1] and after[0] in id_chars:
            raise ValueError(
                f"CorpusConfig.fact_prompt {self.fact_prompt!r}: a character of the patient numbers next to '{{}}' would merge with the number"
            )
        if any(c not in BASE_CHARS for c in self.fact_prompt):
            raise ValueError(f"CorpusConfig.fact_prompt {self.fact_prompt!r} may use printable ASCII characters only")
        if self.arithmetic_digits > 6:
            raise ValueError(f"CorpusConfig.arithmetic_digits must be at most 6, got {self.arithmetic_digits}")
        if self.max_word < 3:
            raise ValueError(f"CorpusConfig.max_word must be at least 3, got {self.max_word}")
        if not 0.0 < self.text_held_out < 1.0:
            raise ValueError(f"CorpusConfig.text_held_out must be in (0, 1), got {self.text_held_out!r}")
        if not isinstance(self.text_weight, (int, float)) or not math.isfinite(self.text_weight) or self.text_weight <= 0:
            raise ValueError(f"CorpusConfig.text_weight must be > 0, got {self.text_weight!r}")
        if self.mix is not None:
            if not isinstance(self.mix, Mapping) or not self.mix:
                raise ValueError(f"CorpusConfig.mix must be a non-empty mapping domain → weight, got {self.mix!r}")
            known = DOMAINS + (TEXT_DOMAIN,)
            for name, weight in self.mix.items():
                if name not in known:
                    raise ValueError(f"CorpusConfig.mix: unknown domain {name!r}; choose from {list(known)}")
                if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight) or weight < 0:
                    raise ValueError(f"CorpusConfig.mix[{name!r}] must be a number >= 0, got {weight!r}")
            if sum(self.mix.values()) <= 0:
                raise ValueError("CorpusConfig.mix: the weights sum to 0; give at least one domain a positive weight")
            if TEXT_DOMAIN in self.mix and self.mix[TEXT_DOMAIN] > 0 and self.text_file is None:
                raise ValueError("CorpusConfig.mix gives weight to 'text' but no text_file is set")

    @property
    def max_facts(self) -> int:
        """How many distinct patient numbers there are: 9·10^(d-1) decimal numbers, or A^d codes."""
        if self.id_alphabet is None:
            return 9 * 10 ** (self.id_digits - 1)
        return len(self.id_alphabet) ** self.id_digits

    def to_dict(self) -> dict:
        """A JSON-friendly dict (``CorpusConfig(**d)`` rebuilds it)."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["mix"] = None if self.mix is None else dict(self.mix)
        return d


@dataclass(frozen=True)
class Sample:
    text: str  # one line, ending in "\n"
    domain: str  # which domain it comes from
    prompt_len: int  # text[:prompt_len] is the prompt, text[prompt_len:] the answer (len(text): no answer)

    @property
    def prompt(self) -> str:
        return self.text[: self.prompt_len]

    @property
    def answer(self) -> str:
        return self.text[self.prompt_len :]


@dataclass(frozen=True)
class LMBatch:
    """B rows of T characters, with per-target labels."""

    x: torch.Tensor  # (B, T) int64 input ids
    y: torch.Tensor  # (B, T) int64 target ids: x shifted by one
    domain: torch.Tensor  # (B, T) int64 domain id of each target (Corpus.domains[id])
    answer: torch.Tensor  # (B, T) bool: the target is part of a sample's answer
    sample: torch.Tensor  # (B, T) int64 index of the target's sample within its row; -1: truncated by the cut

    def to(self, device: torch.device | str) -> LMBatch:
        return LMBatch(*(getattr(self, f).to(device) for f in ("x", "y", "domain", "answer", "sample")))

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.x.shape)

    def rows(self, start: int, stop: int) -> LMBatch:
        """Rows start:stop, as a smaller batch."""
        return LMBatch(*(getattr(self, f)[start:stop] for f in ("x", "y", "domain", "answer", "sample")))


def load_text(path: str | Path) -> str:
    """Read a user's text file (UTF-8) for the "text" domain, with clear errors."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"text file {str(p)!r} does not exist")
    if p.is_dir():
        raise IsADirectoryError(f"text file {str(p)!r} is a folder; give the path of one text file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"text file {str(p)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if len(text.strip()) == 0:
        raise ValueError(f"text file {str(p)!r} is empty")
    return text


class Corpus:
    """The multi-domain character corpus: a fact table, skill generators, a tokenizer.

    ``Corpus(CorpusConfig(...))``. ``domains`` lists the domain names in id
    order (the built-in ones, then "text" when a text file is given); the
    tokenizer is ``BASE_CHARS``, extended by the text file's characters.
    """

    def __init__(self, config: CorpusConfig = CorpusConfig(), *, text: str | None = None) -> None:
        if not isinstance(config, CorpusConfig):
            raise TypeError(f"Corpus expects a CorpusConfig, got {type(config).__name__}")
        self.config = config
        if text is None and config.text_file is not None:
            text = load_text(config.text_file)
        tokenizer = CharTokenizer()
        self._text_train = self._text_val = None
        if text is not None:
            tokenizer = tokenizer.extended(text)
            cut = int(len(text) * (1 - config.text_held_out))
            self._text_train, self._text_val = text[:cut], text[cut:]
            for name, part in (("training", self._text_train), ("held-out", self._text_val)):
                if len(part) < 2:
                    raise ValueError(f"the text is too short: its {name} part has {len(part)} characters")
        self.tokenizer = tokenizer
        self.domains: tuple[str, ...] = DOMAINS + ((TEXT_DOMAIN,) if text is not None else ())
        mix = (
            dict(config.mix)
            if config.mix is not None
            else dict(DEFAULT_MIX, **({TEXT_DOMAIN: config.text_weight} if text is not None else {}))
        )
        missing = [d for d, w in mix.items() if w > 0 and d not in self.domains]
        if missing:
            raise ValueError(f"mix gives weight to {missing}, which this corpus does not have (no text given)")
        self.mix: dict[str, float] = {d: float(mix.get(d, 0.0)) for d in self.domains}
        self._cum_weights = list(itertools.accumulate(self.mix[d] for d in self.domains))
        self.facts: dict[int, str] = self._make_facts()
        self._fact_keys = list(self.facts)
        self._fact_prompts = {k: self.fact_prompt(k) for k in self._fact_keys}  # built once: sampling is the hot path
        self._makers = {
            "facts": self._fact,
            "arithmetic": self._arithmetic,
            "reversal": self._reversal,
            "sorting": self._sorting,
            "brackets": self._brackets,
            "grammar": self._grammar,
            TEXT_DOMAIN: self._text,
        }

    # --- the fact table ---------------------------------------------------------

    def _make_facts(self) -> dict[int, str]:
        rng = _rng(self.config.seed, _FACTS)
        d = self.config.id_digits
        first = 10 ** (d - 1) if d > 1 and self.config.id_alphabet is None else 0
        patients = rng.sample(range(first, first + self.config.max_facts), self.config.num_facts)
        wards = WARDS[: self.config.num_wards]
        return {p: wards[rng.randrange(len(wards))] for p in patients}

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def num_domains(self) -> int:
        return len(self.domains)

    def domain_id(self, name: str) -> int:
        if name not in self.domains:
            raise ValueError(f"unknown domain {name!r}; this corpus has {list(self.domains)}")
        return self.domains.index(name)

    def encode(self, text: str) -> torch.Tensor:
        return self.tokenizer.encode(text)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    # --- samples ----------------------------------------------------------------

    def patient_code(self, patient: int) -> str:
        """How ``patient`` is written: its decimal number ("48"), or with ``id_alphabet`` its code of id_digits characters ("KQ")."""
        alphabet = self.config.id_alphabet
        if alphabet is None:
            return str(patient)
        chars = []
        for _ in range(self.config.id_digits):
            patient, r = divmod(patient, len(alphabet))
            chars.append(alphabet[r])
        return "".join(reversed(chars))

    def fact_prompt(self, patient: int) -> str:
        """The prompt that asks for ``patient``'s ward: ``CorpusConfig.fact_prompt`` with the number or code, e.g. "patient 48: "."""
        return self.config.fact_prompt.format(self.patient_code(patient))

    def _fact(self, rng: random.Random, held_out: bool) -> Sample:
        patient = self._fact_keys[rng.randrange(len(self._fact_keys))]
        prompt = self._fact_prompts[patient]
        return Sample(prompt + self.facts[patient] + "\n", "facts", len(prompt))

    def _arithmetic(self, rng: random.Random, held_out: bool) -> Sample:
        top = 10**self.config.arithmetic_digits
        a, b = rng.randrange(top), rng.randrange(top)
        if rng.random() < 0.5:
            prompt, result = f"{a}+{b}=", a + b
        else:
            a, b = max(a, b), min(a, b)
            prompt, result = f"{a}-{b}=", a - b
        return Sample(f"{prompt}{result}\n", "arithmetic", len(prompt))

    def _word(self, rng: random.Random) -> str:
        n = rng.randint(3, self.config.max_word)
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))

    def _reversal(self, rng: random.Random, held_out: bool) -> Sample:
        w = self._word(rng)
        prompt = f"rev {w}="
        return Sample(f"{prompt}{w[::-1]}\n", "reversal", len(prompt))

    def _sorting(self, rng: random.Random, held_out: bool) -> Sample:
        w = self._word(rng)
        prompt = f"sort {w}="
        return Sample(f"{prompt}{''.join(sorted(w))}\n", "sorting", len(prompt))

    def _brackets(self, rng: random.Random, held_out: bool) -> Sample:
        # A random prefix of a bracket sequence that leaves at least one bracket open.
        n = rng.randint(2, self.config.max_word)
        opens = list(_BRACKETS)
        prefix, stack = [], []
        for i in range(n):
            must_open = not stack or len(stack) >= n - i  # keep the stack non-empty at the end
            if must_open or rng.random() < 0.6:
                o = rng.choice(opens)
                prefix.append(o)
                stack.append(o)
            else:
                prefix.append(_BRACKETS[stack.pop()])
        if not stack:  # unreachable by construction; keep the answer non-empty anyway
            o = rng.choice(opens)
            prefix.append(o)
            stack.append(o)
        prompt = f"close {''.join(prefix)}="
        closing = "".join(_BRACKETS[o] for o in reversed(stack))
        return Sample(f"{prompt}{closing}\n", "brackets", len(prompt))

    def _noun_phrase(self, rng: random.Random, plural: bool) -> str:
        nouns = _SUBJECTS_PL if plural else _SUBJECTS_SG
        det = rng.choice(("the", "some")) if plural else rng.choice(("the", "a"))
        words = [det]
        if rng.random() < 0.5:
            words.append(rng.choice(_ADJECTIVES))
        noun = rng.choice(nouns)
        words.append(noun)
        if det == "a" and words[1][0] in "aeiou":
            words[0] = "an"
        return " ".join(words)

    def _grammar(self, rng: random.Random, held_out: bool) -> Sample:
        plural = rng.random() < 0.5
        subject = self._noun_phrase(rng, plural)
        verb = rng.choice(_VERBS)[1 if plural else 0]
        obj = self._noun_phrase(rng, rng.random() < 0.5)
        text = f"{subject} {verb} {obj}.\n"
        return Sample(text, "grammar", len(text))

    def _text(self, rng: random.Random, held_out: bool) -> Sample:
        source = self._text_val if held_out else self._text_train
        n = min(self.config.text_window, len(source))
        start = rng.randrange(len(source) - n + 1)
        text = source[start : start + n] + "\n"
        return Sample(text, TEXT_DOMAIN, len(text))

    def sample(self, domain: str | None = None, *, rng: random.Random | None = None, held_out: bool = False) -> Sample:
        """One sample of ``domain`` (None: drawn by the mix), using ``rng`` (a ``random.Random``)."""
        rng = rng if rng is not None else random.Random(0)
        if domain is None:
            domain = rng.choices(self.domains, cum_weights=self._cum_weights)[0]
        elif domain not in self.domains:
            raise ValueError(f"unknown domain {domain!r}; this corpus has {list(self.domains)}")
        return self._makers[domain](rng, held_out)

    def stream(self, seed: int = 0, *, held_out: bool = False) -> Iterator[Sample]:
        """An endless iterator of samples drawn by the mix, reproducible from ``seed``."""
        rng = random.Random(seed)
        while True:
            yield self.sample(rng=rng, held_out=held_out)

    # --- batches ----------------------------------------------------------------

    def batch(
        self, batch_size: int, block_size: int, generator: torch.Generator | None = None, *, held_out: bool = False
    ) -> LMBatch:
        """B rows of T characters of fresh samples: an ``LMBatch`` on the CPU.

        All randomness comes from ``generator`` (one draw seeds a Python RNG),
        so the same generator state gives the same batch.
        """
        for name, value in (("batch_size", batch_size), ("block_size", block_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        rng = random.Random(int(torch.randint(2**62, (1,), generator=generator)))
        return self._batch(batch_size, block_size, rng, held_out)

    def _batch(self, batch_size: int, block_size: int, rng: random.Random, held_out: bool) -> LMBatch:
        ids, domain, answer, sample = [], [], [], []
        encode = self.tokenizer.encode_list
        domain_ids = {d: i for i, d in enumerate(self.domains)}
        for _ in range(batch_size):
            row_ids, row_dom, row_ans, row_smp = [0], [0], [False], [-1]  # the "\n" that starts every row
            k = 0
            while len(row_ids) < block_size + 1:
                s = self.sample(rng=rng, held_out=held_out)
                n = len(s.text)
                d = domain_ids[s.domain]
                complete = len(row_ids) + n <= block_size + 1
                row_ids += encode(s.text)
                row_dom += [d] * n
                row_ans += [False] * s.prompt_len + [True] * (n - s.prompt_len)
                row_smp += [k if complete else -1] * n
                k += 1
            ids.append(row_ids[: block_size + 1])
            domain.append(row_dom[: block_size + 1])
            answer.append(row_ans[: block_size + 1])
            sample.append(row_smp[: block_size + 1])
        ids, domain, sample = (torch.tensor(v, dtype=torch.int64) for v in (ids, domain, sample))  # (B, T + 1)
        answer = torch.tensor(answer, dtype=torch.bool)  # (B, T + 1)
        # Labels describe the targets y = ids[:, 1:].
        return LMBatch(
            ids[:, :-1].contiguous(),
            ids[:, 1:].contiguous(),
            domain[:, 1:].contiguous(),
            answer[:, 1:].contiguous(),
            sample[:, 1:].contiguous(),
        )

    def held_out(self, num_rows: int, block_size: int, seed: int = 0) -> LMBatch:
        """A fixed held-out set: fresh samples from the held-out stream (same fact table).

        Deterministic from the corpus seed and ``seed``; independent of any
        training generator. Text samples come from the held-out tail of the file.
        """
        rng = _rng(self.config.seed * 1000 + seed, _HELD_OUT)
        return self._batch(num_rows, block_size, rng, held_out=True)

    def __repr__(self) -> str:
        return (
            f"Corpus(domains={list(self.domains)}, num_facts={self.config.num_facts}, "
            f"vocab_size={self.vocab_size}, seed={self.config.seed})"
        )
