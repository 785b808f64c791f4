"""`launcher collect EXP [EXP ...]`: the comparison table (+ summary.md/.csv/.json, loss.png, memory.png)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = (
    "the comparison table of one or more experiments: loss, BLEU with significance, memory; "
    "writes summaries and plots"
)

FORMATS = ("table", "md", "csv", "json")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "experiments",
        nargs="+",
        metavar="EXP",
        help="experiment directory (<output_dir>/<experiment>) or its spec; several give one joint table",
    )
    parser.add_argument(
        "--baseline",
        metavar="NAME",
        help="run to compare against (default: the spec's baseline, else the first run); EXP/NAME across "
        "experiments",
    )
    parser.add_argument(
        "--format", choices=FORMATS, default="table", help="what to print (files are always written)"
    )
    parser.add_argument(
        "--json",
        dest="format",
        action="store_const",
        const="json",
        help="print the rows as JSON (same as --format json; as plan --json and status --json)",
    )
    parser.add_argument(
        "--sort",
        metavar="KEY",
        help="sort the printed rows by a summary.json key, e.g. --sort bleu, or --sort=-bleu for descending",
    )
    parser.add_argument("--wide", action="store_true", help="every column, however wide the terminal")
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="with several experiments: where the joint summaries and plots go "
        "(default: compare_<EXP_A>+<EXP_B> beside the first)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; write no summary files or plots")


def run(args: argparse.Namespace) -> int:
    # lazy: every command module is imported to build the parser; this loads when the command runs
    from launcher.backends.slurm_queries import slurm_elapsed_by_run_dir
    from launcher.collect import collect_experiments, print_summary, sort_rows
    from launcher.collect.table import render_csv, render_json, render_markdown
    from launcher.submit.status_view import resolve_experiment

    # A spec names its experiment dir as for status/logs/cancel; a directory keeps collect's own errors.
    roots = [resolve_experiment(t).root if Path(t).is_file() else Path(t) for t in args.experiments]
    collection = collect_experiments(
        roots,
        args.baseline,
        write=not args.no_write,
        out_dir=args.out,
        elapsed_s=slurm_elapsed_by_run_dir(roots),  # Slurm's elapsed time where sacct has it
    )
    rows = sort_rows(collection.rows, args.sort) if args.sort else collection.rows
    if args.format == "table":
        print_summary(collection, rows=rows, wide=args.wide)
        if not args.no_write:
            print(
                f"wrote {collection.exp.summary_md}, .csv, .json, {collection.exp.loss_png.name}, "
                f"{collection.exp.memory_png.name}"
            )
    else:
        render = {"md": render_markdown, "csv": render_csv, "json": render_json}[args.format]
        sys.stdout.write(render(collection, rows))
    return 0
