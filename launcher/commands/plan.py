"""`launcher plan SPEC`: the expanded runs with nodes x GPUs, ZeRO, offload and estimated memory."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from launcher.commands import add_overrides
from launcher.fit_table import ALWAYS, Column, print_fitted

HELP = "show the runs a spec expands to, their resources and estimated GPU memory (--write: run dirs)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", type=Path, help="the job spec (jobs/*.yaml)")
    add_overrides(parser)
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per run instead of the table"
    )
    parser.add_argument("--wide", action="store_true", help="every column, however wide the terminal")
    parser.add_argument(
        "--write", action="store_true", help="also write the run directories (run.yaml, ds_config.json)"
    )
    parser.add_argument(
        "--force", action="store_true", help="with --write: replace run dirs that hold a different config"
    )


def _swept(row: dict[str, Any]) -> str:
    # lazy: every command module is imported to build the parser; this loads when the command runs
    from launcher.plan.sweep import ABBREVIATIONS

    def label(key: str) -> str:
        return ABBREVIATIONS.get(key) or key.rsplit(".", 1)[-1]

    return " ".join(f"{label(k)}={v}" for k, v in row["swept"].items()) or "-"


def _offload(row: dict[str, Any]) -> str:
    parts = [name for name, on in (("opt", row["offload_optimizer"]), ("param", row["offload_param"])) if on]
    return "+".join(parts) or "-"


def _method(row: dict[str, Any]) -> str:
    targets = row.get("lora_targets")  # LoRA: the modules it wraps, resolved on the model
    return row["method_label"] + (f"\non {' '.join(targets)}" if targets else "")


def _batch(row: dict[str, Any]) -> str:
    micro, accum = row["micro_batch_size"], row["gradient_accumulation_steps"]
    return f"{micro}x{accum}x{row['world_size']}={row['train_batch_size']}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _eval_set(row: dict[str, Any]) -> str:
    text = row.get("eval_set") or "-"
    overlap = row.get("eval_overlap")
    return f"{text}\n{overlap} in train!" if overlap else text


# Priorities pick what a narrow terminal shows (launcher.fit_table): the run, whether it fits, the
# estimate and the layout first.
PLAN_COLUMNS: tuple[Column[dict[str, Any]], ...] = (
    Column("run", lambda r: r["name"], priority=ALWAYS),
    Column("method", _method, priority=3, wrap=True),
    Column("swept", _swept, priority=5, wrap=True),
    Column("nodes x GPUs", lambda r: f"{r['nodes']} x {r['gpus_per_node']}", right=True, priority=1),
    Column("ZeRO", lambda r: str(r["zero_stage"]), right=True, priority=1),
    Column("offload", _offload, priority=2),
    Column("ckpt", lambda r: "on" if r["gradient_checkpointing"] else "-", priority=3),
    Column("batch", _batch, right=True, priority=2),
    Column("est GiB/GPU", lambda r: f"{r['est_mem_gib']:.1f}", right=True, priority=1),
    Column("smi GiB", lambda r: f"{r['est_reserved_gib'] or 0:.1f}", right=True, priority=4),
    Column("fits", lambda r: "yes" if r["fits"] else "NO", priority=ALWAYS),
    # what the model sees (launcher.plan.data_facts); "-" where the data or tokenizer is elsewhere
    Column("template", lambda r: r["template_used"], priority=4, wrap=True),
    Column("trunc", lambda r: _share(r.get("truncated_frac")), right=True, priority=5),
    Column("query cut", lambda r: _share(r.get("query_cut_frac")), right=True, priority=5),
    Column("eval set", _eval_set, priority=6, wrap=True),
)


def print_table(rows: list[dict[str, Any]], title: str, gpu_mem_gib: float, *, wide: bool = False) -> None:
    from rich.console import Console

    print_fitted(
        Console(),
        PLAN_COLUMNS,
        rows,
        wide=wide,
        title=title,
        caption=f"est GiB/GPU: allocated tensors; smi GiB: reserved + CUDA context (nvidia-smi), "
        f"checked against cluster.gpu_mem_gib = {gpu_mem_gib:g}; trunc: training examples truncated, "
        "query cut: their current query cut too (data.query_truncation)",
    )


def run(args: argparse.Namespace) -> int:
    # lazy: every command module is imported to build the parser; this loads when the command runs
    from launcher.plan.planner import load_and_plan, write_run_dirs

    plan = load_and_plan(args.spec, preflight=True, overrides=args.overrides)
    spec = plan.spec
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    rows = plan.rows()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(
            rows,
            f"{spec.experiment}: {len(rows)} runs -> {plan.exp.root}",
            spec.cluster.gpu_mem_gib,
            wide=args.wide,
        )
    if args.write:
        exp = write_run_dirs(plan, force=args.force)
        print(
            f"wrote {len(plan.runs)} run directories under {exp.runs_dir}",
            file=sys.stderr if args.json else sys.stdout,
        )
    return 0
