"""``status.json`` and ``logs/failure_rank{N}.json``: the one owner of both.

Every process that records a run's state calls :func:`update_status`: the trainer's ranks, the Slurm
task, the local/hostfile supervisor, submit, cancel and the planner. Each call reads the current file,
merges by the policy below and writes the result atomically, all under the run dir's
``.status.json.lock`` (a file lock): a cancel request written on the login node while rank 0 writes
its progress is merged, never lost. The policy (docs/run_directory.md):

- **States.** COMPLETED is never left: once a run has completed, later writes merge their keys but
  the state stays COMPLETED (a completed run is only redone in a fresh run dir, `submit --force`).
  FAILED and CANCELLED are left only by a new submission (PENDING) or the start of a new attempt
  (STARTING, RUNNING); a FAILED run may also become CANCELLED (a cancel explains the failures it caused).
  Every other transition is allowed. An update without a state keeps the current one.
- **reason** belongs to its state: it is kept while the state stays, and replaced (or cleared) when
  the state changes.
- **Scheduler bookkeeping** (``SUBMISSION_KEYS``: backend, job ids, attempt, requeue budget, cancel
  request) survives every update that does not name it, so the trainer (which knows none of it) never
  erases it. A new submission (PENDING) drops the previous submission's bookkeeping.
- **Progress** (``step``, ``total_steps``) survives every update that does not name it.
- **Outcome details** (``OUTCOME_KEYS``: failed_rank, exit codes, requeued) describe the state they
  were written with and are dropped when the state changes; so is the start-up phase (``startup``,
  what a STARTING run is doing: launcher/rundir/startup.py).

A failing rank writes one failure record (``FailureRecord``); status.json then names the EARLIEST
failure of the current attempt: the rank that died first has the real cause, the others only see
their peers vanish.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from launcher.errors import DiskFullError
from launcher.rundir.paths import RunPaths, RunState, read_json, to_json, utc_now, write_json_atomic

HEADER_KEYS = ("state", "updated_at", "reason")
SUBMISSION_KEYS = (
    "backend",
    "job_id",
    "array_job_id",
    "array_index",
    "attempt",
    "max_requeues",
    "cancel_requested",
)
PROGRESS_KEYS = ("step", "total_steps")
OUTCOME_KEYS = ("failed_rank", "exit_codes", "requeued")
PHASE_KEYS = ("startup",)
"""What a STARTING run is doing (launcher/rundir/startup.py); meaningless once the state changes."""

# The attempt every rank of one launch shares (set by the backends): failure records of other
# attempts are history, not this attempt's cause.
ATTEMPT_ID_ENV = "LAUNCHER_ATTEMPT_ID"

_LEAVES_ONLY_TO: dict[RunState, tuple[RunState, ...]] = {
    RunState.COMPLETED: (RunState.COMPLETED,),
    RunState.FAILED: (
        RunState.FAILED,
        RunState.PENDING,
        RunState.STARTING,
        RunState.RUNNING,
        RunState.CANCELLED,
    ),
    RunState.CANCELLED: (RunState.CANCELLED, RunState.PENDING, RunState.STARTING, RunState.RUNNING),
}


def read_status(paths: RunPaths) -> dict[str, Any]:
    """The run's status; a missing or unreadable file reads as PLANNED with a reason."""
    try:
        data = read_json(paths.status_json)
    except FileNotFoundError:
        return {"state": RunState.PLANNED.value, "updated_at": None, "reason": None}
    except (json.JSONDecodeError, OSError) as exc:
        return {"state": RunState.PLANNED.value, "updated_at": None, "reason": f"unreadable status: {exc}"}
    if not isinstance(data, dict) or data.get("state") not in RunState.__members__:
        reason = "status.json has no valid state"
        return {"state": RunState.PLANNED.value, "updated_at": None, "reason": reason}
    return data


def may_follow(current: RunState, new: RunState) -> bool:
    """Whether ``new`` may replace ``current`` (the state part of the merge policy)."""
    return new in _LEAVES_ONLY_TO.get(current, tuple(RunState))


def merge_status(
    current: dict[str, Any], state: RunState | None, reason: str | None, **fields: Any
) -> dict[str, Any]:
    """The merge policy as a pure function: the status that ``update_status`` would write."""
    old_state = RunState(current.get("state", RunState.PLANNED.value))
    new_state = old_state if state is None or not may_follow(old_state, state) else state
    changed = new_state != old_state
    if state is not None and new_state != state:  # refused: only its bookkeeping keys are merged
        reason = None
        fields = {k: v for k, v in fields.items() if k not in OUTCOME_KEYS}
    kept = {k: v for k, v in current.items() if k not in HEADER_KEYS}
    if changed:
        kept = {k: v for k, v in kept.items() if k not in OUTCOME_KEYS + PHASE_KEYS}
    if changed and new_state == RunState.PENDING:
        kept = {k: v for k, v in kept.items() if k not in SUBMISSION_KEYS}
    if reason is None and not changed:
        reason = current.get("reason")
    return {"state": new_state.value, "updated_at": utc_now(), "reason": reason, **kept, **fields}


STATUS_LOCK_NAME = ".status.json.lock"


@contextlib.contextmanager
def status_lock(paths: RunPaths) -> Iterator[None]:
    """Hold the run's status lock: read-merge-write sequences of all processes run one at a time.

    Re-entrant within a process (``is_singleton``: one lock object per path), so a caller that reads
    the status to decide what to write may hold it around ``update_status``. A lock file that cannot
    be created on a full or read-only disk is skipped: recording the failure matters more then."""
    lock = FileLock(paths.root / STATUS_LOCK_NAME, is_singleton=True)
    try:
        lock.acquire()
    except OSError as exc:
        if exc.errno not in (*DiskFullError.ERRNOS, errno.EROFS):
            raise
        yield
        return
    try:
        yield
    finally:
        lock.release()


def update_status(
    paths: RunPaths, state: RunState | None = None, reason: str | None = None, **fields: Any
) -> dict[str, Any]:
    """Merge ``state``, ``reason`` and ``fields`` into status.json under the status lock (policy:
    module docstring); returns what was written. A new run dir (no status.json yet) starts from nothing."""
    with status_lock(paths):
        return _merge_and_write(paths, state, reason, fields)


def _merge_and_write(
    paths: RunPaths, state: RunState | None, reason: str | None, fields: dict[str, Any]
) -> dict[str, Any]:
    current = read_status(paths) if paths.status_json.exists() else {"state": RunState.PLANNED.value}
    payload = merge_status(current, state, reason, **fields)
    try:
        write_json_atomic(paths.status_json, payload)
    except OSError as exc:
        if exc.errno not in DiskFullError.ERRNOS:
            raise
        # A full disk is when the failure most needs recording: the old file's blocks are already
        # allocated, so rewriting it in place needs no new space (a status is a few hundred bytes).
        _overwrite_in_place(paths.status_json, to_json(payload) + "\n", exc)
    return payload


def _overwrite_in_place(path: Path, text: str, original: OSError) -> None:
    try:
        with open(path, "r+b") as handle:
            handle.write(text.encode("utf-8"))
            handle.truncate()
            handle.flush()
            os.fsync(handle.fileno())
    except OSError:
        raise original from None


# --- failure records --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FailureRecord:
    """``logs/failure_rank{N}.json``: why one rank of one attempt failed, and when."""

    rank: int
    reason: str
    at: float
    """Unix time of the failure: the earliest record of an attempt is the run's cause."""
    attempt: str | None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FailureRecord:
        attempt = data.get("attempt")
        return cls(
            rank=int(data["rank"]),
            reason=str(data.get("reason")),
            at=float(data.get("at", 0.0)),
            attempt=None if attempt is None else str(attempt),
        )


def failure_path(paths: RunPaths, rank: int) -> Path:
    return paths.logs / f"failure_rank{rank}.json"


def current_attempt_id() -> str | None:
    """The id every rank of this launch shares: set by the backend, else the rendezvous address."""
    explicit = os.environ.get(ATTEMPT_ID_ENV)
    if explicit:
        return explicit
    if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        return f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    return None


def clear_failure(paths: RunPaths, rank: int) -> None:
    """A new attempt of this rank starts: its earlier failure record is history."""
    with contextlib.suppress(OSError):
        failure_path(paths, rank).unlink(missing_ok=True)


def failure_reason(exc: BaseException) -> str:
    """One line for a failure record: our own errors (already in the user's terms) as their message,
    a full disk as "disk full ... writing PATH", anything else as the exception's last line."""
    if isinstance(exc, OSError) and exc.errno in DiskFullError.ERRNOS and not isinstance(exc, DiskFullError):
        exc = DiskFullError(exc.filename or "a file", exc.errno)
    if type(exc).__module__.startswith("launcher.") and str(exc):
        return str(exc).strip().splitlines()[-1]
    lines = [line for line in traceback.format_exception_only(type(exc), exc) if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


def _attempt_failures(paths: RunPaths, attempt: str | None) -> list[FailureRecord]:
    found = []
    for path in paths.logs.glob("failure_rank*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            record = FailureRecord.from_dict(read_json(path))
            if record.attempt == attempt:
                found.append(record)
    return found


def record_failure(paths: RunPaths, rank: int, reason: str) -> FailureRecord | None:
    """Write this rank's failure record (the first one of an attempt stays), then FAILED with the
    attempt's earliest failure; CANCELLED instead when a cancel was requested (ranks stopped by a
    cancel fail on broken connections). Returns the earliest record."""
    attempt = current_attempt_id()
    path = failure_path(paths, rank)
    try:
        mine: FailureRecord | None = FailureRecord.from_dict(read_json(path))
    except (OSError, ValueError, KeyError, TypeError):
        mine = None
    if mine is None or mine.attempt != attempt:  # else recorded already (trainer, then its Slurm task)
        mine = FailureRecord(rank=rank, reason=reason, at=time.time(), attempt=attempt)
        with contextlib.suppress(OSError):  # a full disk: status.json below still gets the reason
            write_json_atomic(path, asdict(mine))
    first = min([*_attempt_failures(paths, attempt), mine], key=lambda r: r.at)
    with status_lock(paths):  # a cancel request arriving between the read and the write is not missed
        status = read_status(paths)
        if status.get("cancel_requested"):
            kept = f"; checkpoint kept at step {status['step']}" if status.get("step") else ""
            update_status(paths, RunState.CANCELLED, f"cancelled by the user{kept}")
        else:
            update_status(paths, RunState.FAILED, first.reason, failed_rank=first.rank)
    return first
