"""loss.png (train loss vs step, eval loss marked) and memory.png (peak memory per run vs GPU size).

matplotlib with the Agg backend (no display on a cluster node). With very many runs the plots show a
capped, stated subset: a chart with 10,000 lines or bars informs nobody and costs seconds.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.collect.rows import RunRow
from launcher.rundir.paths import RunState, file_fingerprint, iter_jsonl, write_bytes_atomic

if TYPE_CHECKING:
    from launcher.collect.collected import Collection

PLOTS_VERSION = 3  # bump when the drawing changes, so cached signatures redraw
MAX_LOSS_CURVES = 40
MAX_MEMORY_BARS = 60
_LEGEND_ROWS = 20  # entries per legend column


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _curve(path: Path, key: str) -> tuple[list[float], list[float]]:
    steps: list[float] = []
    values: list[float] = []
    for record in iter_jsonl(path, None):
        step, value = record.get("step"), record.get(key)
        if (
            isinstance(step, int | float)
            and isinstance(value, int | float)
            and _finite(step)
            and _finite(value)
        ):
            steps.append(float(step))
            values.append(float(value))
    return steps, values


def _plotted_runs(collection: Collection, limit: int, key: str, reverse: bool) -> list[RunRow]:
    """The baseline first, then the others by ``key`` (best first), up to ``limit``."""
    rows = list(collection.rows)
    if len(rows) <= limit:
        return rows
    base = [r for r in rows if r.get("baseline")]
    others = [r for r in rows if not r.get("baseline")]
    present = sorted((r for r in others if r.get(key) is not None), key=lambda r: r.get(key), reverse=reverse)
    missing = [r for r in others if r.get(key) is None]
    return (base + present + missing)[:limit]


def _legend(ax: Any, n_entries: int) -> None:
    if n_entries == 0:
        return
    ncol = max(1, math.ceil(n_entries / _LEGEND_ROWS))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", ncol=ncol, frameon=False)


def _save(fig: Any, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    write_bytes_atomic(path, buffer.getvalue())


def plot_loss(collection: Collection, plt: Any) -> None:
    rows = _plotted_runs(collection, MAX_LOSS_CURVES, "eval_loss", reverse=False)
    ncol = max(1, math.ceil(len(rows) / _LEGEND_ROWS))
    fig, ax = plt.subplots(figsize=(8 + 2.2 * ncol, 5))
    cmap = plt.get_cmap("tab20" if len(rows) > 10 else "tab10")
    drawn = 0
    for index, row in enumerate(rows):
        paths = row.run_paths()
        steps, losses = _curve(paths.metrics_jsonl, "loss")
        eval_steps, eval_losses = _curve(paths.eval_jsonl, "eval_loss")
        final_eval, last_step = row.get("eval_loss"), row.get("steps") or (steps[-1] if steps else None)
        if (
            final_eval is not None
            and last_step is not None
            and (not eval_steps or eval_steps[-1] != last_step)
        ):
            eval_steps, eval_losses = [*eval_steps, float(last_step)], [*eval_losses, float(final_eval)]
        if not steps and not eval_steps:
            continue
        color = cmap(index % cmap.N)
        label = row.name + (" (baseline)" if row.get("baseline") else "")
        if row.get("state") != RunState.COMPLETED.value:
            label += f" [{row.get('state')}]"
        linewidth = 2.2 if row.get("baseline") else 1.2
        if steps:
            # Colors repeat after cmap.N runs; the line style tells those runs apart.
            style = ("-", "--", ":", "-.")[(index // cmap.N) % 4]
            ax.plot(steps, losses, color=color, linestyle=style, linewidth=linewidth, label=label)
        if eval_steps:
            ax.plot(
                eval_steps,
                eval_losses,
                linestyle="none",
                marker="o",
                markersize=5,
                color=color,
                markeredgecolor="black",
                markeredgewidth=0.5,
                zorder=3,
                label=None if steps else label,
            )
        drawn += 1
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (line: training, dots: eval)")
    shown = (
        f" ({len(rows)} of {len(collection.rows)} runs: baseline + lowest eval loss)"
        if len(rows) < len(collection.rows)
        else ""
    )
    ax.set_title(f"{collection.exp.root.name}: loss{shown}", fontsize="medium")
    ax.grid(alpha=0.3)
    if drawn == 0:
        ax.text(
            0.5,
            0.5,
            "no metrics.jsonl with loss values yet",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    _legend(ax, drawn)
    _save(fig, collection.exp.loss_png)
    plt.close(fig)


def plot_memory(collection: Collection, plt: Any) -> None:
    measured = [r for r in collection.rows if r.get("peak_mem_gib") is not None]
    rows = measured
    if len(measured) > MAX_MEMORY_BARS:
        # The baseline and the hungriest runs: the question this plot answers is "what fits".
        others = sorted((r for r in measured if not r.get("baseline")), key=lambda r: -r.get("peak_mem_gib"))
        rows = ([r for r in measured if r.get("baseline")] + others)[:MAX_MEMORY_BARS]
    kinds = {r.get("peak_mem_kind") for r in rows}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(rows) + 3), 5))
    colors = {"cuda_allocated": "tab:blue", "cpu_rss": "tab:orange"}
    bars = ax.bar(
        range(len(rows)),
        [r.get("peak_mem_gib") for r in rows],
        color=[colors.get(r.get("peak_mem_kind") or "", "tab:gray") for r in rows],
    )
    for bar, row in zip(bars, rows, strict=True):
        ax.annotate(
            f"{row.get('peak_mem_gib'):.2f}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize="x-small",
        )
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r.name for r in rows], rotation=60, ha="right", fontsize="small")
    # GPU capacity is only a yardstick for GPU measurements: against CPU RSS it would dwarf the bars.
    capacity = collection.gpu_mem_gib if "cuda_allocated" in kinds else None
    if capacity is not None:
        ax.axhline(
            capacity,
            color="tab:red",
            linestyle="--",
            label=f"GPU capacity {capacity:g} GiB (cluster.gpu_mem_gib)",
        )
    if kinds == {"cpu_rss"}:
        ylabel = "peak CPU RSS per rank, GiB (CPU run: no GPU memory measured)"
    elif kinds == {"cuda_allocated"}:
        ylabel = "peak GPU memory allocated per GPU, GiB"
    else:
        ylabel = "peak memory per rank, GiB (blue: GPU allocated, orange: CPU RSS)"
    ax.set_ylabel(ylabel)
    notes = []
    if len(rows) < len(measured):
        notes.append(f"baseline + the {len(rows) - 1} highest of {len(measured)} runs")
    if len(measured) < len(collection.rows):
        notes.append(f"{len(collection.rows) - len(measured)} run(s) without a measurement not shown")
    shown = f" ({'; '.join(notes)})" if notes else ""
    ax.set_title(f"{collection.exp.root.name}: peak memory{shown}", fontsize="medium")
    ax.grid(axis="y", alpha=0.3)
    if not rows:
        ax.text(0.5, 0.5, "no run has a peak memory measurement yet", ha="center", transform=ax.transAxes)
    if capacity is not None:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    _save(fig, collection.exp.memory_png)
    plt.close(fig)


def plot_signature(collection: Collection) -> str:
    """A hash of everything the two plots show: unchanged inputs -> the PNGs need not be redrawn.

    Redrawing costs ~1-2 s (matplotlib import and rendering) whatever the number of runs, the biggest
    share of re-collecting a large, unchanged experiment.
    """
    loss_part = [
        [r.name, r.get("state"), r.get("eval_loss"), r.get("steps"), r.get("baseline"),
         file_fingerprint(r.run_paths().metrics_jsonl),
         file_fingerprint(r.run_paths().eval_jsonl)]
        for r in _plotted_runs(collection, MAX_LOSS_CURVES, "eval_loss", reverse=False)
    ]  # fmt: skip
    memory_part = [
        [r.name, r.get("peak_mem_gib"), r.get("peak_mem_kind"), r.get("baseline")] for r in collection.rows
    ]
    payload = [PLOTS_VERSION, collection.exp.root.name, collection.gpu_mem_gib, loss_part, memory_part]
    return hashlib.sha256(json.dumps(payload, default=str).encode()).hexdigest()


def write_plots(collection: Collection) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes; must precede pyplot
    import matplotlib.pyplot as plt

    plot_loss(collection, plt)
    plot_memory(collection, plt)
