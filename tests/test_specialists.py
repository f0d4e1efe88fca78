from __future__ import annotations

import torch

from moe_course.data.clinic import make_clinic
from moe_course.experiments.specialists import oracle_logits, train_specialists
from moe_course.training import TrainConfig


def test_oracle_sends_each_patient_to_its_own_specialist():
    experts = [lambda x, k=k: torch.full((len(x), 3), float(k)) for k in range(4)]
    specialty = torch.tensor([2, 0, 3, 3])
    out = oracle_logits(experts, torch.zeros(4, 5), specialty)
    assert out[:, 0].tolist() == [2.0, 0.0, 3.0, 3.0]


def test_train_specialists_trains_one_model_per_specialty_on_its_own_patients():
    clinic = make_clinic(num_specialties=3, n_train=600, n_val=300, seed=0)
    team = train_specialists(clinic, d_ff=8, config=TrainConfig(steps=60, eval_every=30), progress=False)
    assert len(team.specialists) == 3 and len(team.histories) == 3
    assert [h["specialty"].iloc[0] for h in team.histories] == list(clinic.specialties)
    logits = team(clinic.val.x, clinic.val.specialty)
    acc = (logits.argmax(-1) == clinic.val.diagnosis).float().mean()
    assert acc > 1.5 / clinic.num_diagnoses  # well above chance after 60 steps
    assert not torch.equal(team.specialists[0].fc_in.weight, team.specialists[1].fc_in.weight)
