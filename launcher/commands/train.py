"""`launcher train RUN_DIR`: what every rank runs (Slurm task, torchrun/DeepSpeed worker, or one process)."""

from __future__ import annotations

import argparse
from pathlib import Path

# = launcher.train.entry.EXIT_CODES (not imported: that module pulls in torch, and --help stays fast).
HELP = (
    "train one run directory on this rank (exit 0 completed, 1 failed (recorded in status.json), "
    "2 bad input (nothing started), 3 preempted (checkpoint saved))"
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run directory: <output_dir>/<experiment>/runs/<run>")


def run(args: argparse.Namespace) -> int:
    # lazy: every command module is imported to build the parser; this loads when the command runs
    from launcher.train.entry import exit_rank_process, main

    exit_rank_process(main([str(args.run_dir)]))
