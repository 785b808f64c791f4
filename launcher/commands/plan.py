"""`launcher plan` (placeholder until its issue lands)."""

from __future__ import annotations

import argparse

from launcher.errors import UserError

HELP = "plan (not implemented yet)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs="*")


def run(args: argparse.Namespace) -> int:
    raise UserError("launcher plan is not implemented yet")
