"""The proof that the methods work: on the bundled demo dialogues, every method, trained briefly by the
real entrypoint (`python -m launcher.train RUN_DIR`, DeepSpeed on CPU), ends with a LOWER eval loss and
a HIGHER BLEU than the untuned built-in base model, scored on the same eval examples the same way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from launcher.plan.dsconfig import render_ds_config
from launcher.rundir.paths import RunPaths, RunState, read_json, write_json_atomic, write_text_atomic
from launcher.rundir.run_config import RunConfig
from launcher.rundir.status import update_status

REPO = Path(__file__).resolve().parent.parent
# A small budget per method: enough steps for each to learn the answer format; the prompt methods
# (few parameters, only a 2-layer base to steer) need more steps and a larger learning rate.
# P-Tuning v1 (input-only prompt) has little leverage on so shallow a model: it needs many virtual tokens
# (64; with 8-16 its BLEU barely clears the base's, or not at all, depending on lr and steps).
METHODS: dict[str, tuple[dict[str, Any], float, int]] = {
    "freeze": ({"method": "freeze", "trainable_layers": 1}, 3e-3, 120),
    "ptuning_v2": (
        {"method": "ptuning", "version": "v2", "pre_seq_len": 16, "prefix_projection": True},
        2e-2,
        300,
    ),
    "ptuning_v1": ({"method": "ptuning", "version": "v1", "pre_seq_len": 64}, 3e-2, 300),
    "lora": ({"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"}, 5e-3, 120),
    "full": ({"method": "full"}, 1e-3, 120),
}
EVAL_EXAMPLES = 48
PARALLEL_RUNS = 2  # one thread each: both cores of the CI box


def run_config(name: str) -> RunConfig:
    method, lr, steps = METHODS.get(name, ({"method": "full"}, 1e-3, 1))
    return RunConfig.model_validate(
        {
            "experiment": "methods-improve",
            "name": name,
            "run_id": f"improve-{name}",
            "method": {**method, "name": name},
            "model": {"builtin": "tiny-glm"},
            "tokenizer": {},
            "data": {"builtin": "dialogue", "max_eval_examples": EVAL_EXAMPLES},
            "template": "chatglm",
            "training": {
                "learning_rate": lr,
                "max_steps": steps,
                "per_device_batch_size": 8,
                "warmup_ratio": 0.1,
                "max_source_length": 96,
                "max_target_length": 32,
                "precision": "fp32",
                "logging_steps": 20,
                "save_steps": 10_000,  # only the final checkpoint
                "save_total_limit": 1,
                "seed": 42,
            },
            "eval": {"bleu_tokenize": "zh", "max_new_tokens": 32, "num_samples": 32, "batch_size": 16},
            "resources": {
                "nodes": 1,
                "gpus_per_node": 1,
                "zero_stage": 2,
                "offload_optimizer": False,
                "offload_param": False,
                "gradient_checkpointing": False,
                "est_mem_gib": 0.1,
                "fits": True,
            },
            "cluster": {},
        }
    )


def write_run_dir(root: Path, name: str, hidden_size: int) -> RunPaths:
    cfg = run_config(name)
    paths = RunPaths(root / name)
    paths.root.mkdir(parents=True)
    write_text_atomic(paths.run_yaml, cfg.to_yaml())
    write_json_atomic(paths.ds_config, render_ds_config(cfg, hidden_size))
    update_status(paths, RunState.PLANNED)
    return paths


def start(paths: RunPaths, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    env.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
    )  # fmt: skip
    out = open(paths.root / "stdout.txt", "wb")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher.train", str(paths.root)],
        cwd=REPO,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    out.close()
    return proc


def base_scores(model_dir: Path) -> dict[str, float]:
    """The untuned base, evaluated exactly as the entrypoint evaluates a trained run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher.train.data import encode_for_training, load_examples, resolve_data_files
    from launcher.train.evaluate import bleu_scores, eval_loss, generate_samples

    cfg = run_config("base")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    _, eval_file = resolve_data_files(cfg.data)
    examples = load_examples(eval_file)[:EVAL_EXAMPLES]
    t = cfg.training
    encoded = [
        encode_for_training(ex, tokenizer, cfg.template, t.max_source_length, t.max_target_length)
        for ex in examples
    ]
    samples = generate_samples(model, tokenizer, examples, cfg, 0, 1)
    return {
        "eval_loss": eval_loss(model, encoded, tokenizer.pad_token_id, t.per_device_batch_size),
        **bleu_scores(samples, "zh"),
    }


MIN_BLEU_GAIN = 5.0
"""BLEU points every tuned method must gain over the base (the weakest, P-Tuning v1, gains 13)."""


@pytest.mark.slow
def test_every_method_beats_the_untuned_base(tiny_model_dir: Path, tmp_path: Path) -> None:
    from launcher.backends.launch_env import free_port

    torch.set_num_threads(1)
    hidden_size = int(json.loads((tiny_model_dir / "config.json").read_text())["hidden_size"])
    pending = [write_run_dir(tmp_path, name, hidden_size) for name in METHODS]
    running: list[tuple[RunPaths, subprocess.Popen[bytes], float]] = []
    results: dict[str, dict[str, Any]] = {}
    base = base_scores(tiny_model_dir)  # while nothing else runs yet: the numbers do not depend on it
    while pending or running:
        while pending and len(running) < PARALLEL_RUNS:
            paths = pending.pop(0)
            running.append((paths, start(paths, free_port()), time.monotonic()))
        time.sleep(0.5)
        for item in list(running):
            paths, proc, started = item
            if proc.poll() is None:
                assert time.monotonic() - started < 600, f"{paths.name} took more than 10 minutes"
                continue
            running.remove(item)
            output = (paths.root / "stdout.txt").read_text(errors="replace")[-3000:]
            assert proc.returncode == 0, f"{paths.name} failed:\n{output}"
            results[paths.name] = read_json(paths.result_json) | {
                "wall_s": round(time.monotonic() - started, 1)
            }

    def row(name: str, r: dict[str, Any]) -> str:
        scores = f"{r['eval_loss']:>9.4f} {r['bleu']:>6.2f} {r['chrf']:>6.2f} {r['bleu4_chatglm']:>13.2f}"
        return f"{name:<12} {scores} {r.get('steps', 0):>5} {r.get('wall_s', 0):>6}"

    header = f"{'run':<12} {'eval_loss':>9} {'bleu':>6} {'chrf':>6} {'bleu4_chatglm':>13} steps wall_s"
    table = [header, row("base", base), *(row(name, r) for name, r in results.items())]
    report = "\n".join(table)
    print("\n" + report)
    (tmp_path / "improve.txt").write_text(report + "\n")
    for name, r in results.items():
        assert r["state"] == "COMPLETED"
        assert r["eval_loss"] < base["eval_loss"], f"{name}: eval loss not lower than the base\n{report}"
        # a clear margin: a tuned model whose prefix generation ignored (P-Tuning v2 under peft's own
        # generate) still scraped past the base with 1.6 vs 1.3 BLEU
        assert r["bleu"] > base["bleu"] + MIN_BLEU_GAIN, f"{name}: BLEU not clearly above the base\n{report}"
