"""`launcher submit`: spec -> plan -> run dirs -> idempotent submission through one backend.

Idempotency comes from the manifest plus each run's status (merged with the scheduler's live view):
COMPLETED runs are skipped, PENDING/RUNNING ones never duplicated, FAILED/CANCELLED ones resubmitted
only with --retry-failed, PLANNED/PREEMPTED ones (never submitted, or stopped with a checkpoint)
submitted and resumed. --force starts the selected runs afresh: their old outputs are moved to
`<experiment>/replaced/` first, so a forced rerun never resumes a stale checkpoint. A run whose
config changed under the same name is an error (exit 2, nothing submitted) unless --force.
"""

from __future__ import annotations

import fnmatch
import shutil
import sys
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.backends.registry import default_backend_name, get_backend
from launcher.errors import UserError
from launcher.plan.planner import load_and_plan, write_run_dirs
from launcher.rundir.identity import identity_fields, run_id_of
from launcher.rundir.paths import ExperimentPaths, RunState
from launcher.rundir.run_config import RunConfig
from launcher.rundir.status import read_status, update_status
from launcher.submit.manifest import load_manifest, locked_manifest, submission_lock
from launcher.submit.progress import RunsProgress
from launcher.submit.status_row import merge_state
from launcher.submit.status_view import query_live_states

if TYPE_CHECKING:
    from rich.console import Console

    from launcher.backends.base import Backend, SubmittedRun
    from launcher.plan.planner import Plan
    from launcher.rundir.run_config import RunConfig

IN_FLIGHT = (RunState.PENDING.value, RunState.STARTING.value, RunState.RUNNING.value)
CANCEL_WAIT_S = 60.0
RETRYABLE = (RunState.FAILED.value, RunState.CANCELLED.value)


@dataclass
class Decision:
    run: RunConfig
    action: str  # "submit" | "skip"
    why: str
    state: str
    cancel_first: bool = False
    archive_first: bool = False


@dataclass
class SubmitOutcome:
    exp: ExperimentPaths
    backend: str
    decisions: list[Decision]
    submitted: list[SubmittedRun] = field(default_factory=list)
    final_states: dict[str, str] = field(default_factory=dict)


def select_runs(runs: list[RunConfig], only: list[str] | None) -> list[RunConfig]:
    """--only NAME... (exact names or shell globs); a pattern matching nothing is an error."""
    if not only:
        return runs
    names = [r.name for r in runs]
    chosen: set[str] = set()
    for pattern in only:
        matched = [n for n in names if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            import difflib

            close = difflib.get_close_matches(pattern, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"--only {pattern!r} matches no run{hint}; runs in this spec: {', '.join(names)}")
        chosen.update(matched)
    return [r for r in runs if r.name in chosen]


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def config_diff(old: RunConfig, new: RunConfig, limit: int = 4) -> str:
    """'training.learning_rate: 0.0001 -> 0.0002, ...': the first differing keys of the runs' identities."""
    a, b = _flatten(identity_fields(old)), _flatten(identity_fields(new))
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    parts = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"... {len(keys) - limit} more")
    return ", ".join(parts) or "run id changed"


def find_changed_configs(exp: ExperimentPaths, runs: list[RunConfig]) -> dict[str, str]:
    """Run name -> what changed, for runs with outputs (submitted, or past PLANNED) whose existing
    run.yaml (or submitted run id) has another identity. A never-submitted PLANNED run dir is simply
    re-planned; a run that only moves elsewhere (backend, cluster) keeps its identity."""
    manifest = load_manifest(exp)
    changed: dict[str, str] = {}
    for run in runs:
        paths = exp.run(run.name)
        untouched = read_status(paths).get("state") == RunState.PLANNED.value and not (
            paths.metrics_jsonl.exists() or paths.checkpoints.exists()
        )
        found = manifest.by_name(run.name)
        if untouched and found is None:
            continue
        if paths.run_yaml.is_file():
            try:
                old = RunConfig.from_yaml_file(paths.run_yaml)
            except Exception as exc:  # an unreadable run.yaml can't be compared: treat as changed
                changed[run.name] = f"existing {paths.run_yaml} is unreadable ({exc})"
                continue
            if run_id_of(old) != run.run_id:
                changed[run.name] = config_diff(old, run)
                continue
        elif found is not None and found[0] != run.run_id:
            changed[run.name] = f"differs from the config submitted at {found[1].submitted_at}"
    return changed


def current_states(exp: ExperimentPaths, names: set[str]) -> dict[str, str]:
    """Each run's state: its status.json, refined by the backend's live view (e.g. a dead local
    supervisor, a Slurm job that vanished from the queue)."""
    live = query_live_states(load_manifest(exp), names=names)
    states = {}
    for name in names:
        paths = exp.run(name)
        file_state = str(read_status(paths).get("state")) if paths.status_json.exists() else "PLANNED"
        states[name] = merge_state(file_state, live.get(name))
    return states


def decide(
    runs: list[RunConfig], states: dict[str, str], changed: dict[str, str], *, retry_failed: bool, force: bool
) -> list[Decision]:
    decisions = []
    for run in runs:
        state = states.get(run.name, RunState.PLANNED.value)
        if force:
            why = "--force: starts afresh"
            if run.name in changed:
                why += f" (config changed: {changed[run.name]})"
            has_outputs = state != RunState.PLANNED.value or run.name in changed
            in_flight = state in IN_FLIGHT
            decision = Decision(run, "submit", why, state, cancel_first=in_flight, archive_first=has_outputs)
        elif state == RunState.COMPLETED.value:
            decision = Decision(run, "skip", "already completed", state)
        elif state in IN_FLIGHT:
            decision = Decision(run, "skip", f"already {state.lower()}; not submitted twice", state)
        elif state in RETRYABLE and retry_failed:
            decision = Decision(run, "submit", f"{state.lower()} before; retrying (resumes)", state)
        elif state in RETRYABLE:
            decision = Decision(run, "skip", f"{state.lower()}; pass --retry-failed to resubmit", state)
        elif state == RunState.PREEMPTED.value:
            decision = Decision(run, "submit", "preempted; resumes from its checkpoint", state)
        else:
            decision = Decision(run, "submit", "new", state)
        decisions.append(decision)
    return decisions


def archive_run_dir(exp: ExperimentPaths, name: str) -> Path | None:
    """Move a run's old outputs to <experiment>/replaced/<name>-<utc time>/ (never deleted)."""
    src = exp.run(name).root
    if not src.exists():
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    dest = exp.root / "replaced" / f"{name}-{stamp}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), str(dest))
    return dest


def _cancel_through_backends(exp: ExperimentPaths, names: Collection[str]) -> None:
    """Each run is cancelled by the backend that submitted it (the manifest says which)."""
    by_backend: dict[str, list[SubmittedRun]] = {}
    for sub in load_manifest(exp).submitted_runs(names):
        by_backend.setdefault(sub.backend, []).append(sub)
    for backend_name, subs in by_backend.items():
        get_backend(backend_name, None).cancel(exp, subs)


def _cancel_in_flight(exp: ExperimentPaths, names: set[str]) -> None:
    _cancel_through_backends(exp, names)
    # A cancelled Slurm job may still be writing into its run dir for a moment: the dir is about to
    # be archived and re-created, so wait until the scheduler no longer lists the jobs as live.

    deadline = time.monotonic() + CANCEL_WAIT_S
    while True:
        live = query_live_states(load_manifest(exp), names=names)
        busy = sorted(n for n, state in live.items() if state in IN_FLIGHT)
        if not busy:
            return
        if time.monotonic() > deadline:
            raise UserError(
                f"{', '.join(busy)} still running {CANCEL_WAIT_S:.0f}s after being cancelled; "
                "nothing was resubmitted. Check `launcher status`, then submit with --force again"
            )
        time.sleep(2.0)


def submit_spec(
    spec_path: Path,
    *,
    overrides: Sequence[str] = (),
    backend_name: str | None = None,
    dry_run: bool = False,
    only: list[str] | None = None,
    retry_failed: bool = False,
    force: bool = False,
    console: Console | None = None,
    backend: Backend | None = None,
    hostfile: Path | None = None,
) -> SubmitOutcome:
    """Everything `launcher submit` does; `backend` may be passed ready-made (tests)."""
    from rich.console import Console

    if console is None:
        console = Console()
        if not console.is_terminal:  # piped / CI log: don't fold the tables into 80 columns
            console = Console(width=240)
    plan = load_and_plan(spec_path, check_paths=True, overrides=overrides)
    for warning in plan.warnings:  # e.g. an eval set overlapping the training set, with counts
        print(f"warning: {warning}", file=sys.stderr)
    selected = select_runs(plan.runs, only)
    exp = plan.exp
    if backend is None:
        name = backend_name or default_backend_name(plan.spec)
        backend = get_backend(name, plan.spec, console=console, hostfile=hostfile, progress_view=RunsProgress)
    submission = _Submission(plan, selected, backend)
    if dry_run:
        return _dry_run(submission, console, retry_failed=retry_failed, force=force)
    # One submit at a time per experiment: two concurrent submits must not both see PLANNED and both
    # submit. Held from reading the states to recording the jobs, not while local runs train.
    with submission_lock(exp):
        outcome = _submit(submission, console, retry_failed=retry_failed, force=force)
    if outcome.submitted:
        # local / hostfile supervise their runs here, then the table is made; Slurm returns at once
        # (its collector job makes the table).
        outcome.final_states = backend.wait(exp)
        if outcome.final_states:
            run_collector(exp, console)
    return outcome


@dataclass
class _Submission:
    plan: Plan
    selected: list[RunConfig]
    backend: Backend

    @property
    def exp(self) -> ExperimentPaths:
        return self.plan.exp


def _decisions(sub: _Submission, *, retry_failed: bool, force: bool) -> list[Decision]:
    changed = find_changed_configs(sub.exp, sub.plan.runs)
    if changed and not force:
        lines = "\n".join(f"  {n}: {what}" for n, what in sorted(changed.items()))
        raise UserError(
            f"the spec changed the config of {len(changed)} run(s) already in {sub.exp.root}:\n{lines}\n"
            "nothing was submitted. Rename the run (methods[].name) or the experiment to keep both, "
            "or pass --force to replace them (old outputs are moved to "
            f"{sub.exp.root / 'replaced'}/)"
        )
    states = current_states(sub.exp, {r.name for r in sub.selected})
    return decide(sub.selected, states, changed, retry_failed=retry_failed, force=force)


def _dry_run(sub: _Submission, console: Console, *, retry_failed: bool, force: bool) -> SubmitOutcome:
    decisions = _decisions(sub, retry_failed=retry_failed, force=force)
    outcome = SubmitOutcome(sub.exp, sub.backend.name, decisions)
    # Runs whose outputs would be replaced keep their old run dirs untouched in a dry run.
    keep = {d.run.name for d in decisions if d.archive_first}
    write_run_dirs(sub.plan, [r for r in sub.plan.runs if r.name not in keep], force=True)
    to_submit = [d.run for d in decisions if d.action == "submit"]
    outcome.submitted = sub.backend.submit(sub.exp, to_submit, dry_run=True)
    _print_decisions(console, outcome, dry_run=True)
    _print_commands(console, outcome.submitted)
    return outcome


def _submit(sub: _Submission, console: Console, *, retry_failed: bool, force: bool) -> SubmitOutcome:
    exp = sub.exp
    decisions = _decisions(sub, retry_failed=retry_failed, force=force)
    outcome = SubmitOutcome(exp, sub.backend.name, decisions)
    to_submit = [d for d in decisions if d.action == "submit"]
    cancel = {d.run.name for d in to_submit if d.cancel_first}
    if cancel:
        _cancel_in_flight(exp, cancel)
    for d in to_submit:
        moved = archive_run_dir(exp, d.run.name) if d.archive_first else None
        if moved is not None:
            console.print(f"{d.run.name}: old outputs moved to {moved}", highlight=False, markup=False)
    # Run dirs with the same run id keep their status and results (write_run_dirs' contract); ones
    # still holding another config are only never-submitted PLANNED dirs (or archived) by now.
    write_run_dirs(sub.plan, force=True)
    if to_submit:
        outcome.submitted = sub.backend.submit(exp, [d.run for d in to_submit], dry_run=False)
    with locked_manifest(exp) as manifest:
        for submitted in outcome.submitted:
            manifest.record(submitted)
    _print_decisions(console, outcome, dry_run=False)
    return outcome


def run_collector(exp: ExperimentPaths, console: Console) -> None:
    """The comparison table, as the Slurm backend's dependent collector job would write it."""
    try:
        from launcher.collect import collect_experiment, print_summary
    except ImportError as exc:  # the collector is optional for submitting
        console.print(f"collector unavailable ({exc}); run `launcher collect {exp.root}` later")
        return
    try:
        collection = collect_experiment(exp.root)
        print_summary(collection, console)
    except Exception as exc:  # the runs are done either way; the table can be made later
        console.print(f"collector failed: {exc!r}; run `launcher collect {exp.root}`", markup=False)


def _print_commands(console: Console, submitted: list[SubmittedRun]) -> None:
    """Each distinct command once; a command that is a script file (Slurm arrays) is printed whole."""
    groups: dict[str, list[str]] = {}
    for sub in submitted:
        groups.setdefault(sub.command or "", []).append(sub.name)
    for command, names in groups.items():
        path = Path(command) if command and "\n" not in command and len(command) < 4096 else None
        if path is not None and path.is_file():
            console.print(f"\n# {', '.join(names)}: {path}", highlight=False, markup=False)
            console.print(path.read_text(encoding="utf-8"), highlight=False, markup=False, soft_wrap=True)
        else:
            console.print(f"\n# {', '.join(names)}", highlight=False, markup=False)
            console.print(command, highlight=False, markup=False, soft_wrap=True)


def _print_decisions(console: Console, outcome: SubmitOutcome, *, dry_run: bool) -> None:
    from rich.markup import escape
    from rich.table import Table

    jobs = {s.name: s.job_id for s in outcome.submitted}
    verb = "would submit" if dry_run else "submitted"
    table = Table(title=f"{outcome.exp.root} ({outcome.backend}{', dry run' if dry_run else ''})")
    for column in ("run", "was", "action", "why", "job"):
        table.add_column(column)
    for d in outcome.decisions:
        action = verb if d.action == "submit" else "skipped"
        table.add_row(escape(d.run.name), d.state, action, escape(d.why), escape(jobs.get(d.run.name) or "-"))
    console.print(table)
    n_submit = sum(d.action == "submit" for d in outcome.decisions)
    console.print(f"{verb} {n_submit} run(s), skipped {len(outcome.decisions) - n_submit}", highlight=False)


def cancel_runs(exp: ExperimentPaths, names: list[str] | None = None) -> list[str]:
    """Cancel unfinished runs (all, or `names`) through the backend that submitted them, then record
    CANCELLED in their status.json. Returns the runs cancelled."""
    wanted = set(names) if names is not None else {p.name for p in exp.run_dirs()}
    states = current_states(exp, wanted)
    cancellable = (*IN_FLIGHT, RunState.PREEMPTED.value)
    targets = sorted(n for n in wanted if states.get(n) in cancellable)
    _cancel_through_backends(exp, targets)
    for name in targets:
        paths = exp.run(name)
        if read_status(paths).get("state") != RunState.CANCELLED.value:
            update_status(paths, RunState.CANCELLED, "cancelled by user")
    return targets
