"""Helpers for the methods / export / evaluate tests (helper C2): run configs, data, 2-rank spawning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from launcher.backends.launch_env import free_port, torchrun_env
from launcher.rundir.run_config import RunConfig

WORKER = Path(__file__).with_name("methods_dist_worker.py")

EVAL_METHODS: list[dict[str, Any]] = [
    {"method": "full"},
    {"method": "ptuning", "name": "ptuning_v2", "version": "v2", "pre_seq_len": 4},
    {"method": "ptuning", "name": "ptuning_v1", "version": "v1", "pre_seq_len": 4},
]
EXPORT_METHODS: list[dict[str, Any]] = [
    {"method": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"], "merge": True},
    {
        "method": "ptuning",
        "name": "ptuning_v2",
        "version": "v2",
        "pre_seq_len": 4,
        "prefix_projection": True,
        "encoder_hidden_size": 32,
    },
    {"method": "ptuning", "name": "ptuning_v1", "version": "v1", "pre_seq_len": 4},
    {"method": "freeze", "trainable_layers": 1},
    {"method": "full"},
    {
        "method": "full",
        "name": "full_offload",
    },  # ZeRO-3 + optimizer and parameter offload (the demo's full run)
]
OFFLOADED = {"full_offload"}


def run_config(
    model_dir: Path, method: dict[str, Any], template: str = "chatglm", **eval_overrides: Any
) -> RunConfig:
    """A minimal resolved run config for the tiny model (only what eval/export read matters)."""
    eval_cfg = {"max_new_tokens": 12, "num_samples": 7, "batch_size": 2, **eval_overrides}
    return RunConfig.model_validate(
        {
            "experiment": "c2",
            "name": method.get("name") or method["method"],
            "run_id": "c2-test",
            "method": method,
            "model": {"path": str(model_dir)},
            "tokenizer": {},
            "data": {"builtin": "dialogue"},
            "template": template,
            "training": {"max_source_length": 96, "max_target_length": 32, "precision": "fp32"},
            "eval": eval_cfg,
            "resources": {
                "nodes": 1,
                "gpus_per_node": 1,
                "zero_stage": 0,
                "offload_optimizer": False,
                "offload_param": False,
                "gradient_checkpointing": False,
                "est_mem_gib": 0.1,
                "fits": True,
            },
            "cluster": {},
        }
    )


def zero3_ds_config(micro_batch: int, world_size: int, lr: float, offload: bool = False) -> dict[str, Any]:
    """Real ZeRO-3 on CPU; persistence threshold 0 so even the tiny model's small tensors are partitioned
    (otherwise DeepSpeed keeps them whole and the test would not see partitioned parameters)."""
    zero: dict[str, Any] = {"stage": 3, "stage3_param_persistence_threshold": 0}
    if offload:
        zero |= {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world_size,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.0}},
        "zero_optimization": zero,
        "steps_per_print": 1000000,
    }


def spawn_ranks(args: list[str], world_size: int = 2, timeout_s: float = 300) -> None:
    """Run the worker on ``world_size`` ranks (gloo on CPU) and fail with every rank's output."""
    port = free_port()
    procs = []
    logs = []
    for rank in range(world_size):
        env = {
            **os.environ,
            **torchrun_env(rank, world_size, port),
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        log = open(Path(args[-1]) / f"rank{rank}.log", "w")  # noqa: SIM115 - closed below
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), *args], env=env, stdout=log, stderr=log))
    failed = []
    try:
        for rank, proc in enumerate(procs):
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                code = None
            if code != 0:
                failed.append(rank)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    if failed:
        outputs = "\n".join(
            f"--- rank {r} ---\n" + (Path(args[-1]) / f"rank{r}.log").read_text()[-4000:] for r in failed
        )
        raise AssertionError(f"ranks {failed} failed:\n{outputs}")


def load(
    model_dir: str, method: dict[str, Any], seed: int = 0, template: str = "chatglm"
) -> tuple[Any, Any, RunConfig]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher.train.adapters import apply_method

    cfg = run_config(Path(model_dir), method, template)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)  # same new-parameter init (prefix, LoRA) as the 1-rank reference
    model, _ = apply_method(model, cfg.method)
    return model, tokenizer, cfg


def features(eval_file: str, tokenizer: Any, cfg: RunConfig, count: int) -> tuple[list[Any], list[Any]]:
    from launcher.train.data import encode_for_training, load_examples

    examples = load_examples(Path(eval_file))[:count]
    t = cfg.training
    encoded = [
        encode_for_training(ex, tokenizer, cfg.template, t.max_source_length, t.max_target_length)
        for ex in examples
    ]
    return examples, encoded
