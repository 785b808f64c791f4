"""`launcher collect EXP`: the comparison table (+ summary.md/.csv/.json, loss.png, memory.png)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = (
    "the comparison table of an experiment: loss, BLEU with significance, memory; writes summaries and plots"
)

FORMATS = ("table", "md", "csv", "json")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "experiment", type=Path, metavar="EXP", help="experiment directory (<output_dir>/<experiment>)"
    )
    parser.add_argument(
        "--baseline",
        metavar="NAME",
        help="run to compare against (default: spec's baseline, else the first run)",
    )
    parser.add_argument(
        "--format", choices=FORMATS, default="table", help="what to print (files are always written)"
    )
    parser.add_argument(
        "--sort",
        metavar="KEY",
        help="sort the printed rows by a summary.json key, e.g. --sort bleu, or --sort=-bleu for descending",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; write no summary files or plots")


def run(args: argparse.Namespace) -> int:
    from launcher.collect import collect_experiment, print_summary, sort_rows
    from launcher.collect.table import render_csv, render_json, render_markdown

    collection = collect_experiment(args.experiment, args.baseline, write=not args.no_write)
    rows = sort_rows(collection.rows, args.sort) if args.sort else collection.rows
    if args.format == "table":
        print_summary(collection, rows=rows)
        if not args.no_write:
            print(
                f"wrote {collection.exp.summary_md}, .csv, .json, {collection.exp.loss_png.name}, "
                f"{collection.exp.memory_png.name}"
            )
    else:
        render = {"md": render_markdown, "csv": render_csv, "json": render_json}[args.format]
        sys.stdout.write(render(collection, rows))
    return 0
