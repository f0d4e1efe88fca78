from __future__ import annotations

import pytest
import torch

from moe_course.models import ClinicMoE
from moe_course.moe import MoEConfig
from moe_course.training import ClassificationTask, TrainConfig, model_logits, train


def _model(seed: int = 0, **overrides) -> ClinicMoE:
    torch.manual_seed(seed)
    return ClinicMoE(6, 3, MoEConfig(d_model=8, d_ff=16, num_experts=4, **overrides))


def test_clinicmoe_returns_logits_the_weighted_router_loss_and_the_moe_output():
    model = _model()
    out = model(torch.randn(10, 6))
    assert out.logits.shape == (10, 3)
    torch.testing.assert_close(out.router_loss, out.moe.router_loss)
    assert out.aux_loss is out.moe.aux_loss and out.z_loss is out.moe.z_loss
    assert out.router_logits is out.moe.router_logits and out.router_probs is out.moe.router_probs
    assert out.moe.expert_index.shape == (10, 1)
    logits, router_loss = model_logits(out)
    assert logits is out.logits and router_loss is out.router_loss


def test_clinicmoe_residual_keeps_dropped_patients_embedding():
    model = _model(capacity_factor=0.25)
    x = torch.randn(16, 6)
    out = model(x)
    dropped = ~out.moe.keep.any(-1)
    assert dropped.any()
    h = model.embed(x)
    torch.testing.assert_close(out.logits[dropped], model.head(h[dropped]))


def test_clinicmoe_training_adds_the_router_loss_and_learns():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] * x[:, 2] > 0).long()  # 3 classes
    task = ClassificationTask(x[:384], y[:384], x[384:], y[384:])
    model = _model()
    batch = task.sample_batch(64, torch.Generator().manual_seed(1), torch.device("cpu"))
    total, metrics = task.loss(model, batch)
    assert total.item() == pytest.approx(metrics["train_loss"] + model(batch[0]).router_loss.item(), rel=1e-5)
    result = train(model, task, TrainConfig(steps=150, eval_every=50, lr=1e-2), progress=False, device="cpu")
    assert result.history["val_acc"].iloc[-1] > 0.75  # majority class: 0.5


def test_clinicmoe_rejects_bad_inputs():
    with pytest.raises(ValueError, match="d_in must be a positive int"):
        ClinicMoE(0, 3, MoEConfig(8, 16, 4))
    with pytest.raises(ValueError, match=r"shape \(N, 6\)"):
        _model()(torch.randn(4, 5))
