"""The hyperparameters that differ between the runs of a table, swept or not, from each run's run.yaml.

A key is shown when the runs that have it do not all agree (so LoRA's ``r`` shows when two LoRA runs
differ in it, not because a Freeze run has no ``r``). Identity, resources (the table has columns for
them), cluster and logging settings are not hyperparameters.
"""

from __future__ import annotations

from typing import Any

from launcher.collect.rows import RunRow, read_run_yaml

MAX_RUNS_READ = 2000
"""Above this many runs only the swept values are compared: parsing every run.yaml costs ~0.4 ms a run,
and collecting 10,000 runs must stay under 2 s."""
_SECTIONS = ("model", "tokenizer", "data", "template", "training", "eval", "method")
_NOT_HYPERPARAMETERS = frozenset({"method.method", "method.name", "method.overrides", "method.resources"})


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    elif prefix not in _NOT_HYPERPARAMETERS:
        out[prefix] = value


def run_hyperparameters(row: RunRow) -> dict[str, Any]:
    """The run's settings as dotted keys (empty when run.yaml is missing or damaged)."""
    if row.paths is None:
        return {}
    config = read_run_yaml(row.paths, []) or {}
    out: dict[str, Any] = {}
    for section in _SECTIONS:
        if section in config:
            _flatten(config[section], section, out)
    return out


def differing_hyperparameters(rows: list[RunRow], warnings: list[str]) -> list[str]:
    """Set each row's ``hyperparameters`` to its values of the keys that differ; returns those keys."""
    if len(rows) > MAX_RUNS_READ:
        warnings.append(
            f"{len(rows)} runs: the hyperparameters column compares swept values only "
            f"(run.yaml is read for up to {MAX_RUNS_READ} runs)"
        )
        per_row = [dict(row.get("swept") or {}) for row in rows]
    else:
        per_row = [run_hyperparameters(row) for row in rows]
    seen: dict[str, set[str]] = {}
    for values in per_row:
        for key, value in values.items():
            seen.setdefault(key, set()).add(repr(value))
    keys = [key for key, distinct in seen.items() if len(distinct) > 1]
    for row, values in zip(rows, per_row, strict=True):
        row.values["hyperparameters"] = {key: values[key] for key in keys if key in values}
    return keys


def fmt_hyperparameters(values: Any) -> str:
    """``learning_rate=0.0001 r=16``: the last part of each key, the whole key where two would clash."""
    if not isinstance(values, dict) or not values:
        return "-"
    short = [key.rsplit(".", 1)[-1] for key in values]
    labels = [s if short.count(s) == 1 else key for s, key in zip(short, values, strict=True)]
    return " ".join(f"{label}={value}" for label, value in zip(labels, values.values(), strict=True))
