"""Hand-made run dirs per the run-dir contract (docs/run_directory.md), for the collector and review tests.

``make_run`` writes a real ``run.yaml`` (a validated ``RunConfig``), ``status.json`` and, as asked,
``result.json`` / ``metrics.jsonl`` / ``eval.jsonl`` / ``samples.jsonl`` / logs, so every corruption
the collector must survive can be produced on purpose.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import yaml

from launcher.rundir.paths import ExperimentPaths, RunPaths, RunState
from launcher.rundir.run_config import RunConfig, build_run_config, resolved_resources
from launcher.rundir.status import update_status
from launcher.spec.schema import (
    ClusterSpec,
    DataSpec,
    EvalSpec,
    LoraMethod,
    ModelSpec,
    TokenizerSpec,
    TrainingSpec,
)

CORRUPT = "corrupt"  # pass as ``result=`` to write a damaged result.json

# Frequent Chinese characters, to build references and outputs of controlled quality.
CHARS = (
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小"
    "么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民"
)


def make_config(
    name: str,
    *,
    experiment: str = "exp",
    method: str = "lora",
    swept: dict[str, Any] | None = None,
    seed: int = 42,
    max_source_length: int = 512,
    tokenize: str = "zh",
    nodes: int = 1,
    gpus_per_node: int = 1,
    zero_stage: int = 2,
    offload_optimizer: bool = False,
    gpu_mem_gib: float = 80,
) -> RunConfig:
    return build_run_config(
        experiment=experiment,
        name=name,
        run_id=f"id-{name}",
        method=LoraMethod(method="lora", name=method),
        swept=swept or {},
        model=ModelSpec(builtin="tiny-glm"),
        tokenizer=TokenizerSpec(),
        data=DataSpec(builtin="dialogue"),
        template="chatglm",
        training=TrainingSpec(seed=seed, max_source_length=max_source_length),
        eval=EvalSpec(bleu_tokenize=tokenize),  # type: ignore[arg-type]
        resources=resolved_resources(
            nodes=nodes,
            gpus_per_node=gpus_per_node,
            zero_stage=zero_stage,
            offload_optimizer=offload_optimizer,
            offload_param=False,
            gradient_checkpointing=False,
            est_mem_gib=1.0,
            fits=True,
        ),
        cluster=ClusterSpec(gpu_mem_gib=gpu_mem_gib),
    )


def default_result(name: str, **overrides: Any) -> dict[str, Any]:
    result: dict[str, Any] = {
        "run_id": f"id-{name}",
        "name": name,
        "method": "lora",
        "state": "COMPLETED",
        "steps": 100,
        "epochs": 1.0,
        "train_loss_final": 1.25,
        "train_loss_min": 1.1,
        "eval_loss": 1.4,
        "bleu": 20.0,
        "chrf": 30.0,
        "bleu4_chatglm": 0.2,
        "peak_mem_gib": 12.5,
        "peak_mem_kind": "cuda_allocated",
        "peak_mem_reserved_gib": 14.0,
        "tokens_per_s": 1234.5,
        "train_time_s": 3725.0,
        "startup_s": 95.0,
        "world_size": 2,
        "nodes": 1,
        "gpus_per_node": 2,
        "zero_stage": 3,
        "offload_optimizer": True,
        "offload_param": False,
        "gradient_checkpointing": True,
        "truncated_frac": 0.125,
        "seed": 42,
        "swept": {},
        "versions": {"torch": "2.13.0"},
        "reason": None,
    }
    result.update(overrides)
    return result


def metrics_records(n_steps: int, start_loss: float = 3.0, every: int = 10) -> list[dict[str, Any]]:
    return [
        {
            "step": step,
            "epoch": step / n_steps,
            "loss": start_loss / (1 + step / 20),
            "lr": 1e-4,
            "tokens": 512 * step,
            "tokens_per_s": 1000.0 + step,
            "elapsed_s": 2.0 * step,
        }
        for step in range(every, n_steps + 1, every)
    ]


def write_jsonl(path: Path, records: list[dict[str, Any]], tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    path.write_text(text + tail, encoding="utf-8")


def make_run(
    exp_root: Path,
    name: str,
    *,
    state: RunState = RunState.COMPLETED,
    reason: str | None = None,
    result: dict[str, Any] | str | None = None,
    metrics: list[dict[str, Any]] | None = None,
    metrics_tail: str = "",
    eval_points: list[dict[str, Any]] | None = None,
    samples: list[dict[str, Any]] | None = None,
    logs: dict[str, str] | None = None,
    config: RunConfig | None = None,
    **config_kwargs: Any,
) -> RunPaths:
    """One run dir. ``result``: a dict, ``CORRUPT`` (truncated JSON) or None (no file)."""
    exp = ExperimentPaths(exp_root)
    paths = exp.run(name)
    paths.root.mkdir(parents=True, exist_ok=True)
    cfg = config or make_config(name, **config_kwargs)
    paths.run_yaml.write_text(cfg.to_yaml(), encoding="utf-8")
    update_status(paths, state, reason)
    if result == CORRUPT:
        paths.result_json.write_text('{"name": "x", "bleu": 12.', encoding="utf-8")
    elif isinstance(result, dict):
        # json.dumps writes NaN literally (the collector must cope with files from other writers).
        paths.result_json.write_text(json.dumps(result), encoding="utf-8")
    if metrics is not None:
        write_jsonl(paths.metrics_jsonl, metrics, metrics_tail)
    if eval_points is not None:
        write_jsonl(paths.eval_jsonl, eval_points)
    if samples is not None:
        write_jsonl(paths.samples_jsonl, samples)
    for file_name, text in (logs or {}).items():
        (paths.logs / file_name).parent.mkdir(parents=True, exist_ok=True)
        (paths.logs / file_name).write_text(text, encoding="utf-8")
    return paths


def write_spec(exp_root: Path, *, baseline: str | None = None, gpu_mem_gib: float = 80) -> None:
    spec = {
        "experiment": exp_root.name,
        "model": {"builtin": "tiny-glm"},
        "data": {"builtin": "dialogue"},
        "methods": [{"method": "lora"}],
        "cluster": {"gpu_mem_gib": gpu_mem_gib},
        "baseline": baseline,
    }
    (exp_root / "spec.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")


def references(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(CHARS) for _ in range(rng.randint(15, 40))) for _ in range(n)]


def perturb(texts: list[str], rate: float, seed: int) -> list[str]:
    """Replace each character with probability ``rate`` (0: the reference itself)."""
    rng = random.Random(seed)
    return ["".join(c if rng.random() >= rate else rng.choice(CHARS) for c in t) for t in texts]


def samples(refs: list[str], preds: list[str], *, ids: list[str] | None = None) -> list[dict[str, Any]]:
    ids = ids or [f"ex{i:04d}" for i in range(len(refs))]
    return [
        {"id": i, "prompt": f"问题 {i}", "reference": r, "prediction": p}
        for i, r, p in zip(ids, refs, preds, strict=True)
    ]
