"""Train a dense or Switch language model on the course corpus from the command line.

    python -m moe_course.train --model switch --experts 8 --out runs/switch8
    python -m moe_course.train --model dense --out runs/dense
    python -m moe_course.train --out runs/switch8 --resume        # continue an interrupted run
    moe-train --help                                             # the same, as a console script

The flags fill the same config dataclasses the lessons use (``GPTConfig``,
``CorpusConfig``, ``TrainConfig``); anything not given comes from the preset.
``--preset cpu`` (the default on a CPU) is a model that trains in a few minutes on a
laptop; ``--preset large`` (the default on a GPU) is four times wider and deeper in
context, and takes about an hour per 2,000 steps on a 2-core CPU. The device is picked
automatically (CUDA, then Apple MPS, then the CPU; ``--device cpu`` forces one).
Before training the command times a few steps on a copy of the model and prints how
long the run will take. Ctrl-C stops after the current step and saves a checkpoint
(so does every ``--checkpoint-minutes`` of training); ``--resume`` continues from it.
The output folder receives

    config.json     the three configs (and the task's settings), to rebuild the run
    checkpoint.pt   model, optimiser and sampler state, every --checkpoint-every steps and at the end
    metrics.csv     one row per evaluation: step, lr, train loss, held-out loss overall and per domain, ...
    samples.txt     a few completions by the trained model

``--resume`` continues from ``checkpoint.pt`` with the saved configs (flags
given again must agree with them) and ends with exactly the weights an
uninterrupted run would have.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from ..data.corpus import Corpus, CorpusConfig
from ..device import get_device, seed_everything
from ..flops import count_parameters
from ..transformer import GPT, GPTConfig, flops_per_token, param_count
from .lm import LMTask, complete
from .loop import TrainConfig, TrainingInterrupted, load_checkpoint, make_optimizer, train

__all__ = ["main", "build_parser", "configs_from_args", "load_run", "preset_for", "PRESETS", "estimate_seconds_per_step"]

CONFIG_FILE, CHECKPOINT_FILE, METRICS_FILE, SAMPLES_FILE = "config.json", "checkpoint.pt", "metrics.csv", "samples.txt"

# flag dest → (config section, field name)
_MODEL_FLAGS = {
    "context": "block_size",
    "d_model": "d_model",
    "layers": "n_layers",
    "heads": "n_heads",
    "d_ff": "d_ff",
    "model": "ffn",
    "experts": "num_experts",
    "router": "router",
    "top_k": "top_k",
    "moe_every": "moe_every",
    "capacity_factor": "capacity_factor",
    "aux_coef": "aux_loss_coef",
    "z_coef": "z_loss_coef",
    "jitter": "router_jitter",
    "dropout": "dropout",
    "untied": "tie_embeddings",
    "init_scale": "init_scale",
}
_CORPUS_FLAGS = {
    "facts": "num_facts",
    "id_digits": "id_digits",
    "id_alphabet": "id_alphabet",
    "fact_prompt": "fact_prompt",
    "wards": "num_wards",
    "corpus_seed": "seed",
    "mix": "mix",
    "text_file": "text_file",
}
_TRAIN_FLAGS = {
    "steps": "steps",
    "batch_size": "batch_size",
    "lr": "lr",
    "weight_decay": "weight_decay",
    "warmup": "warmup_steps",
    "lr_min_ratio": "lr_min_ratio",
    "grad_clip": "grad_clip",
    "eval_every": "eval_every",
    "seed": "seed",
}
_TASK_FLAGS = {"eval_rows": "eval_rows"}

# The command's defaults, by preset. "cpu": a model that trains in minutes on a laptop CPU
# (a little larger than lesson 08's); "large": four times the context and width of a step's
# work, for a GPU (or an hour of a CPU). "auto" picks "cpu" on the CPU and "large" elsewhere.
PRESETS = {
    "cpu": {
        "model": dict(block_size=64, d_model=96, n_layers=3, n_heads=4, d_ff=384),
        "train": dict(steps=1500, batch_size=32, lr=3e-3, warmup_steps=100, lr_min_ratio=0.1, eval_every=250),
        "task": dict(eval_rows=128),
    },
    "large": {
        "model": dict(block_size=128, d_model=128, n_layers=4, n_heads=4, d_ff=512),
        "train": dict(steps=2000, batch_size=32, lr=1e-3, warmup_steps=100, lr_min_ratio=0.1, eval_every=200),
        "task": dict(eval_rows=256),
    },
}


def _optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "off", "dropless") else float(text)


def _mix(text: str) -> dict[str, float]:
    try:
        pairs = [item.split("=") for item in text.split(",") if item.strip()]
        return {k.strip(): float(v) for k, v in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--mix expects domain=weight pairs separated by commas, e.g. facts=0.5,arithmetic=0.5; got {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every flag left out keeps its default (or, with --resume, the saved value).",
    )
    S = argparse.SUPPRESS  # flags not given stay absent, so --resume can tell them apart
    m = p.add_argument_group("model (GPTConfig)")
    m.add_argument("--model", choices=["dense", "switch"], default=S, help="dense FFNs or Switch layers (default dense)")
    m.add_argument("--experts", type=int, default=S, help="experts per Switch layer (switch only; default 8)")
    m.add_argument(
        "--router",
        choices=["switch", "top_k", "noisy_top_k", "hash"],
        default=S,
        help="routing of the expert layers (default switch: top-1, raw gate; hash: fixed by token id, needs --capacity-factor none)",
    )
    m.add_argument("--top-k", type=int, default=S, help="experts per token (router top_k or noisy_top_k; default 1)")
    m.add_argument("--d-model", type=int, default=S, help="model width D (default 128)")
    m.add_argument("--d-ff", type=int, default=S, help="FFN / expert hidden width F (default 512)")
    m.add_argument("--layers", type=int, default=S, help="transformer blocks (default 4)")
    m.add_argument("--heads", type=int, default=S, help="attention heads (default 4)")
    m.add_argument("--context", type=int, default=S, help="characters of context T (default 128)")
    m.add_argument("--moe-every", type=int, default=S, help="every n-th block is a Switch block (default 1: all)")
    m.add_argument(
        "--capacity-factor", type=_optional_float, default=S, help="expert capacity factor, or 'none' for dropless (default 1.25)"
    )
    m.add_argument("--aux-coef", type=float, default=S, help="load-balancing loss weight α (default 0.01)")
    m.add_argument("--z-coef", type=float, default=S, help="router z-loss weight (default 0.001)")
    m.add_argument("--jitter", type=float, default=S, help="router input jitter ε (default 0)")
    m.add_argument("--dropout", type=float, default=S, help="dropout (default 0)")
    m.add_argument(
        "--init-scale", type=_optional_float, default=S, help="Switch init scale of FFNs and experts, or 'none' (default 0.1)"
    )
    m.add_argument(
        "--untied",
        action="store_const",
        const=False,
        default=S,
        help="give the head its own weights (default: tied to the embedding)",
    )
    c = p.add_argument_group("corpus (CorpusConfig)")
    c.add_argument("--facts", type=int, default=S, help=f"patients in the fact table (default {CorpusConfig().num_facts})")
    c.add_argument(
        "--id-digits",
        type=int,
        default=S,
        help=f"digits of a patient number (default {CorpusConfig().id_digits}; 3 or 4 allow more facts)",
    )
    c.add_argument(
        "--id-alphabet",
        default=S,
        help="write patients as codes of --id-digits characters from this alphabet, e.g. ABCDEFGHIJKLMNOPQRSTUVWXYZ (default: numbers)",
    )
    c.add_argument("--fact-prompt", default=S, help="a record's prompt, {} for the patient, e.g. '#{}' (default 'patient {}: ')")
    c.add_argument("--wards", type=int, default=S, help=f"distinct answers of a fact (default {CorpusConfig().num_wards})")
    c.add_argument("--corpus-seed", type=int, default=S, help="seed of the fact table and the held-out set (default 0)")
    c.add_argument(
        "--mix", type=_mix, default=S, help="sampling weights, e.g. facts=0.5,arithmetic=0.1,... (default: the course's mix)"
    )
    c.add_argument("--text-file", default=S, help="also train on your own UTF-8 text file (domain 'text')")
    t = p.add_argument_group("training (TrainConfig)")
    t.add_argument("--steps", type=int, default=S, help="optimiser steps (default 2000)")
    t.add_argument("--batch-size", type=int, default=S, help="rows of --context characters per step (default 32)")
    t.add_argument("--lr", type=float, default=S, help="peak learning rate (default 1e-3)")
    t.add_argument("--weight-decay", type=float, default=S, help="AdamW weight decay (default 0)")
    t.add_argument("--warmup", type=int, default=S, help="warm-up steps (default: 100, at most a tenth of --steps)")
    t.add_argument("--lr-min-ratio", type=float, default=S, help="cosine decay to this fraction of lr (default 0.1)")
    t.add_argument("--grad-clip", type=_optional_float, default=S, help="max gradient norm, or 'none' (default 1.0)")
    t.add_argument("--eval-every", type=int, default=S, help="steps between held-out evaluations (default 200)")
    t.add_argument("--eval-rows", type=int, default=S, help="rows in the held-out set (default 256)")
    t.add_argument("--seed", type=int, default=S, help="seeds the model's initialisation and the batch sampler (default 0)")
    r = p.add_argument_group("run")
    r.add_argument("--out", required=True, help="output folder (config.json, checkpoint.pt, metrics.csv, samples.txt)")
    r.add_argument(
        "--preset",
        choices=["auto", *PRESETS],
        default="auto",
        help="the defaults of the flags above: cpu (minutes on a laptop CPU), large (for a GPU); auto: cpu on the CPU (default)",
    )
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    r.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="steps between checkpoints and metrics writes (default: 5 × --eval-every)",
    )
    r.add_argument(
        "--checkpoint-minutes",
        type=float,
        default=5.0,
        help="also save a checkpoint after this many minutes of training (default 5)",
    )
    r.add_argument(
        "--stop-after", type=int, default=None, help="stop after this many steps in total (to split a run; resume later)"
    )
    r.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    r.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on the CPU (default: PyTorch's choice)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def preset_for(name: str, device: torch.device) -> str:
    """The preset ``--preset name`` means on ``device``: "auto" is "cpu" on the CPU and "large" elsewhere."""
    if name == "auto":
        return "cpu" if device.type == "cpu" else "large"
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {['auto', *PRESETS]}")
    return name


def configs_from_args(
    args: argparse.Namespace, saved: dict | None = None, *, preset: str = "cpu"
) -> tuple[GPTConfig, CorpusConfig, TrainConfig, dict]:
    """Build (model, corpus, train, task) configs from parsed flags, over ``saved`` configs or the ``preset``'s defaults."""
    given = vars(args)
    if saved is None:
        defaults = PRESETS[preset]
        model_kw, corpus_kw = dict(defaults["model"]), {}
        train_kw, task_kw = dict(defaults["train"]), dict(defaults["task"])
        if given.get("model") == "switch" and "experts" not in given:
            model_kw["num_experts"] = 8
    else:
        model_kw, corpus_kw = dict(saved["model"]), dict(saved["corpus"])
        train_kw, task_kw = dict(saved["train"]), dict(saved["task"])
        model_kw.pop("vocab_size", None)
    for flags, kw in ((_MODEL_FLAGS, model_kw), (_CORPUS_FLAGS, corpus_kw), (_TRAIN_FLAGS, train_kw), (_TASK_FLAGS, task_kw)):
        for flag, name in flags.items():
            if flag in given:
                kw[name] = given[flag]
    if saved is None and "warmup" not in given:  # the default warm-up never exceeds a tenth of the run
        train_kw["warmup_steps"] = min(train_kw["warmup_steps"], train_kw["steps"] // 10)
    if model_kw.get("ffn", "dense") == "dense" and "experts" not in given:
        model_kw["num_experts"] = 1
    corpus_cfg = CorpusConfig(**corpus_kw)
    corpus = Corpus(corpus_cfg)
    model_cfg = GPTConfig(vocab_size=corpus.vocab_size, **model_kw)
    train_cfg = TrainConfig(**train_kw)
    if task_kw.get("eval_rows", 1) <= 0:
        raise ValueError(f"--eval-rows must be positive, got {task_kw['eval_rows']}")
    return model_cfg, corpus_cfg, train_cfg, task_kw


def _as_saved(model_cfg: GPTConfig, corpus_cfg: CorpusConfig, train_cfg: TrainConfig, task_kw: dict) -> dict:
    return {"model": model_cfg.to_dict(), "corpus": corpus_cfg.to_dict(), "train": asdict(train_cfg), "task": dict(task_kw)}


def _differences(a: dict, b: dict) -> list[str]:
    out = []
    for section in a:
        for key in a[section]:
            if a[section][key] != b.get(section, {}).get(key):
                out.append(f"{section}.{key}: saved {a[section][key]!r}, now {b.get(section, {}).get(key)!r}")
    return out


def load_run(out: str | Path, device: torch.device | str = "cpu") -> tuple[GPT, Corpus, dict]:
    """Rebuild a trained model and its corpus from an output folder: → (model, corpus, saved configs).

    The checkpoint is read with ``load_checkpoint`` (tensors and plain values only), so a
    run folder from someone else cannot run code when it is loaded.
    """
    out = Path(out)
    saved = json.loads((out / CONFIG_FILE).read_text())
    corpus = Corpus(CorpusConfig(**saved["corpus"]))
    model = GPT(GPTConfig(**saved["model"]))
    state = load_checkpoint(out / CHECKPOINT_FILE, map_location=device)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), corpus, saved


def _samples(model: GPT, corpus: Corpus) -> str:
    lines = []
    for prompt in (corpus.fact_prompt(next(iter(corpus.facts))), "37+45=", "rev hospital=", "sort doctor=", "close ([{=", "the "):
        got = complete(model, corpus, prompt, max_new_tokens=min(60, model.config.block_size))
        lines.append(f"{prompt}{got}".rstrip("\n"))
    return "\n".join(lines) + "\n"


def estimate_seconds_per_step(model: GPT, task: LMTask, config: TrainConfig, device: torch.device, steps: int = 3) -> float:
    """Median wall-clock seconds of a training step, timed on a copy of ``model`` (the run itself is untouched).

    One step first warms up; then ``steps`` steps are timed. The batches come from a
    generator of their own, so the run's sampler and random state are not consumed.
    """
    rng = torch.get_rng_state()
    trial = copy.deepcopy(model).to(device).train()
    optimizer = make_optimizer(trial, config)  # the run's own optimiser
    generator = torch.Generator().manual_seed(12345)
    times = []
    for i in range(steps + 1):
        batch = task.sample_batch(config.batch_size, generator, device)
        start = time.perf_counter()
        loss, _ = task.loss(trial, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    torch.set_rng_state(rng)
    return sorted(times)[len(times) // 2]


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds / 3600:.1f} hours"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    config_path, ckpt = out / CONFIG_FILE, out / CHECKPOINT_FILE
    for name in ("checkpoint_every", "stop_after", "threads", "checkpoint_minutes"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    try:
        device = get_device(args.device)
    except (ValueError, RuntimeError) as err:
        parser.error(str(err))
    preset = preset_for(args.preset, device)
    try:
        if args.resume:
            if not config_path.exists():
                parser.error(f"--resume: there is no run to resume in {str(out)!r} (no {CONFIG_FILE})")
            if not ckpt.exists():
                parser.error(
                    f"--resume: {str(out)!r} holds a run but no {CHECKPOINT_FILE}: it was stopped before its first "
                    "checkpoint, so there is nothing to continue. Start it again with another --out (or delete the folder)."
                )
            saved = json.loads(config_path.read_text())
            model_cfg, corpus_cfg, train_cfg, task_kw = configs_from_args(args, saved)
            diff = _differences(saved, _as_saved(model_cfg, corpus_cfg, train_cfg, task_kw))
            if diff:
                parser.error(
                    "--resume: these flags differ from the saved run (drop them, or start a new --out):\n  " + "\n  ".join(diff)
                )
        else:
            if config_path.exists() or ckpt.exists():
                parser.error(f"{str(out)!r} already holds a run; add --resume to continue it, or choose another --out")
            model_cfg, corpus_cfg, train_cfg, task_kw = configs_from_args(args, preset=preset)
    except (ValueError, TypeError, FileNotFoundError, IsADirectoryError) as err:
        parser.error(str(err))
    if args.threads:
        torch.set_num_threads(args.threads)

    corpus = Corpus(corpus_cfg)
    if model_cfg.block_size < 2:
        parser.error("--context must be at least 2")
    out.mkdir(parents=True, exist_ok=True)
    if not config_path.exists():
        config_path.write_text(json.dumps(_as_saved(model_cfg, corpus_cfg, train_cfg, task_kw), indent=1) + "\n")
    task = LMTask(corpus, model_cfg.block_size, eval_rows=task_kw["eval_rows"], eval_chunk=train_cfg.batch_size)
    seed_everything(train_cfg.seed)
    model = GPT(model_cfg)
    pc, fc = param_count(model_cfg), flops_per_token(model_cfg)
    print(
        f"{model_cfg.ffn} model, {model_cfg.num_experts} expert(s): {pc.total:,} parameters ({pc.active:,} active per token), "
        f"{fc.total:,} forward FLOPs per token; device {device}; corpus {list(corpus.domains)}",
        flush=True,
    )
    assert count_parameters(model) == pc.total

    start = load_checkpoint(ckpt)["step"] if ckpt.exists() else 0
    last = train_cfg.steps if args.stop_after is None else min(args.stop_after, train_cfg.steps)
    if start >= last:
        print(f"{str(ckpt)!r} is already at step {start}; nothing to do", flush=True)
    else:
        per_step = estimate_seconds_per_step(model, task, train_cfg, device)
        print(
            f"about {per_step * 1000:.0f} ms per step here: steps {start} to {last} take about {_duration(per_step * (last - start))} "
            f"(without the evaluations); Ctrl-C stops after the current step and saves a checkpoint",
            flush=True,
        )

    def write_metrics(step: int, rows: list[dict[str, float]]) -> None:
        if rows:
            pd.DataFrame(rows).to_csv(out / METRICS_FILE, index=False)

    t0 = time.perf_counter()
    result = None
    if start < last:
        try:
            result = train(
                model,
                task,
                train_cfg,
                device=device,
                progress=not args.quiet,
                checkpoint_path=ckpt,
                resume=True,
                checkpoint_every=args.checkpoint_every or 5 * train_cfg.eval_every,
                checkpoint_minutes=args.checkpoint_minutes,
                on_checkpoint=write_metrics,
                stop_after=last,
            )
        except TrainingInterrupted as stop:
            print(
                f"\nstopped after step {stop.step} of {train_cfg.steps}; the checkpoint is in {ckpt}. "
                f"Continue with: moe-train --out {out} --resume",
                flush=True,
            )
            return 130
    if result is not None and len(result.history):
        row = result.final
        shown = {
            k: round(v, 4) for k, v in row.items() if k == "val_loss" or k.startswith("val_loss_") or k.startswith("val_exact_")
        }
        print(f"step {int(row['step'])}: " + ", ".join(f"{k}={v}" for k, v in shown.items()), flush=True)
    if result is not None and last >= train_cfg.steps:
        model.to(device).eval()
        (out / SAMPLES_FILE).write_text(_samples(model, corpus))
    print(f"wrote {out}/ ({time.perf_counter() - t0:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
