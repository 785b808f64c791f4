"""status.json and the failure records have one owner (launcher.rundir.status): its merge policy, the
failure-record schema, the earliest-failure rule, and writes on a full disk."""

from __future__ import annotations

import errno
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from launcher.errors import DiskFullError
from launcher.rundir import status as run_status
from launcher.rundir.paths import RunPaths, RunState, read_json
from launcher.rundir.status import (
    ATTEMPT_ID_ENV,
    FailureRecord,
    failure_reason,
    read_status,
    record_failure,
    update_status,
)

LAUNCHER = Path(__file__).resolve().parent.parent / "launcher"


@pytest.fixture
def paths(tmp_path: Path) -> RunPaths:
    return RunPaths(tmp_path / "run")


# A write names the file inside a write/open call, or calls write_text/open on the path itself.
_STATUS_WRITE = re.compile(
    r"(write_\w+|open)\([^)]*(status_json|[\"']status\.json[\"'])"
    r"|(status_json|[\"']status\.json[\"']\))\.(write_text|write_bytes|open)\("
)
DELIBERATELY_CORRUPT = "a corrupt status.json on purpose"
"""The marker a test puts on the line that writes a broken file to test the reader (not a writer)."""


def status_writers(root: Path) -> list[str]:
    writers = []
    for source in root.rglob("*.py"):
        text = source.read_text(encoding="utf-8")
        for match in _STATUS_WRITE.finditer(text):  # over the whole text: a call may span lines
            start = text.rfind("\n", 0, match.start()) + 1
            end = text.find("\n", match.end())
            call = text[start : end if end >= 0 else None]
            if DELIBERATELY_CORRUPT not in call:
                writers.append(f"{source.relative_to(root.parent)}: {' '.join(call.split())}")
    return writers


def test_status_json_has_one_writer() -> None:
    """Only launcher/rundir/status.py writes status.json; every other module, and every test helper
    (the stand-in trainer included), calls update_status."""
    writers = status_writers(LAUNCHER) + status_writers(Path(__file__).parent)
    assert writers and all(w.startswith("launcher/rundir/status.py") for w in writers), writers


_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from launcher.rundir.paths import RunPaths, RunState
    from launcher.rundir.status import update_status

    run_dir, role, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    while not (run_dir / "go").exists():  # both writers start together
        time.sleep(0.005)
    for i in range(count):
        if role == "rank0":  # the trainer's progress write
            update_status(RunPaths(run_dir), RunState.RUNNING, step=i + 1, **{f"rank0_{i}": i})
        else:  # `launcher cancel` on the login node
            update_status(RunPaths(run_dir), cancel_requested=True, **{f"cancel_{i}": i})
    """
)


def test_concurrent_writers_lose_nothing(paths: RunPaths) -> None:
    """Two real processes (rank 0's progress, a login-node cancel) merge into one status.json at the
    same time: every key either wrote is there at the end (read-merge-write runs under the lock)."""
    count = 60
    update_status(paths, RunState.RUNNING, job_id="7")
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(paths.root), role, str(count)])
        for role in ("rank0", "cancel")
    ]
    (paths.root / "go").touch()
    assert [proc.wait(timeout=120) for proc in procs] == [0, 0]
    status = read_status(paths)
    written = [f"{role}_{i}" for role in ("rank0", "cancel") for i in range(count)]
    missing = [key for key in written if key not in status]
    assert not missing, f"lost updates: {missing}"
    assert status["cancel_requested"] is True and status["step"] == count and status["job_id"] == "7"


def test_scheduler_keys_survive_trainer_updates(paths: RunPaths) -> None:
    update_status(paths, RunState.PENDING, job_id="12_3", array_job_id="12", array_index=3, attempt=0)
    update_status(paths, attempt=1)  # the Slurm task: state kept
    update_status(paths, RunState.RUNNING, step=0, total_steps=10)  # the trainer knows no job ids
    update_status(paths, step=5, total_steps=10)
    status = read_status(paths)
    assert status["state"] == "RUNNING" and status["step"] == 5
    assert (status["job_id"], status["array_index"], status["attempt"]) == ("12_3", 3, 1)


def test_completed_stays_completed(paths: RunPaths) -> None:
    update_status(paths, RunState.COMPLETED, step=10, total_steps=10)
    written = update_status(paths, RunState.FAILED, "rank 1 died in teardown", failed_rank=1)
    assert written["state"] == "COMPLETED" and written["reason"] is None and "failed_rank" not in written
    update_status(paths, RunState.PENDING, job_id="99")
    status = read_status(paths)
    assert status["state"] == "COMPLETED" and status["step"] == 10


def test_failed_is_left_only_by_a_new_attempt_or_submission(paths: RunPaths) -> None:
    update_status(paths, RunState.RUNNING, step=3, job_id="7")
    update_status(paths, RunState.FAILED, "rank 1: boom", failed_rank=1)
    update_status(paths, step=4)  # a surviving rank's progress does not hide the failure
    update_status(paths, RunState.PREEMPTED, "SIGTERM")
    status = read_status(paths)
    assert (status["state"], status["reason"], status["failed_rank"], status["step"]) == (
        "FAILED",
        "rank 1: boom",
        1,
        4,
    )
    update_status(paths, RunState.STARTING)  # a new attempt (a requeue, `launcher train` again)
    status = read_status(paths)
    assert status["state"] == "STARTING" and status["reason"] is None and "failed_rank" not in status
    update_status(paths, RunState.RUNNING, step=0)
    status = read_status(paths)
    assert status["state"] == "RUNNING" and status["reason"] is None
    assert status["job_id"] == "7"


def test_cancelled_is_final_for_its_submission(paths: RunPaths) -> None:
    update_status(paths, RunState.RUNNING, job_id="5", cancel_requested=True)
    update_status(paths, RunState.CANCELLED, "cancelled by the user")
    update_status(paths, RunState.PREEMPTED, "SIGTERM received; checkpoint saved at step 2", step=2)
    assert read_status(paths)["state"] == "CANCELLED"
    # --retry-failed submits it again: the previous submission's bookkeeping goes, progress stays
    update_status(paths, RunState.PENDING, job_id="6")
    status = read_status(paths)
    assert status["state"] == "PENDING" and status["job_id"] == "6" and status["step"] == 2
    assert "cancel_requested" not in status and status["reason"] is None


def test_reason_belongs_to_its_state(paths: RunPaths) -> None:
    update_status(paths, RunState.PREEMPTED, "SIGUSR2 received", requeued=True)
    update_status(paths, attempt=2)
    assert read_status(paths)["reason"] == "SIGUSR2 received"
    update_status(paths, RunState.RUNNING)
    status = read_status(paths)
    assert status["reason"] is None and "requeued" not in status and status["attempt"] == 2


def test_earliest_failure_of_this_attempt_is_the_reason(
    paths: RunPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 1 crashes first; rank 0 fails later with a broken connection: status.json names rank 1's
    error, not the older failure record of an earlier attempt."""
    monkeypatch.setenv(ATTEMPT_ID_ENV, "9:0")
    paths.logs.mkdir(parents=True)
    stale = {"rank": 2, "reason": "old", "at": 1.0, "attempt": "8:0"}
    (paths.logs / "failure_rank2.json").write_text(json.dumps(stale))
    record_failure(paths, 1, "RuntimeError: simulated crash of rank 1")
    update_status(paths, RunState.RUNNING, step=2)
    record_failure(paths, 0, "RuntimeError: Connection closed by peer")
    record_failure(paths, 1, "RuntimeError: simulated crash of rank 1 (again, by the Slurm task)")
    status = read_status(paths)
    assert status["state"] == "FAILED" and status["failed_rank"] == 1
    assert status["reason"] == "RuntimeError: simulated crash of rank 1"
    record = FailureRecord.from_dict(read_json(paths.logs / "failure_rank1.json"))
    assert record.attempt == "9:0" and record.reason == "RuntimeError: simulated crash of rank 1"
    assert set(read_json(paths.logs / "failure_rank0.json")) == {"rank", "reason", "at", "attempt"}


def test_failure_after_a_cancel_request_is_a_cancel(paths: RunPaths) -> None:
    update_status(paths, RunState.RUNNING, step=4, cancel_requested=True)
    record_failure(paths, 0, "RuntimeError: Connection closed by peer")
    status = read_status(paths)
    assert status["state"] == "CANCELLED" and "step 4" in status["reason"]


def test_failure_reasons() -> None:
    assert failure_reason(ValueError("bad value")) == "ValueError: bad value"
    assert failure_reason(DiskFullError("/x/ckpt")) == "disk full: no space left on device writing /x/ckpt"
    plain = OSError(errno.ENOSPC, "No space left on device")
    assert failure_reason(plain) == "disk full: no space left on device writing a file"


def test_status_is_recorded_on_a_full_disk(paths: RunPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    """No room for a new file: the status is rewritten in place (its blocks exist already)."""
    update_status(paths, RunState.RUNNING, step=3, total_steps=10, job_id="1")

    def no_space(path: Path, obj: object) -> None:
        raise DiskFullError(path)

    monkeypatch.setattr(run_status, "write_json_atomic", no_space)
    update_status(paths, RunState.FAILED, "disk full: no space left on device writing /r/metrics.jsonl")
    status = read_status(paths)
    assert (
        status["state"] == "FAILED" and status["reason"].startswith("disk full") and status["job_id"] == "1"
    )
