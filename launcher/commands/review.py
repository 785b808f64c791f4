"""`launcher review export|import`: blind A/B human review of two runs' outputs."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "blind A/B human review: export a sheet of two runs' outputs, import the verdicts"


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = sub.add_parser(
        "export", help="write a blind sheet (CSV + self-contained HTML) for RUN_A vs RUN_B"
    )
    export.add_argument("experiment", type=Path, metavar="EXP", help="experiment directory")
    export.add_argument("run_a", metavar="RUN_A")
    export.add_argument("run_b", metavar="RUN_B")
    export.add_argument("--out", type=Path, metavar="DIR", help="where the sheet goes (default: EXP/review/)")
    export.add_argument("--seed", type=int, default=0, help="seed of the per-row order (default 0)")
    imp = sub.add_parser("import", help="read a filled sheet; `launcher collect` then shows win/tie/loss")
    imp.add_argument("experiment", type=Path, metavar="EXP", help="experiment directory")
    imp.add_argument("sheet", type=Path, metavar="SHEET", help="the filled CSV")


def run(args: argparse.Namespace) -> int:
    # lazy: every command module is imported to build the parser; this loads when the command runs
    from launcher.collect.review import export_review, import_review

    if args.action == "export":
        sheet = export_review(args.experiment, args.run_a, args.run_b, out_dir=args.out, seed=args.seed)
        print(f"wrote {sheet.n_items} items: {sheet.csv_path} and {sheet.html_path}")
        print(f"the key (which output is which run) stays in {sheet.key_path}; do not send it to reviewers")
        return 0
    counts = import_review(args.experiment, args.sheet)
    print(
        f"{counts.run_a} wins {counts.wins_a}, ties {counts.ties}, {counts.run_b} wins {counts.wins_b} "
        f"(unrated {counts.unrated}; sign test p={counts.sign_test_p:.3f}) -> {counts.path}"
    )
    return 0
