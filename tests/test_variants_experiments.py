"""Lesson 09's clinic experiments: Soft MoE and adaptive routers against the Switch layer, and what they measure."""

from __future__ import annotations

import pytest
import torch

from moe_course.data.clinic import make_clinic
from moe_course.experiments.variants import VariantRun, compute_profile, run_variants, waiting_room_effect
from moe_course.moe import MoEConfig
from moe_course.training import TrainConfig
from moe_course.variants.adaptive import AdaptiveMoEConfig, ClinicAdaptiveMoE
from moe_course.variants.soft_moe import ClinicSoftMoE, SoftMoEConfig


@pytest.fixture(scope="module")
def clinic():
    return make_clinic(4, n_train=512, n_val=256, seed=0)


def test_run_variants_trains_each_kind_of_model_and_is_deterministic(clinic):
    runs = [
        VariantRun("switch", MoEConfig(d_model=8, d_ff=8, num_experts=4), seed=1),
        VariantRun("soft", SoftMoEConfig(d_model=8, d_ff=8, num_experts=4, slots_per_expert=2), seed=1, group_size=8),
        VariantRun("top-p", AdaptiveMoEConfig(d_model=8, d_ff=8, num_experts=4, top_p=0.8), seed=1),
    ]
    cfg = TrainConfig(steps=5, batch_size=32, eval_every=5)
    first, second = (run_variants(clinic, runs, cfg, workers=1, progress=False) for _ in range(2))
    assert [type(r.model).__name__ for r in first] == ["ClinicMoE", "ClinicSoftMoE", "ClinicAdaptiveMoE"]
    assert [r.accuracy for r in first] == [r.accuracy for r in second]
    assert all(not r.model.training and len(r.history) == 1 for r in first)


def test_run_variants_refuses_a_batch_that_soft_moe_cannot_group(clinic):
    run = VariantRun("soft", SoftMoEConfig(d_model=8, d_ff=8, num_experts=2), group_size=24)
    with pytest.raises(ValueError, match="multiples of it"):
        run_variants(clinic, [run], TrainConfig(steps=1, batch_size=32), workers=1, progress=False)
    with pytest.raises(TypeError, match="VariantRun.model"):
        VariantRun("x", "not a config")


def test_the_waiting_room_moves_soft_moe_diagnoses_but_never_a_token_choice_layer(clinic):
    torch.manual_seed(0)
    from moe_course.models import ClinicMoE

    alone = waiting_room_effect(
        ClinicMoE(clinic.d_in, clinic.num_diagnoses, MoEConfig(d_model=8, d_ff=8, num_experts=4, capacity_factor=None)),
        clinic.val,
    )
    assert alone["changed between two waiting rooms"] == 0.0 and alone["changed in some waiting room"] == 0.0
    soft = ClinicSoftMoE(
        clinic.d_in, clinic.num_diagnoses, SoftMoEConfig(d_model=8, d_ff=8, num_experts=4, slots_per_expert=2), group_size=8
    )
    with torch.no_grad():
        soft.moe.scale.fill_(20.0)  # sharp dispatch: each slot close to a few patients, so the company matters
    blended = waiting_room_effect(soft, clinic.val, arrangements=3)
    assert blended["changed in some waiting room"] > 0.0
    assert 0.0 <= blended["changed between two waiting rooms"] <= blended["changed in some waiting room"] <= 1.0
    with pytest.raises(ValueError, match="arrangements"):
        waiting_room_effect(soft, clinic.val, arrangements=1)


def test_compute_profile_counts_experts_per_patient_by_group(clinic):
    torch.manual_seed(0)
    model = ClinicAdaptiveMoE(clinic.d_in, clinic.num_diagnoses, AdaptiveMoEConfig(d_model=8, d_ff=8, num_experts=4, top_p=0.9))
    prof = compute_profile(model, clinic, clinic.val, blur=(0.0, 0.5))
    with torch.no_grad():
        k = model(clinic.val.x).moe.experts_per_token.float()
    assert prof["by_blur"][0.0] == pytest.approx(k.mean().item())
    assert list(prof["by_specialty"].index) == list(clinic.specialties)
    assert prof["share_by_experts"].sum() == pytest.approx(1.0) and list(prof["share_by_experts"].index) == [0, 1, 2, 3, 4]
    assert (prof["share_by_experts"] * prof["share_by_experts"].index).sum() == pytest.approx(k.mean().item(), rel=1e-5)
    assert set(prof["accuracy_by_blur"].index) == {0.0, 0.5} and model.training  # left in its own mode
    with pytest.raises(TypeError, match="ClinicAdaptiveMoE"):
        compute_profile(object(), clinic, clinic.val)
