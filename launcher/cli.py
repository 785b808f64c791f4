"""The `launcher` command line: one parser, one module per subcommand (launcher/commands/<name>.py).

Each command module exposes ``HELP`` (one line), ``configure(parser)`` and ``run(args) -> int``, and
imports heavy libraries (torch, deepspeed) inside ``run`` so ``launcher --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from launcher.errors import UserError

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
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launcher",
        description=(
            "Controlled LLM fine-tuning experiments: YAML spec -> Slurm/local runs -> one comparison table."
        ),
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"launcher.commands.{name}")
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.configure(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
