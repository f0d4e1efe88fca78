"""Tests for moe_course.data.corpus: the multi-domain character corpus."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from moe_course.data.corpus import (
    ANSWER_DOMAINS,
    BASE_CHARS,
    DOMAINS,
    WARDS,
    CharTokenizer,
    Corpus,
    CorpusConfig,
    LMBatch,
    load_text,
)

_CLOSE = {"(": ")", "[": "]", "{": "}", "<": ">"}


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus(CorpusConfig(num_facts=300, id_digits=3))


def _is_valid(corpus: Corpus, text: str, domain: str) -> bool:
    """Whether a whole sample obeys its domain's rule."""
    assert text.endswith("\n")
    body = text[:-1]
    if domain == "facts":
        head, ward = body.split(": ")
        return corpus.facts[int(head.removeprefix("patient "))] == ward
    if domain == "arithmetic":
        expr, result = body.split("=")
        a, op, b = expr.partition("+") if "+" in expr else expr.partition("-")
        return int(result) == (int(a) + int(b) if op == "+" else int(a) - int(b)) and int(result) >= 0
    if domain == "reversal":
        word, answer = body.removeprefix("rev ").split("=")
        return answer == word[::-1]
    if domain == "sorting":
        word, answer = body.removeprefix("sort ").split("=")
        return answer == "".join(sorted(word))
    if domain == "brackets":
        prefix, closing = body.removeprefix("close ").split("=")
        stack = []
        for ch in prefix:
            if ch in _CLOSE:
                stack.append(ch)
            else:
                assert _CLOSE[stack.pop()] == ch, f"prefix {prefix!r} closes the wrong bracket"
        return len(stack) > 0 and closing == "".join(_CLOSE[o] for o in reversed(stack))
    if domain == "grammar":
        words = body.rstrip(".").split()
        plural_subject = words[0] == "some" or words[
            1 + (words[1] in ("old", "young", "kind", "busy", "tired", "calm", "new"))
        ].endswith(("s", "children"))
        verb = next(
            w
            for w in words
            if w in {"sees", "see", "treats", "treat", "helps", "help", "calls", "call", "visits", "visit", "thanks", "thank"}
        )
        return body.endswith(".") and verb.endswith("s") != plural_subject
    raise AssertionError(domain)


# --- tokenizer --------------------------------------------------------------------


def test_tokenizer_round_trip_and_fixed_vocabulary():
    tok = CharTokenizer()
    text = "patient 4821: eye\n(37+45=82) ~"
    ids = tok.encode(text)
    assert ids.dtype == torch.int64 and ids.shape == (len(text),)
    assert tok.decode(ids) == text and tok.decode(ids.tolist()) == text
    assert tok.vocab_size == len(BASE_CHARS) == 96 and tok.encode("\n").item() == 0
    assert CharTokenizer() == tok  # the same vocabulary every time


def test_tokenizer_names_the_unknown_character():
    with pytest.raises(ValueError, match=r"'é' \(U\+00E9\) at position 3"):
        CharTokenizer().encode("caféx")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        CharTokenizer().decode([0, 96])
    with pytest.raises(ValueError, match="repeats"):
        CharTokenizer("abca")


def test_tokenizer_extended_keeps_old_ids_and_adds_new_characters():
    tok = CharTokenizer()
    ext = tok.extended("naïve café")
    assert ext.chars.startswith(tok.chars) and ext.vocab_size == tok.vocab_size + 2
    assert ext.decode(ext.encode("naïve café")) == "naïve café"
    assert torch.equal(ext.encode("abc"), tok.encode("abc"))


# --- samples --------------------------------------------------------------------------


@pytest.mark.parametrize("domain", DOMAINS)
def test_every_sample_obeys_its_domains_rule(corpus: Corpus, domain: str):
    rng = random.Random(1)
    for _ in range(200):
        s = corpus.sample(domain, rng=rng)
        assert s.domain == domain and s.text.count("\n") == 1 and s.text.endswith("\n")
        assert _is_valid(corpus, s.text, domain), s.text
        if domain in ANSWER_DOMAINS:
            assert 0 < s.prompt_len < len(s.text) and s.prompt.endswith((": ", "=")) and s.answer.endswith("\n")
        else:
            assert s.prompt_len == len(s.text) and s.answer == ""


def test_fact_table_is_seeded_and_independent_of_the_mix():
    a = Corpus(CorpusConfig(seed=3, num_facts=500, id_digits=4))
    b = Corpus(CorpusConfig(seed=3, num_facts=500, id_digits=4, mix={"facts": 1.0}))
    c = Corpus(CorpusConfig(seed=4, num_facts=500, id_digits=4))
    assert a.facts == b.facts and a.facts != c.facts
    assert len(a.facts) == 500 and all(1000 <= p <= 9999 for p in a.facts)
    assert set(a.facts.values()) <= set(WARDS)
    default = Corpus()
    assert sorted(default.facts) == list(range(10, 100))  # every 2-digit patient
    # every ward is used about equally often (16 wards, 500 patients)
    counts = Counter(a.facts.values())
    assert len(counts) == 16 and max(counts.values()) < 3 * 500 / 16


def test_num_wards_limits_the_answers():
    corpus = Corpus(CorpusConfig(num_facts=80, num_wards=4))
    assert set(corpus.facts.values()) == set(WARDS[:4])


def test_stream_follows_the_mix(corpus: Corpus):
    stream = corpus.stream(seed=0)
    counts = Counter(next(stream).domain for _ in range(5000))
    assert 0.46 < counts["facts"] / 5000 < 0.54
    for d in DOMAINS[1:]:
        assert 0.08 < counts[d] / 5000 < 0.12
    only = Corpus(CorpusConfig(num_facts=50, mix={"sorting": 1.0, "facts": 0.0}))
    assert {next(only.stream(1)).domain for _ in range(20)} == {"sorting"}


# --- batches ----------------------------------------------------------------------------


def test_batch_shapes_shift_and_labels(corpus: Corpus):
    b = corpus.batch(8, 48, torch.Generator().manual_seed(0))
    assert isinstance(b, LMBatch) and b.shape == (8, 48)
    for t in (b.x, b.y, b.domain, b.sample):
        assert t.dtype == torch.int64 and t.shape == (8, 48)
    assert b.answer.dtype == torch.bool
    assert torch.equal(b.x[:, 1:], b.y[:, :-1])  # targets are the inputs shifted by one
    assert (b.x[:, 0] == 0).all()  # every row starts with "\n"
    assert b.domain.min() >= 0 and b.domain.max() < corpus.num_domains


def test_batch_labels_describe_the_text_they_sit_on(corpus: Corpus):
    b = corpus.batch(16, 64, torch.Generator().manual_seed(1))
    seen = Counter()
    for r in range(16):
        row = corpus.decode(b.y[r])
        for k in b.sample[r].unique().tolist():
            if k < 0:
                continue
            pos = (b.sample[r] == k).nonzero().squeeze(1)
            text = row[pos[0] : pos[-1] + 1]
            domain = corpus.domains[b.domain[r, pos[0]]]
            assert (b.domain[r, pos] == b.domain[r, pos[0]]).all()
            assert _is_valid(corpus, text, domain), (domain, text)
            answer = "".join(row[i] for i in pos.tolist() if b.answer[r, i])
            if domain in ANSWER_DOMAINS:
                sep = ": " if domain == "facts" else "="
                assert answer == text.split(sep, 1)[1], (text, answer)
            else:
                assert answer == ""
            seen[domain] += 1
        # the truncated last sample is marked -1, and only at the end of the row
        cut = (b.sample[r] < 0).nonzero().squeeze(1)
        if len(cut):
            assert cut[-1] == 63 and torch.equal(cut, torch.arange(cut[0], 64))
    assert set(seen) == set(DOMAINS)


def test_batches_are_reproducible_from_the_generator(corpus: Corpus):
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = corpus.batch(4, 32, g1), corpus.batch(4, 32, g2)
    assert torch.equal(a.x, b.x) and torch.equal(a.domain, b.domain)
    c = corpus.batch(4, 32, g1)  # the generator moved on: a new batch
    assert not torch.equal(a.x, c.x)


def test_held_out_set_is_fixed_fresh_and_uses_the_same_facts(corpus: Corpus):
    h1, h2 = corpus.held_out(16, 64), corpus.held_out(16, 64)
    assert torch.equal(h1.x, h2.x)
    assert not torch.equal(h1.x, corpus.held_out(16, 64, seed=1).x)
    train = corpus.batch(16, 64, torch.Generator().manual_seed(0))
    assert not torch.equal(h1.x, train.x)
    text = "".join(corpus.decode(r) for r in h1.y)
    patients = [
        int(line.split(":")[0].removeprefix("patient "))
        for line in text.split("\n")
        if line.startswith("patient ") and ": " in line and len(line.split(": ")[0]) == 11
    ]
    assert patients and all(p in corpus.facts for p in patients)


# --- a user's own text --------------------------------------------------------------------


def test_text_file_becomes_its_own_domain(tmp_path):
    body = "".join(f"Zeile {i}: Grüße aus dem Krankenhaus.\n" for i in range(200))
    path = tmp_path / "mine.txt"
    path.write_text(body, encoding="utf-8")
    corpus = Corpus(CorpusConfig(num_facts=50, text_file=str(path)))
    assert corpus.domains == DOMAINS + ("text",)
    assert "ü" in corpus.tokenizer.chars and "ß" in corpus.tokenizer.chars
    assert corpus.mix["text"] == pytest.approx(0.25)
    rng = random.Random(0)
    s = corpus.sample("text", rng=rng)
    assert s.domain == "text" and len(s.text) == 65 and s.text[:-1] in body
    # held-out text comes from the last tenth of the file only
    cut = int(len(body) * 0.9)
    for _ in range(50):
        held = corpus.sample("text", rng=rng, held_out=True).text[:-1]
        assert held in body[cut:]
    b = corpus.held_out(8, 64)
    assert (b.domain == corpus.domain_id("text")).any()


def test_text_file_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        load_text(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_text(tmp_path / "bin.txt")
    with pytest.raises(ValueError, match="no text_file"):
        CorpusConfig(mix={"text": 1.0})


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"num_facts": 0}, "num_facts"),
        ({"num_facts": 91}, "at most 90 facts"),
        ({"num_facts": 901, "id_digits": 3}, "at most 900"),
        ({"num_wards": 17}, "num_wards"),
        ({"mix": {"gossip": 1.0}}, "unknown domain 'gossip'"),
        ({"mix": {"facts": -1.0}}, r"mix\['facts'\]"),
        ({"mix": {"facts": 0.0}}, "sum to 0"),
        ({"max_word": 2}, "max_word"),
        ({"seed": -1}, "seed"),
        ({"fact_prompt": "patient: "}, "exactly one"),
        ({"fact_prompt": "#{} {}"}, "exactly one"),
        ({"fact_prompt": "#{}\n"}, "one line"),
        ({"fact_prompt": "7{}: "}, "merge with the number"),
        ({"fact_prompt": "Patiënt {}: "}, "printable ASCII"),
        ({"id_alphabet": "A"}, "at least 2 distinct"),
        ({"id_alphabet": "AA"}, "at least 2 distinct"),
        ({"id_alphabet": "A B"}, "other than spaces"),
        ({"id_alphabet": "AB", "num_facts": 5}, "at most 4 facts"),
        ({"id_alphabet": "ABC", "num_facts": 5, "fact_prompt": "#{}A"}, "merge with the number"),
    ],
)
def test_corpus_config_rejects_bad_values(kwargs, words):
    with pytest.raises(ValueError, match=words):
        CorpusConfig(**kwargs)


def test_fact_prompt_shapes_every_record():
    short = Corpus(CorpusConfig(num_facts=300, id_digits=3, fact_prompt="#{}"))
    assert short.fact_prompt(482) == "#482"
    rng = random.Random(0)
    for _ in range(20):
        s = short.sample("facts", rng=rng)
        patient = int(s.prompt.removeprefix("#"))
        assert s.answer == short.facts[patient] + "\n" and s.prompt == short.fact_prompt(patient)
    assert Corpus(CorpusConfig(num_facts=10)).fact_prompt(42) == "patient 42: "  # the default
    assert short.facts == Corpus(CorpusConfig(num_facts=300, id_digits=3)).facts  # the prompt changes the text, not the table


def test_patient_codes_from_an_alphabet():
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    coded = Corpus(CorpusConfig(num_facts=676, id_digits=2, id_alphabet=letters, fact_prompt="#{}"))
    codes = {coded.patient_code(p) for p in coded.facts}
    assert len(codes) == 676 and codes == {a + b for a in letters for b in letters}  # every code once
    assert coded.patient_code(0) == "AA" and coded.patient_code(27) == "BB" and coded.fact_prompt(675) == "#ZZ"
    s = coded.sample("facts", rng=random.Random(1))
    assert len(s.prompt) == 3 and s.prompt[0] == "#" and s.prompt[1:].isupper()
    assert CorpusConfig(id_alphabet="AB", id_digits=3, num_facts=8).max_facts == 8 and CorpusConfig(id_digits=3).max_facts == 900
    assert Corpus(CorpusConfig(num_facts=10)).patient_code(42) == "42"


def test_batch_rejects_bad_sizes(corpus: Corpus):
    with pytest.raises(ValueError, match="block_size"):
        corpus.batch(2, 0)
    with pytest.raises(ValueError, match="unknown domain"):
        corpus.sample("gossip")
