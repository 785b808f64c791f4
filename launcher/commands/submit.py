"""`launcher submit SPEC`: plan the spec, write run dirs, submit what is not already done."""

from __future__ import annotations

import argparse
from pathlib import Path

from launcher.backends.registry import BACKEND_NAMES
from launcher.commands import add_overrides

HELP = "submit a spec's runs (Slurm arrays, local processes or DeepSpeed's hostfile launcher)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", type=Path, help="the job spec (jobs/*.yaml)")
    add_overrides(parser)
    parser.add_argument(
        "--backend",
        choices=BACKEND_NAMES,
        default=None,
        help="where runs execute (default: the spec's `backend`, else slurm when sbatch is on PATH, "
        "else local)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="write run dirs and print the exact scripts/commands; submit nothing",
    )
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="submit only these runs (names or shell globs)"
    )
    parser.add_argument(
        "--retry-failed", action="store_true", help="also resubmit FAILED/CANCELLED runs (they resume)"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="resubmit the selected runs from scratch, even completed/running/changed ones "
        "(old outputs are moved to <experiment>/replaced/)",
    )
    parser.add_argument(
        "--hostfile", type=Path, help="hostfile for --backend hostfile (overrides the spec's)"
    )


def run(args: argparse.Namespace) -> int:
    # lazy: every command module is imported to build the parser; this loads when the command runs
    from launcher.rundir.paths import RunState
    from launcher.submit.submission import submit_spec

    # `--only lora training.max_steps=4`: --only takes every word after it, but no run name has a '='.
    only = [name for name in args.only or [] if "=" not in name] or None
    overrides = [*args.overrides, *(word for word in args.only or [] if "=" in word)]
    outcome = submit_spec(
        args.spec,
        overrides=overrides,
        backend_name=args.backend,
        dry_run=args.dry_run,
        only=only,
        retry_failed=args.retry_failed,
        force=args.force,
        hostfile=args.hostfile,
    )
    failed = [n for n, s in outcome.final_states.items() if s != RunState.COMPLETED.value]
    return 1 if failed else 0
