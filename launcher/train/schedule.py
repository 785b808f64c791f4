"""Step arithmetic and the run-time parts of ``ds_config.json`` (the scheduler's "auto" step counts)."""

from __future__ import annotations

import logging
import math
from typing import Any

from launcher.rundir.ds_config import fill_scheduler_auto
from launcher.spec.schema import TrainingSpec

log = logging.getLogger(__name__)


def total_optimizer_steps(
    training: TrainingSpec, batches_per_epoch: int, accumulation: int | None = None
) -> int:
    """Optimizer steps of the run: ``max_steps`` if set, else epochs x micro-batches per rank / accumulation.

    A trailing partial accumulation window is dropped (it would be an optimizer step on fewer samples).
    ``accumulation`` defaults to ``training.gradient_accumulation_steps``; pass ds_config's value.
    """
    if training.max_steps is not None:
        return training.max_steps
    micro_batches = math.ceil(training.num_epochs * batches_per_epoch)
    return max(1, micro_batches // (accumulation or training.gradient_accumulation_steps))


def _is_adam(ds_config: dict[str, Any]) -> bool:
    optimizer = ds_config.get("optimizer")
    return isinstance(optimizer, dict) and str(optimizer.get("type", "")).lower() in ("adam", "adamw")


def cpu_optimizer_op(ds_config: dict[str, Any]) -> str | None:
    """The DeepSpeed op a CPU run's optimizer JIT-builds: None when Adam runs as torch's AdamW.

    On a CPU host Adam runs as torch's AdamW, offloaded or not, unless the config sets ``torch_adam:
    false``. DeepSpeed's CPU ops (cpu_adam with offload, FusedAdam without) must first be compiled
    for each environment (130 s for the three CPU ops on a 2-core machine, 2026-12-06), for no gain
    on the CPU hosts this runs on (no GPU to hide the optimizer step behind); and FusedAdam's first
    step after a checkpoint load differs from an uninterrupted run in the last bits (measured ~3e-6
    in the loss), which breaks exact resume.
    GPU hosts keep DeepSpeed's optimizers (cpu_adam for offload).
    """
    if not _is_adam(ds_config):
        return None
    if (ds_config["optimizer"].get("params") or {}).get("torch_adam", True):
        return None
    offload = (ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return "cpu_adam" if offload.get("device") in ("cpu", "nvme") else "fused_adam"


def adam_as_torch_adamw(ds_config: dict[str, Any]) -> None:
    """In place: Adam runs as torch's AdamW unless the config says ``torch_adam: false`` (what a CPU
    run uses: ``cpu_optimizer_op``)."""
    if _is_adam(ds_config):
        ds_config["optimizer"].setdefault("params", {}).setdefault("torch_adam", True)


def fill_ds_config(
    ds_config: dict[str, Any], *, total_steps: int, warmup_ratio: float, world_size: int, on_cpu: bool = False
) -> dict[str, Any]:
    """A copy of ``ds_config`` with the scheduler's "auto" step counts filled in (the plan's own rule,
    ``launcher.rundir.ds_config.fill_scheduler_auto``) and the global batch matching the real world size.

    ``on_cpu``: Adam runs as torch's AdamW (``adam_as_torch_adamw``) unless the config says
    ``torch_adam: false``.
    """
    filled = fill_scheduler_auto(ds_config, total_steps, warmup_ratio)
    if on_cpu:
        adam_as_torch_adamw(filled)
    micro = int(filled["train_micro_batch_size_per_gpu"])
    accumulation = int(filled.get("gradient_accumulation_steps", 1))
    planned = filled.get("train_batch_size")
    actual = micro * accumulation * world_size
    if planned is not None and int(planned) != actual:
        # Running on a different number of ranks than planned (e.g. one process on a laptop): keep the
        # per-rank micro-batch and accumulation, say loudly that the global batch differs.
        log.warning(
            "ds_config train_batch_size=%s was planned for another world size; using %d = %d x %d x %d ranks",
            planned,
            actual,
            micro,
            accumulation,
            world_size,
        )
    filled["train_batch_size"] = actual
    leftovers = _auto_keys(filled)
    if leftovers:
        raise ValueError(
            f"ds_config.json still has 'auto' values the trainer cannot fill: {', '.join(leftovers)}"
        )
    return filled


def _auto_keys(value: Any, prefix: str = "") -> list[str]:
    found: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _auto_keys(item, f"{prefix}.{key}" if prefix else str(key))
    elif value == "auto":
        found.append(prefix)
    return found


def scale_group_lrs(ds_config: dict[str, Any], multipliers: list[float]) -> dict[str, Any]:
    """Per-group learning rates (LoRA+) in the scheduler: DeepSpeed's WarmupLR and WarmupDecayLR set one
    rate for every group unless their bounds are lists, one value per group (WarmupCosineLR scales each
    group's own rate and needs nothing)."""
    if len(multipliers) == 1:
        return ds_config
    params = ds_config.get("scheduler", {}).get("params", {})
    for key in ("warmup_min_lr", "warmup_max_lr"):
        if isinstance(params.get(key), int | float):
            params[key] = [params[key] * m for m in multipliers]
    return ds_config
