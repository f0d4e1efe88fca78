"""The clinic: synthetic patients whose diagnosis depends on who reads them.

Shape legend (used across the package): B batch, D width, F hidden width,
E experts, N tokens (here: patients).

How a patient is made
---------------------
Every patient belongs to one *specialty* (cardiology, ophthalmology, ...) and is
a vector of ``d_in = d_measure + d_context`` numbers::

    x = [ measurements (d_measure) | context (d_context) ]

* **Measurements** are the same kind of numbers for every patient, whatever the
  specialty: think blood pressure, heart rate, temperature, ... They are drawn
  from one standard normal distribution, so a cardiology patient and a
  dermatology patient look alike on this part of the vector.
* **Context** says which department the patient walked into: a noisy copy of a
  per-specialty centre (the specialties are well separated clusters). This is
  what a GP (the router) can read to send the patient to the right doctor. A
  straight line (a linear classifier) separates the specialties almost perfectly.

The **diagnosis** (one of ``num_diagnoses`` classes) is decided by the
specialty's own rule, a small random "teacher" network that reads *only the
measurements*::

    diagnosis = argmax( tanh(m · U_s + c_s) · V_s + b_s )      (one U_s, c_s, V_s, b_s per specialty s)

Why the rules interfere
-----------------------
Each specialty reads the same measurements differently: the teachers are
independent, so a region of measurement space that cardiology calls diagnosis
0 may be diagnosis 2 for neurology. Worse, every second specialty is a
*contradicting twin* of the one before: it uses exactly the same teacher but
gives its conclusions different names (a fixed shuffle of the diagnoses with no
diagnosis kept), so the same measurements lead to a different diagnosis for
sure. A single doctor (one MLP) who sees every patient must learn all the rules
at once *and* which one to apply, from the context; with a small budget the
rules pull its weights in opposite directions and it ends up worse than a team
of specialists of the same total size, each of whom only learns its own rule.
That gap is the reason Mixture-of-Experts exists.

The biases ``b_s`` are tuned so every diagnosis is about equally common in
every specialty, and patients are drawn so that every (specialty, diagnosis)
pair has the same count (up to rounding): chance accuracy is exactly
``1 / num_diagnoses``.

Everything is made from the seed with local ``torch.Generator`` objects (never
the global random state). The rule of specialty ``s`` depends only on
``(seed, s)``, so cardiology is the same disease book in a 4- and an
8-specialty clinic. Train and validation patients are independent draws under
the same rules.
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
    "endocrinology",
    "paediatrics",
    "pulmonology",
    "rheumatology",
)

# Fixed offsets that split one seed into independent random streams.
_RULES, _CENTRES, _TRAIN, _VAL = 0, 1, 2, 3
import os
_SHARE_ALL = bool(os.environ.get("SHARE_ALL"))


@dataclass(frozen=True)
class Patients:
    """A set of N patients.

    x (N, d_in) float32: measurements then context features.
    diagnosis (N,) int64 in [0, num_diagnoses): the label to predict.
    specialty (N,) int64 in [0, num_specialties): who should see the patient.
    """

    x: torch.Tensor  # (N, d_in)
    diagnosis: torch.Tensor  # (N,)
    specialty: torch.Tensor  # (N,)

    def __post_init__(self) -> None:
        n = self.x.shape[0]
        if self.x.ndim != 2 or self.diagnosis.shape != (n,) or self.specialty.shape != (n,):
            raise ValueError(
                "Patients expects x (N, d_in), diagnosis (N,), specialty (N,); got "
                f"{tuple(self.x.shape)}, {tuple(self.diagnosis.shape)}, {tuple(self.specialty.shape)}"
            )

    def __len__(self) -> int:
        return self.x.shape[0]

    def of_specialty(self, s: int) -> "Patients":
        """The patients of specialty ``s`` only (in their original order)."""
        keep = self.specialty == s  # (N,)
        return Patients(self.x[keep], self.diagnosis[keep], self.specialty[keep])


@dataclass(frozen=True)
class Clinic:
    """Train and validation patients, drawn under the same diagnosis rules."""

    train: Patients
    val: Patients
    specialties: tuple[str, ...]  # names, one per specialty id
    num_diagnoses: int  # number of diagnosis classes
    d_in: int  # patient vector width = d_measure + d_context
    d_measure: int = 0  # the first d_measure features are the shared measurements
    d_context: int = 0  # the last d_context features identify the specialty

    @property
    def num_specialties(self) -> int:
        return len(self.specialties)

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
    """One specialty's disease book: the teacher network and its class relabelling."""

    u: torch.Tensor  # (d_measure, F) first layer of the teacher
    c: torch.Tensor  # (F,) its bias
    v: torch.Tensor  # (F, K) read-out to diagnosis scores
    b: torch.Tensor  # (K,) biases that balance the diagnoses
    relabel: torch.Tensor  # (K,) diagnosis names: teacher class k is called relabel[k]

    def __call__(self, m: torch.Tensor) -> torch.Tensor:
        """Diagnoses of measurements m (N, d_measure) → (N,) int64."""
        scores = torch.tanh(m @ self.u + self.c) @ self.v + self.b  # (N, K)
        return self.relabel[scores.argmax(-1)]


def _make_rule(seed: int, s: int, *, d_measure: int, num_diagnoses: int, teacher_width: int, teacher_gain: float, twins: bool) -> _Rule:
    # A twin (odd s) copies its partner's teacher and renames the diagnoses with a
    # derangement: same measurements, a different conclusion for every patient.
    base = s - 1 if twins and s % 2 == 1 else s
    if _SHARE_ALL and twins:
        base = 0
    g = _generator(seed, _RULES, base)
    u = torch.randn(d_measure, teacher_width, generator=g) * (teacher_gain / d_measure**0.5)  # (d_measure, F)
    c = torch.randn(teacher_width, generator=g) * 0.5  # (F,)
    v = torch.randn(teacher_width, num_diagnoses, generator=g) / teacher_width**0.5  # (F, K)
    # Balance the diagnoses: nudge the class biases until every class wins on
    # about 1/K of a reference sample. Exact balance is not needed (the sampler
    # enforces equal counts); this only keeps rare classes from being costly to draw.
    m_ref = torch.randn(2048, d_measure, generator=g)
    h_ref = torch.tanh(m_ref @ u + c) @ v  # (2048, K)
    step = 0.5 * h_ref.std()
    b = torch.zeros(num_diagnoses)
    for _ in range(40):
        freq = torch.bincount((h_ref + b).argmax(-1), minlength=num_diagnoses).float() / len(m_ref)
        b = b - step * (freq - 1.0 / num_diagnoses)
    relabel = torch.arange(num_diagnoses)
    if base != s:
        relabel = (relabel + 1 + torch.randint(num_diagnoses - 1, (), generator=_generator(seed, _RULES, 1000 + s))) % num_diagnoses
    return _Rule(u, c, v, b, relabel)


def _make_centres(seed: int, num_specialties: int, d_context: int, radius: float) -> torch.Tensor:
    """Specialty centres (S, d_context) at distance ``radius`` from the origin.

    With d_context >= S the centres are orthogonal directions, all equally far
    apart (radius·√2); with fewer context features they are random directions.
    """
    g = _generator(seed, _CENTRES, num_specialties)
    a = torch.randn(d_context, num_specialties, generator=g)  # (d_context, S)
    if d_context >= num_specialties:
        a, _ = torch.linalg.qr(a)  # orthonormal columns
    centres = a.T / a.T.norm(dim=1, keepdim=True).clamp_min(1e-8)  # (S, d_context)
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
    num_specialties = len(rules)
    xs, ds, ss = [], [], []
    for s, rule in enumerate(rules):
        # Spread n over the (specialty, diagnosis) cells as evenly as possible.
        n_s = n // num_specialties + (s < n % num_specialties)
        quota = [n_s // num_diagnoses + (k < n_s % num_diagnoses) for k in range(num_diagnoses)]
        kept: list[list[torch.Tensor]] = [[] for _ in range(num_diagnoses)]
        have = [0] * num_diagnoses
        while any(h < q for h, q in zip(have, quota)):
            # Rejection sampling per class keeps each class's measurement distribution
            # exactly the teacher's; the balancing biases make this cheap (~1.3 rounds).
            m = torch.randn(max(64, 2 * n_s), d_measure, generator=g)  # (n_s, d_measure)
            d = rule(m)
            for k in range(num_diagnoses):
                need = quota[k] - have[k]
                if need > 0:
                    take = m[d == k][:need]
                    kept[k].append(take)
                    have[k] += len(take)
        for k in range(num_diagnoses):
            m_k = torch.cat(kept[k]) if kept[k] else torch.empty(0, d_measure)
            xs.append(m_k)
            ds.append(torch.full((len(m_k),), k, dtype=torch.int64))
            ss.append(torch.full((len(m_k),), s, dtype=torch.int64))
    m = torch.cat(xs)  # (N, d_measure)
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
    d_measure: int = 8,
    d_context: int = 8,
    seed: int = 0,
    teacher_width: int = 8,
    teacher_gain: float = 2.0,
    twins: bool = True,
    separation: float = 4.0,
    context_noise: float = 1.0,
) -> Clinic:
    """Make a clinic of synthetic patients from ``num_specialties`` specialties.

    num_specialties: how many specialties (clusters), 1 to len(SPECIALTY_NAMES).
    n_train, n_val: patients in the train and validation splits (positive ints).
    num_diagnoses: diagnosis classes per specialty (>= 2); chance accuracy is 1/num_diagnoses.
    d_measure: width of the shared measurement features the diagnosis rules read.
    d_context: width of the context features that identify the specialty.
    seed: fixes the rules, the specialty centres and both splits.
    teacher_width: hidden width of each specialty's random teacher network;
        wider teachers draw more intricate decision boundaries.
    teacher_gain: scale of the teachers' first layer; larger values make the
        rules more non-linear (tanh saturates into sharper regions).
    twins: if True, every odd specialty contradicts the one before it: same
        teacher, every diagnosis renamed. The strongest interference.
    separation: distance of each specialty centre from the origin, in units of
        ``context_noise``; with the default 4 a linear probe separates 8
        specialties almost perfectly.
    context_noise: standard deviation of the noise added to the context features.

    Returns a ``Clinic`` whose ``train`` and ``val`` hold x (N, d_in) float32,
    diagnosis (N,) int64 and specialty (N,) int64, with d_in = d_measure + d_context.
    """
    _check_int("num_specialties", num_specialties, 1)
    if num_specialties > len(SPECIALTY_NAMES):
        raise ValueError(f"num_specialties must be at most {len(SPECIALTY_NAMES)} (the named specialties), got {num_specialties}")
    _check_int("n_train", n_train, 1)
    _check_int("n_val", n_val, 1)
    _check_int("num_diagnoses", num_diagnoses, 2)
    _check_int("d_measure", d_measure, 1)
    _check_int("d_context", d_context, 1)
    _check_int("teacher_width", teacher_width, 1)
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    for name, value in (("teacher_gain", teacher_gain), ("separation", separation)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")
    if not context_noise >= 0:
        raise ValueError(f"context_noise must be >= 0, got {context_noise!r}")

    rules = [
        _make_rule(seed, s, d_measure=d_measure, num_diagnoses=num_diagnoses, teacher_width=teacher_width, teacher_gain=teacher_gain, twins=twins)
        for s in range(num_specialties)
    ]
    # separation is in units of the noise, so the probe's difficulty stays put when the noise changes
    centres = _make_centres(seed, num_specialties, d_context, separation * (context_noise if context_noise > 0 else 1.0))
    kw = dict(num_diagnoses=num_diagnoses, d_measure=d_measure, context_noise=context_noise)
    train = _draw(n_train, rules, centres, g=_generator(seed, _TRAIN), **kw)
    val = _draw(n_val, rules, centres, g=_generator(seed, _VAL), **kw)
    return Clinic(
        train=train,
        val=val,
        specialties=SPECIALTY_NAMES[:num_specialties],
        num_diagnoses=num_diagnoses,
        d_in=d_measure + d_context,
        d_measure=d_measure,
        d_context=d_context,
    )


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
