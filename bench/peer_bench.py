"""Side by side with LLaMA-Factory: our entrypoint vs ``llamafactory-cli train`` on the same model, data
and hyperparameters.

    .venv/bin/python bench/peer_bench.py --quick        # LoRA and full, 1 repeat, 600 examples
    .venv/bin/python bench/peer_bench.py                # 3 interleaved repeats, the whole data set

LLaMA-Factory (pinned: ``LLAMAFACTORY_VERSION``) goes into its own venv, created by the bench under
``--work`` (with the CPU build of torch): its pins on transformers, peft and datasets differ from ours.
It imports torchaudio at start-up, and no torchaudio on PyPI loads with torch 2.13: the bench puts an
empty ``torchaudio`` module in that venv (text training never uses it).
Model: a tiny Qwen2 (hidden 128, 2 layers, 4 heads / 2 KV heads) built from a config with random
weights, saved with the built-in model's character tokenizer. Data: the bundled dialogues as an
alpaca file (instruction = the dialogue so far, output = the answer; lengths vary ~3x). Both sides
get the alpaca template, one epoch, the same micro-batch, accumulation, learning rate, sequence cap
and seed, fp32 on CPU, no checkpoints, one process.

Recorded per run: real (non-pad) tokens/s (ours: result.json; LLaMA-Factory: the Trainer's
``num_input_tokens_seen``, which counts attention-mask tokens, over its ``train_runtime``), peak RSS of
the process tree, final train loss, eval loss, and wall time from process start to exit (start-up,
data, training, eval, saving). The last line: ``ours vs LLaMA-Factory: tokens/s X.XXx, wall Y.YYx (lora)``.
Not part of the test suite (tests/test_peer_bench.py runs its pieces that need no LLaMA-Factory).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

LLAMAFACTORY_VERSION = "0.9.5"
TORCH_CPU = "torch==2.13.0"
QWEN2_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}
METHODS = ("lora", "full")


@dataclass(frozen=True)
class Settings:
    examples: int
    eval_examples: int
    repeats: int
    micro_batch: int = 8
    accumulation: int = 2
    cutoff_len: int = 320
    lora_lr: float = 2e-3
    full_lr: float = 5e-4
    lora_rank: int = 8
    seed: int = 42

    def learning_rate(self, method: str) -> float:
        return self.lora_lr if method == "lora" else self.full_lr


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="600 examples, 1 repeat (under 15 min)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3, quick 1)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/peer-bench"), help="venv, model, data, runs")
    parser.add_argument("--json", type=Path, default=None, help="write every row here")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    examples = 600 if args.quick else 3000
    return args, Settings(examples=examples, eval_examples=100, repeats=repeats)


def build_qwen2(dest: Path) -> Path:
    """The tiny Qwen2 both sides train, with the built-in model's tokenizer (built once)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from launcher.builtins.tiny import BOS_ID, EOS_ID, PAD_ID, ensure_tiny_model

    if (dest / "config.json").is_file():
        return dest
    tokenizer_dir = ensure_tiny_model()
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    config = Qwen2Config(
        **QWEN2_CONFIG, vocab_size=vocab, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for path in tokenizer_dir.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(path, tmp / path.name)
    os.replace(tmp, dest)
    return dest


def _alpaca(record: dict[str, Any]) -> dict[str, str]:
    """One bundled dialogue as alpaca: the earlier turns and the question as instruction."""
    history = record.get("history") or []
    context = "".join(f"{q}{a}" for q, a in history)
    return {"instruction": context + record["prompt"], "input": "", "output": record["response"]}


def write_data(work: Path, settings: Settings) -> tuple[Path, Path]:
    """(train.json, eval.json) in alpaca format, plus LLaMA-Factory's dataset_info.json next to them."""
    from launcher.builtins.demo_data import ensure_builtin_data

    train_src, eval_src = ensure_builtin_data("dialogue")
    data_dir = work / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for src, name, limit in (
        (train_src, "train", settings.examples),
        (eval_src, "eval", settings.eval_examples),
    ):
        lines = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
        path = data_dir / f"{name}.json"
        path.write_text(json.dumps([_alpaca(r) for r in lines[:limit]], ensure_ascii=False), encoding="utf-8")
        out.append(path)
    info = {name: {"file_name": f"{name}.json"} for name in ("train", "eval")}
    (data_dir / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return out[0], out[1]


def llamafactory_config(settings: Settings, method: str, model_dir: Path, data_dir: Path, out: Path) -> dict:
    config: dict[str, Any] = {
        "model_name_or_path": str(model_dir),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": method,
        "dataset": "train",
        "eval_dataset": "eval",
        "dataset_dir": str(data_dir),
        "template": "alpaca",
        "cutoff_len": settings.cutoff_len,
        "overwrite_cache": True,
        "preprocessing_num_workers": 1,
        "output_dir": str(out),
        "overwrite_output_dir": True,
        "logging_steps": 10,
        "save_strategy": "no",
        "per_device_train_batch_size": settings.micro_batch,
        "per_device_eval_batch_size": settings.micro_batch,
        "gradient_accumulation_steps": settings.accumulation,
        "learning_rate": settings.learning_rate(method),
        "num_train_epochs": 1.0,
        "lr_scheduler_type": "linear",
        "warmup_ratio": 0.0,
        "eval_strategy": "no",
        "do_eval": True,
        "seed": settings.seed,
        "include_num_input_tokens_seen": True,
        "report_to": "none",
        "use_cpu": True,
        "dataloader_num_workers": 0,
    }
    if method == "lora":
        config.update(
            {"lora_rank": settings.lora_rank, "lora_alpha": 2 * settings.lora_rank, "lora_target": "all"}
        )
    return config


def our_spec(settings: Settings, method: str, model_dir: Path, train: Path, eval_: Path, out: Path) -> dict:
    lora = {"r": settings.lora_rank, "lora_alpha": 2 * settings.lora_rank, "target_modules": "all-linear"}
    return {
        "experiment": f"peer-{method}",
        "output_dir": str(out),
        "backend": "local",
        "model": {"path": str(model_dir)},
        "data": {"format": "alpaca", "train_file": str(train), "eval_file": str(eval_)},
        "template": "alpaca",
        "training": {
            "precision": "fp32",
            "learning_rate": settings.learning_rate(method),
            "num_epochs": 1,
            "per_device_batch_size": settings.micro_batch,
            "gradient_accumulation_steps": settings.accumulation,
            "max_length": settings.cutoff_len,
            "max_source_length": settings.cutoff_len,
            "max_target_length": settings.cutoff_len,
            "group_by_length": True,
            "logging_steps": 10,
            "save_steps": 1_000_000,
            "seed": settings.seed,
        },
        "eval": {"num_samples": 8, "max_new_tokens": 16},  # generation cannot be off: the least of it
        "methods": [{"method": method, "name": method, **(lora if method == "lora" else {})}],
        "resources": {"nodes": 1, "gpus_per_node": 1, "zero_stage": 0, "gradient_checkpointing": False},
    }


def ensure_llamafactory(work: Path) -> Path:
    """LLaMA-Factory's own venv (created once): the path of its ``llamafactory-cli``."""
    venv = work / f"llamafactory-{LLAMAFACTORY_VERSION}"
    cli = venv / "bin" / "llamafactory-cli"
    if cli.is_file():
        return cli
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TORCH_CPU, f"llamafactory=={LLAMAFACTORY_VERSION}"], check=True)
    # pip pairs the CPU torch with PyPI's torchvision/torchaudio, built against another torch: importing
    # transformers then fails (operator torchvision::nms does not exist), and PyPI's newest torchaudio
    # (2.11.1) does not load with torch 2.13. Text training needs neither, but llamafactory imports
    # torchaudio at start-up (data/mm_plugin.py, for audio inputs): an empty module stands in for it.
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio"], check=True)
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    stand_in = Path(site) / "torchaudio" / "__init__.py"
    stand_in.parent.mkdir(exist_ok=True)
    stand_in.write_text('"""Stand-in (bench/peer_bench.py): no torchaudio loads with torch 2.13."""\n')
    return cli


def run_measured(
    cmd: list[str], log: Path, env: dict[str, str], cwd: Path | None = None
) -> tuple[int, float, float]:
    """(exit code, wall seconds, peak RSS GiB of the process tree, sampled every 0.2 s)."""
    import psutil

    started = time.perf_counter()
    peak = 0
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        parent = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                tree = [parent, *parent.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.2)
    return proc.returncode, time.perf_counter() - started, peak / 2**30


def _env() -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_", "PYTHONPATH"))}
    return keep | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}


def run_ours(settings: Settings, method: str, model_dir: Path, data: tuple[Path, Path], out: Path) -> dict:
    from launcher.plan.planner import load_and_plan, write_run_dirs
    from launcher.rundir.paths import read_json

    spec_path = out / f"{method}.yaml"
    out.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(yaml.safe_dump(our_spec(settings, method, model_dir, *data, out / "runs")))
    exp = write_run_dirs(load_and_plan(spec_path), force=True)
    run_dir = exp.run(method).root
    env = _env() | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    code, wall, rss = run_measured(
        [sys.executable, "-m", "launcher.train", str(run_dir)], out / "ours.log", env
    )
    result = read_json(run_dir / "result.json") if code == 0 else {}
    return {
        "state": result.get("state", f"exit {code}"),
        "tokens_per_s": result.get("tokens_per_s"),
        "train_loss": result.get("train_loss_final"),
        "eval_loss": result.get("eval_loss"),
        "peak_rss_gib": rss,
        "wall_s": wall,
        "startup_s": result.get("startup_s"),
    }


def run_llamafactory(cli: Path, settings: Settings, method: str, model_dir: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    config = llamafactory_config(settings, method, model_dir, model_dir.parent / "data", out / "output")
    config_path = out / f"{method}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    code, wall, rss = run_measured([str(cli), "train", str(config_path)], out / "llamafactory.log", _env())
    results: dict[str, Any] = {}
    for name in ("train_results.json", "eval_results.json", "trainer_state.json"):
        path = out / "output" / name
        if path.is_file():
            results.update(json.loads(path.read_text()))
    losses = [h["loss"] for h in results.get("log_history", []) if "loss" in h]
    tokens = results.get("num_input_tokens_seen")
    runtime = results.get("train_runtime")
    return {
        "state": "COMPLETED" if code == 0 else f"exit {code}",
        "tokens_per_s": tokens / runtime if tokens and runtime else None,
        "train_loss": losses[-1] if losses else None,
        "eval_loss": results.get("eval_loss"),
        "peak_rss_gib": rss,
        "wall_s": wall,
        "startup_s": None,
    }


def ratio(ours: list[dict], theirs: list[dict], key: str, higher_is_better: bool) -> float | None:
    a = [r[key] for r in ours if r.get(key)]
    b = [r[key] for r in theirs if r.get(key)]
    if not a or not b:
        return None
    return (
        statistics.median(a) / statistics.median(b)
        if higher_is_better
        else statistics.median(b) / statistics.median(a)
    )


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_args(argv)
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    cli = ensure_llamafactory(work)
    model_dir = build_qwen2(work / "qwen2-tiny")
    data = write_data(work, settings)
    rows: list[dict[str, Any]] = []
    for repeat in range(settings.repeats):  # interleaved: ours, theirs, ours, theirs...
        for method in args.methods:
            for runner in ("ours", "llamafactory"):
                out = work / "runs" / f"{method}-{runner}-{repeat}"
                shutil.rmtree(out, ignore_errors=True)
                if runner == "ours":
                    row = run_ours(settings, method, model_dir, data, out)
                else:
                    row = run_llamafactory(cli, settings, method, model_dir, out)
                row |= {"method": method, "runner": runner, "repeat": repeat}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"load average at end: {os.getloadavg()}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    last = ""
    for method in args.methods:
        ours = [r for r in rows if r["method"] == method and r["runner"] == "ours"]
        theirs = [r for r in rows if r["method"] == method and r["runner"] == "llamafactory"]
        tps = ratio(ours, theirs, "tokens_per_s", True)
        wall = ratio(ours, theirs, "wall_s", False)
        rss = ratio(ours, theirs, "peak_rss_gib", False)
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}x"  # noqa: E731
        line = f"ours vs LLaMA-Factory: tokens/s {fmt(tps)}, wall {fmt(wall)} ({method})"
        print(f"{line}; peak RSS {fmt(rss)} (smaller is better, as ratio theirs/ours)")
        if method == "lora":
            last = line
    if last:
        print(last)
    return 0 if all(r["state"] == "COMPLETED" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
