"""`launcher train RUN_DIR`: what every rank runs (Slurm task, torchrun/DeepSpeed worker, or one process)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "train one run directory on this rank (exit 0 completed, 3 preempted, 1 failed)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run directory: <output_dir>/<experiment>/runs/<run>")


def run(args: argparse.Namespace) -> int:
    from launcher.train.entry import FAILED_EXIT_CODE, _failure_reason, exit_code_for, train_run

    try:
        state = train_run(args.run_dir)
    except Exception as exc:
        from launcher.errors import UserError

        if isinstance(exc, UserError):
            raise
        print(f"error: training failed: {_failure_reason(exc)}", file=sys.stderr)
        return FAILED_EXIT_CODE
    return exit_code_for(state)
