"""The clinic: synthetic patients whose diagnosis depends on who reads them.

Shape legend (used across the package): B batch, T time, D model width,
F hidden width, E experts, K top-k, C capacity, N = B·T tokens. Here a token
is a patient, so N counts patients.

How a patient is made
---------------------
Every patient belongs to one *specialty* (cardiology, ophthalmology, ...) and
is a vector of ``d_in = d_measure + d_context`` numbers::

    x = [ measurements (d_measure) | context (d_context) ]

* **Measurements** mean the same thing for every patient, whatever the
  specialty: think blood pressure, heart rate, temperature. They are drawn
  from one standard normal distribution, so on this part of the vector a
  cardiology patient and a dermatology patient look exactly alike.
* **Context** says which department the patient walked into: a noisy copy of
  the specialty's centre. The centres point in different (orthogonal)
  directions, ``separation`` noise-widths from the origin, so a straight line
  (a linear classifier, such as a router) tells the specialties apart almost
  perfectly. The context is a faint cue: small numbers next to the measurements.

The **diagnosis** (one of ``num_diagnoses`` classes) is decided by the
specialty's own rule, a small random "teacher" network that reads only the
measurements::

    diagnosis = relabel_s[ argmax( tanh(m U_s + c_s) V_s + b_s ) ]

with one set of U_s (d_measure, F), c_s (F,), V_s (F, K), b_s (K,) per specialty.

Why the rules interfere
-----------------------
Each specialty reads the same measurements differently. The teachers of
different specialties are drawn independently, so a region of measurement
space that cardiology calls diagnosis 0 may be diagnosis 2 for neurology.
Worse, with ``twins=True`` every second specialty contradicts the one before
it: it uses the very same teacher but renames every diagnosis (a cyclic shift
of the names), so the same measurements lead to a *different* diagnosis for
every patient.

One doctor (a single MLP) who sees every patient must learn all the rules and,
from the faint context, which one to apply. Its hidden units get pulled in
opposite directions by the specialties; with a small budget it ends up clearly
worse than a team of specialists of the same total size, each of whom only
learns its own rule (oracle routing). The more specialties share the one
doctor, the wider the gap. That gap is the reason Mixture-of-Experts exists:
learning *which* doctor to ask (a linear router) is easy here, learning every
rule in one network is not.

Balance and determinism
-----------------------
The biases b_s are tuned so that every diagnosis is about equally common in
every specialty, and patients are drawn so that every (specialty, diagnosis)
pair has the same count (up to rounding): chance accuracy is exactly
``1 / num_diagnoses``, in every specialty.

Everything comes from ``seed`` through local ``torch.Generator`` objects (never
the global random state). The rule of specialty ``s`` depends only on
``(seed, s)`` and the rule options (sizes, gain, twins), so cardiology has the same disease book in a
4- and an 8-specialty clinic. Train and validation patients are independent
draws under the same rules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SPECIALTY_NAMES", "Patients", "Clinic", "make_clinic"]

SPECIALTY_NAMES: tuple[str, ...] = (
    "cardiology",
    "ophthalmology",
    "neurology",
    "dermatology",
    "orthopaedics",
    "gastroenterology",
    "psychiatry",
    "oncology",
)

# Named random streams: one seed feeds independent generators for each purpose,
# so e.g. asking for more training patients leaves the validation patients alone.
_RULES, _CENTRES, _TRAIN, _VAL = 0, 1, 2, 3
_MAX_SEED = 2**40  # keeps the derived generator seeds inside 64 bits


@dataclass(frozen=True)
class Patients:
    """A set of N patients.

    x (N, d_in) float32: measurements, then context features.
    diagnosis (N,) int64 in [0, num_diagnoses): the label to predict.
    specialty (N,) int64 in [0, num_specialties): who should see the patient.
    """

    x: torch.Tensor  # (N, d_in)
    diagnosis: torch.Tensor  # (N,)
    specialty: torch.Tensor  # (N,)

    def __post_init__(self) -> None:
        n = self.x.shape[0] if self.x.ndim else -1
        if self.x.ndim != 2 or tuple(self.diagnosis.shape) != (n,) or tuple(self.specialty.shape) != (n,):
            raise ValueError(
                "Patients expects x (N, d_in), diagnosis (N,) and specialty (N,); got "
                f"{tuple(self.x.shape)}, {tuple(self.diagnosis.shape)} and {tuple(self.specialty.shape)}"
            )

    def __len__(self) -> int:
        return self.x.shape[0]

    def of_specialty(self, s: int) -> Patients:
        """The patients of specialty ``s`` only, in their original order."""
        keep = self.specialty == s  # (N,)
        return Patients(self.x[keep], self.diagnosis[keep], self.specialty[keep])


@dataclass(frozen=True)
class Clinic:
    """Train and validation patients, drawn under the same diagnosis rules."""

    train: Patients  # patients to learn from
    val: Patients  # held-out patients, same rules, different people
    specialties: tuple[str, ...]  # specialty names; specialty id s is specialties[s]
    num_diagnoses: int  # diagnosis classes per specialty; chance accuracy is 1/num_diagnoses
    d_in: int  # width of a patient vector = d_measure + d_context
    d_context: int = 0  # the last d_context features identify the specialty (0: not recorded)

    @property
    def num_specialties(self) -> int:
        return len(self.specialties)

    @property
    def d_measure(self) -> int:
        """Width of the shared measurements, the first features of a patient vector."""
        return self.d_in - self.d_context

    def measurements(self, x: torch.Tensor) -> torch.Tensor:
        """The shared measurement part of patient vectors: (N, d_in) → (N, d_measure)."""
        return x[..., : self.d_measure]

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """The specialty-identifying part of patient vectors: (N, d_in) → (N, d_context)."""
        return x[..., self.d_measure :]


def _generator(seed: int, stream: int, index: int = 0) -> torch.Generator:
    # Distinct (seed, stream, index) triples give distinct, reproducible streams.
    return torch.Generator().manual_seed((seed * 16 + stream) * 4096 + index)


@dataclass(frozen=True)
class _Rule:
    """One specialty's disease book: a random teacher network and the names of its classes."""

    u: torch.Tensor  # (d_measure, F) first layer of the teacher
    c: torch.Tensor  # (F,) its bias
    v: torch.Tensor  # (F, K) read-out to one score per diagnosis
    b: torch.Tensor  # (K,) biases that make the diagnoses equally common
    relabel: torch.Tensor  # (K,) teacher class k is called diagnosis relabel[k]

    def __call__(self, m: torch.Tensor) -> torch.Tensor:
        """Diagnoses of measurements m (N, d_measure) → (N,) int64."""
        scores = torch.tanh(m @ self.u + self.c) @ self.v + self.b  # (N, K)
        return self.relabel[scores.argmax(-1)]


def _make_rule(
    seed: int, s: int, *, d_measure: int, num_diagnoses: int, teacher_width: int, teacher_gain: float, twins: bool
) -> _Rule:
    """The rule of specialty ``s``; it depends on (seed, s) and the sizes only."""
    # A twin (odd s) copies its partner's teacher, then renames the diagnoses.
    base = s - 1 if twins and s % 2 == 1 else s
    g = _generator(seed, _RULES, base)
    # The gain sets how far into tanh's bends the measurements reach: larger
    # gains carve measurement space into more curved regions.
    u = torch.randn(d_measure, teacher_width, generator=g) * (teacher_gain / d_measure**0.5)  # (d_measure, F)
    c = torch.randn(teacher_width, generator=g) * 0.5  # (F,)
    v = torch.randn(teacher_width, num_diagnoses, generator=g) / teacher_width**0.5  # (F, K)
    # Balance the diagnoses: nudge the class biases until every class wins on
    # about 1/K of a reference sample. Exact balance is the sampler's job; this
    # keeps rare classes from being costly to draw.
    m_ref = torch.randn(2048, d_measure, generator=g)  # (2048, d_measure)
    h_ref = torch.tanh(m_ref @ u + c) @ v  # (2048, K)
    step = 0.5 * h_ref.std()
    b = torch.zeros(num_diagnoses)
    for _ in range(40):
        freq = torch.bincount((h_ref + b).argmax(-1), minlength=num_diagnoses).float() / len(m_ref)  # (K,)
        b = b - step * (freq - 1.0 / num_diagnoses)
    freq = torch.bincount((h_ref + b).argmax(-1), minlength=num_diagnoses).float() / len(m_ref)
    if freq.min() < 0.25 / num_diagnoses:
        # A teacher narrower than the number of classes may be unable to produce some of them.
        raise ValueError(
            f"the random rule of specialty {s} can hardly produce diagnosis {int(freq.argmin())} "
            f"(teacher_width={teacher_width}, num_diagnoses={num_diagnoses}); "
            "use a larger teacher_width, fewer num_diagnoses or another seed"
        )
    relabel = torch.arange(num_diagnoses)
    if base != s:
        # A cyclic shift by 1..K-1 renames every diagnosis: the twin never agrees.
        shift = 1 + int(torch.randint(num_diagnoses - 1, (), generator=_generator(seed, _RULES, 2048 + s)))
        relabel = (relabel + shift) % num_diagnoses
    return _Rule(u, c, v, b, relabel)


def _make_centres(seed: int, num_specialties: int, d_context: int, radius: float) -> torch.Tensor:
    """Specialty centres (S, d_context), each at distance ``radius`` from the origin.

    With d_context >= S the centres are orthogonal, so every pair is equally far
    apart (radius·√2); with fewer context features they are random directions
    and some pairs may sit close together.
    """
    g = _generator(seed, _CENTRES, num_specialties)
    a = torch.randn(d_context, num_specialties, generator=g)  # (d_context, S)
    if d_context >= num_specialties:
        a, _ = torch.linalg.qr(a)  # orthonormal columns
    centres = a.T / a.T.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (S, d_context)
    return radius * centres


def _draw(
    n: int,
    rules: list[_Rule],
    centres: torch.Tensor,
    *,
    num_diagnoses: int,
    d_measure: int,
    context_noise: float,
    g: torch.Generator,
) -> Patients:
    """Draw n patients under ``rules``: balanced specialties and diagnoses, shuffled."""
    num_specialties = len(rules)
    ms, ds, ss = [], [], []
    for s, rule in enumerate(rules):
        # Spread n over the (specialty, diagnosis) cells as evenly as possible.
        n_s = n // num_specialties + int(s < n % num_specialties)
        quota = [n_s // num_diagnoses + int(k < n_s % num_diagnoses) for k in range(num_diagnoses)]
        kept: list[list[torch.Tensor]] = [[] for _ in range(num_diagnoses)]
        have = [0] * num_diagnoses
        rounds = 0
        while have != quota:
            rounds += 1
            if rounds > 1000:  # unreachable for the rules _make_rule accepts; never hang
                raise RuntimeError(f"could not draw enough patients of every diagnosis for specialty {s}")
            # Keeping the first patients of each class (rejection sampling) leaves
            # each class's measurements distributed exactly as the rule implies.
            # The rule makes every class common, so one or two rounds suffice.
            m = torch.randn(max(64, 2 * n_s), d_measure, generator=g)  # (2·n_s, d_measure)
            d = rule(m)  # (2·n_s,)
            for k in range(num_diagnoses):
                take = m[d == k][: quota[k] - have[k]]
                kept[k].append(take)
                have[k] += len(take)
        for k in range(num_diagnoses):
            ms.extend(kept[k])
            ds.append(torch.full((quota[k],), k, dtype=torch.int64))
            ss.append(torch.full((quota[k],), s, dtype=torch.int64))
    m = torch.cat(ms)  # (N, d_measure)
    diagnosis = torch.cat(ds)  # (N,)
    specialty = torch.cat(ss)  # (N,)
    context = centres[specialty] + context_noise * torch.randn(len(m), centres.shape[1], generator=g)  # (N, d_context)
    order = torch.randperm(len(m), generator=g)  # interleave specialties and diagnoses
    x = torch.cat([m, context], dim=1).float()[order]  # (N, d_in)
    return Patients(x.contiguous(), diagnosis[order].contiguous(), specialty[order].contiguous())


def make_clinic(
    num_specialties: int = 4,
    *,
    n_train: int = 4096,
    n_val: int = 2048,
    num_diagnoses: int = 4,
    d_measure: int = 4,
    d_context: int = 8,
    seed: int = 0,
    teacher_width: int = 4,
    teacher_gain: float = 2.0,
    twins: bool = True,
    separation: float = 4.0,
    context_noise: float = 0.15,
) -> Clinic:
    """Make a clinic of synthetic patients from ``num_specialties`` specialties.

    num_specialties: how many specialties (clusters), 1 to len(SPECIALTY_NAMES).
    n_train, n_val: patients in the train and validation splits (>= 1 each),
        spread evenly over specialties and, within each, over diagnoses.
    num_diagnoses: diagnosis classes (>= 2); chance accuracy is 1/num_diagnoses.
    d_measure: width of the shared measurements that the diagnosis rules read.
    d_context: width of the context features that identify the specialty;
        with d_context >= num_specialties the specialty centres are orthogonal.
    seed: fixes the rules, the specialty centres and both splits (0 <= seed < 2**40).
    teacher_width: hidden width of each specialty's random teacher network;
        wider teachers draw more intricate decision regions (harder rules).
    teacher_gain: scale of the teachers' first layer; larger gains bend the
        decision boundaries more (more non-linear rules).
    twins: if True, every odd specialty contradicts the one before it: same
        teacher, every diagnosis renamed. The strongest kind of interference.
    separation: distance of each specialty centre from the origin, in units of
        ``context_noise``; 4 lets a linear probe identify 8 specialties ~99% right.
    context_noise: standard deviation of the noise on the context features;
        with ``separation`` it sets how loud the specialty cue is (centres sit
        at radius separation·context_noise, 0.6 by default, while the
        measurements have standard deviation 1).

    Returns a ``Clinic`` whose ``train`` and ``val`` hold x (N, d_in) float32,
    diagnosis (N,) int64 and specialty (N,) int64, with d_in = d_measure + d_context.
    """
    _check_int("num_specialties", num_specialties, 1)
    if num_specialties > len(SPECIALTY_NAMES):
        raise ValueError(
            f"num_specialties must be at most {len(SPECIALTY_NAMES)} (one per name in SPECIALTY_NAMES), got {num_specialties}"
        )
    _check_int("n_train", n_train, 1)
    _check_int("n_val", n_val, 1)
    _check_int("num_diagnoses", num_diagnoses, 2)
    _check_int("d_measure", d_measure, 1)
    _check_int("d_context", d_context, 1)
    _check_int("teacher_width", teacher_width, 1)
    _check_int("seed", seed, 0)
    if seed >= _MAX_SEED:
        raise ValueError(f"seed must be below 2**40, got {seed}")
    for name, value in (("teacher_gain", teacher_gain), ("separation", separation), ("context_noise", context_noise)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a number > 0, got {value!r}")

    rules = [
        _make_rule(
            seed,
            s,
            d_measure=d_measure,
            num_diagnoses=num_diagnoses,
            teacher_width=teacher_width,
            teacher_gain=teacher_gain,
            twins=twins,
        )
        for s in range(num_specialties)
    ]
    # separation is counted in noise widths, so the probe's difficulty depends on it alone.
    centres = _make_centres(seed, num_specialties, d_context, separation * context_noise)  # (S, d_context)
    kw = dict(num_diagnoses=num_diagnoses, d_measure=d_measure, context_noise=float(context_noise))
    train = _draw(n_train, rules, centres, g=_generator(seed, _TRAIN), **kw)
    val = _draw(n_val, rules, centres, g=_generator(seed, _VAL), **kw)
    return Clinic(
        train=train,
        val=val,
        specialties=SPECIALTY_NAMES[:num_specialties],
        num_diagnoses=num_diagnoses,
        d_in=d_measure + d_context,
        d_context=d_context,
    )


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
