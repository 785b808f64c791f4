"""`launcher status EXP`: per run state, attempts, step/total, last loss, tokens/s, ETA."""

from __future__ import annotations

import argparse
import json
import time

HELP = "show each run's state, attempts, step/total, loss, tokens/s and ETA (--watch, --json)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", help="the experiment directory (<output_dir>/<experiment>) or its spec")
    parser.add_argument("--watch", action="store_true", help="keep a live view until every run has ended")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between refreshes with --watch")
    parser.add_argument("--json", action="store_true", help="print one JSON object per run (a list)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from launcher.rundir import RunState
    from launcher.status import collect_rows, render_table, resolve_experiment

    exp = resolve_experiment(args.experiment)
    if args.json:
        print(json.dumps([row.to_json() for row in collect_rows(exp)], indent=2))
        return 0
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # piped / CI: don't squeeze the table into 80 columns
    title = str(exp.root)
    if not args.watch:
        console.print(render_table(collect_rows(exp), title=title))
        return 0
    final = {RunState.COMPLETED.value, RunState.FAILED.value, RunState.CANCELLED.value}
    with Live(render_table(collect_rows(exp), title=title), console=console, auto_refresh=False) as live:
        while True:
            rows = collect_rows(exp)
            live.update(render_table(rows, title=title), refresh=True)
            if rows and all(r.state in final for r in rows):
                return 0
            time.sleep(max(0.5, args.interval))
