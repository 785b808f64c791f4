"""``attempts.jsonl``: when each attempt of a run started and ended, for its real wall time.

Rank 0 appends ``{"attempt", "event": "start", "at", "gpus"}`` when its process starts (the process's
own start time, so imports and model loading count) and ``{"attempt", "event": "end", "at", "state"}``
when it leaves, however it leaves short of SIGKILL. Time in the queue is never in it. The collector
sums the attempts; an attempt killed before it could write its end is counted until the run's files
last changed (or the next attempt started), and says so.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from launcher.rundir.paths import RunPaths, append_jsonl, iter_jsonl


def process_start_time() -> float:
    """This process's start (epoch seconds): psutil when it is there (DeepSpeed needs it), else now."""
    try:
        import psutil

        return float(psutil.Process(os.getpid()).create_time())
    except Exception:  # no psutil, or a platform it cannot read: the time of the call
        return time.time()


def record_attempt_start(
    paths: RunPaths, attempt: str, gpus: int, at: float | None = None, job_id: str | None = None
) -> None:
    """``job_id``: the scheduler's (SLURM_JOB_ID), so accounting can be asked about every job the run
    ever had, also those of earlier submissions the manifest no longer names."""
    record: dict[str, object] = {
        "attempt": attempt,
        "event": "start",
        "at": process_start_time() if at is None else at,
        "gpus": gpus,
    }
    if job_id:
        record["job_id"] = job_id
    append_jsonl(paths.attempts_jsonl, record)


def attempt_job_ids(paths: RunPaths) -> list[str]:
    """The scheduler job ids the run's attempts recorded, in order, each once."""
    ids = (
        str(r["job_id"])
        for r in iter_jsonl(paths.attempts_jsonl)
        if r.get("event") == "start" and r.get("job_id")
    )
    return list(dict.fromkeys(ids))


def record_attempt_end(paths: RunPaths, attempt: str, state: str, at: float | None = None) -> None:
    append_jsonl(
        paths.attempts_jsonl,
        {"attempt": attempt, "event": "end", "at": time.time() if at is None else at, "state": state},
    )


@dataclass(frozen=True)
class WallTime:
    seconds: float
    """Sum over attempts of end - start: queue time excluded."""
    gpu_seconds: float
    """Sum over attempts of GPUs x (end - start)."""
    attempts: int
    open_attempts: int
    """Attempts without an end record (killed, or still running): counted up to ``last_seen``."""


def wall_time(paths: RunPaths, last_seen: float) -> WallTime | None:
    """The run's wall time from attempts.jsonl; None when the file is missing (an older trainer).

    ``last_seen``: when the run last showed life (now for a run in flight, else its files' last
    change); an attempt with no end is counted until then or until the next attempt started.
    """
    starts: list[tuple[str, float, int]] = []
    ends: dict[str, float] = {}
    for record in iter_jsonl(paths.attempts_jsonl):
        at, attempt = record.get("at"), str(record.get("attempt"))
        if not isinstance(at, int | float):
            continue
        if record.get("event") == "start":
            gpus = record.get("gpus")
            starts.append((attempt, float(at), int(gpus) if isinstance(gpus, int) and gpus > 0 else 1))
        elif record.get("event") == "end":
            ends[attempt] = float(at)
    if not starts:
        return None
    starts.sort(key=lambda s: s[1])
    seconds = gpu_seconds = 0.0
    open_attempts = 0
    for index, (attempt, start, gpus) in enumerate(starts):
        end = ends.get(attempt)
        if end is None:
            open_attempts += 1
            end = starts[index + 1][1] if index + 1 < len(starts) else last_seen
        duration = max(0.0, end - start)
        seconds += duration
        gpu_seconds += gpus * duration
    return WallTime(seconds, gpu_seconds, len(starts), open_attempts)
