"""`launcher logs EXP RUN [--rank N] [-f]`: print (or follow) one rank's log of a run."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from launcher.errors import UserError

HELP = "print or follow a run's rank log (logs/rank{N}.log, else the scheduler's log)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", help="the experiment directory (<output_dir>/<experiment>) or its spec")
    parser.add_argument("run", help="the run name")
    parser.add_argument("--rank", type=int, default=0, help="which rank's log (default 0)")
    parser.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new lines until the run ends"
    )
    parser.add_argument("-n", "--lines", type=int, default=None, help="only the last N lines")


def find_log(logs_dir: Path, rank: int, scheduler_logs: list[Path] | None = None) -> Path:
    """logs/rank{N}.log (the trainer's); else DeepSpeed's `<time>_rank{N}.log`; else the scheduler's
    stdout for that task (submitit's `<job>_<task>_log.out`); else a UserError listing what exists."""
    exact = logs_dir / f"rank{rank}.log"
    if exact.is_file():
        return exact
    candidates = sorted(logs_dir.glob(f"*_rank{rank}.log")) + [p for p in scheduler_logs or [] if p.is_file()]
    if candidates:
        return max(candidates, key=lambda p: p.stat().st_mtime)
    existing = sorted(p.name for p in logs_dir.glob("*") if p.is_file()) if logs_dir.is_dir() else []
    raise UserError(
        f"no log for rank {rank} in {logs_dir}"
        + (f"; logs there: {', '.join(existing)}" if existing else " (the run has not started yet)")
    )


def run(args: argparse.Namespace) -> int:
    # lazy: every command module is imported to build the parser; this loads when the command runs
    from launcher.rundir.paths import RunState
    from launcher.rundir.status import read_status
    from launcher.submit.manifest import load_manifest
    from launcher.submit.status_view import resolve_experiment, resolve_run_names

    exp = resolve_experiment(args.experiment)
    resolve_run_names(exp, [args.run])
    paths = exp.run(args.run)
    found = load_manifest(exp).by_name(args.run)
    job_id = found[1].job_id if found else None
    # Slurm (submitit) task logs: <experiment>/logs/slurm/<job id>_<task>_log.out (array ids: 12_3).
    scheduler_logs = [exp.logs / "slurm" / f"{job_id}_{args.rank}_log.out"] if job_id else []
    if not args.follow:
        text = find_log(paths.logs, args.rank, scheduler_logs).read_text(encoding="utf-8", errors="replace")
        if args.lines is not None:
            text = "\n".join(text.splitlines()[-args.lines :]) + "\n"
        sys.stdout.write(text)
        return 0
    final = {RunState.COMPLETED.value, RunState.FAILED.value, RunState.CANCELLED.value}
    log_path: Path | None = None
    position = 0
    quiet_since = time.monotonic()
    while True:
        if log_path is None:
            try:
                log_path = find_log(paths.logs, args.rank, scheduler_logs)
            except UserError:
                log_path = None
        if log_path is not None:
            with open(log_path, encoding="utf-8", errors="replace") as handle:
                handle.seek(position)
                chunk = handle.read()
                position = handle.tell()
            if chunk:
                sys.stdout.write(chunk)
                sys.stdout.flush()
                quiet_since = time.monotonic()
        # Stop once the run has ended and its log has been quiet for a moment (last lines flushed).
        if read_status(paths).get("state") in final and time.monotonic() - quiet_since > 2.0:
            return 0
        time.sleep(0.5)
