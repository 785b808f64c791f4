"""One run's status row, read from its files: status.json, the tail of metrics.jsonl, and the
scheduler's live state where the files are not final.

Used by `launcher status` (launcher.submit.status_view: every run of an experiment) and by the live progress
view of the local and hostfile backends (launcher.submit.progress). Only the end of metrics.jsonl is read: a
long run's file grows long, and the progress view reads every run at each poll.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from launcher.rundir.paths import RunPaths, RunState, tail_lines
from launcher.rundir.status import read_status

_TAIL_BYTES = 16384


@dataclass
class StatusRow:
    """One line of `launcher status` (one object of `--json`)."""

    name: str
    state: str
    attempts: int
    step: int | None
    total_steps: int | None
    loss: float | None
    tokens_per_s: float | None
    eta_s: float | None
    elapsed_s: float | None
    backend: str | None
    job_id: str | None
    reason: str | None
    updated_at: str | None
    pending_reason: str | None = None
    """Why the scheduler keeps a PENDING run queued (Slurm's squeue reason: Priority, Resources...)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def tail_jsonl(path: Path, max_records: int = 2) -> list[dict[str, Any]]:
    """The last well-formed records of a JSONL file (a torn last line, while the trainer appends, is
    skipped)."""
    records: list[dict[str, Any]] = []
    for line in reversed(tail_lines(path, _TAIL_BYTES)):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            records.append(obj)
            if len(records) == max_records:
                break
    return list(reversed(records))


def _as_int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _as_float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def estimate_eta_s(records: list[dict[str, Any]], step: int | None, total: int | None) -> float | None:
    """Seconds left from the recent step rate (last two metric records), else the average rate."""
    if step is None or total is None or not records:
        return None
    if step >= total:
        return 0.0
    last = records[-1]
    sec_per_step: float | None = None
    if len(records) >= 2:
        d_step = (_as_int(last.get("step")) or 0) - (_as_int(records[-2].get("step")) or 0)
        d_time = (_as_float(last.get("elapsed_s")) or 0.0) - (_as_float(records[-2].get("elapsed_s")) or 0.0)
        if d_step > 0 and d_time > 0:
            sec_per_step = d_time / d_step
    if sec_per_step is None:
        elapsed = _as_float(last.get("elapsed_s"))
        last_step = _as_int(last.get("step"))
        if elapsed and last_step:
            sec_per_step = elapsed / last_step
    return None if sec_per_step is None else sec_per_step * (total - step)


def merge_state(file_state: str, live_state: str | None) -> str:
    """The run's state from its files and the scheduler's view.

    Final files (the trainer wrote COMPLETED/FAILED, or a cancel was recorded) win. A job the scheduler
    runs whose ranks have not reported RUNNING yet is STARTING. The scheduler wins when it says the job
    is queued or running (e.g. requeued after preemption while the files still say PREEMPTED), and
    when the files claim in-flight but the job ended without updating them (killed, node lost,
    supervisor gone).
    """
    final = (RunState.COMPLETED.value, RunState.FAILED.value, RunState.CANCELLED.value)
    in_flight = (RunState.PENDING.value, RunState.STARTING.value, RunState.RUNNING.value)
    if not live_state or live_state == file_state or file_state in final:
        return file_state
    if live_state == RunState.RUNNING.value:
        return RunState.STARTING.value  # the files say anything but RUNNING: the ranks are loading
    if live_state in in_flight or file_state in in_flight:
        return live_state
    return file_state


def read_status_row(
    paths: RunPaths,
    *,
    live_state: str | None = None,
    attempts: int = 0,
    backend: str | None = None,
    job_id: str | None = None,
) -> StatusRow:
    """One run's row from its files, with the scheduler's live state where the files are not final."""
    status = read_status(paths)
    records = tail_jsonl(paths.metrics_jsonl)
    last = records[-1] if records else {}
    state = str(status.get("state"))
    reason = status.get("reason")
    merged = merge_state(state, live_state)
    if merged != state:
        state = merged
        # STARTING: the job runs and its ranks have not reported yet; the state says it all.
        reason = (
            None
            if merged == RunState.STARTING.value
            else (f"the {backend or 'scheduler'} backend reports {merged} (job {job_id})")
        )
    if state == RunState.STARTING.value and status.get("startup"):
        reason = str(status["startup"])  # what the ranks are doing: building ops, loading weights...
    step = _as_int(status.get("step"))
    metrics_step = _as_int(last.get("step"))
    if metrics_step is not None and (step is None or metrics_step > step):
        step = metrics_step
    total = _as_int(status.get("total_steps"))
    restarts = _as_int(status.get("attempt")) or 0
    return StatusRow(
        name=paths.name,
        state=state,
        attempts=max(attempts, restarts),
        step=step,
        total_steps=total,
        loss=_as_float(last.get("loss")),
        tokens_per_s=_as_float(last.get("tokens_per_s")),
        eta_s=None if state != RunState.RUNNING.value else estimate_eta_s(records, step, total),
        elapsed_s=_as_float(last.get("elapsed_s")),
        backend=backend,
        job_id=job_id,
        reason=reason,
        updated_at=status.get("updated_at"),
    )


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
