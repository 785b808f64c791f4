"""`launcher status EXP`: per run state, attempts, step/total, last loss, tokens/s, ETA."""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING, Any

from launcher.errors import UserError
from launcher.rundir.paths import ExperimentPaths, RunState

if TYPE_CHECKING:
    from launcher.submit.status_row import StatusRow

HELP = (
    "show each run's state, attempts, step/total, loss, tokens/s and ETA (--watch, --json); "
    "exit 1 when a run FAILED"
)
# Scripts can chain on it: `launcher status EXP --watch && launcher collect EXP`.
FAILED_EXIT_CODE = 1


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", help="the experiment directory (<output_dir>/<experiment>) or its spec")
    parser.add_argument("--watch", action="store_true", help="keep a live view until every run has ended")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between refreshes with --watch")
    parser.add_argument("--json", action="store_true", help="print one JSON object per run (a list)")
    parser.add_argument("--wide", action="store_true", help="every column, however wide the terminal")


def exit_code(rows: list[StatusRow]) -> int:
    return FAILED_EXIT_CODE if any(r.state == RunState.FAILED.value for r in rows) else 0


def _refuse_unsubmitted(exp: ExperimentPaths, given: str) -> None:
    """An experiment nothing of which was submitted has no status to show: say so (exit 2) rather
    than print an empty or all-PLANNED table that reads as "all is well"."""
    from launcher.rundir.status import read_status
    from launcher.submit.manifest import load_manifest

    run_dirs = exp.run_dirs()
    if load_manifest(exp).entries or any(
        read_status(paths).get("state") != RunState.PLANNED.value for paths in run_dirs
    ):
        return
    planned = len(run_dirs)
    what = f"{planned} run(s) planned, none submitted" if planned else "nothing planned or submitted"
    raise UserError(f"{exp.root}: {what} yet; submit first: launcher submit {given}")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    # lazy: every command module is imported to build the parser; this loads when the command runs
    from launcher.fit_table import print_fitted
    from launcher.submit.status_view import STATUS_COLUMNS, collect_rows, render_table, resolve_experiment

    exp = resolve_experiment(args.experiment)
    _refuse_unsubmitted(exp, args.experiment)
    if args.json:
        rows = collect_rows(exp)
        print(json.dumps([row.to_json() for row in rows], indent=2))
        return exit_code(rows)
    console = Console()
    title = str(exp.root)

    def ended(rows: list[StatusRow]) -> bool:
        return bool(rows) and all(RunState(r.state).is_final for r in rows)

    if not args.watch or not console.is_terminal:
        # Piped / CI: no live view; --watch waits for the end, then prints the table once.
        rows = collect_rows(exp)
        while args.watch and not ended(rows):
            time.sleep(max(0.5, args.interval))
            rows = collect_rows(exp)
        print_fitted(console, STATUS_COLUMNS, rows, wide=args.wide, title=title)
        return exit_code(rows)

    def table(rows: list[StatusRow]) -> Any:
        return render_table(rows, title=title, width=console.width, wide=args.wide)

    with Live(table(collect_rows(exp)), console=console, auto_refresh=False) as live:
        while True:
            rows = collect_rows(exp)
            live.update(table(rows), refresh=True)
            if ended(rows):
                return exit_code(rows)
            time.sleep(max(0.5, args.interval))
