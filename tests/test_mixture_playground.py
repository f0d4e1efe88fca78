from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from moe_course.data.clinic import Patients, make_clinic  # noqa: E402
from moe_course.figures.widgets import mixture_playground  # noqa: E402
from moe_course.mixture import DenseMixture, DenseMixtureConfig  # noqa: E402


def _setup():
    clinic = make_clinic(num_specialties=3, n_train=60, n_val=60, seed=0)
    torch.manual_seed(0)
    model = DenseMixture(DenseMixtureConfig(clinic.d_in, 4, clinic.num_diagnoses, 3))
    return clinic, model


def test_playground_shows_a_patient_then_a_specialty():
    clinic, model = _setup()
    widget = mixture_playground(model, clinic.val, clinic.specialties, max_patients=20)
    mode, (patient, chosen), summary, chart = (
        widget.children[0],
        widget.children[1].children,
        widget.children[2],
        widget.children[3],
    )
    assert patient.max == 19 and "Patient 0" in summary.value and chart.value[:4] == b"\x89PNG"
    with torch.no_grad():
        top = int(model(clinic.val.x[5:6]).router_probs.argmax())
    patient.value = 5
    assert "Patient 5" in summary.value and f"expert {top}" in summary.value
    first = chart.value
    mode.value = "one specialty"
    chosen.value = 2
    assert clinic.specialties[2] in summary.value and chart.value != first
    assert f"{int((clinic.val.specialty == 2).sum())} patients" in summary.value  # all of them, not only the slider's 20
    assert patient.layout.display == "none" and chosen.layout.display is None


def test_playground_needs_patients():
    clinic, model = _setup()
    empty = Patients(clinic.val.x[:0], clinic.val.diagnosis[:0], clinic.val.specialty[:0])
    with pytest.raises(ValueError, match="at least one patient"):
        mixture_playground(model, empty, clinic.specialties)
