"""The benchmark's mechanics (never its timings: those live in its own output)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from moe_course.bench import BenchConfig, format_table, run_benchmark
from moe_course.bench.benchmark import EXPERTS_ONLY, _candidates, _run
from moe_course.dispatch import DEFAULT_METHOD, METHODS

TINY = (BenchConfig(64, 16, 32, 4), BenchConfig(64, 16, 32, 4, 2))


def test_run_benchmark_has_a_row_per_config_implementation_and_mode():
    results = run_benchmark(TINY, repeats=2, warmup=1, log=None)
    timed = results[results["mode"] != ""]
    for cfg in TINY:
        part = timed[timed["config"] == cfg.name]
        assert set(part["implementation"]) >= {"dense", *METHODS}
        assert set(part["mode"]) == {"forward", "forward+backward"}
        dense = part[part["implementation"] == "dense"]
        assert (dense["ratio_to_dense"] == 1.0).all()
    assert (timed["median_ms"] > 0).all() and (timed["peak_MiB"] > 0).all()
    assert (timed["ratio_q1"] <= timed["ratio_to_dense"]).all() and (timed["ratio_to_dense"] <= timed["ratio_q3"]).all()
    assert timed[timed["default"]]["implementation"].unique().tolist() == [DEFAULT_METHOD]
    notes = results[results["mode"] == ""]
    assert "top-1 only" in " ".join(notes["note"])  # the Switch peer sits out the k=2 case


def test_the_outside_peer_is_timed_when_transformers_is_installed():
    pytest.importorskip("transformers")
    results = run_benchmark(TINY[:1], methods=["grouped_mm"], repeats=1, warmup=0, memory=False, log=None)
    assert "hf_switch" in set(results["implementation"])


def test_one_hot_memory_grows_with_n_times_c_while_sorting_grows_with_n():
    """The reason GShard-style dispatch loses on a CPU: its (N, E, C) tensors. Dropless, C ~ N/E, so N·E·C ~ N²."""
    results = run_benchmark(
        [BenchConfig(256, 16, 32, 4), BenchConfig(1024, 16, 32, 4)],
        methods=["onehot_einsum", "grouped_mm"],
        repeats=1,
        warmup=0,
        peer=False,
        log=None,
    )
    fb = results[results["mode"] == "forward+backward"].set_index(["config", "implementation"])["peak_MiB"]
    small, large = (f"N={n} D=16 F=32 E=4 k=1" for n in (256, 1024))
    assert fb[(small, "onehot_einsum")] > 3 * fb[(small, "grouped_mm")]
    assert fb[(large, "onehot_einsum")] > 10 * fb[(small, "onehot_einsum")]  # ~16x for 4x the tokens
    assert fb[(large, "grouped_mm")] < 5 * fb[(small, "grouped_mm")]  # ~4x


def test_format_table_names_every_implementation():
    text = format_table(run_benchmark(TINY[:1], methods=["masks_loop"], repeats=1, warmup=0, peer=False, log=None))
    assert "N=64 D=16 F=32 E=4 k=1" in text and "masks_loop" in text and "dense" in text


@pytest.mark.parametrize("kwargs,words", [({"methods": ["warp"]}, "unknown dispatch"), ({"repeats": 0}, "repeats")])
def test_run_benchmark_rejects_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        run_benchmark(TINY, log=None, **kwargs)


def test_bench_config_validates():
    with pytest.raises(ValueError, match="top_k"):
        BenchConfig(8, 4, 4, 2, 3)
    with pytest.raises(ValueError, match="num_tokens"):
        BenchConfig(0, 4, 4, 2)


@pytest.mark.slow  # the benchmark in a subprocess
def test_command_line_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_course.bench",
            "--quick",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--methods",
            "grouped_mm",
            "--no-peer",
            "--no-memory",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(out.read_text())
    assert payload["default"] == DEFAULT_METHOD and len(payload["configs"]) == 3
    assert {r["implementation"] for r in payload["results"]} == {"dense", "grouped_mm"}
    assert "ratio" not in proc.stderr and "grouped_mm" in proc.stdout


def test_paired_times_cancels_a_slow_spell_that_hits_both_halves_of_a_pair(monkeypatch):
    """A fake clock: the candidate costs 2 units, the baseline 1, and every other pair runs 5x slower."""
    import moe_course.bench.benchmark as bench

    clock = {"now": 0.0, "slow": 1.0}
    calls = []
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock["now"])

    def runner(name, cost):
        def run():
            calls.append(name)
            clock["now"] += cost * clock["slow"]
            if len(calls) % 2 == 0:  # a pair is over: the next one runs in a slow spell, or not
                clock["slow"] = 5.0 if clock["slow"] == 1.0 else 1.0

        return run

    out = bench.paired_times({"base": runner("base", 1.0), "cand": runner("cand", 2.0)}, baseline="base", repeats=6, warmup=0)
    assert calls == ["base", "cand", "cand", "base"] * 3  # paired, and which half goes first alternates
    assert out["cand"].ratios == [2.0] * 6 and out["cand"].ratio == 2.0  # the slow spells cancel
    assert sorted(set(out["cand"].seconds)) == [2.0, 10.0] and out["base"].ratio == 1.0


def test_paired_times_rejects_a_missing_baseline():
    import moe_course.bench.benchmark as bench

    with pytest.raises(ValueError, match="baseline 'dense' is not among"):
        bench.paired_times({"a": lambda: None}, baseline="dense")


@pytest.mark.slow  # the benchmark in a subprocess
@pytest.mark.parametrize("keep", [False, True], ids=["flushed", "kept"])
def test_command_line_lm_mode_times_dense_switch_and_hash_and_says_what_it_did_with_denormals(tmp_path, keep):
    out = tmp_path / "lm.json"
    args = ["--lm", "--rounds", "1", "--repeats", "2", "--warmup", "1", "--lm-widths", "1", "--batch-size", "2"]
    args += ["--d-model", "16", "--d-ff", "16", "--json", str(out)] + (["--keep-denormals"] if keep else [])
    proc = subprocess.run([sys.executable, "-m", "moe_course.bench", *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(out.read_text())
    assert payload["mode"] == "lm" and payload["threads"] == 1  # one thread, as lesson 08 trains
    assert {row["candidate"] for row in payload["results"]} >= {"switch", "hash"}
    assert payload["flush_denormal"] is (not keep)
    assert ("denormals flushed to zero" in proc.stdout) is (not keep)


@pytest.mark.parametrize("top_k", [1, 2])
def test_the_experts_only_floor_runs_each_expert_on_its_equal_block_and_adds_the_rows_back(top_k):
    cfg = BenchConfig(24, 8, 16, 4, top_k)
    candidates = _candidates(cfg, ["masks_loop"], False, {}, floor=True)
    floor = next(c for c in candidates if c.name == EXPERTS_ONLY)
    assert [c.name for c in _candidates(cfg, ["masks_loop"], False, {})] == ["dense", "masks_loop"]  # only when asked
    y = floor.forward()
    params = dict(zip(("w_in", "b_in", "w_out", "b_out"), floor.params))
    x = floor.x.reshape(24, 8)
    rows = x.repeat_interleave(top_k, dim=0)  # assignment order: token-major
    want = torch.empty(24 * top_k, 8)
    for e, block in enumerate(torch.arange(24 * top_k).chunk(4)):  # 4 equal blocks of assignments
        h = torch.nn.functional.gelu(rows[block] @ params["w_in"][e] + params["b_in"][e])
        want[block] = h @ params["w_out"][e] + params["b_out"][e]
    torch.testing.assert_close(y, want.view(24, top_k, 8).sum(1), atol=1e-5, rtol=1e-5)
    _run(floor, True, torch.randn(24, 8))  # and its backward runs
    assert all(p.grad is not None for p in floor.params)
