"""`launcher validate SPEC`: every problem in a job spec at once, as file:line:col: key: message."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launcher.commands import add_overrides

HELP = "check a job spec: every problem at once, with file:line, the key and the fix (exit 2 if any)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", type=Path, help="the job spec (jobs/*.yaml)")
    add_overrides(parser)
    parser.add_argument(
        "--check-paths",
        action="store_true",
        help="treat data/model paths missing on this machine as errors (as submit does), not warnings",
    )
    parser.add_argument(
        "--no-read-inputs",
        dest="read_inputs",
        action="store_false",
        help="don't read the model, tokenizer and data files that are on this machine (by default every "
        "record is read and rendered, as plan and submit do)",
    )


def run(args: argparse.Namespace) -> int:
    # lazy: every command module is imported to build the parser; this loads when the command runs
    from launcher.plan.planner import load_and_plan

    plan = load_and_plan(
        args.spec, check_paths=args.check_paths, preflight=args.read_inputs, overrides=args.overrides
    )
    runs = plan.runs
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    methods = sorted({r.method.method for r in runs})
    given = f" with {len(args.overrides)} override(s)" if args.overrides else ""
    print(f"{args.spec}{given}: ok ({len(runs)} run{'s' if len(runs) != 1 else ''}: {', '.join(methods)})")
    report = plan.preflight
    if not args.read_inputs:
        print("model, tokenizer and data files not read (--no-read-inputs); plan and submit read them")
    if report is not None:
        remembered = f", {report.cached} unchanged since their last check" if report.cached else ""
        print(
            f"pre-flight: {report.records:,} records read and rendered in {report.seconds:.1f} s{remembered}"
        )
    return 0
