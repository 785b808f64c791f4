"""`launcher collect` (placeholder until its issue lands)."""

from __future__ import annotations

import argparse

from launcher.errors import UserError

HELP = "collect (not implemented yet)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs="*")


def run(args: argparse.Namespace) -> int:
    raise UserError("launcher collect is not implemented yet")
