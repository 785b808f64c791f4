"""The collector: run dirs -> one comparison table (summary.md/.csv/.json), significance, plots.

Modules, one job each: ``rows`` (a run dir -> a row, tolerant of damage), ``collection`` (run dirs -> a
``collected.Collection``), ``significance`` (sacrebleu's paired tests), ``groups`` (seed repeats),
``hyperparams``, ``table`` (rich table and file formats), ``plots``, ``review`` (blind A/B review).
Reads run directories only (launcher.rundir); never imports train.
"""

from __future__ import annotations

from launcher.collect.collected import Collection
from launcher.collect.collection import collect_experiment, collect_experiments, sort_rows
from launcher.collect.rows import RESULT_KEYS, SUMMARY_KEYS, RunRow
from launcher.collect.table import print_summary

__all__ = [
    "RESULT_KEYS",
    "SUMMARY_KEYS",
    "Collection",
    "RunRow",
    "collect_experiment",
    "collect_experiments",
    "print_summary",
    "sort_rows",
]
