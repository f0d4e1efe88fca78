from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_course.experts import FeedForward
from moe_course.training import ClassificationTask, TrainConfig, model_logits, train


def _task(n: int = 256, seed: int = 0) -> ClassificationTask:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = (x[:, 0] * x[:, 1] > 0).long()
    return ClassificationTask(x[: n // 2], y[: n // 2], x[n // 2 :], y[n // 2 :])


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return FeedForward(5, 16, d_out=2)


def test_train_learns_and_returns_a_history_table():
    result = train(_model(), _task(), TrainConfig(steps=200, eval_every=50, lr=1e-2), progress=False, device="cpu")
    h = result.history
    assert list(h["step"]) == [50, 100, 150, 200]
    assert {"step", "lr", "train_loss", "val_loss", "val_acc", "seconds"} <= set(h.columns)
    assert h["val_acc"].iloc[-1] > 0.8 > h["val_acc"].iloc[0] - 0.2
    assert result.final["step"] == 200


def test_train_is_reproducible():
    a = train(_model(), _task(), TrainConfig(steps=30, eval_every=10), progress=False, device="cpu")
    b = train(_model(), _task(), TrainConfig(steps=30, eval_every=10), progress=False, device="cpu")
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)


def test_resumed_run_ends_with_exactly_the_same_weights(tmp_path):
    config = TrainConfig(steps=40, eval_every=10, warmup_steps=5, lr_min_ratio=0.1)
    whole = train(_model(), _task(), config, progress=False, device="cpu")
    ckpt = tmp_path / "run.pt"
    first = train(_model(), _task(), config, progress=False, device="cpu", checkpoint_path=ckpt, stop_after=20)
    assert first.final["step"] == 20 and ckpt.exists()
    resumed = train(_model(seed=99), _task(), config, progress=False, device="cpu", checkpoint_path=ckpt, resume=True)
    for p, q in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
    assert list(resumed.history["step"]) == [10, 20, 30, 40]
    assert resumed.history["val_loss"].tolist() == whole.history["val_loss"].tolist()


def test_resume_refuses_a_different_config(tmp_path):
    ckpt = tmp_path / "run.pt"
    train(_model(), _task(), TrainConfig(steps=10, eval_every=5), progress=False, device="cpu", checkpoint_path=ckpt)
    with pytest.raises(ValueError, match="different TrainConfig"):
        train(
            _model(),
            _task(),
            TrainConfig(steps=20, eval_every=5),
            progress=False,
            device="cpu",
            checkpoint_path=ckpt,
            resume=True,
        )


def test_resume_needs_a_path():
    with pytest.raises(ValueError, match="checkpoint_path"):
        train(_model(), _task(), TrainConfig(steps=5), progress=False, device="cpu", resume=True)


def test_learning_rate_schedule_warms_up_then_decays():
    c = TrainConfig(steps=100, lr=1.0, warmup_steps=10, lr_min_ratio=0.1)
    assert c.lr_at(0) == pytest.approx(0.1) and c.lr_at(9) == pytest.approx(1.0)
    assert c.lr_at(10) == pytest.approx(1.0) and c.lr_at(99) == pytest.approx(0.1, abs=0.01)
    assert TrainConfig(steps=10, lr=0.5).lr_at(7) == 0.5


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"steps": 0}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"batch_size": -1}, "batch_size"),
        ({"steps": 5, "warmup_steps": 6}, "warmup_steps"),
        ({"grad_clip": 0.0}, "grad_clip"),
        ({"lr_min_ratio": 2.0}, "lr_min_ratio"),
    ],
)
def test_train_config_rejects_bad_values(kwargs, words):
    with pytest.raises(ValueError, match=words):
        TrainConfig(**kwargs)


def test_callback_sees_every_evaluation():
    seen = []
    train(
        _model(), _task(), TrainConfig(steps=20, eval_every=5), progress=False, device="cpu", callback=lambda s, m: seen.append(s)
    )
    assert seen == [5, 10, 15, 20]


def test_model_logits_reads_typed_results():
    class Out:
        logits = torch.zeros(2, 3)
        router_loss = torch.tensor(0.5)
        aux_loss = torch.tensor(50.0)  # unweighted: for watching, never added

    logits, router_loss = model_logits(Out())
    assert logits.shape == (2, 3) and router_loss.item() == 0.5
    assert model_logits(torch.ones(1))[1] is None
    with pytest.raises(TypeError, match="expected a tensor"):
        model_logits(object())


def test_router_loss_is_added_to_the_training_loss():
    class WithAux(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 2)

        def forward(self, x):
            class Out:
                pass

            out = Out()
            out.logits = self.lin(x)
            out.router_loss = 10.0 * self.lin.weight.pow(2).sum()
            return out

    task = _task()
    batch = (task.x_train[:8], task.y_train[:8])
    model = WithAux()
    total, metrics = task.loss(model, batch)
    assert total.item() == pytest.approx(metrics["train_loss"] + 10.0 * model.lin.weight.pow(2).sum().item(), rel=1e-5)


def test_a_bare_moe_layer_trains_with_its_weighted_router_loss():
    """train(MoELayer(...), task): the task loss adds α·aux + β·z, not the unweighted aux_loss."""
    from moe_course.moe import MoEConfig, MoELayer

    torch.manual_seed(0)
    config = MoEConfig(d_model=5, d_ff=8, num_experts=4, aux_loss_coef=0.01, z_loss_coef=0.001)
    layer = MoELayer(config)
    task = _task()  # x (N, 5); the layer's y (N, 5) serves as five class scores
    batch = (task.x_train[:16], task.y_train[:16])
    total, metrics = task.loss(layer, batch)
    out = layer(batch[0])
    ce = F.cross_entropy(out.y, batch[1])
    want = ce + config.aux_loss_coef * out.aux_loss + config.z_loss_coef * out.z_loss
    assert total.item() == pytest.approx(want.item(), rel=1e-6)
    assert out.aux_loss.item() >= 1.0 - 1e-6 and abs(total.item() - (ce + out.aux_loss).item()) > 0.5  # not the unweighted 100x α
    result = train(layer, task, TrainConfig(steps=5, eval_every=5), progress=False, device="cpu")
    assert len(result.history) == 1 and result.history["train_loss"].notna().all()


def test_classification_task_checks_shapes():
    with pytest.raises(ValueError, match="train split"):
        ClassificationTask(
            torch.zeros(3, 2), torch.zeros(4, dtype=torch.long), torch.zeros(2, 2), torch.zeros(2, dtype=torch.long)
        )


def test_every_tracker_looks_at_the_model_in_eval_mode_without_gradients_and_restores_its_mode():
    """LoadTracker, SpecialisationTracker and RoutingTracker share one rule: training.evaluating."""
    from moe_course.analysis.lm_routing import RoutingTracker
    from moe_course.analysis.load import LoadTracker
    from moe_course.analysis.specialisation import SpecialisationTracker
    from moe_course.data.corpus import Corpus, CorpusConfig
    from moe_course.mixture import DenseMixture, DenseMixtureConfig
    from moe_course.models import ClinicMoE
    from moe_course.moe import MoEConfig
    from moe_course.transformer import GPT, GPTConfig

    corpus = Corpus(CorpusConfig(num_facts=20))
    torch.manual_seed(0)
    cases = [
        (ClinicMoE(5, 2, MoEConfig(d_model=8, d_ff=8, num_experts=3)), LoadTracker(torch.randn(12, 5))),
        (DenseMixture(DenseMixtureConfig(5, 8, 2, 3)), SpecialisationTracker(torch.randn(12, 5), torch.randint(0, 2, (12,)), 2)),
        (
            GPT(
                GPTConfig(
                    vocab_size=corpus.vocab_size,
                    block_size=16,
                    d_model=16,
                    n_layers=1,
                    n_heads=2,
                    d_ff=16,
                    ffn="switch",
                    num_experts=2,
                )
            ),
            RoutingTracker(corpus.held_out(4, 16), corpus.domains, chunk=2),
        ),
    ]
    for model, tracker in cases:
        seen = []
        model.register_forward_pre_hook(lambda m, args: seen.append((m.training, torch.is_grad_enabled())))
        for mode in (True, False):
            model.train(mode)
            tracker(0, model)
            assert model.training is mode, type(tracker).__name__
        assert seen and set(seen) == {(False, False)}, type(tracker).__name__


def test_a_checkpoint_every_few_minutes_and_after_each_save_the_callback(tmp_path):
    saves = []
    config = TrainConfig(steps=5, batch_size=16, eval_every=2)
    train(
        _model(),
        _task(),
        config,
        device="cpu",
        progress=False,
        checkpoint_path=tmp_path / "c.pt",
        checkpoint_minutes=1e-9,
        on_checkpoint=lambda step, rows: saves.append((step, len(rows))),
    )
    # every step is "a few minutes" after the last save here; the final save comes at the end
    assert [s for s, _ in saves] == [1, 2, 3, 4, 5] and saves[-1] == (5, 3)
    saves.clear()
    train(
        _model(),
        _task(),
        config,
        device="cpu",
        progress=False,
        checkpoint_path=tmp_path / "d.pt",
        checkpoint_minutes=60,
        on_checkpoint=lambda step, rows: saves.append(step),
    )
    assert saves == [5]  # an hour never passed: only the save at the end


def test_ctrl_c_in_train_finishes_the_step_saves_and_raises(tmp_path):
    import os
    import signal

    from moe_course.training import TrainingInterrupted, load_checkpoint

    def press_ctrl_c(step, model):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    config = TrainConfig(steps=6, batch_size=16, eval_every=2)
    with pytest.raises(TrainingInterrupted, match="stopped after step 2; checkpoint saved in") as stop:
        train(_model(), _task(), config, device="cpu", progress=False, checkpoint_path=tmp_path / "c.pt", callback=press_ctrl_c)
    assert stop.value.step == 2 and load_checkpoint(tmp_path / "c.pt")["step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the usual Ctrl-C is back
    resumed = train(_model(), _task(), config, device="cpu", progress=False, checkpoint_path=tmp_path / "c.pt", resume=True)
    whole = train(_model(), _task(), config, device="cpu", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(), whole.model.state_dict().values()))
    assert resumed.history.drop(columns="seconds").equals(whole.history.drop(columns="seconds"))


def test_the_progress_bar_shows_a_few_headline_numbers_not_every_metric():
    from moe_course.training.loop import _headline

    lm_row = {"step": 200, "lr": 1e-3, "seconds": 3.0, "train_loss": 1.5, "val_loss": 0.9, "val_recall_facts": 0.4}
    lm_row |= {f"val_loss_{d}": 1.0 for d in ("facts", "arithmetic", "reversal", "sorting", "brackets", "grammar")}
    assert list(_headline(lm_row)) == ["train_loss", "val_loss", "val_recall_facts"]
    assert _headline({"step": 1, "lr": 0.1, "seconds": 1.0, "train_loss": 0.5, "val_loss": 0.4, "val_acc": 0.9}) == {
        "train_loss": "0.5",
        "val_loss": "0.4",
        "val_acc": "0.9",
    }
    other = {"step": 1, "lr": 0.1, "a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0, "e": 5.0}
    assert list(_headline(other)) == ["a", "b", "c", "d"]  # an unknown task: its first four numbers


def test_make_optimizer_uses_the_fused_adamw_and_falls_back_where_there_is_none(monkeypatch):
    import torch

    from moe_course.training.loop import TrainConfig, make_optimizer

    model = torch.nn.Linear(4, 3)
    config = TrainConfig(lr=0.05, weight_decay=0.1)
    optimizer = make_optimizer(model, config)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["fused"]
    assert optimizer.param_groups[0]["lr"] == 0.05 and optimizer.param_groups[0]["weight_decay"] == 0.1

    real = torch.optim.AdamW

    def no_fused_kernel(params, **kwargs):  # an older torch, or a device without the kernel
        if kwargs.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused_kernel)
    fallback = make_optimizer(model, config)
    assert isinstance(fallback, real) and not fallback.param_groups[0]["fused"]
    assert fallback.param_groups[0]["lr"] == 0.05 and len(fallback.param_groups[0]["params"]) == 2
