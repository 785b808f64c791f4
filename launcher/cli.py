"""The `launcher` command line: one parser, one module per subcommand (launcher/commands/<name>.py).

Each command module exposes ``HELP`` (one line), ``configure(parser)`` and ``run(args) -> int``, and
imports heavy libraries (torch, deepspeed) inside ``run`` so ``launcher --help`` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import signal
import sys
from collections.abc import Sequence

from launcher import __version__
from launcher.errors import DiskFullError, UserError

# A reader that goes away (`launcher status --json | head`) ends the command as SIGPIPE would.
BROKEN_PIPE_EXIT_CODE = 128 + int(signal.SIGPIPE)

# Order is the order shown in --help: the user's path through an experiment.
COMMANDS: tuple[str, ...] = (
    "validate",
    "plan",
    "submit",
    "status",
    "logs",
    "cancel",
    "collect",
    "review",
    "train",
    "hostfile",
    "tiny",
    "convert",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launcher",
        description=(
            "Controlled LLM fine-tuning experiments: YAML spec -> Slurm/local runs -> one comparison table."
        ),
    )
    parser.add_argument("--version", action="version", version=f"launcher {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"launcher.commands.{name}")
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.configure(sub)
        sub.set_defaults(_run=module.run)
    return parser


def _closed_pipe_raises() -> None:
    """rich's Console ends the process with exit 1 when stdout's reader goes away, which would read as
    "a run FAILED" from `status`. rich documents on_broken_pipe as the hook to change that; here it
    raises, so every command ends through main's one BrokenPipeError exit."""
    from rich.console import Console

    def on_broken_pipe(self: Console) -> None:
        raise BrokenPipeError(errno.EPIPE, "the reader of stdout closed the pipe")

    Console.on_broken_pipe = on_broken_pipe  # type: ignore[method-assign]


def _take_late_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> None:
    """KEY=VALUE overrides anywhere on the command line: argparse gives the positional list only the
    ones before the first option (`submit spec.yaml --backend local training.max_steps=2` would
    otherwise be "unrecognized arguments"). Anything else left over is still an error (exit 2)."""
    if not extra:
        return
    late = [arg for arg in extra if "=" in arg and not arg.startswith("-")]
    if len(late) != len(extra) or not hasattr(args, "overrides"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = [*(args.overrides or []), *late]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    _take_late_overrides(parser, args, extra)
    _closed_pipe_raises()
    try:
        code = int(args._run(args) or 0)
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at interpreter exit
        return code
    except BrokenPipeError:
        # Python's documented recipe: point stdout at devnull so the final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE_EXIT_CODE
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except DiskFullError as exc:  # e.g. writing run dirs: the file it could not write, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
