"""Tests for moe_course.data.clinic: the synthetic patients and their interfering rules."""

from __future__ import annotations

import pytest
import torch

from moe_course.data.clinic import SPECIALTY_NAMES, Clinic, Patients, make_clinic
from moe_course.experiments.specialists import train_specialists
from moe_course.experts import FeedForward
from moe_course.training import ClassificationTask, TrainConfig, train


@pytest.fixture(scope="module")
def clinic() -> Clinic:
    return make_clinic(seed=0)


def _nearest_neighbour_guess(ref: Patients, query: Patients, d_measure: int) -> torch.Tensor:
    dist = torch.cdist(query.x[:, :d_measure], ref.x[:, :d_measure])  # (N_query, N_ref)
    return ref.diagnosis[dist.argmin(dim=1)]  # (N_query,)


def _nearest_neighbour_accuracy(ref: Patients, query: Patients, d_measure: int) -> float:
    """Diagnose each query patient as its nearest reference patient (measurements only)."""
    return (_nearest_neighbour_guess(ref, query, d_measure) == query.diagnosis).float().mean().item()


def _least_squares_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, classes: int
) -> float:
    """Accuracy of a linear classifier fitted by least squares to one-hot targets."""

    def with_bias(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, torch.ones(len(x), 1)], dim=1)  # (N, d + 1)

    targets = torch.nn.functional.one_hot(train_y, classes).float()  # (N, S)
    w = torch.linalg.lstsq(with_bias(train_x), targets).solution  # (d + 1, S)
    return (with_bias(val_x) @ w).argmax(-1).eq(val_y).float().mean().item()


# --- shapes, ranges, speed --------------------------------------------------------


def test_make_clinic_shapes_dtypes_and_ranges(clinic: Clinic) -> None:
    assert clinic.num_specialties == 4
    assert clinic.specialties == SPECIALTY_NAMES[:4]
    assert clinic.d_in == clinic.d_measure + clinic.d_context
    for split, n in ((clinic.train, 4096), (clinic.val, 2048)):
        assert len(split) == n
        assert split.x.shape == (n, clinic.d_in) and split.x.dtype == torch.float32
        assert split.diagnosis.shape == (n,) and split.diagnosis.dtype == torch.int64
        assert split.specialty.shape == (n,) and split.specialty.dtype == torch.int64
        assert torch.isfinite(split.x).all()
        assert split.diagnosis.min() >= 0 and split.diagnosis.max() < clinic.num_diagnoses
        assert split.specialty.min() >= 0 and split.specialty.max() < clinic.num_specialties
    assert clinic.measurements(clinic.val.x).shape == (2048, clinic.d_measure)
    assert clinic.context(clinic.val.x).shape == (2048, clinic.d_context)


def test_make_clinic_options_change_sizes() -> None:
    c = make_clinic(8, n_train=80, n_val=24, num_diagnoses=3, d_measure=5, d_context=9, seed=3)
    assert (c.num_specialties, c.num_diagnoses, c.d_in, c.d_measure) == (8, 3, 14, 5)
    assert c.train.x.shape == (80, 14) and c.val.x.shape == (24, 14)
    assert set(c.train.diagnosis.tolist()) == {0, 1, 2}


# --- determinism and shared rules -------------------------------------------------


def test_make_clinic_same_seed_gives_identical_tensors(clinic: Clinic) -> None:
    again = make_clinic(seed=0)
    for split in ("train", "val"):
        a, b = getattr(clinic, split), getattr(again, split)
        assert torch.equal(a.x, b.x) and torch.equal(a.diagnosis, b.diagnosis) and torch.equal(a.specialty, b.specialty)


def test_make_clinic_different_seed_gives_different_patients(clinic: Clinic) -> None:
    other = make_clinic(seed=1)
    assert not torch.equal(clinic.train.x, other.train.x)
    assert not torch.equal(clinic.val.x, other.val.x)


def test_make_clinic_does_not_touch_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_clinic(seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_make_clinic_train_and_val_are_different_patients(clinic: Clinic) -> None:
    dist = torch.cdist(clinic.val.x, clinic.train.x)  # (N_val, N_train)
    assert dist.min() > 0, "a validation patient also appears in the training split"


def test_make_clinic_train_and_val_share_rules(clinic: Clinic) -> None:
    # Same rules: a nearest-neighbour doctor who learned from train patients of the
    # same specialty diagnoses val patients well...
    other_seed = make_clinic(seed=1)
    for s in range(clinic.num_specialties):
        val = clinic.val.of_specialty(s)
        own = _nearest_neighbour_accuracy(clinic.train.of_specialty(s), val, clinic.d_measure)
        assert own > 0.75, f"specialty {s}: 1-NN from its own train patients only {own:.2f} right"
        # ...while the same specialty under another seed follows different rules.
        foreign = _nearest_neighbour_accuracy(other_seed.train.of_specialty(s), val, clinic.d_measure)
        assert foreign < own - 0.25, f"specialty {s}: seed 1's rules agree with seed 0's ({foreign:.2f} vs {own:.2f})"


def test_make_clinic_val_split_does_not_depend_on_n_train(clinic: Clinic) -> None:
    smaller = make_clinic(seed=0, n_train=100)
    assert torch.equal(smaller.val.x, clinic.val.x)


def test_make_clinic_specialty_rule_does_not_depend_on_num_specialties(clinic: Clinic) -> None:
    # Cardiology reads the measurements the same way in a 4- and an 8-specialty clinic.
    bigger = make_clinic(8, seed=0)
    acc = _nearest_neighbour_accuracy(bigger.train.of_specialty(0), clinic.val.of_specialty(0), clinic.d_measure)
    assert acc > 0.75


def _best_renaming_agreement(guess: torch.Tensor, truth: torch.Tensor, num_diagnoses: int) -> tuple[float, float]:
    """Agreement of guess and truth with no renaming, and under the best cyclic renaming."""
    agree = [((guess + k) % num_diagnoses == truth).float().mean().item() for k in range(num_diagnoses)]
    return agree[0], max(agree[1:])


def test_make_clinic_twins_are_renamings_of_one_rule_unlike_independent_specialties(clinic: Clinic) -> None:
    # Specialty 1 is specialty 0's contradicting twin: the same measurements get
    # another diagnosis (a renaming), so learning from the twin is worse than guessing...
    guess = _nearest_neighbour_guess(clinic.train.of_specialty(0), clinic.val.of_specialty(1), clinic.d_measure)
    same, renamed = _best_renaming_agreement(guess, clinic.val.of_specialty(1).diagnosis, clinic.num_diagnoses)
    assert same < 0.15, f"twins agree on {same:.2f} of patients"
    assert renamed > 0.75, f"twins should be renamings of one rule; best renaming agrees on only {renamed:.2f}"
    # ...while without twins specialty 1 has its own rule, not a renamed copy.
    independent = make_clinic(seed=0, twins=False)
    guess = _nearest_neighbour_guess(independent.train.of_specialty(0), independent.val.of_specialty(1), clinic.d_measure)
    _, renamed = _best_renaming_agreement(guess, independent.val.of_specialty(1).diagnosis, clinic.num_diagnoses)
    assert renamed < 0.6


# --- balance ----------------------------------------------------------------------


def test_make_clinic_balances_specialties_and_diagnoses(clinic: Clinic) -> None:
    # 4096 patients over 4 specialties x 4 diagnoses: exactly 256 per cell.
    counts = torch.zeros(4, 4, dtype=torch.int64)
    counts.index_put_((clinic.train.specialty, clinic.train.diagnosis), torch.ones(4096, dtype=torch.int64), accumulate=True)
    assert (counts == 256).all(), counts


def test_make_clinic_balance_with_remainders() -> None:
    c = make_clinic(3, n_train=100, n_val=7, num_diagnoses=3, seed=4)
    per_specialty = torch.bincount(c.train.specialty, minlength=3)
    assert per_specialty.tolist() == [34, 33, 33]
    for s in range(3):
        per_diagnosis = torch.bincount(c.train.of_specialty(s).diagnosis, minlength=3)
        assert per_diagnosis.max() - per_diagnosis.min() <= 1
    assert len(c.val) == 7


# --- argument checks --------------------------------------------------------------


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((0,), {}, "num_specialties"),
        ((len(SPECIALTY_NAMES) + 1,), {}, "at most"),
        ((2.5,), {}, "num_specialties"),
        ((), {"n_train": 0}, "n_train"),
        ((), {"n_val": -3}, "n_val"),
        ((), {"num_diagnoses": 1}, "num_diagnoses"),
        ((), {"d_measure": 0}, "d_measure"),
        ((), {"d_context": 0}, "d_context"),
        ((), {"teacher_width": 0}, "teacher_width"),
        ((), {"seed": -1}, "seed"),
        ((), {"seed": 2**40}, "seed"),
        ((), {"teacher_gain": 0.0}, "teacher_gain"),
        ((), {"separation": -1.0}, "separation"),
        ((), {"context_noise": 0.0}, "context_noise"),
    ],
)
def test_make_clinic_rejects_bad_arguments(args, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        make_clinic(*args, **kwargs)


def test_make_clinic_rejects_teacher_too_narrow_for_diagnoses() -> None:
    # One hidden unit cannot carve measurement space into 8 regions.
    with pytest.raises(ValueError, match="teacher_width"):
        make_clinic(num_diagnoses=8, teacher_width=1)


def test_patients_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="Patients expects"):
        Patients(torch.zeros(5, 3), torch.zeros(4, dtype=torch.int64), torch.zeros(5, dtype=torch.int64))


def test_patients_of_specialty_keeps_only_that_specialty(clinic: Clinic) -> None:
    sub = clinic.train.of_specialty(2)
    assert len(sub) == 1024 and (sub.specialty == 2).all()
    assert torch.equal(sub.x, clinic.train.x[clinic.train.specialty == 2])
    assert len(clinic.train.of_specialty(99)) == 0


# --- what the lessons rely on -----------------------------------------------------


@pytest.mark.parametrize("num_specialties", [4, 8])
def test_clinic_specialty_is_linearly_recognisable(num_specialties: int) -> None:
    # A router is a linear map of the whole patient vector: it can learn the routing.
    c = make_clinic(num_specialties, seed=0)
    acc = _least_squares_probe(c.train.x, c.train.specialty, c.val.x, c.val.specialty, num_specialties)
    assert acc > 0.95, f"a linear probe finds the specialty only {acc:.3f} of the time"


def test_clinic_measurements_alone_do_not_reveal_specialty(clinic: Clinic) -> None:
    # The measurements look alike in every department; only the context tells them apart.
    m = clinic.measurements
    acc = _least_squares_probe(m(clinic.train.x), clinic.train.specialty, m(clinic.val.x), clinic.val.specialty, 4)
    assert acc < 0.25 + 0.06


def _generalist_vs_specialists(c: Clinic, hidden: int, config: TrainConfig) -> tuple[float, float]:
    """Val accuracy of one FFN of width S·hidden vs S oracle-routed FFNs of width hidden.

    Equal parameters (up to the output biases) and equal training FLOPs: every
    model takes the same number of steps with the same batch size, and a
    specialist step costs 1/S of a generalist step.
    """
    S, K = c.num_specialties, c.num_diagnoses
    with torch.random.fork_rng():  # seed the initialisation without leaking global state
        torch.manual_seed(0)
        generalist = FeedForward(c.d_in, S * hidden, d_out=K)
        train(generalist, ClassificationTask.from_clinic(c), config, progress=False, device="cpu")
        team = train_specialists(c, hidden, config, progress=False)
    params = sum(p.numel() for m in team.specialists for p in m.parameters())
    assert sum(p.numel() for p in generalist.parameters()) == params - (S - 1) * K
    with torch.no_grad():
        generalist_acc = (generalist(c.val.x).argmax(-1) == c.val.diagnosis).float().mean().item()
    team_acc = (team(c.val.x, c.val.specialty).argmax(-1) == c.val.diagnosis).float().mean().item()
    return generalist_acc, team_acc


@pytest.mark.slow  # trains a generalist and the specialists: seconds each
@pytest.mark.parametrize("num_specialties, seed, min_gap", [(4, 0, 0.08), (4, 1, 0.08), (8, 0, 0.15)])
def test_clinic_generalist_is_worse_than_specialists(num_specialties: int, seed: int, min_gap: float) -> None:
    # Measured over clinic seeds 0-7 (S=4): gap 0.11-0.17, specialists 0.91-0.93,
    # generalist 0.76-0.81; S=8: gap 0.22-0.26.
    c = make_clinic(num_specialties, seed=seed)
    config = TrainConfig(steps=300, batch_size=128, lr=1e-2, eval_every=300)
    generalist, specialists = _generalist_vs_specialists(c, hidden=16, config=config)
    assert specialists > 0.88, f"specialists reach only {specialists:.3f}"
    assert generalist > 0.25 + 0.3, f"the generalist ({generalist:.3f}) should be well above chance (0.25)"
    assert specialists - generalist >= min_gap, f"generalist {generalist:.3f} vs specialists {specialists:.3f}"
