"""`launcher hostfile`: write a DeepSpeed hostfile for the current Slurm allocation."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from launcher.errors import UserError

HELP = "write a DeepSpeed hostfile ('host slots=N') from SLURM_JOB_NODELIST, or check one (--check)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", type=Path, help="file to write (default: print to stdout)")
    parser.add_argument("--slots", type=int, help="slots per host (default: SLURM_GPUS_ON_NODE)")
    parser.add_argument(
        "--check", type=Path, metavar="HOSTFILE", help="validate an existing hostfile instead"
    )


def run(args: argparse.Namespace) -> int:
    # lazy: every command module is imported to build the parser; this loads when the command runs
    from launcher.backends.hostfile import format_hostfile, hostfile_from_slurm_env, parse_hostfile
    from launcher.rundir.paths import write_text_atomic

    if args.check is not None:
        hosts = parse_hostfile(args.check)
        print(f"{args.check}: {len(hosts)} host(s), {sum(h.slots for h in hosts)} slot(s)")
        return 0
    if args.slots is not None and args.slots < 1:
        raise UserError(f"--slots {args.slots}: must be >= 1")
    text = format_hostfile(hostfile_from_slurm_env(dict(os.environ), args.slots))
    if args.output is None:
        print(text, end="")
    else:
        write_text_atomic(args.output, text)
        print(f"wrote {args.output}")
    return 0
