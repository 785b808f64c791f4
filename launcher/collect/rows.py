"""One run directory -> one table row, whatever state the directory is in.

Reads only what the row needs: ``status.json`` and ``result.json`` for a finished run; the metrics,
``run.yaml`` and logs only when the result is missing or the run did not complete. Nothing here
raises on a damaged file: the row keeps what is known and ``warnings`` says what was skipped.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import yaml

from launcher.rundir.method_label import method_label
from launcher.rundir.paths import RESULT_KEYS, RunPaths, RunState, iter_jsonl, tail_lines

# libyaml is ~10x faster than the pure-Python loader; run.yaml is read for every unfinished run.
_YamlLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# What the run trained and was evaluated on (template, truncation, eval set, examples): read from
# result.json when there (older trainers did not write them), compared by launcher.collect.notes.
DATA_KEYS: tuple[str, ...] = tuple(
    k
    for k in ("template_used", "query_cut_frac", "eval_set_hash", "train_examples", "train_tokens")
    if k not in RESULT_KEYS
)
_READ_KEYS = RESULT_KEYS + DATA_KEYS

# Added by the collector (significance against the baseline, seed groups, human review).
SUMMARY_EXTRA_KEYS: tuple[str, ...] = (
    "experiment",
    "baseline",
    "bleu_delta",
    "bleu_delta_ci",
    "bleu_p_value",
    "bleu_p_value_ar",
    "bleu_p_value_holm",
    "bleu_p_value_ar_holm",
    "bleu_delta_se",
    "bleu_mde",
    "n_samples",
    "no_delta_reason",
    "wall_time_s",
    "gpu_hours",
    "cost",
    "wall_source",
    "hyperparameters",
    "group",
    "review",
    "warnings",
)
SUMMARY_KEYS: tuple[str, ...] = _READ_KEYS + SUMMARY_EXTRA_KEYS

_FLOAT_KEYS = frozenset(
    {
        "epochs",
        "train_loss_final",
        "train_loss_min",
        "eval_loss",
        "bleu",
        "chrf",
        "bleu4_chatglm",
        "rouge1",
        "rouge2",
        "rougeL",
        "peak_mem_gib",
        "peak_mem_reserved_gib",
        "tokens_per_s",
        "train_time_s",
        "startup_s",
        "truncated_frac",
        "query_cut_frac",
    }
)
_INT_KEYS = frozenset(
    {"steps", "world_size", "nodes", "gpus_per_node", "zero_stage", "seed", "train_examples", "train_tokens"}
)
_BOOL_KEYS = frozenset({"offload_optimizer", "offload_param", "gradient_checkpointing"})
_STR_KEYS = frozenset(
    {"run_id", "name", "method", "state", "peak_mem_kind", "reason", "template_used", "eval_set_hash"}
)
_DICT_KEYS = frozenset({"swept", "versions"})

SEED_KEYS = frozenset({"training.seed", "seed"})
_LOG_TAIL_BYTES = 64 * 1024
_FILE_NAMES = RunPaths(Path("run"))  # rundir owns the names; only the file names are taken from it
_STATUS_JSON = _FILE_NAMES.status_json.name
_RESULT_JSON = _FILE_NAMES.result_json.name
_ERROR_LINE = re.compile(r"(Error|Exception|Traceback|Killed|out of memory|CANCELLED|error:)", re.IGNORECASE)
_EXCEPTION_LINE = re.compile(r"^\s*[\w.]*(Error|Exception|Interrupt)\b.*")


@dataclass
class RunRow:
    """One row of the table: the summary.json object of one run dir plus what was skipped reading it."""

    name: str
    values: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    group_key: str = ""
    """Method + swept values without the seed: runs sharing it are repeats of one configuration."""
    paths: RunPaths | None = None
    """The run directory (the name may carry the experiment: ``EXP/run`` across experiments)."""

    def get(self, key: str) -> Any:
        return self.values.get(key)

    def run_paths(self) -> RunPaths:
        if self.paths is None:
            raise ValueError(f"row {self.name!r} was not read from a run directory")
        return self.paths

    def to_json(self) -> dict[str, Any]:
        out = {key: self.values.get(key) for key in SUMMARY_KEYS}
        out["warnings"] = list(self.warnings)
        return out


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


_KIND: dict[str, str] = {
    **dict.fromkeys(_FLOAT_KEYS, "float"),
    **dict.fromkeys(_INT_KEYS, "int"),
    **dict.fromkeys(_BOOL_KEYS, "bool"),
    **dict.fromkeys(_DICT_KEYS, "dict"),
    **dict.fromkeys(_STR_KEYS, "str"),
}


def clean_value(key: str, value: Any, where: str, warnings: list[str]) -> Any:
    """Coerce one value to its contract type; NaN, inf and wrong types become None with a warning."""
    if value is None:
        return None
    kind = _KIND.get(key)
    value_type = type(value)
    # Fast paths first: this runs ~30 times per run dir, 10,000 run dirs in the 2 s budget.
    if kind == "float" or kind == "int":
        if value_type is float or value_type is int:
            if value_type is float and not math.isfinite(value):
                warnings.append(f"{where}: {key} is {value}, skipped")
                return None
            return int(value) if kind == "int" else float(value)
        warnings.append(f"{where}: {key}={value!r} is not a number, skipped")
        return None
    if kind == "bool":
        if value_type is bool:
            return value
        warnings.append(f"{where}: {key}={value!r} is not true/false, skipped")
        return None
    if kind == "dict":
        if value_type is dict:
            return value
        warnings.append(f"{where}: {key} is not a mapping, skipped")
        return None
    if kind == "str":
        return value if value_type is str else str(value)
    return value


def _read_json_object(path: str | Path, warnings: list[str], label: str) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when missing (silently) or damaged (with a warning)."""
    try:
        with open(path, "rb") as handle:  # bytes: json detects UTF-8 itself, no text layer per file
            raw = handle.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        warnings.append(f"{label}: unreadable ({exc}), skipped")
        return None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        warnings.append(f"{label}: not valid JSON ({exc.msg} at line {exc.lineno}), skipped")
        return None
    except ValueError as exc:  # not UTF-8
        warnings.append(f"{label}: not valid JSON ({type(exc).__name__}), skipped")
        return None
    if not isinstance(data, dict):
        warnings.append(f"{label}: not a JSON object, skipped")
        return None
    return data


def read_run_yaml(paths: RunPaths, warnings: list[str]) -> dict[str, Any] | None:
    """run.yaml as a plain mapping (not validated: a row must show even for an older schema)."""
    try:
        with open(paths.run_yaml, encoding="utf-8", errors="replace") as handle:
            data = yaml.load(handle, Loader=_YamlLoader)
    except FileNotFoundError:
        warnings.append("run.yaml missing")
        return None
    except (OSError, yaml.YAMLError) as exc:
        warnings.append(f"run.yaml unreadable ({type(exc).__name__}), skipped")
        return None
    if not isinstance(data, dict):
        warnings.append("run.yaml is not a mapping, skipped")
        return None
    return data


def _section(config: dict[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key)
    return value if isinstance(value, dict) else {}


def values_from_run_yaml(config: dict[str, Any]) -> dict[str, Any]:
    """What the plan already knows about a run that has no result yet."""
    method = _section(config, "method")
    resources = _section(config, "resources")
    training = _section(config, "training")
    nodes, gpus = resources.get("nodes"), resources.get("gpus_per_node")
    return {
        "run_id": config.get("run_id"),
        "method": method_label(method) if method.get("method") else None,
        "swept": config.get("swept") if isinstance(config.get("swept"), dict) else {},
        "nodes": nodes,
        "gpus_per_node": gpus,
        "world_size": nodes * gpus if _is_number(nodes) and _is_number(gpus) else None,
        "zero_stage": resources.get("zero_stage"),
        "offload_optimizer": resources.get("offload_optimizer"),
        "offload_param": resources.get("offload_param"),
        "gradient_checkpointing": resources.get("gradient_checkpointing"),
        "seed": training.get("seed"),
    }


@dataclass
class MetricsSummary:
    steps: int | None = None
    epochs: float | None = None
    loss_final: float | None = None
    loss_min: float | None = None
    tokens_per_s: float | None = None
    elapsed_s: float | None = None


def summarize_metrics(path: Path, warnings: list[str]) -> MetricsSummary:
    """Last step, last and min loss from metrics.jsonl; torn lines and NaN losses are skipped."""
    summary = MetricsSummary()
    skipped: list[str] = []
    nonfinite = 0
    for record in iter_jsonl(path, skipped):
        step, loss = record.get("step"), record.get("loss")
        if _is_number(step):
            summary.steps = int(step)
        for attr, key in (("epochs", "epoch"), ("tokens_per_s", "tokens_per_s"), ("elapsed_s", "elapsed_s")):
            value = record.get(key)
            if _is_number(value) and math.isfinite(value):
                setattr(summary, attr, float(value))
        if not _is_number(loss):
            continue
        if not math.isfinite(loss):
            nonfinite += 1
            continue
        summary.loss_final = float(loss)
        summary.loss_min = loss if summary.loss_min is None else min(summary.loss_min, float(loss))
    for line in skipped:
        warnings.append(f"metrics.jsonl{line[len(str(path)) :]}")
    if nonfinite:
        warnings.append(f"metrics.jsonl: {nonfinite} non-finite loss value(s) skipped")
    return summary


def last_eval_loss(path: Path, warnings: list[str]) -> float | None:
    value: float | None = None
    for record in iter_jsonl(path, None):
        loss = record.get("eval_loss")
        if _is_number(loss) and math.isfinite(loss):
            value = float(loss)
    return value


def _log_files(paths: RunPaths) -> list[Path]:
    """Rank logs first (rank0, rank1, ... numerically), then the scheduler's logs."""
    try:
        entries = [Path(e.path) for e in os.scandir(paths.logs) if e.is_file()]
    except OSError:
        return []

    def order(path: Path) -> tuple[int, int, str]:
        match = re.fullmatch(r"rank(\d+)\.log", path.name)
        return (0, int(match.group(1)), "") if match else (1, 0, path.name)

    return sorted(entries, key=order)


def last_error_line(paths: RunPaths) -> str | None:
    """The last error-looking line of the logs, e.g. ``rank1.log: RuntimeError: CUDA out of memory``.

    A Python exception line wins over a generic match (the traceback's last line is the reason).
    """
    for path in _log_files(paths):
        lines = [line.strip() for line in tail_lines(path, _LOG_TAIL_BYTES) if line.strip()]
        for pattern in (_EXCEPTION_LINE, _ERROR_LINE):
            for line in reversed(lines):
                if pattern.search(line) and not line.startswith("Traceback"):
                    return f"{path.name}: {line[:300]}"
    return None


def group_key(name: str, method: Any, swept: Any) -> str:
    """Runs that differ only in their seed share this key; "" for a run that is not a seed repeat.

    Only runs whose swept values include the seed (``sweep.seeds``) are repeats. The key is the run
    name without its seed part (``lora-lr0.001-seed2`` -> ``lora-lr0.001``, as launcher.plan.sweep names
    runs), which keeps two methods of one kind apart; else method + the other swept values.
    """
    if not isinstance(swept, dict):
        return ""
    seed = next((swept[k] for k in SEED_KEYS if k in swept), None)
    if seed is None:
        return ""
    parts = re.split(r"([-_])", name)
    for index, part in enumerate(parts):
        if part in (f"seed{seed}", f"s{seed}"):
            # drop the part and the separator before it (or after it when it comes first)
            cut = [index - 1, index] if index > 0 else [index, index + 1]
            return "".join(p for i, p in enumerate(parts) if i not in cut)
    items = sorted((k, v) for k, v in swept.items() if k not in SEED_KEYS)
    label = ", ".join(f"{k}={v}" for k, v in items)
    return f"{method or '?'}" + (f" [{label}]" if label else "")


def values_from_plan(entry: dict[str, Any]) -> dict[str, Any]:
    """The same facts from the run's plan.json entry (one file for all runs: no YAML per run)."""
    values = {key: entry.get(key) for key in _PLAN_KEYS}
    swept = entry.get("swept")
    swept = swept if isinstance(swept, dict) else {}
    values["swept"] = swept
    values["seed"] = next((swept[k] for k in SEED_KEYS if k in swept), None)
    return values


_PLAN_KEYS = (
    "run_id",
    "method",
    "nodes",
    "gpus_per_node",
    "world_size",
    "zero_stage",
    "offload_optimizer",
    "offload_param",
    "gradient_checkpointing",
)


def read_row(paths: RunPaths, plan_entry: dict[str, Any] | None = None) -> RunRow:
    """One run dir -> its row; never raises for damaged or missing files.

    ``plan_entry`` (the run's object in plan.json) stands in for run.yaml when the run has no result.
    """
    warnings: list[str] = []
    values: dict[str, Any] = dict.fromkeys(SUMMARY_KEYS)
    name = paths.root.name
    values["name"] = name
    # String joins, not pathlib: Path objects cost more than the reads (10,000 runs in 2 s).
    root = str(paths.root)
    status = _read_json_object(os.path.join(root, _STATUS_JSON), warnings, "status.json")
    result = _read_json_object(os.path.join(root, _RESULT_JSON), warnings, "result.json")

    if result is not None:
        for key in _READ_KEYS:
            if key in result:
                values[key] = clean_value(key, result[key], "result.json", warnings)
        values["name"] = name  # the directory is the run's identity, whatever the file says

    state = status.get("state") if status else None
    if state not in RunState.__members__:
        if status is not None:
            warnings.append(f"status.json: no valid state ({state!r})")
        state = values.get("state") if values.get("state") in RunState.__members__ else None
    if state is None:
        state = RunState.PLANNED.value
    values["state"] = state

    if result is None or state != RunState.COMPLETED.value:
        if state == RunState.COMPLETED.value:
            warnings.append("result.json missing or unreadable: numbers from metrics.jsonl")
        planned: dict[str, Any] | None = None
        if plan_entry is not None:
            planned = values_from_plan(plan_entry)
        else:
            config = read_run_yaml(paths, warnings)
            planned = values_from_run_yaml(config) if config is not None else None
        if planned is not None:
            for key, value in planned.items():
                if values.get(key) is None:
                    values[key] = clean_value(key, value, "run.yaml", warnings)
        metrics = summarize_metrics(paths.metrics_jsonl, warnings)
        for key, value in (
            ("steps", metrics.steps),
            ("epochs", metrics.epochs),
            ("train_loss_final", metrics.loss_final),
            ("train_loss_min", metrics.loss_min),
            ("tokens_per_s", metrics.tokens_per_s),
            ("train_time_s", metrics.elapsed_s),
        ):
            if values.get(key) is None:
                values[key] = value
        if values.get("eval_loss") is None:
            values["eval_loss"] = last_eval_loss(paths.eval_jsonl, warnings)

    if state != RunState.COMPLETED.value:
        reason = (status or {}).get("reason") or values.get("reason")
        if not reason and state == RunState.FAILED.value:
            reason = last_error_line(paths) or "no reason recorded (status.json and logs/ have none)"
        values["reason"] = str(reason) if reason else None
    if values.get("swept") is None:
        values["swept"] = {}
    return RunRow(
        name=name,
        values=values,
        warnings=warnings,
        group_key=group_key(name, values.get("method"), values.get("swept")),
        paths=paths,
    )
