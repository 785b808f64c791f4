"""The GPU run: every method through the real entrypoint on a ~1B model, throughput, MFU and memory.

    bench/gpu_check.sh            # on a GPU machine (installs the carried wheels, then runs this)
    .venv/bin/python bench/gpu_check.py --smoke --out DIR     # CPU: tiny model, 2 steps (the test suite)

Model: a ~1B-parameter Qwen2 built from a config on the spot (random weights, bf16; hidden 2048, 16
layers, 16 heads / 8 KV heads, FFN 5632, vocabulary 32,000) with the built-in model's character tokenizer
(carried in .whl/tokenizer). Data: the bundled dialogues, source/target lengths 1024/256, micro-batch 4.
Each run is ``python -m launcher.train RUN_DIR`` on one GPU, its run directory written by the planner,
so the plan's memory estimate for exactly that run is at hand:

- full fine-tuning, ZeRO-3, and ZeRO-3 with optimizer + parameter offload;
- full fine-tuning, ZeRO-2, padded (length-grouped) and packed, and Hugging Face ``Trainer`` on the same
  run directory (same model, data, DeepSpeed config and micro-batch; bench/train_throughput.py's runner);
- LoRA (padded and packed), Freeze (last 4 layers), P-Tuning v1 and v2, ZeRO-2.

Recorded per run: real (non-pad) tokens/s over the steps after ``--warmup``, MFU = 6 x parameters x
tokens/s against 989 TFLOP/s (H100/H200 dense bf16) and against 790 TFLOP/s (what a large bf16 matmul
reaches on an H200; 6N counts weight gradients that frozen methods skip, so theirs is an upper bound),
``max_memory_allocated`` and ``max_memory_reserved`` against the plan's allocated estimate and its
reserved pool (the nvidia-smi estimate without the CUDA context). Results: OUT/gpu_check.json and a
markdown table (OUT/gpu_check.md, also printed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DENSE_BF16_TFLOPS = 989.0
MATMUL_BF16_TFLOPS = 790.0
MODEL_CONFIG = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}


@dataclass(frozen=True)
class Run:
    name: str
    method: dict[str, Any]
    zero_stage: int = 2
    offload: bool = False
    packing: bool = False
    steps: int | None = None
    """None: the check's --steps."""
    trainer: bool = False
    """Also run Hugging Face Trainer on this run directory."""
    quantization: str | None = None
    """QLoRA: model.quantization (bitsandbytes)."""
    attn: str = "auto"
    """training.attn_implementation (auto: flash_attention_2 where flash-attn is installed, else sdpa)."""
    liger: bool = False
    """training.liger_kernel."""
    needs: str | None = None
    """A module the run needs (flash_attn, liger_kernel); skipped, with the reason, where it is missing."""


LORA = {"method": "lora", "r": 16, "lora_alpha": 32}
RUNS = (
    Run("full-z3", {"method": "full"}, zero_stage=3),
    Run("full-z3-offload", {"method": "full"}, zero_stage=3, offload=True, steps=10),
    Run("full-z2", {"method": "full"}, trainer=True),
    Run("full-z2-packed", {"method": "full"}, packing=True),
    Run("lora", {"method": "lora", "r": 16, "lora_alpha": 32}),
    Run("lora-packed", {"method": "lora", "r": 16, "lora_alpha": 32}, packing=True),
    Run("dora", {"method": "lora", "r": 16, "lora_alpha": 32, "use_dora": True}),
    Run("qlora-4bit", {"method": "lora", "r": 16, "lora_alpha": 32}, quantization="4bit"),
    Run("freeze", {"method": "freeze", "trainable_layers": 4}),
    Run("ptuning-v1", {"method": "ptuning", "version": "v1", "pre_seq_len": 16}),
    Run("ptuning-v2", {"method": "ptuning", "version": "v2", "pre_seq_len": 16}),
    # The speed options (README "GPU speed options"): the same LoRA run per attention kernel, and Liger.
    Run("lora-sdpa", LORA, attn="sdpa"),
    Run("lora-eager", LORA, attn="eager"),
    Run("lora-fa2", LORA, attn="flash_attention_2", needs="flash_attn"),
    Run("lora-liger", LORA, liger=True, needs="liger_kernel"),
    Run("full-z2-liger", {"method": "full"}, liger=True, needs="liger_kernel"),
)
SMOKE_RUNS = (
    Run("full-z3", {"method": "full"}, zero_stage=3),
    Run("lora", {"method": "lora", "r": 4}, trainer=True),
    Run("lora-packed", {"method": "lora", "r": 4}, packing=True),
    Run("ptuning-v2-eager", {"method": "ptuning", "version": "v2", "pre_seq_len": 4}, attn="eager"),
)


@dataclass
class Settings:
    steps: int
    warmup: int
    micro_batch: int
    max_source: int
    max_target: int
    model: dict[str, Any] = field(default_factory=dict)
    precision: str = "bf16"


def build_model_dir(dest: Path, tokenizer_dir: Path) -> Path:
    """A ~1B Qwen2 with random weights, saved with the carried tokenizer (ids match its specials)."""
    import shutil

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from launcher.builtins.tiny import BOS_ID, EOS_ID, PAD_ID

    if (dest / "config.json").is_file():
        return dest
    config = Qwen2Config(**MODEL_CONFIG, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(dest)
    for path in tokenizer_dir.iterdir():
        shutil.copy(path, dest / path.name)
    return dest


def write_spec(settings: Settings, run: Run, root: Path) -> Path:
    off = run.offload
    spec = {
        "experiment": f"gpu-check-{run.name}",
        "output_dir": str(root / "runs"),
        "model": {**settings.model, **({"quantization": run.quantization} if run.quantization else {})},
        "data": {"builtin": "dialogue", "max_eval_examples": 16},
        "template": "chatglm",
        "training": {
            "precision": settings.precision,
            "learning_rate": 1e-5 if run.method["method"] == "full" else 1e-4,
            "max_steps": run.steps or settings.steps,
            "per_device_batch_size": settings.micro_batch,
            "max_source_length": settings.max_source,
            "max_target_length": settings.max_target,
            "group_by_length": True,
            "packing": run.packing,
            "attn_implementation": run.attn,
            "liger_kernel": run.liger,
            "logging_steps": 1,
            "save_steps": 1_000_000,
            "seed": 42,
        },
        "eval": {"num_samples": 4, "max_new_tokens": 8, "batch_size": 4},
        "methods": [{**run.method, "name": run.name}],
        "resources": {
            "nodes": 1,
            "gpus_per_node": 1,
            "zero_stage": run.zero_stage,
            "offload_optimizer": off,
            "offload_param": off and run.zero_stage == 3,
            "gradient_checkpointing": False,
        },
        "cluster": {"gpu_mem_gib": 139},
    }
    path = root / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def plan_run(spec_path: Path) -> tuple[Path, dict[str, Any]]:
    from launcher.plan.planner import load_and_plan, write_run_dirs

    plan = load_and_plan(spec_path)
    exp = write_run_dirs(plan, force=True)
    return exp.run(plan.runs[0].name).root, plan.rows()[0]


def rank_env() -> dict[str, str]:
    from launcher.backends.launch_env import free_port, torchrun_env

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUBMITIT_", "SLURM_"))}
    return env | torchrun_env(0, 1, free_port()) | {"TOKENIZERS_PARALLELISM": "false"}


def train_ours(run_dir: Path, warmup: int, log: Path) -> dict[str, Any]:
    """Our entrypoint, one rank; tokens/s from metrics.jsonl after ``warmup`` steps."""
    from launcher.rundir.paths import RunPaths, iter_jsonl, read_json

    started = time.perf_counter()
    with open(log, "w") as handle:
        cmd = [sys.executable, "-m", "launcher.train", str(run_dir)]
        code = subprocess.call(cmd, env=rank_env(), stdout=handle, stderr=handle)
    paths = RunPaths(run_dir)
    if code != 0:
        return {"state": "FAILED", "exit_code": code, "log": str(log)}
    rows = list(iter_jsonl(paths.metrics_jsonl))
    first = rows[min(warmup, len(rows) - 1) - 1] if len(rows) > 1 else {"tokens": 0, "elapsed_s": 0.0}
    last = rows[-1]
    seconds = max(1e-9, last["elapsed_s"] - first["elapsed_s"])
    result = read_json(paths.result_json)
    return {
        "state": result.get("state", "COMPLETED"),
        "steps": last["step"],
        "tokens_per_s": (last["tokens"] - first["tokens"]) / seconds,
        "peak_allocated_gib": result.get("peak_mem_gib"),
        "peak_reserved_gib": result.get("peak_mem_reserved_gib"),
        "peak_kind": result.get("peak_mem_kind"),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def train_trainer(run_dir: Path, warmup: int, log: Path) -> dict[str, Any]:
    """Hugging Face Trainer on the same run directory (bench/train_throughput.py's runner)."""
    started = time.perf_counter()
    cmd = [sys.executable, str(HERE / "train_throughput.py"), "--worker", "trainer"]
    cmd += ["--run-dir", str(run_dir), "--variant", "dynamic+group", "--warmup", str(warmup)]
    with open(log, "w") as handle:
        proc = subprocess.run(
            cmd, env=rank_env(), stdout=subprocess.PIPE, stderr=handle, text=True, check=False
        )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"state": "FAILED", "exit_code": proc.returncode, "log": str(log)}
    out = json.loads(lines[-1][len("RESULT ") :])
    return {
        "state": out["state"],
        "steps": out["steps"],
        "tokens_per_s": out["tokens"] / out["time_s"],
        "peak_allocated_gib": out["peak_mem_gib"],
        "peak_kind": out["peak_mem_kind"],
        "wall_s": round(time.perf_counter() - started, 1),
    }


def add_ratios(row: dict[str, Any], plan_row: dict[str, Any], params: int, on_gpu: bool) -> None:
    from launcher.plan.memory_model import CUDA_CONTEXT_BYTES, GIB

    row["est_allocated_gib"] = plan_row["est_mem_gib"]
    row["est_reserved_gib"] = round(plan_row["est_reserved_gib"] - CUDA_CONTEXT_BYTES / GIB, 2)
    row["est_smi_gib"] = plan_row["est_reserved_gib"]
    if row.get("state") != "COMPLETED":
        return
    flops = 6 * params * row["tokens_per_s"]
    row["mfu_989"] = flops / (DENSE_BF16_TFLOPS * 1e12) if on_gpu else None
    row["mfu_790"] = flops / (MATMUL_BF16_TFLOPS * 1e12) if on_gpu else None
    if on_gpu and row.get("peak_allocated_gib"):
        row["allocated_ratio"] = row["peak_allocated_gib"] / row["est_allocated_gib"]
    if on_gpu and row.get("peak_reserved_gib"):
        row["reserved_ratio"] = row["peak_reserved_gib"] / row["est_reserved_gib"]


def table(rows: list[dict[str, Any]]) -> str:
    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [
        "| run | runner | packing | tokens/s | MFU (989) | MFU (790) | allocated GiB | est | ratio | "
        "reserved GiB | est | ratio |",
        "|---" * 12 + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['runner']} | {'on' if r['packing'] else 'off'} | "
            f"{fmt(r.get('tokens_per_s'), ',.0f')} | {fmt(r.get('mfu_989'), '.1%')} | "
            f"{fmt(r.get('mfu_790'), '.1%')} | {fmt(r.get('peak_allocated_gib'), '.2f')} | "
            f"{fmt(r.get('est_allocated_gib'), '.2f')} | {fmt(r.get('allocated_ratio'), '.2f')} | "
            f"{fmt(r.get('peak_reserved_gib'), '.2f')} | {fmt(r.get('est_reserved_gib'), '.2f')} | "
            f"{fmt(r.get('reserved_ratio'), '.2f')} |"
            + ("" if r.get("state") == "COMPLETED" else f" {r.get('state')}: {r.get('log')}")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU: the tiny model, 2 steps, 3 runs")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check-out")))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of tokens/s")
    parser.add_argument("--only", nargs="*", default=[], help="runs whose name contains one of these")
    parser.add_argument("--tokenizer", type=Path, default=REPO / ".whl" / "tokenizer")
    args = parser.parse_args(argv)

    import torch

    on_gpu = torch.cuda.is_available()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    work.mkdir(exist_ok=True)
    started = time.perf_counter()
    if args.smoke:
        settings = Settings(2, 1, 2, 64, 16, {"builtin": "tiny-glm"}, "fp32")
        runs = SMOKE_RUNS
    else:
        model_dir = build_model_dir(work / "model", args.tokenizer)
        settings = Settings(args.steps, args.warmup, 4, 1024, 256, {"path": str(model_dir)})
        runs = RUNS
    runs = tuple(r for r in runs if not args.only or any(s in r.name for s in args.only))
    import importlib.util

    for run in runs:
        if run.needs and importlib.util.find_spec(run.needs) is None:
            print(f"{run.name}: skipped, {run.needs} is not installed here", flush=True)
    runs = tuple(r for r in runs if not r.needs or importlib.util.find_spec(r.needs) is not None)
    from launcher.plan.planner import resolve_arch
    from launcher.spec.schema import ModelSpec

    arch, error, _ = resolve_arch(ModelSpec.model_validate(settings.model), REPO)
    if arch is None:
        raise SystemExit(f"model: {error}")
    device = "cuda" if on_gpu else "cpu"
    print(f"model: {arch.total_params / 1e9:.3f} B parameters; device: {device}", flush=True)
    rows: list[dict[str, Any]] = []
    for run in runs:
        run_dir, plan_row = plan_run(write_spec(settings, run, work))
        runners = [("ours", train_ours)] + ([("hf-trainer", train_trainer)] if run.trainer else [])
        for runner, train in runners:
            row = {"run": run.name, "runner": runner, "packing": run.packing, "zero_stage": run.zero_stage}
            if runner == "hf-trainer":  # a fresh run directory of the same plan
                (work / "trainer").mkdir(exist_ok=True)
                run_dir, plan_row = plan_run(write_spec(settings, run, work / "trainer"))
            row.update(train(run_dir, settings.warmup, args.out / f"{run.name}-{runner}.log"))
            add_ratios(row, plan_row, arch.total_params, on_gpu)
            rows.append(row)
            print(f"{run.name:<16} {runner:<10} {json.dumps(row)}", flush=True)
    report = {
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "torch": torch.__version__,
        "params": arch.total_params,
        "date": time.strftime("%Y-%m-%d"),
        "wall_s": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    text = table(rows)
    (args.out / "gpu_check.md").write_text(text + "\n")
    print(f"\n{report['device']}, {arch.total_params / 1e9:.2f} B params, {report['wall_s']:.0f} s\n{text}")
    return 0 if all(r.get("state") == "COMPLETED" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
