"""`launcher plan SPEC`: the expanded runs with nodes x GPUs, ZeRO, offload and estimated memory."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HELP = "show the runs a spec expands to, their resources and estimated GPU memory (--write: run dirs)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", type=Path, help="the job spec (jobs/*.yaml)")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per run instead of the table"
    )
    parser.add_argument(
        "--write", action="store_true", help="also write the run directories (run.yaml, ds_config.json)"
    )
    parser.add_argument(
        "--force", action="store_true", help="with --write: replace run dirs that hold a different config"
    )


def _swept(row: dict[str, Any]) -> str:
    from launcher.sweep import ABBREVIATIONS

    def label(key: str) -> str:
        return ABBREVIATIONS.get(key) or key.rsplit(".", 1)[-1]

    return " ".join(f"{label(k)}={v}" for k, v in row["swept"].items()) or "-"


def _offload(row: dict[str, Any]) -> str:
    parts = [name for name, on in (("opt", row["offload_optimizer"]), ("param", row["offload_param"])) if on]
    return "+".join(parts) or "-"


def print_table(rows: list[dict[str, Any]], title: str, gpu_mem_gib: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=f"est. GiB/GPU vs cluster.gpu_mem_gib = {gpu_mem_gib:g}")
    for column, justify in (
        ("run", "left"),
        ("method", "left"),
        ("swept", "left"),
        ("nodes x GPUs", "right"),
        ("ZeRO", "right"),
        ("offload", "left"),
        ("ckpt", "left"),
        ("batch", "right"),
        ("est GiB/GPU", "right"),
        ("fits", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        table.add_row(
            row["name"],
            row["method_label"],
            _swept(row),
            f"{row['nodes']} x {row['gpus_per_node']}",
            str(row["zero_stage"]),
            _offload(row),
            "on" if row["gradient_checkpointing"] else "-",
            f"{row['micro_batch_size']}x{row['gradient_accumulation_steps']}x{row['world_size']}"
            f"={row['train_batch_size']}",
            f"{row['est_mem_gib']:.1f}",
            "yes" if row["fits"] else "NO",
        )
    # Wide enough for the whole table when piped (rich assumes 80 columns without a terminal).
    console = Console() if sys.stdout.isatty() else Console(width=160)
    console.print(table)


def run(args: argparse.Namespace) -> int:
    from launcher.plan import build_plan, experiment_paths, plan_row, write_run_dirs
    from launcher.spec import load_spec

    spec = load_spec(args.spec)
    runs = build_plan(spec, args.spec)
    for warning in spec.spec_warnings:
        print(f"warning: {warning}", file=sys.stderr)
    rows = [plan_row(r) for r in runs]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(
            rows,
            f"{spec.experiment}: {len(rows)} runs -> {experiment_paths(spec).root}",
            spec.cluster.gpu_mem_gib,
        )
    if args.write:
        exp = write_run_dirs(spec, args.spec, runs, force=args.force)
        print(
            f"wrote {len(runs)} run directories under {exp.runs_dir}",
            file=sys.stderr if args.json else sys.stdout,
        )
    return 0
