"""The comparison table: cell formatting shared by the rich table, summary.md and summary.csv/json."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from launcher.collect.groups import SeedGroup
from launcher.collect.hyperparams import fmt_hyperparameters
from launcher.collect.notes import degenerate_bootstrap, table_notes
from launcher.collect.rows import SUMMARY_KEYS, RunRow
from launcher.fit_table import ALWAYS, Column, print_fitted
from launcher.rundir.paths import to_json, write_text_atomic

if TYPE_CHECKING:
    from rich.console import Console

    from launcher.collect.collected import Collection

SIGNIFICANCE_LEVEL = 0.05


def fmt_num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def fmt_delta(row: RunRow) -> str:
    if row.get("baseline"):
        return "baseline"
    delta = row.get("bleu_delta")
    if delta is None:
        return "n/a" if row.get("no_delta_reason") else "-"
    return f"{delta:+.2f}" + ("*" if _significant(row) else "")


def fmt_ci(row: RunRow) -> str:
    ci = row.get("bleu_delta_ci")
    if row.get("baseline") or not (isinstance(ci, list | tuple) and len(ci) == 2 and None not in ci):
        return "-"
    return f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def _p_values(row: RunRow) -> tuple[Any, Any]:
    """The p-values that decide *: Holm-adjusted over the runs compared (the raw ones for one run)."""
    p_bs = row.get("bleu_p_value_holm")
    if p_bs is None:
        return row.get("bleu_p_value"), row.get("bleu_p_value_ar")
    return p_bs, row.get("bleu_p_value_ar_holm")


def _significant(row: RunRow) -> bool:
    p_bs, p_ar = _p_values(row)
    if degenerate_bootstrap(row):
        return False
    return p_bs is not None and p_bs < SIGNIFICANCE_LEVEL and (p_ar is None or p_ar < SIGNIFICANCE_LEVEL)


def fmt_p(row: RunRow) -> str:
    p_bs, p_ar = _p_values(row)
    if p_bs is None:
        return "-"
    star = "*" if _significant(row) else ""
    text = f"{p_bs:.3f}"
    if p_ar is not None:
        text += f"/{p_ar:.3f}"
    return text + star


def fmt_mem(row: RunRow) -> str:
    mem = row.get("peak_mem_gib")
    if mem is None:
        return "-"
    kind = {"cuda_allocated": "GPU", "cpu_rss": "CPU RSS"}.get(
        row.get("peak_mem_kind") or "", row.get("peak_mem_kind") or "?"
    )
    return f"{mem:.2f} ({kind})"


def fmt_layout(row: RunRow) -> str:
    nodes, gpus = row.get("nodes"), row.get("gpus_per_node")
    if nodes is None and gpus is None:
        return "-"
    return f"{nodes if nodes is not None else '?'}x{gpus if gpus is not None else '?'}"


def fmt_zero(row: RunRow) -> str:
    stage = row.get("zero_stage")
    if stage is None:
        return "-"
    parts = [str(stage)]
    if row.get("offload_optimizer"):
        parts.append("opt")
    if row.get("offload_param"):
        parts.append("param")
    text = parts[0] + (" off:" + "+".join(parts[1:]) if len(parts) > 1 else "")
    if row.get("gradient_checkpointing"):
        text += " gc"
    return text


def fmt_frac(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, int | float) else "-"


def fmt_rouge(row: RunRow) -> str:
    values = [row.get(k) for k in ("rouge1", "rouge2", "rougeL")]
    if all(v is None for v in values):
        return "-"
    return "/".join(fmt_num(v, 1) for v in values)


def fmt_review(row: RunRow) -> str:
    entries = row.get("review") or []
    return "; ".join(f"vs {e['vs']}: {e['win']}/{e['tie']}/{e['loss']}" for e in entries) or "-"


def fmt_note(row: RunRow) -> str:
    reason = row.get("reason")
    note = str(reason) if reason and row.get("state") != "COMPLETED" else ""
    if row.get("no_delta_reason"):
        note += ("; " if note else "") + f"no ΔBLEU: {row.get('no_delta_reason')}"
    if row.warnings:
        note += ("; " if note else "") + f"{len(row.warnings)} warning(s)"
    return note or ""


def _state_style(row: RunRow) -> str:
    return _STATE_STYLE.get(row.get("state") or "", "")


# One list for the terminal table and summary.md. Priorities pick the columns a narrow terminal shows
# (launcher.fit_table): the run and its state, then eval loss, BLEU, ΔBLEU (* when significant) and
# peak memory.
COLUMNS: tuple[Column[RunRow], ...] = (
    Column("run", lambda r: r.name, priority=ALWAYS),
    Column("method", lambda r: r.get("method") or "-", priority=5),
    # What differs between the runs shown (swept or not, from run.yaml): summary.json keeps "swept" too.
    Column("hyperparameters", lambda r: fmt_hyperparameters(r.get("hyperparameters")), priority=4, wrap=True),
    Column("state", lambda r: r.get("state") or "-", priority=ALWAYS, style=_state_style),
    Column("steps", lambda r: fmt_num(r.get("steps")), right=True, priority=6),
    Column("loss", lambda r: fmt_num(r.get("train_loss_final")), right=True, priority=2),
    Column("min loss", lambda r: fmt_num(r.get("train_loss_min")), right=True, priority=9),
    Column("eval loss", lambda r: fmt_num(r.get("eval_loss")), right=True, priority=1),
    Column("BLEU", lambda r: fmt_num(r.get("bleu"), 2), right=True, priority=1),
    Column("chrF", lambda r: fmt_num(r.get("chrf"), 2), right=True, priority=8),
    Column("ΔBLEU", fmt_delta, right=True, priority=1),
    Column("95% CI", fmt_ci, right=True, priority=3),
    Column("p bs/ar", fmt_p, right=True, priority=3),
    Column("peak mem GiB", fmt_mem, right=True, priority=1),
    Column("nodes x GPUs", fmt_layout, right=True, priority=7),
    Column("ZeRO", fmt_zero, priority=7),
    Column(
        "tok/s",
        lambda r: fmt_num(r.get("tokens_per_s"), 0) if r.get("tokens_per_s") is not None else "-",
        right=True,
        priority=6,
    ),
    # Real time of all attempts, queue excluded; the training loop's own time is "train".
    Column("wall", lambda r: fmt_duration(r.get("wall_time_s")), right=True, priority=6),
    Column("train", lambda r: fmt_duration(r.get("train_time_s")), right=True, priority=10),
    Column("GPU h", lambda r: fmt_num(r.get("gpu_hours"), 2), right=True, priority=6),
    Column("start-up", lambda r: fmt_duration(r.get("startup_s")), right=True, priority=10),
    Column("trunc", lambda r: fmt_frac(r.get("truncated_frac")), right=True, priority=9),
    Column("ROUGE-1/2/L", fmt_rouge, right=True, priority=8),
)
COST_COLUMN: Column[RunRow] = Column("cost", lambda r: fmt_num(r.get("cost"), 2), right=True, priority=5)
REVIEW_COLUMN = Column("review W/T/L", fmt_review, priority=5, wrap=True)
NOTE_COLUMN = Column("reason / notes", fmt_note, priority=4, wrap=True)


def columns_for(collection: Collection) -> list[Column[RunRow]]:
    cols = list(COLUMNS)
    if collection.gpu_hour_price is not None:
        cols.insert(cols.index(next(c for c in cols if c.header == "GPU h")) + 1, COST_COLUMN)
    if collection.reviews:
        cols.append(REVIEW_COLUMN)
    if any(fmt_note(row) for row in collection.rows):
        cols.append(NOTE_COLUMN)
    return cols


def _mean_std(group: SeedGroup, key: str, digits: int) -> str:
    mean, std = group.mean.get(key), group.std.get(key)
    if mean is None:
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


GROUP_COLUMNS: tuple[tuple[str, Callable[[SeedGroup], str]], ...] = (
    ("configuration", lambda g: g.key),
    ("seeds", lambda g: ", ".join(str(s) for s in g.seeds)),
    ("loss", lambda g: _mean_std(g, "train_loss_final", 3)),
    ("eval loss", lambda g: _mean_std(g, "eval_loss", 3)),
    ("BLEU", lambda g: _mean_std(g, "bleu", 2)),
    ("chrF", lambda g: _mean_std(g, "chrf", 2)),
    ("ΔBLEU", lambda g: _mean_std(g, "bleu_delta", 2)),
    ("peak mem GiB", lambda g: _mean_std(g, "peak_mem_gib", 2)),
)

_STATE_STYLE = {
    "COMPLETED": "green",
    "RUNNING": "cyan",
    "PENDING": "yellow",
    "PLANNED": "dim",
    "PREEMPTED": "magenta",
    "FAILED": "bold red",
    "CANCELLED": "red",
}


def legend(collection: Collection) -> str:
    """The footnote: what ΔBLEU, its CI, the p-values and * mean for this table."""
    many = collection.n_comparisons > 1
    p_text = (
        "p bs/ar: paired bootstrap / approximate randomization p-values, Holm-adjusted over the "
        f"{collection.n_comparisons} runs compared with the baseline (raw ones in summary.json); "
        "* (also on ΔBLEU) = both adjusted p < 0.05"
        if many
        else "p bs/ar: paired bootstrap / approximate randomization p-values; * (also on ΔBLEU) = both < 0.05"
    )
    return (
        "ΔBLEU: run minus baseline on the same examples (sacrebleu); 95% CI from paired bootstrap "
        f"resampling. {p_text}. Without *, the runs' BLEU cannot be told apart on this eval set."
    )


def print_summary(
    collection: Collection,
    console: Console | None = None,
    rows: list[RunRow] | None = None,
    *,
    wide: bool = False,
) -> None:
    """The rich table fitted to the terminal (``wide``: every column), then seed groups, human review
    counts and warnings."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    rows = collection.rows if rows is None else rows
    print_fitted(
        console,
        columns_for(collection),
        rows,
        wide=wide,
        title=f"{collection.exp.root.name}: {len(rows)} run(s), baseline {collection.baseline or '-'}",
        row_style=lambda r: "bold" if r.get("baseline") else None,
    )
    console.print(f"[dim]{escape(legend(collection))}[/]")
    notes = table_notes(collection)
    if notes:
        console.print("Notes:")
        for note in notes:
            console.print(f"  - {escape(note)}", highlight=False)
    if collection.groups:
        groups = Table(title="Seed groups: mean ± std over seeds", header_style="bold")
        for header, _ in GROUP_COLUMNS:
            groups.add_column(header, overflow="fold")
        for group in collection.groups:
            groups.add_row(*(fmt(group) for _, fmt in GROUP_COLUMNS))
        console.print(groups)
    for review in collection.reviews:
        console.print(
            f"Human review {review.run_a} vs {review.run_b}: {review.run_a} wins {review.wins_a}, "
            f"ties {review.ties}, {review.run_b} wins {review.wins_b} (unrated {review.unrated}; "
            f"sign test p={review.sign_test_p:.3f})"
        )
    warnings = collection.all_warnings()
    if warnings:
        console.print(f"[yellow]{len(warnings)} warning(s):[/]")
        for line in warnings[:50]:
            console.print(f"  [yellow]{escape(line)}[/]", highlight=False)
        if len(warnings) > 50:
            console.print(f"  ... {len(warnings) - 50} more in summary.json (key 'warnings')")


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(collection: Collection, rows: list[RunRow] | None = None) -> str:
    rows = collection.rows if rows is None else rows
    cols = columns_for(collection)
    lines = [
        f"# {collection.exp.root.name}",
        "",
        f"Baseline: **{collection.baseline or '-'}**; BLEU tokenize: `{collection.tokenize}`.",
        "",
        "| " + " | ".join(c.header for c in cols) + " |",
        "|" + "|".join("---:" if c.right else "---" for c in cols) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_md_cell(c.cell(row)) for c in cols) + " |")
    lines += ["", legend(collection), ""]
    notes = table_notes(collection)
    if notes:
        lines += ["Notes:", ""] + [f"- {_md_cell(n)}" for n in notes] + [""]
    if collection.groups:
        lines += ["## Seed groups (mean ± std)", ""]
        lines.append("| " + " | ".join(h for h, _ in GROUP_COLUMNS) + " |")
        lines.append("|" + "|".join("---" for _ in GROUP_COLUMNS) + "|")
        for group in collection.groups:
            lines.append("| " + " | ".join(_md_cell(fmt(group)) for _, fmt in GROUP_COLUMNS) + " |")
        lines.append("")
    if collection.reviews:
        lines += [
            "## Human review (blind A/B)",
            "",
            "| A | B | A wins | ties | B wins | unrated | sign test p |",
        ]
        lines.append("|---|---|---:|---:|---:|---:|---:|")
        for r in collection.reviews:
            cells = [r.run_a, r.run_b, r.wins_a, r.ties, r.wins_b, r.unrated, f"{r.sign_test_p:.3f}"]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines.append("")
    warnings = collection.all_warnings()
    if warnings:
        lines += ["## Warnings", ""] + [f"- {_md_cell(w)}" for w in warnings] + [""]
    return "\n".join(lines)


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return value


def render_csv(collection: Collection, rows: list[RunRow] | None = None) -> str:
    """Raw values (not rounded), one row per run; the CI as two columns for spreadsheets."""
    rows = collection.rows if rows is None else rows
    keys = [k for k in SUMMARY_KEYS if k not in ("bleu_delta_ci", "group", "review", "warnings")]
    header = [*keys, "bleu_delta_ci_low", "bleu_delta_ci_high", "group", "review", "warnings"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        ci = row.get("bleu_delta_ci") or [None, None]
        group = row.get("group")
        writer.writerow(
            [_csv_value(row.get(k)) for k in keys]
            + [
                _csv_value(ci[0]),
                _csv_value(ci[1]),
                group["key"] if isinstance(group, dict) else "",
                _csv_value(row.get("review")),
                " | ".join(row.warnings),
            ]
        )
    return buffer.getvalue()


def render_json(collection: Collection, rows: list[RunRow] | None = None) -> str:
    """A JSON list, one run object per line (readable and diffable; the C encoder keeps 10,000 rows fast)."""
    rows = collection.rows if rows is None else rows
    lines = []
    for row in rows:
        obj = row.to_json()
        try:
            lines.append(json.dumps(obj, ensure_ascii=False, allow_nan=False))
        except (TypeError, ValueError):  # NaN in a nested value, or a non-JSON type: the careful encoder
            lines.append(to_json(obj, indent=None))
    return "[\n" + ",\n".join(lines) + "\n]\n" if lines else "[]\n"


def write_summaries(collection: Collection) -> None:
    exp = collection.exp
    write_text_atomic(exp.summary_json, render_json(collection))
    write_text_atomic(exp.summary_csv, render_csv(collection))
    write_text_atomic(exp.summary_md, render_markdown(collection) + "\n")
