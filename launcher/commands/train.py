"""`launcher train RUN_DIR`: what every rank runs (Slurm task, torchrun/DeepSpeed worker, or one process)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "train one run directory on this rank (exit 0 completed, 3 preempted, 1 failed)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run directory: <output_dir>/<experiment>/runs/<run>")


def run(args: argparse.Namespace) -> int:
    from launcher.train.entry import (
        FAILED_EXIT_CODE,
        _failure_reason,
        exit_code_for,
        exit_rank_process,
        train_run,
    )

    try:
        state = train_run(args.run_dir)
    except Exception as exc:
        from launcher.errors import UserError

        if isinstance(exc, UserError):
            raise  # printed by the CLI, exit code 2 (nothing was started)
        print(f"error: training failed: {_failure_reason(exc)}", file=sys.stderr)
        exit_rank_process(FAILED_EXIT_CODE)
    exit_rank_process(exit_code_for(state))
