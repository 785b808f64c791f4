"""Two ranks (two real processes, gloo): full fine-tuning under ZeRO-3 with optimizer + parameter
offload and gradient checkpointing, LoRA and P-Tuning v2 under ZeRO-3, and a rank that crashes
mid-run (FAILED with its reason, no hang)."""

from __future__ import annotations

import math
import re
import signal
import time
from pathlib import Path

import pytest
from train_helpers import (
    losses_by_step,
    make_run_dir,
    metrics,
    rank_output,
    resumed_from_steps,
    run_ranks,
    signal_all,
    start_ranks,
    status,
    wait_all,
    wait_until,
)

from launcher.rundir.paths import RunPaths, read_json
from launcher.train import checkpoint as ckpt
from launcher.train.distributed import DIST_TIMEOUT_ENV
from launcher.train.loop import TEST_CRASH_ENV

pytestmark = pytest.mark.slow


def _check_completed(paths, *, steps: int, zero_stage: int, offload: bool) -> dict:
    result = read_json(paths.result_json)
    assert result["state"] == "COMPLETED" and status(paths)["state"] == "COMPLETED"
    assert result["world_size"] == 2 and result["zero_stage"] == zero_stage
    assert result["offload_optimizer"] is offload and result["offload_param"] is offload
    assert result["steps"] == steps and len(metrics(paths)) == steps
    assert all(math.isfinite(m["loss"]) for m in metrics(paths))
    assert result["peak_mem_kind"] == "cpu_rss" and result["peak_mem_gib"] > 0
    # both ranks wrote their part of every checkpoint (ZeRO-3: one model+optimizer shard per rank)
    newest = ckpt.latest_complete(paths.checkpoints)
    assert newest is not None
    for rank in (0, 1):
        assert (newest / f"rng_state_rank{rank}.pt").is_file()
        assert (newest / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file()
    assert len(read_json_lines(paths.samples_jsonl)) == 4  # gathered from both ranks by rank 0
    return result


def read_json_lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


FULL_SETTINGS = {
    "method": "full",
    "world_size": 2,
    "zero_stage": 3,
    "offload": True,
    "gradient_checkpointing": True,  # what the resource policy picks for full fine-tuning
    "max_steps": 12,
    "save_steps": 3,
}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[RunPaths, float, Path]:
    """2-rank full fine-tuning, ZeRO-3 + offload, uninterrupted: checked below and the reference for the
    2-rank kill-and-resume test. Its ops directory starts empty (what a fresh environment has)."""
    paths = make_run_dir(tmp_path_factory.mktemp("full"), name="full-reference", **FULL_SETTINGS)
    ops_dir = tmp_path_factory.mktemp("fresh-ops")
    started = time.monotonic()
    codes = run_ranks(paths, 2, timeout_s=400, extra_env={"TORCH_EXTENSIONS_DIR": str(ops_dir)})
    assert codes == [0, 0], rank_output(paths)
    return paths, time.monotonic() - started, ops_dir


def test_cpu_run_builds_no_deepspeed_op(full_run: tuple[RunPaths, float, Path]) -> None:
    """On a CPU host a run JIT-builds nothing, even in a fresh environment: Adam with offload runs as
    torch's AdamW (not cpu_adam) and DeepSpeed's inference-only shm all-reduce op is skipped."""
    paths, _, ops_dir = full_run
    assert sorted(p.name for p in ops_dir.rglob("*.so")) == []
    assert sorted(p.name for p in ops_dir.iterdir()) == []
    assert read_json(paths.result_json)["state"] == "COMPLETED"


def test_full_zero3_offload_two_ranks(full_run: tuple[RunPaths, float, Path]) -> None:
    paths, wall_s, _ = full_run
    result = _check_completed(paths, steps=12, zero_stage=3, offload=True)
    print(f"\n2-rank full ZeRO-3 offload: {wall_s:.1f}s wall, {result}")
    assert result["gradient_checkpointing"] is True
    assert_partitioned_at_load(paths)  # with parameter offload: the shards went straight to CPU
    assert_target_only_loss(paths)
    # a full model export, gathered from the ZeRO-3 shards
    assert (paths.final / "config.json").is_file()
    assert any(paths.final.glob("*.safetensors"))
    losses = [m["loss"] for m in metrics(paths)]
    assert min(losses[-2:]) < losses[0], losses


def test_sigkill_both_ranks_then_resume_zero3_offload(
    full_run: tuple[RunPaths, float, Path], tmp_path: Path
) -> None:
    """Both ranks SIGKILLed after a checkpoint was published and training moved past it; the restart
    resumes from it and reproduces the uninterrupted losses (ZeRO-3 shards + per-rank RNG restored)."""
    reference = losses_by_step(full_run[0])
    paths = make_run_dir(tmp_path, name="full-killed", **FULL_SETTINGS)
    procs = start_ranks(paths, 2)
    wait_until(
        lambda: (
            ckpt.latest_complete(paths.checkpoints) is not None and max(losses_by_step(paths), default=0) >= 4
        ),
        timeout_s=300,
        procs=procs,
    )
    signal_all(procs, signal.SIGKILL)
    wait_all(procs, 30)
    logged_before_kill = max(losses_by_step(paths))
    published = [step for step, _ in ckpt.complete_checkpoints(paths.checkpoints)]
    assert published and logged_before_kill < 12, "the run finished before it could be killed"

    assert run_ranks(paths, 2, timeout_s=400) == [0, 0], rank_output(paths)
    assert resumed_from_steps(paths) == [published[-1]]
    assert logged_before_kill - published[-1] <= FULL_SETTINGS["save_steps"]
    resumed = losses_by_step(paths)
    assert sorted(resumed) == list(range(1, 13))
    for step in range(1, 13):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), step


@pytest.mark.parametrize(
    ("method", "export_file"),
    [
        ("lora", "adapter_config.json"),
        ("ptuning_v2", "adapter_config.json"),
        ("ptuning_v1", "adapter_config.json"),
        ("freeze", "config.json"),
    ],
)
def test_methods_zero3_two_ranks(method: str, export_file: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    """Every method on a model built already sharded (zero.Init): peft wraps partitioned weights."""
    paths = make_run_dir(tmp_path, method, world_size=2, zero_stage=3, max_steps=4, save_steps=4)
    assert run_ranks(paths, 2, timeout_s=400) == [0, 0], rank_output(paths)
    _check_completed(paths, steps=4, zero_stage=3, offload=False)
    assert (paths.final / export_file).is_file()
    assert_partitioned_at_load(paths)
    assert_target_only_loss(paths)


def assert_target_only_loss(paths: RunPaths) -> None:
    """Under ZeRO-3 too the LM head got only the target rows: no fall-back to every position's logits."""
    for rank in (0, 1):
        assert "loss: logits of target positions only" in paths.rank_log(rank).read_text(errors="replace")


def assert_partitioned_at_load(paths: RunPaths) -> None:
    """ZeRO-3 built the model already sharded (zero.Init): each rank held half of it from the start."""
    for rank in (0, 1):
        text = paths.rank_log(rank).read_text(errors="replace")
        match = re.search(r"weights partitioned at load \(zero.Init\): (\d+) of (\d+) elements", text)
        assert match, f"rank {rank} loaded the whole model: no zero.Init"
        here, total = int(match.group(1)), int(match.group(2))
        assert 0 < here <= total // 2 + 1024, (here, total)


def test_crashed_rank_fails_the_run_without_hanging(tmp_path: Path, tiny_model_dir: Path) -> None:
    paths = make_run_dir(tmp_path, "lora", world_size=2, zero_stage=2, max_steps=6, save_steps=100)
    started = time.monotonic()
    codes = run_ranks(paths, 2, timeout_s=300, extra_env={TEST_CRASH_ENV: "1:2", DIST_TIMEOUT_ENV: "60"})
    elapsed_s = time.monotonic() - started
    assert codes[1] == 1 and codes[0] != 0, (codes, rank_output(paths))
    st = status(paths)
    assert st["state"] == "FAILED"
    assert st["reason"] == f"RuntimeError: {TEST_CRASH_ENV}: simulated crash of rank 1 at step 2"
    assert st["failed_rank"] == 1
    assert "Traceback" in paths.rank_log(1).read_text()
    assert not paths.result_json.exists()
    assert max(m["step"] for m in metrics(paths)) <= 2
    print(f"\ncrashed rank: both ranks exited after {elapsed_s:.1f}s")
