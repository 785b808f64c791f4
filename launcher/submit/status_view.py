"""The status view of an experiment: one row per run (launcher.submit.status_row) merged with the live view
of the backends that submitted the runs.

Files (status.json, metrics.jsonl) are always readable, so the view never depends on `sacct`;
the backend's `live_states` only refines runs whose files are not final (queued, requeued, killed
without writing). Backend queries run under a time limit: `launcher status` never hangs.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from launcher.backends.registry import get_backend
from launcher.errors import UserError
from launcher.fit_table import ALWAYS, Column, fitted_table
from launcher.rundir.paths import ExperimentPaths, RunState
from launcher.submit.manifest import load_manifest
from launcher.submit.status_row import StatusRow, format_duration, read_status_row

if TYPE_CHECKING:
    from rich.console import RenderableType

    from launcher.backends.base import SubmittedRun
    from launcher.submit.manifest import Manifest

T = TypeVar("T")
LIVE_QUERY_TIMEOUT_S = 15.0


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


def _ask_backends(
    manifest: Manifest, question: str, timeout_s: float, names: set[str] | None
) -> dict[str, str]:
    """Run name -> answer of ``backend.<question>(runs)`` from each backend that submitted runs."""
    by_backend: dict[str, list[SubmittedRun]] = {}
    for run in manifest.submitted_runs(names):
        by_backend.setdefault(run.backend, []).append(run)
    answers: dict[str, str] = {}
    for backend_name, runs in by_backend.items():
        try:
            backend = get_backend(backend_name, None)
        except (ImportError, UserError):
            continue
        query = functools.partial(getattr(backend, question), runs)
        empty: dict[str, str] = {}
        answers.update(call_with_timeout(query, timeout_s, empty))
    return answers


def query_live_states(
    manifest: Manifest, timeout_s: float = LIVE_QUERY_TIMEOUT_S, names: set[str] | None = None
) -> dict[str, str]:
    """Run name -> live state from each backend that submitted runs; {} where a backend can't tell."""
    states = _ask_backends(manifest, "live_states", timeout_s, names)
    return {name: state for name, state in states.items() if state in RunState.__members__}


def collect_rows(exp: ExperimentPaths, *, live: bool = True) -> list[StatusRow]:
    """A row for every run directory (submitted or not), in the spec's order (as plan and collect)."""
    manifest = load_manifest(exp)
    live_states = query_live_states(manifest) if live else {}
    rows = []
    for paths in exp.run_dirs_in_plan_order():
        found = manifest.by_name(paths.name)
        entry = found[1] if found else None
        rows.append(
            read_status_row(
                paths,
                live_state=live_states.get(paths.name),
                attempts=entry.attempts if entry else 0,
                backend=entry.backend if entry else None,
                job_id=entry.job_id if entry else None,
            )
        )
    pending = {row.name for row in rows if row.state == RunState.PENDING.value}
    if live and pending:
        reasons = _ask_backends(manifest, "pending_reasons", LIVE_QUERY_TIMEOUT_S, pending)
        for row in rows:
            row.pending_reason = reasons.get(row.name) if row.name in pending else None
    return rows


# --- rendering ---------------------------------------------------------------------------------

STATE_STYLES = {
    "PLANNED": "dim",
    "PENDING": "yellow",
    "STARTING": "blue",
    "RUNNING": "cyan",
    "COMPLETED": "green",
    "FAILED": "bold red",
    "CANCELLED": "magenta",
    "PREEMPTED": "yellow",
}


def _step_cell(row: StatusRow) -> str:
    return "-" if row.step is None else f"{row.step}/{row.total_steps if row.total_steps else '?'}"


def _reason_cell(row: StatusRow) -> str:
    waiting = f"squeue: {row.pending_reason}" if row.pending_reason else ""
    return "; ".join(part for part in (row.reason, waiting) if part)


# Priorities pick what a narrow terminal shows (launcher.fit_table).
STATUS_COLUMNS: tuple[Column[StatusRow], ...] = (
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
    Column("reason", _reason_cell, priority=1, wrap=True),
)


def render_table(
    rows: list[StatusRow], title: str | None = None, *, width: int, wide: bool = False
) -> RenderableType:
    """The status table for a terminal ``width`` columns wide (the live view of ``status --watch``)."""
    table, _ = fitted_table(STATUS_COLUMNS, rows, width=width, every_column=wide, title=title)
    return table


def resolve_experiment(path_text: str) -> ExperimentPaths:
    """EXP may be the experiment directory or the spec that produced it."""
    path = Path(path_text)
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        # lazy: `launcher status`, `logs` and `cancel` load the planner only for a spec file
        from launcher.plan.planner import load_and_plan

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
