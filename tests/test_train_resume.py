"""Kill-and-resume: a run SIGKILLed after it published a checkpoint, restarted, gives the same loss at
every step as an uninterrupted run (CPU, within 1e-6) and recomputes only the steps since that
checkpoint. Real DeepSpeed engine, LoRA with dropout (so the restored RNG state matters)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from train_helpers import (
    RESUME_SETTINGS,
    losses_by_step,
    make_run_dir,
    rank_output,
    reference_losses,
    resumed_from_steps,
    run_ranks,
    signal_all,
    start_ranks,
    start_reference,
    status,
    wait_all,
    wait_until,
)

from launcher.rundir.paths import read_json
from launcher.train import checkpoint as ckpt

pytestmark = pytest.mark.slow
STEPS = RESUME_SETTINGS["max_steps"]
SAVE_STEPS = RESUME_SETTINGS["save_steps"]


def test_sigkill_then_resume_matches_uninterrupted(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> None:
    reference_root = tmp_path_factory.mktemp("reference")
    start_reference(reference_root)  # trains alongside this test's own run
    paths = make_run_dir(tmp_path_factory.mktemp("killed"), name="killed", **RESUME_SETTINGS)
    procs = start_ranks(paths, 1)
    # Kill once a checkpoint (step 3) is published and training is already past it (step 4 logged).
    wait_until(
        lambda: (
            ckpt.latest_complete(paths.checkpoints) is not None
            and max(losses_by_step(paths), default=0) >= SAVE_STEPS + 1
        ),
        timeout_s=240,
        procs=procs,
    )
    signal_all(procs, signal.SIGKILL)
    assert wait_all(procs, 30) == [-signal.SIGKILL]
    logged_before_kill = max(losses_by_step(paths))
    published = [step for step, _ in ckpt.complete_checkpoints(paths.checkpoints)]
    assert published and logged_before_kill < STEPS, "the run finished before it could be killed"
    assert status(paths)["state"] == "RUNNING"  # a SIGKILL leaves no chance to write anything
    peak_in_checkpoint = {
        str(step): read_json(path / "trainer_state.json")["peak_memory"]
        for step, path in ckpt.complete_checkpoints(paths.checkpoints)
    }

    assert run_ranks(paths, 1, timeout_s=300) == [0], rank_output(paths)
    reference = reference_losses(reference_root)
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert status(paths)["state"] == "COMPLETED"
    # Resumed from the newest complete checkpoint: only the steps after it were recomputed.
    assert resumed_from_steps(paths) == [published[-1]]
    assert logged_before_kill - published[-1] <= SAVE_STEPS
    resumed = losses_by_step(paths)
    assert sorted(resumed) == list(range(1, STEPS + 1))  # no duplicated or missing metric lines
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), step
    # The peak memory covers the killed attempt too: it travelled in the checkpoints.
    first_attempt_peak = peak_in_checkpoint[str(published[-1])]
    assert first_attempt_peak["kind"] == "cpu_rss" and first_attempt_peak["peak_mem_gib"] > 0
    # result.json keeps 4 decimals
    assert read_json(paths.result_json)["peak_mem_gib"] >= round(first_attempt_peak["peak_mem_gib"], 4)
