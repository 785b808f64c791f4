"""`launcher cancel EXP [RUN...]`: cancel runs through their backend and record CANCELLED."""

from __future__ import annotations

import argparse

HELP = "cancel an experiment's runs (all, or the named ones)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", help="the experiment directory (<output_dir>/<experiment>) or its spec")
    parser.add_argument("runs", nargs="*", metavar="RUN", help="run names (default: every unfinished run)")


def run(args: argparse.Namespace) -> int:
    # lazy: every command module is imported to build the parser; this loads when the command runs
    from launcher.submit.status_view import resolve_experiment, resolve_run_names
    from launcher.submit.submission import cancel_runs

    exp = resolve_experiment(args.experiment)
    names = resolve_run_names(exp, list(args.runs)) if args.runs else None
    cancelled = cancel_runs(exp, names)
    if cancelled:
        print(f"cancelled: {', '.join(cancelled)}")
    else:
        print("nothing to cancel: every selected run has already ended")
    return 0
