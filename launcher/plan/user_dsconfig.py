"""A user's own DeepSpeed JSON (``resources.deepspeed: PATH``), as LLaMA-Factory, axolotl or ChatGLM's
fine-tuning scripts ship them, made into a run's complete ``ds_config.json``.

As the Hugging Face Trainer does (``transformers.integrations.deepspeed.HfTrainerDeepSpeedConfig``):
every ``"auto"`` is filled from the spec (batch sizes, accumulation, clipping, precision, learning rate,
weight decay, bucket sizes); a value written out that contradicts the spec is an error naming both;
a missing optimizer or scheduler block gets the one launcher's own templates use. The ZeRO stage and
offload come from the file unless the spec's resources say otherwise, which is an error too: the file
and the spec must tell one story. Everything else in the file (monitor, comms, sub-group sizes...) is
passed through as written. Only the scheduler's step counts stay "auto" for the trainer to fill.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

from launcher.errors import UserError

AUTO = "auto"


class FileResourceConflict(ValueError):
    """The spec's resources contradict the file's ZeRO settings; ``key`` is the spec key to drop."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


DEFAULT_BETAS = [0.9, 0.999]  # TrainingArguments' adam_beta1 / adam_beta2
DEFAULT_EPS = 1e-8


def read_user_ds_config(path: Path) -> dict[str, Any]:
    """The file as a JSON object; a bad file is a UserError with its line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a DeepSpeed config is a JSON object, got {type(data).__name__}")
    return data


def _offload_on(block: Any) -> bool:
    return isinstance(block, dict) and str(block.get("device", "none")).lower() not in ("none", "")


def file_resources(user: dict[str, Any]) -> dict[str, Any]:
    """What the file says about ZeRO: stage, optimizer offload, parameter offload."""
    zero = user.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UserError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return {
        "zero_stage": stage,
        "offload_optimizer": _offload_on(zero.get("offload_optimizer")),
        "offload_param": _offload_on(zero.get("offload_param")),
    }


def merge_file_resources(explicit: dict[str, Any], user: dict[str, Any], path: Path) -> dict[str, Any]:
    """The spec's explicit resources with the file's ZeRO settings (a contradiction: FileResourceConflict)."""
    merged = dict(explicit)
    for key, value in file_resources(user).items():
        given = explicit.get(key)
        if given is not None and given != value:
            source = "zero_optimization.stage" if key == "zero_stage" else f"zero_optimization.{key}"
            raise FileResourceConflict(
                f"resources.{key}",
                f"{given} contradicts {path.name}'s {source} ({value}); drop resources.{key} to use the "
                f"file's, or edit the file",
            )
        merged[key] = value
    return merged


def _fill(block: dict[str, Any], key: str, value: Any, where: str, conflicts: list[str]) -> None:
    """Set ``block[key]`` to the spec's value if "auto" or missing; record a contradicting written value."""
    current = block.get(key, AUTO)
    if current == AUTO:
        block[key] = value
    elif (
        isinstance(value, int | float) and isinstance(current, int | float) and not isinstance(current, bool)
    ):
        if not math.isclose(float(current), float(value), rel_tol=1e-9):
            conflicts.append(f"{where}{key} is {current} but the spec gives {value}")
    elif current != value:
        conflicts.append(f"{where}{key} is {current!r} but the spec gives {value!r}")


def render_user_ds_config(
    user: dict[str, Any],
    path: Path,
    *,
    batch: tuple[int, int, int],
    precision: str,
    max_grad_norm: float,
    learning_rate: float,
    weight_decay: float,
    scheduler: dict[str, Any],
    buckets: dict[str, int],
) -> dict[str, Any]:
    """The run's config from the user's file and the spec's values (see the module doc)."""
    cfg = copy.deepcopy(user)
    conflicts: list[str] = []
    train_batch, micro, accum = batch
    for key, value in (
        ("train_batch_size", train_batch),
        ("train_micro_batch_size_per_gpu", micro),
        ("gradient_accumulation_steps", accum),
        ("gradient_clipping", max_grad_norm),
    ):
        _fill(cfg, key, value, "", conflicts)
    for name in ("bf16", "fp16"):
        block = cfg.setdefault(name, {})
        _fill(block, "enabled", precision == name, f"{name}.", conflicts)
    optimizer = cfg.get("optimizer")
    if optimizer is None:  # as launcher's templates: AdamW at the spec's rate
        cfg["optimizer"] = optimizer = {"type": "AdamW", "params": {}}
    params = optimizer.setdefault("params", {})
    _fill(params, "lr", learning_rate, "optimizer.params.", conflicts)
    _fill(params, "weight_decay", weight_decay, "optimizer.params.", conflicts)
    for key, default in (("betas", DEFAULT_BETAS), ("eps", DEFAULT_EPS)):
        if params.get(key, AUTO) == AUTO:
            params[key] = default
    user_scheduler = cfg.get("scheduler")
    if user_scheduler is None or user_scheduler == AUTO:
        cfg["scheduler"] = scheduler
    else:
        sched_params = user_scheduler.setdefault("params", {})
        for key in ("warmup_max_lr",):
            _fill(sched_params, key, learning_rate, "scheduler.params.", conflicts)
        if sched_params.get("warmup_min_lr") == AUTO:
            sched_params["warmup_min_lr"] = 0.0
    zero = cfg.get("zero_optimization") or {}
    for key, value in buckets.items():
        if zero.get(key) == AUTO:
            zero[key] = value
    if conflicts:
        raise UserError(f"{path} disagrees with the spec: " + "; ".join(conflicts))
    leftover = [".".join(p) for p in _auto_paths(cfg) if p[0] != "scheduler" or p[-1] not in _TRAINER_AUTO]
    if leftover:
        raise UserError(f'{path}: launcher cannot fill these "auto" values: {", ".join(leftover)}')
    return cfg


_TRAINER_AUTO = ("total_num_steps", "warmup_num_steps")
"""Filled by the trainer, which alone knows the number of training examples."""


def _auto_paths(obj: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _auto_paths(v, (*path, str(k)))]
    return [path] if obj == AUTO else []
