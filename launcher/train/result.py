"""``result.json``: the one file per run the collector turns into a table row (its keys:
``launcher.rundir.paths.RESULT_KEYS``, described in docs/run_directory.md)."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Any

from launcher.rundir.method_label import method_label
from launcher.rundir.paths import RESULT_KEYS, RunPaths, iter_jsonl, write_json_atomic
from launcher.rundir.run_config import RunConfig
from launcher.train.memory import PeakMemory

_VERSIONED = ("torch", "transformers", "peft", "deepspeed", "launcher")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@dataclass(frozen=True)
class TrainOutcome:
    """What the loop measured (all numbers already reduced over ranks)."""

    steps: int
    epochs: float
    tokens: int
    train_time_s: float
    world_size: int
    nodes: int
    gradient_checkpointing: bool
    truncated_frac: float | None
    peak: PeakMemory
    eval_loss: float | None
    scores: dict[str, float | None]
    template_used: str | None = None
    """The template the run rendered with (launcher.data.templates.template_used)."""
    query_cut_frac: float | None = None
    eval_set_hash: str | None = None
    train_examples: int | None = None
    """Training examples seen (counted again in every epoch)."""
    startup_s: float | None = None
    """Process start to the first optimizer step of this attempt (rank 0), None without a step."""


def loss_summary(paths: RunPaths) -> tuple[float | None, float | None]:
    """(final, min) logged training loss, from metrics.jsonl."""
    losses = [float(m["loss"]) for m in iter_jsonl(paths.metrics_jsonl) if m.get("loss") is not None]
    if not losses:
        return None, None
    return losses[-1], min(losses)


def build_result(
    cfg: RunConfig, paths: RunPaths, outcome: TrainOutcome, state: str, reason: str | None = None
) -> dict[str, Any]:
    res = cfg.resources
    loss_final, loss_min = loss_summary(paths)
    result: dict[str, Any] = {
        "run_id": cfg.run_id,
        "name": cfg.name,
        "method": method_label(cfg.method.model_dump(mode="json")),  # lora r8 dora for a variant
        "state": state,
        "steps": outcome.steps,
        "epochs": round(outcome.epochs, 4),
        "train_loss_final": loss_final,
        "train_loss_min": loss_min,
        "eval_loss": outcome.eval_loss,
        "bleu": outcome.scores.get("bleu"),
        "chrf": outcome.scores.get("chrf"),
        "bleu4_chatglm": outcome.scores.get("bleu4_chatglm"),
        "rouge1": outcome.scores.get("rouge1"),
        "rouge2": outcome.scores.get("rouge2"),
        "rougeL": outcome.scores.get("rougeL"),
        "peak_mem_gib": round(outcome.peak.peak_mem_gib, 4),
        "peak_mem_kind": outcome.peak.kind,
        "peak_mem_reserved_gib": (
            round(outcome.peak.peak_mem_reserved_gib, 4)
            if outcome.peak.peak_mem_reserved_gib is not None
            else None
        ),
        "tokens_per_s": (outcome.tokens / outcome.train_time_s) if outcome.train_time_s > 0 else None,
        "train_tokens": outcome.tokens,
        "train_time_s": round(outcome.train_time_s, 3),
        "startup_s": outcome.startup_s,
        "world_size": outcome.world_size,
        "nodes": outcome.nodes,
        "gpus_per_node": max(1, outcome.world_size // max(1, outcome.nodes)),
        "zero_stage": res.zero_stage,
        "offload_optimizer": res.offload_optimizer,
        "offload_param": res.offload_param,
        "gradient_checkpointing": outcome.gradient_checkpointing,
        "truncated_frac": outcome.truncated_frac,
        "query_cut_frac": outcome.query_cut_frac,
        "template_used": outcome.template_used,
        "eval_set_hash": outcome.eval_set_hash,
        "train_examples": outcome.train_examples,
        "seed": cfg.training.seed,
        "swept": cfg.swept,
        "versions": package_versions(),
        "reason": reason,
    }
    assert set(result) == set(RESULT_KEYS)
    return result


def write_result(paths: RunPaths, result: dict[str, Any]) -> None:
    write_json_atomic(paths.result_json, result)
