"""Tests for the training command: python -m moe_course.train / moe-train."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from moe_course.training.cli import load_run, main

TINY = [
    "--d-model",
    "16",
    "--d-ff",
    "32",
    "--layers",
    "2",
    "--heads",
    "2",
    "--context",
    "16",
    "--batch-size",
    "4",
    "--eval-rows",
    "4",
    "--facts",
    "20",
    "--quiet",
    "--device",
    "cpu",
    "--threads",
    "1",
    "--warmup",
    "2",
]


def _weights(out) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]


def test_cli_trains_and_writes_config_checkpoint_metrics_and_samples(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--model", "switch", "--experts", "4", "--steps", "6", "--eval-every", "3", "--out", str(out), *TINY]) == 0
    assert {p.name for p in out.iterdir()} >= {"config.json", "checkpoint.pt", "metrics.csv", "samples.txt"}
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["ffn"] == "switch" and saved["model"]["num_experts"] == 4 and saved["model"]["d_model"] == 16
    assert saved["corpus"]["num_facts"] == 20 and saved["train"]["steps"] == 6 and saved["task"]["eval_rows"] == 4
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["step"].tolist() == [3, 6]
    assert {"train_loss", "router_loss", "val_loss", "val_loss_facts", "val_loss_grammar", "val_dropped"} <= set(metrics.columns)
    assert "parameters" in capsys.readouterr().out
    model, corpus, _ = load_run(out)
    assert model.config.num_experts == 4 and corpus.config.num_facts == 20
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in _weights(out).items())


def test_cli_resume_ends_with_exactly_the_weights_of_an_uninterrupted_run(tmp_path):
    args = [
        "--model",
        "switch",
        "--experts",
        "2",
        "--jitter",
        "0.05",
        "--dropout",
        "0.1",
        "--steps",
        "8",
        "--eval-every",
        "2",
        *TINY,
    ]
    whole, split = tmp_path / "whole", tmp_path / "split"
    main([*args, "--out", str(whole)])
    main([*args, "--out", str(split), "--stop-after", "4", "--checkpoint-every", "2"])
    assert torch.load(split / "checkpoint.pt", weights_only=False)["step"] == 4
    assert not (split / "samples.txt").exists()  # not finished yet
    main(["--out", str(split), "--resume", "--quiet"])  # the saved configs are used
    a, b = _weights(whole), _weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m_whole, m_split = (pd.read_csv(o / "metrics.csv").drop(columns="seconds") for o in (whole, split))
    pd.testing.assert_frame_equal(m_whole, m_split)


def test_cli_refuses_to_overwrite_or_to_resume_with_other_settings(tmp_path, capsys):
    out = tmp_path / "run"
    main(["--steps", "2", "--eval-every", "1", "--out", str(out), *TINY])
    with pytest.raises(SystemExit):
        main(["--steps", "2", "--out", str(out), *TINY])
    assert "already holds a run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(out), "--resume", "--lr", "0.5"])
    assert "train.lr: saved 0.003, now 0.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "nothing"), "--resume"])
    assert "no run to resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--model", "dense", "--experts", "4"], "dense model has no experts"),
        (["--heads", "5"], "divisible by n_heads"),
        (["--facts", "0"], "num_facts"),
        (["--capacity-factor", "-1"], "capacity_factor"),
        (["--mix", "facts=1,gossip=1"], "unknown domain 'gossip'"),
        (["--text-file", "/nonexistent/file.txt"], "does not exist"),
        (["--model", "switch", "--top-k", "2"], "router='top_k'"),
        (["--fact-prompt", "patient"], "exactly one"),
        (["--model", "switch", "--router", "hash"], "capacity_factor=None"),
    ],
)
def test_cli_bad_settings_give_a_clear_error_not_a_traceback(tmp_path, capsys, flags, words):
    with pytest.raises(SystemExit) as exc:
        main(["--steps", "2", "--out", str(tmp_path / "x"), *flags])
    assert exc.value.code == 2 and words in capsys.readouterr().err


def test_cli_takes_top_k_routing_and_coded_records(tmp_path):
    out = tmp_path / "top2"
    flags = [
        "--model",
        "switch",
        "--experts",
        "4",
        "--router",
        "top_k",
        "--top-k",
        "2",
        "--id-alphabet",
        "ABCDEFGHIJ",
        "--fact-prompt",
        "#{}",
        "--steps",
        "2",
        "--eval-every",
        "2",
        "--out",
        str(out),
    ]
    assert main([*flags, *TINY]) == 0
    model, corpus, saved = load_run(out)
    assert (model.config.router, model.config.top_k) == ("top_k", 2) and saved["corpus"]["fact_prompt"] == "#{}"
    assert corpus.fact_prompt(next(iter(corpus.facts))).startswith("#") and (out / "samples.txt").read_text().startswith("#")
    assert "val_recall_facts" in pd.read_csv(out / "metrics.csv").columns


def test_cli_trains_on_a_users_text_file(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("Die Ärztin sieht den Patienten.\n" * 50, encoding="utf-8")
    out = tmp_path / "run"
    main(["--steps", "2", "--eval-every", "2", "--text-file", str(text), "--out", str(out), *TINY])
    assert "val_loss_text" in pd.read_csv(out / "metrics.csv").columns
    model, corpus, _ = load_run(out)
    assert "Ä" in corpus.tokenizer.chars and model.config.vocab_size == corpus.vocab_size


@pytest.mark.filterwarnings("ignore:'moe_course.train' found in sys.modules:RuntimeWarning")
def test_module_entry_point_prints_help(monkeypatch, capsys):
    # what `python -m moe_course.train --help` runs, without starting a new interpreter
    monkeypatch.setattr(sys, "argv", ["moe-train", "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("moe_course.train", run_name="__main__")
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "--experts" in out and "--resume" in out


def test_console_script_is_declared():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'moe-train = "moe_course.training.cli:main"' in text


def test_presets_pick_a_laptop_sized_model_on_the_cpu():
    from moe_course.training.cli import PRESETS, build_parser, configs_from_args, preset_for

    assert preset_for("auto", torch.device("cpu")) == "cpu" and preset_for("auto", torch.device("cuda")) == "large"
    assert preset_for("large", torch.device("cpu")) == "large"
    args = build_parser().parse_args(["--out", "x"])
    small, _, small_train, _ = configs_from_args(args, preset="cpu")
    large, _, large_train, _ = configs_from_args(args, preset="large")
    assert (small.d_model, small.block_size, small_train.steps) == (96, 64, 1500)
    assert (large.d_model, large.block_size, large_train.steps) == (128, 128, 2000)
    wider = configs_from_args(build_parser().parse_args(["--out", "x", "--d-model", "64"]), preset="large")[0]
    assert wider.d_model == 64 and wider.block_size == 128  # a flag beats the preset
    with pytest.raises(ValueError, match="unknown preset"):
        preset_for("huge", torch.device("cpu"))
    assert set(PRESETS) == {"cpu", "large"}


def test_cli_prints_a_time_estimate_and_trains_with_one_progress_bar(tmp_path, capsys, monkeypatch):
    import moe_course.training.cli as cli

    calls = []
    real = cli.train
    monkeypatch.setattr(cli, "train", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    assert main(["--steps", "6", "--eval-every", "2", "--checkpoint-every", "2", "--out", str(tmp_path / "run"), *TINY]) == 0
    assert len(calls) == 1 and calls[0]["stop_after"] == 6  # one call, one bar over the whole run, checkpoints inside it
    out = capsys.readouterr().out
    assert "ms per step here: steps 0 to 6 take about" in out


def _interrupt_at_evaluation(monkeypatch, which: int) -> None:
    """Send ourselves Ctrl-C (SIGINT) during the ``which``-th held-out evaluation, as a learner would press it."""
    import os
    import signal

    from moe_course.training.lm import LMTask

    real, seen = LMTask.evaluate, []

    def evaluate(self, model, device):
        seen.append(1)
        if len(seen) == which:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, model, device)

    monkeypatch.setattr(LMTask, "evaluate", evaluate)


def test_ctrl_c_saves_a_checkpoint_and_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, capsys, monkeypatch):
    args = ["--model", "switch", "--experts", "2", "--steps", "8", "--eval-every", "2", "--checkpoint-every", "100", *TINY]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main([*args, "--out", str(whole)]) == 0
    with monkeypatch.context() as m:
        _interrupt_at_evaluation(m, which=2)  # at step 4, long before the first planned checkpoint
        assert main([*args, "--out", str(cut)]) == 130
    printed = capsys.readouterr().out
    assert "stopped after step 4 of 8" in printed and "--resume" in printed
    assert torch.load(cut / "checkpoint.pt", weights_only=True)["step"] == 4
    assert pd.read_csv(cut / "metrics.csv")["step"].tolist() == [2, 4]
    assert main(["--out", str(cut), "--resume", "--quiet"]) == 0
    a, b = _weights(whole), _weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
    m_whole, m_cut = (pd.read_csv(o / "metrics.csv").drop(columns="seconds") for o in (whole, cut))
    pd.testing.assert_frame_equal(m_whole, m_cut)


def test_resume_refuses_a_run_folder_without_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(out), "--resume"])
    assert exc.value.code == 2 and "no checkpoint.pt" in capsys.readouterr().err


class _NotATensor:
    """What a malicious or foreign checkpoint might carry: an object whose unpickling could run code."""


def test_checkpoints_load_without_running_code_and_foreign_objects_are_refused(tmp_path):
    from moe_course.training import load_checkpoint

    out = tmp_path / "run"
    assert main(["--steps", "2", "--eval-every", "1", "--out", str(out), *TINY]) == 0
    state = load_checkpoint(out / "checkpoint.pt")  # weights_only: tensors and plain values
    assert state["step"] == 2 and isinstance(state["history"][0]["step"], int)
    state["extra"] = _NotATensor()
    torch.save(state, out / "checkpoint.pt")
    with pytest.raises(ValueError, match="refusing to load .*checkpoint.pt: it holds objects other than tensors"):
        load_checkpoint(out / "checkpoint.pt")
    with pytest.raises(ValueError, match="refusing to load"):
        load_run(out)
