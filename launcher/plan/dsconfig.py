"""Render a run's ``ds_config.json`` from the readable templates in ``deepspeed_configs/``.

Templates mark per-run values with ``"auto"``; rendering fills every one of them (batch sizes,
accumulation, precision, clipping, AdamW, bucket sizes, the scheduler) except the scheduler's
``total_num_steps`` and ``warmup_num_steps``: those depend on the real number of training examples,
which only the train entrypoint knows. It fills them with ``launcher.rundir.ds_config.fill_scheduler_auto``.
"""

from __future__ import annotations

import copy
import json
import sys
from functools import cache
from pathlib import Path
from typing import Any

from launcher.errors import UserError
from launcher.rundir.ds_config import AUTO
from launcher.rundir.run_config import RunConfig


def _template_dir() -> Path:
    """The source tree's ``deepspeed_configs/``; a wheel install carries a copy as data files."""
    source_tree = Path(__file__).resolve().parents[2] / "deepspeed_configs"
    installed = Path(sys.prefix) / "share" / "launcher" / "deepspeed_configs"
    return source_tree if source_tree.is_dir() or not installed.is_dir() else installed


TEMPLATE_DIR = _template_dir()
TEMPLATES = ("zero2", "zero2_offload", "zero3", "zero3_offload")
SCHEDULERS = {"linear": "WarmupDecayLR", "cosine": "WarmupCosineLR", "constant": "WarmupLR"}
MIN_BUCKET_ELEMENTS = 4 * 1024 * 1024


@cache
def load_template(name: str) -> dict[str, Any]:
    path = TEMPLATE_DIR / f"{name}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(
            f"DeepSpeed config template {path} is missing (expected one of {TEMPLATES})"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a DeepSpeed config template must be a JSON object")
    return data


def template_name(zero_stage: int, offload_optimizer: bool, offload_param: bool) -> str:
    family = "zero3" if zero_stage == 3 else "zero2"
    return f"{family}_offload" if (offload_optimizer or offload_param) else family


def bucket_elements(hidden_size: int) -> int:
    """hidden_size^2 elements (Hugging Face's 'auto'), at least 4M so tiny models do not make tiny buckets."""
    return max(hidden_size * hidden_size, MIN_BUCKET_ELEMENTS)


def batch_sizes(run: RunConfig) -> tuple[int, int, int]:
    """(train_batch_size, micro batch per GPU, gradient accumulation steps) for the run's world size."""
    t = run.training
    world = run.resources.nodes * run.resources.gpus_per_node
    micro = t.per_device_batch_size
    if t.global_batch_size is not None:
        accum, rest = divmod(t.global_batch_size, micro * world)
        if rest or accum < 1:
            raise UserError(
                f"{run.name}: training.global_batch_size {t.global_batch_size} is not a multiple of "
                f"per_device_batch_size {micro} x world size {world}"
            )
    else:
        accum = t.gradient_accumulation_steps
    return micro * accum * world, micro, accum


def _scheduler(run: RunConfig) -> dict[str, Any]:
    t = run.training
    kind = SCHEDULERS[t.lr_scheduler]
    params: dict[str, Any] = {"warmup_num_steps": AUTO}
    if kind == "WarmupDecayLR":
        params |= {"total_num_steps": AUTO, "warmup_min_lr": 0.0, "warmup_max_lr": t.learning_rate}
        params["warmup_type"] = "linear"
    elif kind == "WarmupCosineLR":
        params |= {
            "total_num_steps": AUTO,
            "warmup_min_ratio": 0.0,
            "cos_min_ratio": 0.0,
            "warmup_type": "linear",
        }
    else:  # WarmupLR takes no total: constant after warm-up
        params |= {"warmup_min_lr": 0.0, "warmup_max_lr": t.learning_rate, "warmup_type": "linear"}
    return {"type": kind, "params": params}


def render_ds_config(run: RunConfig, hidden_size: int) -> dict[str, Any]:
    """The concrete DeepSpeed config of one run (only the scheduler's step counts stay "auto")."""
    r, t = run.resources, run.training
    if r.deepspeed is not None:
        return _render_from_user_file(run, hidden_size, Path(r.deepspeed))
    cfg = copy.deepcopy(load_template(template_name(r.zero_stage, r.offload_optimizer, r.offload_param)))
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    train_batch, micro, accum = batch_sizes(run)
    cfg["train_batch_size"] = train_batch
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["gradient_accumulation_steps"] = accum
    cfg["gradient_clipping"] = t.max_grad_norm
    cfg["bf16"] = {"enabled": t.precision == "bf16"}
    cfg["fp16"] = {**cfg.get("fp16", {}), "enabled": t.precision == "fp16"}
    if t.precision != "fp16":
        cfg["fp16"] = {"enabled": False}
    cfg["optimizer"]["params"]["lr"] = t.learning_rate
    cfg["optimizer"]["params"]["weight_decay"] = t.weight_decay
    cfg["scheduler"] = _scheduler(run)
    zero = cfg["zero_optimization"]
    zero["stage"] = r.zero_stage
    bucket = bucket_elements(hidden_size)
    for key, value in (
        ("allgather_bucket_size", bucket),
        ("reduce_bucket_size", bucket),
        ("stage3_prefetch_bucket_size", int(0.9 * bucket)),
        ("stage3_param_persistence_threshold", 10 * hidden_size),
    ):
        if zero.get(key) == AUTO:
            zero[key] = value
    if not r.offload_optimizer:
        zero.pop("offload_optimizer", None)
    elif "offload_optimizer" not in zero:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if not r.offload_param:
        zero.pop("offload_param", None)
    elif "offload_param" not in zero:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    leftover = [path for path in _auto_paths(cfg) if path[0] != "scheduler"]
    if leftover:
        raise UserError(f"template values left as 'auto': {leftover}")
    return cfg


def _render_from_user_file(run: RunConfig, hidden_size: int, path: Path) -> dict[str, Any]:
    from launcher.plan.user_dsconfig import read_user_ds_config, render_user_ds_config

    bucket = bucket_elements(hidden_size)
    t = run.training
    return render_user_ds_config(
        read_user_ds_config(path),
        path,
        batch=batch_sizes(run),
        precision=t.precision,
        max_grad_norm=t.max_grad_norm,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        scheduler=_scheduler(run),
        buckets={
            "allgather_bucket_size": bucket,
            "reduce_bucket_size": bucket,
            "stage3_prefetch_bucket_size": int(0.9 * bucket),
            "stage3_param_persistence_threshold": 10 * hidden_size,
        },
    )


def _auto_paths(obj: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _auto_paths(v, (*path, str(k)))]
    return [path] if obj == AUTO else []
