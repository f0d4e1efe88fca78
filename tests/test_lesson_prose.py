"""No sentence of a lesson states a number the run did not just compute.

The rule (every lesson follows it; this test enforces it)
----------------------------------------------------------
A lesson's prose (its markdown cells, and the comments in its code cells) may
not state a number that reads like a **measurement**:

- a decimal with a fractional part: ``0.955``, ``1.3``, ``1e-7``;
- a percentage: ``24%``, ``1.3 %``;
- a ratio written with × or x: ``3.15x``, ``1.1×`` (a product such as
  ``8 × 12`` is not a ratio);
- an amount with a unit of time, memory or speed: ``104 s``, ``150 ms``,
  ``10 minutes``, ``3 MiB``, ``70 GFLOP/s``;
- an estimate: ``about 80``, ``roughly 20``, ``~5``.

Such a number is allowed only where it cannot be a pasted result:

- it is a **setting the code uses**: the same value appears as a number in a
  code cell of the same notebook (``capacity_factor=1.25`` lets the prose say
  "a capacity factor of 1.25"; ``1e-2`` in code lets it say "α = 0.01"; a
  percentage p% is a setting when p/100 is in the code);
- it sits in LaTeX math (``$...$``, ``$$...$$``) or inline code (`` `...` ``);
- it is part of an arXiv id, a year, an exercise number (``exercise 5.1``), a
  section or table of a paper (``§2.1.2``, ``Table 2``), or a version
  (``torch 2.13``);
- its sentence cites a paper (``et al.``, ``arXiv:``, "the paper", or a named
  paper or author with "reports", "found", "shows"): a number the paper
  measured is a citation, not our measurement;
- it is one of the well-known constants in ``KNOWN`` below, each with its reason.

Also banned, anywhere in the prose: phrases that announce a result pasted
from another run (``BANNED``), such as "on our test machine", "in our runs",
"written in advance", "the machine this course was written on".

What to do instead: print the number from the run (a cell that computes and
prints it, or the verdict), refer to it ("the ratio printed above"), or write
the interpretation as a condition ("if the load is uneven, the busiest doctors
overflow first"). A SCALE comment says what changes (more steps, wider
model), not what a past run gave.

Each failure names the notebook, the line of its ``.py`` twin, the cell, the
offending number and its sentence.
"""

from __future__ import annotations

import io
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

from notebook_tools import ROOT

LESSONS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))

# Well-known constants that prose may state, each with the reason it is not a measurement.
KNOWN: dict[str, str] = {
    "2 minutes": "the course's run-time budget per notebook (DESIGN.md), a target, not a result",
    "1 minute": "the fast test tier's budget (DESIGN.md), a target, not a result",
}

BANNED = (
    r"on our (test )?machine",
    r"in our (own )?(runs?|experiments?|tests?)\b",
    r"written in advance",
    r"this course was written on",
    r"when this (lesson|course|notebook|text) was written",
    r"at the time of writing",
    r"on the machine (we|I) used",
    r"(our|a) past run",
    r"in a previous run",
)

_NUM = r"\d+(?:[.,]\d+)*(?:\.\d+)?(?:e-?\d+)?"
_DEC = r"\d+\.\d+(?:e-?\d+)?|\d+e-\d+"
_UNITS = (
    r"(?:ms|µs|us|ns|s|sec|secs|seconds?|min|minutes?|hours?|h|MiB|GiB|KiB|MB|GB|kB|KB|GFLOP/s|TFLOP/s|FLOP/s|GB/s|it/s|tokens/s)"
)
_MEASURE = re.compile(
    rf"""
    (?P<pct>{_NUM}\s?%)                                         # a percentage
  | (?P<ratio>{_NUM}\s?[×x](?![\w(]|\s*\d))                       # a ratio: 3.15x, 1.1× (not 8 × 12, not 0x1f)
  | (?P<unit>{_NUM}(?:\s?[–-]\s?{_NUM})?\s?{_UNITS}(?![\w/]))   # an amount with a unit: 104 s, 45-70 GFLOP/s
  | (?P<about>(?:\babout|\broughly|\baround|\bnearly|\balmost|\bsome|~|≈)\s?{_NUM}(?!\s?[×x·*/]\s?\w))  # an estimate
  | (?P<dec>(?<![\w.])(?:{_DEC})(?!\w|\.\d))                      # a decimal or scientific number
    """,
    re.X,
)

# Stripped before scanning: where numbers are not claims about this run.
_STRIP = [
    re.compile(r"\$\$.*?\$\$", re.S),  # display math
    re.compile(r"(?<!\\)\$[^$\n]+?(?<!\\)\$"),  # inline math
    re.compile(r"```.*?```", re.S),  # fenced code
    re.compile(r"`[^`\n]+`"),  # inline code
    re.compile(r"https?://\S+"),  # links
    re.compile(r"arXiv:\s?\d{4}\.\d{4,5}(v\d+)?", re.I),
    re.compile(r"\b[Ee]xercises?\s+\d+\.\d+(?:\s*(?:,|–|-|and|to|·)\s*\d+\.\d+)*"),
    re.compile(r"§\s?\d+(?:\.\d+)*"),
    re.compile(r"\b(?:Table|Figure|Fig\.|eq\.|Eq\.|Equation|Section|Sec\.)\s?\d+(?:\.\d+)*"),
    re.compile(
        r"\b(?:torch|PyTorch|Python|JupyterLab|Jupyter|nbval|jupytext|ipywidgets|CUDA|transformers)\s?(?:≥|>=|<=)?\s?\d+(?:\.\d+)+"
    ),
]
_PAPERS = (
    r"(?:Switch Transformers?|ST-MoE|GShard|Mixtral|DeepSeek[-\w]*|OLMoE|MegaBlocks|Fedus|Shazeer|Lepikhin|Zoph|Zhou|Jacobs)"
)
_CITATION = re.compile(
    rf"et al\.|arXiv:|\bthe paper\b|\bpaper's\b|\btheir Table\b"  # a citation on its own
    rf"|\b{_PAPERS}\b.*\b(?:reports?|reported|found|finds|shows?|showed|measured)\b",  # a named paper and its finding
    re.I | re.S,
)
_ABBREVIATIONS = re.compile(r"\b(et al|e\.g|i\.e|eq|cf|vs|Fig|approx)\.", re.I)


@dataclass(frozen=True)
class Violation:
    line: int  # 1-based line in the .py twin
    cell: int  # 0-based cell index (the same in the .ipynb)
    number: str  # the offending text
    sentence: str
    why: str

    def message(self, name: str) -> str:
        return f"{name}:{self.line} (cell {self.cell}): {self.why} {self.number!r} in: {self.sentence.strip()!r}"


@dataclass
class Cell:
    kind: str  # "markdown" or "code"
    index: int
    lines: list[tuple[int, str]]  # (1-based line number in the .py, text)


def parse_percent(text: str) -> list[Cell]:
    """Split a jupytext py:percent file into cells, keeping the line number of every line."""
    cells: list[Cell] = []
    lines = text.splitlines()
    i = 0
    if lines and lines[0].startswith("# ---"):  # the YAML header
        i = 1
        while i < len(lines) and not lines[i].startswith("# ---"):
            i += 1
        i += 1
    current: Cell | None = None
    for n in range(i, len(lines)):
        line = lines[n]
        if line.startswith("# %%"):
            kind = "markdown" if "[markdown]" in line else "code"
            current = Cell(kind, len(cells), [])
            cells.append(current)
        elif current is not None:
            current.lines.append((n + 1, line))
    return cells


def _markdown_text(cell: Cell) -> list[tuple[int, str]]:
    out = []
    for n, line in cell.lines:
        out.append((n, line[2:] if line.startswith("# ") else line.lstrip("#")))
    return out


@dataclass(frozen=True)
class Settings:
    """The numeric literals of a notebook's code: what its prose may quote as settings."""

    texts: frozenset[str] = frozenset()  # each literal as written, e.g. "1e-2", "1.25", "600"

    def values(self, floats_only: bool = False) -> set[float]:
        return {float(eval(t)) for t in self.texts if not floats_only or re.search(r"[.eE]", t)}  # noqa: S307

    def __contains__(self, value: float) -> bool:
        return any(abs(value - v) <= 1e-12 * max(1.0, abs(v)) for v in self.values())


def code_numbers(cells: list[Cell]) -> Settings:
    """Every numeric literal in the notebook's code cells (not in their comments or strings)."""
    texts: set[str] = set()
    for cell in cells:
        if cell.kind != "code":
            continue
        source = "\n".join(line for _, line in cell.lines) + "\n"
        source = re.sub(r"^\s*[%!].*$", "", source, flags=re.M)  # magics
        try:
            tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
        except (tokenize.TokenError, IndentationError, SyntaxError):
            tokens = []
        for tok in tokens:
            if tok.type == tokenize.NUMBER and not re.search(r"[jJxXoObB]", tok.string):
                texts.add(tok.string.replace("_", ""))
    return Settings(frozenset(texts))


def _comments(cell: Cell) -> list[tuple[int, str]]:
    source = "\n".join(line for _, line in cell.lines) + "\n"
    source_lines = [n for n, _ in cell.lines]
    out = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                row = tok.start[0] - 1
                if row < len(source_lines):
                    out.append((source_lines[row], tok.string.lstrip("#").strip()))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return out


def _value(text: str) -> float | None:
    m = re.search(r"\d+(?:[.,]\d+)*(?:\.\d+)?(?:e-?\d+)?", text)
    if not m:
        return None
    try:
        return float(m.group(0).replace(",", ""))
    except ValueError:
        return None


def _is_setting(kind: str, text: str, settings: Settings) -> bool:
    """Whether a measurement-like number is a value the code uses.

    A decimal must match a float literal (an int 1 does not make "1.00" a
    setting), and a decimal written with trailing zeros ("0.000", "1.50")
    reads like printed output, so it must match a literal written the same way.
    """
    value = _value(text)
    if value is None:
        return False
    if kind == "dec":
        if re.search(r"\.\d*[1-9]?0$", text.strip()) and re.search(r"\.\d\d", text):
            return text.strip() in settings.texts
        return any(abs(value - v) <= 1e-12 * max(1.0, abs(v)) for v in settings.values(floats_only=True))
    candidates = [value / 100, value] if kind == "pct" else [value]
    return any(c in settings for c in candidates)


def _sentences(text: str) -> list[str]:
    protected = _ABBREVIATIONS.sub(lambda m: m.group(0).replace(".", "\0"), text)
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z(*`$\"'])|\n\s*\n|\n(?=\s*[-*] |\s*\d+\. |#)", protected)
    return [p.replace("\0", ".") for p in parts if p.strip()]


def scan_prose(text: str, settings: Settings = Settings()) -> list[tuple[str, str, str]]:
    """(number, sentence, why) for every measurement-like number and banned phrase in a piece of prose."""
    found = []
    for phrase in BANNED:
        for m in re.finditer(phrase, text, re.I):
            sentence = next((s for s in _sentences(text) if m.group(0).lower() in s.lower()), text)
            found.append((m.group(0), sentence, "a phrase that announces a pasted result:"))
    for sentence in _sentences(text):
        cleaned = sentence
        for pattern in _STRIP:
            cleaned = pattern.sub(" ", cleaned)
        for known in KNOWN:
            cleaned = cleaned.replace(known, " ")
        if _CITATION.search(sentence):
            continue
        for m in _MEASURE.finditer(cleaned):
            kind = m.lastgroup
            if _is_setting(kind, m.group(0), settings):
                continue
            if kind == "unit" and re.fullmatch(r"\d{4}\s?s", m.group(0)):  # "the 1990s"
                continue
            what = {
                "pct": "a percentage",
                "ratio": "a ratio",
                "unit": "an amount with a unit",
                "about": "an estimate",
                "dec": "a decimal",
            }[kind]
            found.append((m.group(0).strip(), sentence, f"{what} not printed by the run and not a setting in the code:"))
    return found


def scan_notebook(path: Path) -> list[Violation]:
    """Every violation of the rule in one lesson's py:percent file."""
    cells = parse_percent(path.read_text())
    settings = code_numbers(cells)
    violations = []
    for cell in cells:
        if cell.kind == "markdown":
            numbered = _markdown_text(cell)
            text = "\n".join(t for _, t in numbered)
        else:
            numbered = _comments(cell)
            text = "\n".join(t for _, t in numbered)
        if not text.strip():
            continue
        for number, sentence, why in scan_prose(text, settings):
            head = sentence.strip().split("\n")[0][:40]
            line = next((n for n, t in numbered if head and head in t), numbered[0][0])
            for n, t in numbered:  # the line that holds the number itself, if it is on one line
                if number in t and n >= line:
                    line = n
                    break
            violations.append(Violation(line, cell.index, number, " ".join(sentence.split()), why))
    return violations


# ---- the scanner has teeth ------------------------------------------------------------------


def _numbers(text: str, settings: Settings = Settings()) -> list[str]:
    return [n for n, _, _ in scan_prose(text, settings)]


def test_a_pasted_result_fails():
    assert _numbers("The default took 1.15× the dense layer's time.") == ["1.15×"]
    assert _numbers("Capacity factor 1.0 drops 24% of the patients.") == ["1.0", "24%"]
    assert _numbers("Held-out loss 0.988 against 0.955 for the dense twin.") == ["0.988", "0.955"]
    assert _numbers("It took 104 s on a busy machine.") == ["104 s"]
    assert _numbers("The router ran at 45–70 GFLOP/s, against about 80 for the experts.") == ["45–70 GFLOP/s", "about 80"]
    assert _numbers("Largest difference about 1e-7.") == ["about 1e-7"]
    assert _numbers("Its weight ends at 0.93.") == ["0.93"]


def test_a_banned_phrase_fails():
    assert _numbers("On our test machine the sort path won.") == ["On our test machine"]
    assert _numbers("The text was written in advance.") == ["written in advance"]
    assert _numbers("In our run the head reads the second digit.") == ["In our run"]
    assert _numbers("On the machine this course was written on, the ratio was small.") == ["this course was written on"]


def test_a_setting_the_code_uses_passes():
    cells = parse_percent(
        "# %%\nfactors = [0.5, 1.0, 1.25]\nBASE = dict(aux_loss_coef=1e-2)  # 0.75 in a comment is no setting\n"
    )
    settings = code_numbers(cells)
    assert 1.25 in settings and 0.01 in settings and 0.75 not in settings
    assert "1e-2" in settings.texts
    assert _numbers("A capacity factor of 1.25 leaves slack; α = 0.01 is the paper's weight.", settings) == []
    assert _numbers("A capacity factor of 1.3 leaves slack.", settings) == ["1.3"]
    assert _numbers("Half the patients (50%) go first.", settings) == []
    assert _numbers("Unchanged (0.000), and the weight is 1.00.", code_numbers(parse_percent("# %%\nx = [0, 1]\n"))) == [
        "0.000",
        "1.00",
    ]


def test_math_code_citations_and_exercise_numbers_pass():
    assert _numbers("The loss is $E \\cdot 0.01 \\sum_i f_i P_i$ and $$p = 0.5$$.") == []
    assert _numbers("Call `top_k(x, 0.9)` first.") == []
    assert _numbers("Exercise 5.1 builds it; exercises 5.2–5.4 the rest.") == []
    assert _numbers("Fedus et al. 2021 report fewer than 1% dropped (arXiv:2101.03961).") == []
    assert _numbers("The Switch Transformer reports that fewer than 1% of tokens are dropped.") == []
    assert _numbers("The table reports 24% dropped.") == ["24%"]  # "reports" alone cites nobody
    assert _numbers("See §2.1.2 and Table 2 of DeepSeek-V3, with torch 2.13.") == []
    assert _numbers("An 8 × 12 chart, 16 experts, 600 steps, in the 1990s.") == []
    assert _numbers("Each notebook runs in well under 2 minutes.") == []


def test_a_notebook_is_scanned_with_lines_cells_and_comments():
    text = (
        "# ---\n# jupyter:\n# ---\n\n"
        "# %% [markdown]\n# # Title\n#\n# The layer took 1.3x the dense time.\n\n"
        "# %%\nSCALE = 1  # 4 gives a held-out loss of 0.64\nlr = 3e-3\n\n"
        "# %% [markdown]\n# With lr 0.003 it trains.\n"
    )
    path = Path(__file__).parent / "_prose_sample.py"
    try:
        path.write_text(text)
        found = scan_notebook(path)
    finally:
        path.unlink(missing_ok=True)
    assert [(v.line, v.cell, v.number) for v in found] == [(8, 0, "1.3x"), (11, 1, "0.64")]
    assert "_prose_sample.py:8 (cell 0)" in found[0].message("_prose_sample.py")


# ---- every lesson follows the rule ----------------------------------------------------------


def test_there_are_lessons_to_guard():
    assert len(LESSONS) >= 9, [p.name for p in LESSONS]


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_lesson_prose_states_no_number_the_run_did_not_compute(path):
    violations = scan_notebook(path)
    rel = path.relative_to(ROOT)
    assert not violations, (
        f"{len(violations)} number(s) in the prose of {rel} read like results the run did not print "
        "(see tests/test_lesson_prose.py for the rule):\n" + "\n".join(v.message(str(rel)) for v in violations)
    )
