"""Build real run directories for the training tests and launch ranks as real processes.

A run dir is written the way the planner writes it (run.yaml from a ``RunConfig``, ds_config.json from
``launcher.plan.dsconfig.render_ds_config``), but with tiny lengths and few steps so a run takes seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launcher.backends.launch_env import free_port, torchrun_env
from launcher.plan.dsconfig import render_ds_config
from launcher.rundir.paths import (
    RENDEZVOUS_FILE_ENV,
    RunPaths,
    RunState,
    iter_jsonl,
    write_json_atomic,
    write_text_atomic,
)
from launcher.rundir.run_config import build_run_config, resolved_resources
from launcher.rundir.status import update_status
from launcher.spec.schema import ClusterSpec, DataSpec, EvalSpec, ModelSpec, TokenizerSpec, TrainingSpec

REPO = Path(__file__).resolve().parent.parent
TINY_HIDDEN_SIZE = 128

METHODS: dict[str, dict[str, Any]] = {
    "full": {"method": "full"},
    "freeze": {"method": "freeze", "trainable_layers": 1},
    "lora": {"method": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.05},
    "ptuning_v1": {"method": "ptuning", "version": "v1", "pre_seq_len": 4},
    "ptuning_v2": {"method": "ptuning", "version": "v2", "pre_seq_len": 4},
}


def make_run_dir(
    root: Path,
    method: str = "lora",
    *,
    name: str | None = None,
    world_size: int = 1,
    zero_stage: int = 2,
    offload: bool = False,
    max_steps: int = 8,
    logging_steps: int = 1,
    save_steps: int = 4,
    save_total_limit: int = 2,
    eval_steps: int | None = None,
    learning_rate: float = 3e-3,
    micro_batch: int = 4,
    accumulation: int = 2,
    train_examples: int = 96,
    eval_examples: int = 8,
    model_path: Path | None = None,
    template: str = "chatglm",
    gradient_checkpointing: bool = False,
    method_spec: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    max_source_length: int = 48,
    max_target_length: int = 24,
    eval_settings: dict[str, Any] | None = None,
    **training: Any,
) -> RunPaths:
    """A planned run dir (status PLANNED) for the built-in tiny model (or ``model_path``), by default on
    the bundled dialogue data. ``method_spec`` replaces the named METHODS entry; ``data`` the DataSpec
    fields."""
    run_name = name or f"{method}-z{zero_stage}{'-off' if offload else ''}-w{world_size}"
    cfg = build_run_config(
        experiment="train-tests",
        name=run_name,
        run_id=f"test-{run_name}",
        method=method_spec or METHODS[method],  # type: ignore[arg-type]
        model=ModelSpec(path=str(model_path)) if model_path else ModelSpec(builtin="tiny-glm"),
        tokenizer=TokenizerSpec(),
        data=DataSpec(
            **(data or {"builtin": "dialogue"}),
            max_train_examples=train_examples,
            max_eval_examples=eval_examples,
        ),
        template=template,
        training=TrainingSpec(
            learning_rate=learning_rate,
            max_steps=max_steps,
            per_device_batch_size=micro_batch,
            gradient_accumulation_steps=accumulation,
            warmup_ratio=0.1,
            max_source_length=max_source_length,
            max_target_length=max_target_length,
            precision="fp32",
            logging_steps=logging_steps,
            save_steps=save_steps,
            save_total_limit=save_total_limit,
            eval_steps=eval_steps,
            **training,
        ),
        eval=EvalSpec(**{"max_new_tokens": 8, "num_samples": 4, "batch_size": 4, **(eval_settings or {})}),
        resources=resolved_resources(
            nodes=1,
            gpus_per_node=world_size,
            zero_stage=zero_stage,
            offload_optimizer=offload,
            offload_param=offload and zero_stage == 3,
            gradient_checkpointing=gradient_checkpointing,
            est_mem_gib=0.1,
            fits=True,
        ),
        cluster=ClusterSpec(),
    )
    paths = RunPaths(root / run_name)
    paths.root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(paths.run_yaml, cfg.to_yaml())
    write_json_atomic(paths.ds_config, render_ds_config(cfg, TINY_HIDDEN_SIZE))
    update_status(paths, RunState.PLANNED)
    return paths


def rank_env(rank: int, world_size: int, port: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUBMITIT_", "SLURM_"))}
    env.update(
        {
            **torchrun_env(rank, world_size, port),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env


def start_ranks(
    paths: RunPaths, world_size: int, extra_env: dict[str, str] | None = None
) -> list[subprocess.Popen[bytes]]:
    """``python -m launcher.train RUN_DIR`` once per rank, each with its own stdout file in logs/."""
    port = free_port()  # only a fallback: rank 0 binds its own port and publishes it (no EADDRINUSE)
    paths.logs.mkdir(parents=True, exist_ok=True)
    paths.rendezvous_port.unlink(missing_ok=True)
    extra_env = {RENDEZVOUS_FILE_ENV: str(paths.rendezvous_port), **(extra_env or {})}
    procs = []
    for rank in range(world_size):
        out = open(paths.logs / f"test-stdout-rank{rank}.txt", "ab")  # noqa: SIM115 - closed with the process
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "launcher.train", str(paths.root)],
                cwd=REPO,
                env=rank_env(rank, world_size, port, extra_env),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        )
        out.close()
    return procs


def wait_all(procs: list[subprocess.Popen[bytes]], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    return codes


def run_ranks(
    paths: RunPaths, world_size: int, timeout_s: float = 300, extra_env: dict[str, str] | None = None
) -> list[int]:
    return wait_all(start_ranks(paths, world_size, extra_env), timeout_s)


def wait_until(predicate: Callable[[], bool], timeout_s: float, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a rank exited early: {[p.poll() for p in procs]}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the condition")


def signal_all(procs: list[subprocess.Popen[bytes]], sig: signal.Signals) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(sig)


def metrics(paths: RunPaths) -> list[dict[str, Any]]:
    return list(iter_jsonl(paths.metrics_jsonl))


def losses_by_step(paths: RunPaths) -> dict[int, float]:
    return {int(m["step"]): float(m["loss"]) for m in metrics(paths)}


def status(paths: RunPaths) -> dict[str, Any]:
    return dict(json.loads(paths.status_json.read_text(encoding="utf-8")))


def rank_output(paths: RunPaths) -> str:
    return "\n".join(p.read_text(errors="replace")[-4000:] for p in sorted(paths.logs.glob("*rank*")))


# --- the uninterrupted reference for the resume / preemption tests -------------------------------

RESUME_SETTINGS: dict[str, Any] = {
    "method": "lora",
    "max_steps": 16,
    "logging_steps": 1,
    "save_steps": 3,
    "save_total_limit": 2,
}
_REFERENCE: dict[str, Any] = {}


def start_reference(root: Path) -> None:
    """Start the uninterrupted reference run (once per test session) without waiting for it, so it
    trains while a test drives its own interrupted run."""
    if "paths" not in _REFERENCE:
        paths = make_run_dir(root, name="reference", **RESUME_SETTINGS)
        _REFERENCE["paths"] = paths
        _REFERENCE["procs"] = start_ranks(paths, 1)


def reference_losses(root: Path) -> dict[int, float]:
    """Per-step losses of an uninterrupted run with RESUME_SETTINGS (trained once per test session)."""
    start_reference(root)
    if "losses" not in _REFERENCE:
        paths = _REFERENCE["paths"]
        codes = wait_all(_REFERENCE["procs"], timeout_s=300)
        assert codes == [0], rank_output(paths)
        _REFERENCE["losses"] = losses_by_step(paths)
    return dict(_REFERENCE["losses"])


def resumed_from_steps(paths: RunPaths) -> list[int]:
    """The checkpoint steps the run resumed from, in order (read from rank 0's log)."""
    import re

    text = paths.rank_log(0).read_text(errors="replace") if paths.rank_log(0).exists() else ""
    return [int(m) for m in re.findall(r"resumed from step (\d+)", text)]


# --- several runs in one process per rank ---------------------------------------------------------

RUNS_WORKER = Path(__file__).with_name("family_worker.py")


def start_runs_in_one_process(
    runs: list[RunPaths], world_size: int, out_json: Path
) -> list[subprocess.Popen[bytes]]:
    """Train ``runs`` one after another through the real entrypoint in ONE process per rank
    (tests/family_worker.py): the imports and the process group are paid once, not once per run. Returns
    without waiting (``wait_all``); each rank's output goes to ``out_json`` with ``.rank{N}.log``."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        log = open(out_json.with_suffix(f".rank{rank}.log"), "wb")  # noqa: SIM115 - closed below
        procs.append(
            subprocess.Popen(
                [sys.executable, str(RUNS_WORKER), str(out_json), *(str(r.root) for r in runs)],
                cwd=REPO,
                env=rank_env(rank, world_size, port),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        log.close()
    return procs
