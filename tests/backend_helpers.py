"""Helpers shared by the backend / submit / status tests: hand-built run configs and run dirs."""

from __future__ import annotations

import sys
from pathlib import Path

from launcher.rundir.paths import ExperimentPaths, RunState, write_text_atomic
from launcher.rundir.run_config import RunConfig, build_run_config, resolved_resources
from launcher.rundir.status import update_status
from launcher.spec.schema import (
    ClusterSpec,
    DataSpec,
    EvalSpec,
    LocalSpec,
    LoraMethod,
    ModelSpec,
    TokenizerSpec,
    TrainingSpec,
)

STAND_IN = Path(__file__).with_name("stand_in_trainer.py")
STAND_IN_COMMAND = [sys.executable, "-u", str(STAND_IN)]


def make_run(
    name: str,
    *,
    world_size: int = 1,
    nodes: int = 1,
    max_steps: int = 5,
    max_concurrent: int = 1,
    lr: float = 1e-4,
    experiment: str = "exp",
) -> RunConfig:
    return build_run_config(
        experiment=experiment,
        name=name,
        run_id=f"{name}-{int(lr * 1e6)}-{max_steps}",
        method=LoraMethod(method="lora"),
        model=ModelSpec(builtin="tiny-glm"),
        tokenizer=TokenizerSpec(),
        data=DataSpec(builtin="dialogue"),
        template="chatglm",
        training=TrainingSpec(max_steps=max_steps, learning_rate=lr),
        eval=EvalSpec(),
        resources=resolved_resources(
            nodes=nodes,
            gpus_per_node=world_size,
            zero_stage=0,
            offload_optimizer=False,
            offload_param=False,
            gradient_checkpointing=False,
            est_mem_gib=0.1,
            fits=True,
        ),
        cluster=ClusterSpec(),
        local=LocalSpec(max_concurrent_runs=max_concurrent),
    )


def write_runs(root: Path, runs: list[RunConfig]) -> ExperimentPaths:
    """What `launcher.plan.planner.write_run_dirs` does, minimally: run.yaml + PLANNED status."""
    exp = ExperimentPaths(root)
    for run in runs:
        paths = exp.run(run.name)
        write_text_atomic(paths.run_yaml, run.to_yaml())
        write_text_atomic(paths.ds_config, "{}\n")
        update_status(paths, RunState.PLANNED)
    return exp
