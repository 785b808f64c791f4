"""SIGTERM (what Slurm sends before a time limit / preemption, with SIGUSR2) mid-run: the run saves a
checkpoint at the next step boundary, writes PREEMPTED, exits 3; a restart finishes with the same
losses as an uninterrupted run."""

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

from launcher.train import checkpoint as ckpt
from launcher.train.entry import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow
STEPS = RESUME_SETTINGS["max_steps"]


def test_sigterm_checkpoints_and_exits_3_then_resumes(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> None:
    reference_root = tmp_path_factory.mktemp("reference")
    start_reference(reference_root)  # trains alongside this test's own run
    paths = make_run_dir(tmp_path_factory.mktemp("preempted"), name="preempted", **RESUME_SETTINGS)
    procs = start_ranks(paths, 1)
    wait_until(lambda: max(losses_by_step(paths), default=0) >= 1, timeout_s=240, procs=procs)
    signal_all(procs, signal.SIGTERM)
    assert wait_all(procs, 120) == [PREEMPTED_EXIT_CODE], rank_output(paths)

    st = status(paths)
    assert st["state"] == "PREEMPTED" and "SIGTERM" in st["reason"]
    stopped_at = st["step"]
    assert 1 <= stopped_at < STEPS
    # the checkpoint of the step it stopped at is published (not only the periodic ones)
    assert ckpt.latest_complete(paths.checkpoints) == paths.checkpoints / f"global_step{stopped_at}"
    assert max(losses_by_step(paths)) == stopped_at
    assert not paths.result_json.exists()

    assert run_ranks(paths, 1, timeout_s=300) == [0], rank_output(paths)
    reference = reference_losses(reference_root)
    assert status(paths)["state"] == "COMPLETED"
    assert resumed_from_steps(paths) == [stopped_at]  # nothing recomputed
    resumed = losses_by_step(paths)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), step
