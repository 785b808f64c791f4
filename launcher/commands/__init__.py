"""One module per `launcher` subcommand: HELP, configure(parser), run(args) -> int."""

from __future__ import annotations

import argparse


def add_overrides(parser: argparse.ArgumentParser) -> None:
    """The KEY=VALUE arguments after SPEC (launcher.spec.overrides) of validate, plan and submit."""
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="set a spec key for this command, validated like the file, e.g. training.learning_rate=1e-4, "
        "methods.lora.r=16 (a method by its name), sweep.grid.training.seed=[1,2]; values are YAML",
    )
