"""The status view: one row per run from the run dir's files, merged with the scheduler's live view.

Files (status.json, metrics.jsonl) are always readable, so the view never depends on `sacct`;
the backend's `live_states` only refines runs whose files are not final (queued, requeued, killed
without writing). Backend queries run under a time limit: `launcher status` never hangs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from launcher.errors import UserError
from launcher.fit_table import ALWAYS, Column, fitted_table
from launcher.run_status import read_status
from launcher.rundir import ExperimentPaths, RunPaths, RunState

if TYPE_CHECKING:
    from rich.console import RenderableType

    from launcher.backends.base import SubmittedRun
    from launcher.manifest import Manifest

T = TypeVar("T")
LIVE_QUERY_TIMEOUT_S = 15.0
_TAIL_BYTES = 16384


@dataclass
class RunRow:
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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def tail_jsonl(path: Path, max_records: int = 2) -> list[dict[str, Any]]:
    """The last well-formed records of a JSONL file, reading only its end (metrics files grow long)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - _TAIL_BYTES))
            chunk = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    lines = chunk.splitlines()
    if size > _TAIL_BYTES and lines:
        lines = lines[1:]  # the first line of the window may be cut
    records: list[dict[str, Any]] = []
    for line in reversed(lines):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line while the trainer appends
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

    Final files (the trainer wrote COMPLETED/FAILED, or a cancel was recorded) win. The scheduler wins
    when it says the job is queued or running (e.g. requeued after preemption while the files still
    say PREEMPTED), and when the files claim in-flight but the job ended without updating them
    (killed, node lost, supervisor gone).
    """
    final = (RunState.COMPLETED.value, RunState.FAILED.value, RunState.CANCELLED.value)
    in_flight = (RunState.PENDING.value, RunState.RUNNING.value)
    if not live_state or live_state == file_state or file_state in final:
        return file_state
    if live_state in in_flight or file_state in in_flight:
        return live_state
    return file_state


def read_run_row(
    paths: RunPaths,
    *,
    live_state: str | None = None,
    attempts: int = 0,
    backend: str | None = None,
    job_id: str | None = None,
) -> RunRow:
    """One run's row from its files, with the scheduler's live state where the files are not final."""
    status = read_status(paths)
    records = tail_jsonl(paths.metrics_jsonl)
    last = records[-1] if records else {}
    state = str(status.get("state"))
    reason = status.get("reason")
    merged = merge_state(state, live_state)
    if merged != state:
        state = merged
        if merged != RunState.RUNNING.value:
            reason = f"the {backend or 'scheduler'} backend reports {merged} (job {job_id})"
    step = _as_int(status.get("step"))
    metrics_step = _as_int(last.get("step"))
    if metrics_step is not None and (step is None or metrics_step > step):
        step = metrics_step
    total = _as_int(status.get("total_steps"))
    restarts = _as_int(status.get("attempt")) or 0
    return RunRow(
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


def call_with_timeout(fn: Callable[[], T], timeout_s: float, default: T) -> T:
    """Run fn in a daemon thread; give up after timeout_s (a hung `squeue` must not hang status)."""
    box: list[T] = []

    def target() -> None:
        with contextlib.suppress(Exception):  # a broken scheduler query degrades to the files' view
            box.append(fn())

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return box[0] if box else default


def submitted_runs(manifest: Manifest) -> list[SubmittedRun]:
    from launcher.backends.base import SubmittedRun

    return [
        SubmittedRun(
            name=e.name,
            run_id=rid,
            backend=e.backend,
            job_id=e.job_id,
            array_job_id=e.array_job_id,
            array_index=e.array_index,
        )
        for rid, e in manifest.entries.items()
    ]


def query_live_states(
    manifest: Manifest, timeout_s: float = LIVE_QUERY_TIMEOUT_S, names: set[str] | None = None
) -> dict[str, str]:
    """Run name -> live state from each backend that submitted runs; {} where a backend can't tell."""
    from launcher.backends.base import get_backend

    by_backend: dict[str, list[SubmittedRun]] = {}
    for run in submitted_runs(manifest):
        if names is None or run.name in names:
            by_backend.setdefault(run.backend, []).append(run)
    states: dict[str, str] = {}
    for backend_name, runs in by_backend.items():
        try:
            backend = get_backend(backend_name, None)
        except (ImportError, UserError):
            continue
        query = functools.partial(backend.live_states, runs)
        empty: dict[str, str] = {}
        states.update(call_with_timeout(query, timeout_s, empty))
    return {name: state for name, state in states.items() if state in RunState.__members__}


def collect_rows(exp: ExperimentPaths, *, live: bool = True) -> list[RunRow]:
    """A row for every run directory (submitted or not), in name order."""
    from launcher.manifest import load_manifest

    manifest = load_manifest(exp)
    live_states = query_live_states(manifest) if live else {}
    rows = []
    for paths in exp.run_dirs():
        found = manifest.by_name(paths.name)
        entry = found[1] if found else None
        rows.append(
            read_run_row(
                paths,
                live_state=live_states.get(paths.name),
                attempts=entry.attempts if entry else 0,
                backend=entry.backend if entry else None,
                job_id=entry.job_id if entry else None,
            )
        )
    return rows


# --- rendering ---------------------------------------------------------------------------------

STATE_STYLES = {
    "PLANNED": "dim",
    "PENDING": "yellow",
    "RUNNING": "cyan",
    "COMPLETED": "green",
    "FAILED": "bold red",
    "CANCELLED": "magenta",
    "PREEMPTED": "yellow",
}


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _step_cell(row: RunRow) -> str:
    return "-" if row.step is None else f"{row.step}/{row.total_steps if row.total_steps else '?'}"


# Priorities pick what a narrow terminal shows (launcher.fit_table).
STATUS_COLUMNS: tuple[Column[RunRow], ...] = (
    Column("run", lambda r: r.name, priority=ALWAYS),
    Column("state", lambda r: r.state, priority=ALWAYS, style=lambda r: STATE_STYLES.get(r.state, "")),
    Column("attempts", lambda r: str(r.attempts), right=True, priority=4),
    Column("step", _step_cell, right=True, priority=1),
    Column("loss", lambda r: "-" if r.loss is None else f"{r.loss:.4f}", right=True, priority=2),
    Column(
        "tokens/s",
        lambda r: "-" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f}",
        right=True,
        priority=3,
    ),
    Column("ETA", lambda r: format_duration(r.eta_s), right=True, priority=1),
    Column("job", lambda r: f"{r.backend}:{r.job_id}" if r.job_id else (r.backend or "-"), priority=4),
    Column("reason", lambda r: r.reason or "", priority=1, wrap=True),
)


def render_table(
    rows: list[RunRow], title: str | None = None, *, width: int, wide: bool = False
) -> RenderableType:
    """The status table for a terminal ``width`` columns wide (the live view of ``status --watch``)."""
    table, _ = fitted_table(STATUS_COLUMNS, rows, width=width, every_column=wide, title=title)
    return table


def resolve_experiment(path_text: str) -> ExperimentPaths:
    """EXP may be the experiment directory or the spec that produced it."""
    path = Path(path_text)
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        from launcher.plan import load_and_plan

        return load_and_plan(path).exp
    exp = ExperimentPaths(path)
    if not exp.runs_dir.is_dir():
        raise UserError(
            f"{path}: not an experiment directory (no runs/ inside); pass <output_dir>/<experiment>, "
            "e.g. runs/demo, or the spec file"
        )
    return exp


def resolve_run_names(exp: ExperimentPaths, names: list[str]) -> list[str]:
    """Validate run names against the experiment; an unknown one names the valid ones and the closest."""
    import difflib

    valid = [p.name for p in exp.run_dirs()]
    for name in names:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"no run {name!r} in {exp.root}{hint}; runs: {', '.join(valid) or 'none'}")
    return names


class RunsProgress:
    """Progress over runs and steps while the local/hostfile backend supervises them.

    On a terminal: a live rich bar per run (step/total, state, loss, tokens/s, ETA), refreshed by the
    caller's loop (no refresh thread: the supervisor forks rank processes). Otherwise: one line per
    state change, so CI logs stay readable.
    """

    def __init__(self, runs: list[RunPaths], *, console: Any = None, live: bool | None = None) -> None:
        from rich.console import Console

        self.runs = runs
        self.console = console if console is not None else Console()
        self.live = self.console.is_terminal if live is None else live
        self._states: dict[str, str] = {}
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> RunsProgress:
        if self.live:
            from rich.progress import BarColumn, Progress, TextColumn

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[step]:>11}"),
                TextColumn("{task.fields[state]:<9}"),
                TextColumn("loss {task.fields[loss]:>7}"),
                TextColumn("{task.fields[tps]:>8} tok/s"),
                TextColumn("ETA {task.fields[eta]:>7}"),
                console=self.console,
                auto_refresh=False,
            )
            self._progress.start()
            for paths in self.runs:
                self._tasks[paths.name] = self._progress.add_task(
                    paths.name, total=None, step="-", state="PENDING", loss="-", tps="-", eta="-"
                )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.refresh()
            self._progress.stop()
            self._progress = None

    def update(self) -> None:
        for paths in self.runs:
            row = read_run_row(paths)
            if self._progress is not None:
                self._progress.update(
                    self._tasks[paths.name],
                    total=row.total_steps,
                    completed=row.step or 0,
                    step="-" if row.step is None else f"{row.step}/{row.total_steps or '?'}",
                    state=row.state,
                    loss="-" if row.loss is None else f"{row.loss:.4f}",
                    tps="-" if row.tokens_per_s is None else f"{row.tokens_per_s:,.0f}",
                    eta=format_duration(row.eta_s),
                )
            elif self._states.get(paths.name) != row.state:
                detail = f" ({row.reason})" if row.reason and row.state != RunState.RUNNING.value else ""
                self.console.print(
                    f"{paths.name}: {row.state}{detail}", highlight=False, markup=False, soft_wrap=True
                )
            self._states[paths.name] = row.state
        if self._progress is not None:
            self._progress.refresh()
