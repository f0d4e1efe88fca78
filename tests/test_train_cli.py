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

TINY = ["--d-model", "16", "--d-ff", "32", "--layers", "2", "--heads", "2", "--context", "16", "--batch-size", "4",
        "--eval-rows", "4", "--facts", "20", "--quiet", "--device", "cpu", "--threads", "1", "--warmup", "2"]


def _weights(out) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]


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
    args = ["--model", "switch", "--experts", "2", "--jitter", "0.05", "--dropout", "0.1", "--steps", "8", "--eval-every", "2", *TINY]
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
    assert "train.lr: saved 0.001, now 0.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "nothing"), "--resume"])
    assert "no run to resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags,words",
    [(["--model", "dense", "--experts", "4"], "dense model has no experts"), (["--heads", "3"], "divisible by n_heads"),
     (["--facts", "0"], "num_facts"), (["--capacity-factor", "-1"], "capacity_factor"), (["--mix", "facts=1,gossip=1"], "unknown domain 'gossip'"),
     (["--text-file", "/nonexistent/file.txt"], "does not exist"), (["--model", "switch", "--top-k", "2"], "router='top_k'"),
     (["--fact-prompt", "patient"], "exactly one"), (["--model", "switch", "--router", "hash"], "capacity_factor=None")],
)
def test_cli_bad_settings_give_a_clear_error_not_a_traceback(tmp_path, capsys, flags, words):
    with pytest.raises(SystemExit) as exc:
        main(["--steps", "2", "--out", str(tmp_path / "x"), *flags])
    assert exc.value.code == 2 and words in capsys.readouterr().err


def test_cli_takes_top_k_routing_and_coded_records(tmp_path):
    out = tmp_path / "top2"
    flags = ["--model", "switch", "--experts", "4", "--router", "top_k", "--top-k", "2", "--id-alphabet", "ABCDEFGHIJ",
             "--fact-prompt", "#{}", "--steps", "2", "--eval-every", "2", "--out", str(out)]
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
