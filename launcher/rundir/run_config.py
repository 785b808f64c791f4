"""The run directory's ``run.yaml``: everything one run needs, resolved (``RunConfig``), and what the
resource policy chose for it (``ResolvedResources``). This file is the contract between the planner
that writes it and the ranks, backends and collector that read it, so it lives with the run directory;
its sections are the spec's own typed field models (launcher.spec.schema, a leaf that imports only
pydantic, yaml and launcher.errors).

``build_run_config`` is the one factory: the planner, the benches and the tests build a RunConfig
through it, so a new field gets its default in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field

from launcher.spec.schema import (
    BackendName,
    ClusterSpec,
    DataSpec,
    EvalSpec,
    LocalSpec,
    LoggingSpec,
    MethodSpec,
    ModelSpec,
    StrictModel,
    TokenizerSpec,
    TrainingSpec,
)


class ResolvedResources(StrictModel):
    """What the resource policy chose for one run (all concrete)."""

    nodes: int
    gpus_per_node: int
    zero_stage: Literal[0, 1, 2, 3]
    offload_optimizer: bool
    offload_param: bool
    gradient_checkpointing: bool
    deepspeed: str | None = Field(default=None, exclude_if=lambda v: v is None)
    """The user's DeepSpeed JSON the run's ds_config.json was rendered from (absolute path)."""
    est_mem_gib: float
    """Estimated peak of allocated tensors per GPU (what ``torch.cuda.max_memory_allocated`` and the
    result's ``peak_mem_gib`` measure)."""
    fits: bool
    est_reserved_gib: float | None = None
    """Estimated GPU memory as ``nvidia-smi`` shows it: the caching allocator's reserved pool plus the
    CUDA context; ``fits`` compares this with cluster.gpu_mem_gib."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


class RunConfig(StrictModel):
    """Everything one run needs; serialised as ``run.yaml`` in its run directory."""

    experiment: str
    name: str
    run_id: str
    method: MethodSpec
    swept: dict[str, Any] = Field(default_factory=dict)
    model: ModelSpec
    tokenizer: TokenizerSpec
    data: DataSpec
    template: str
    training: TrainingSpec
    eval: EvalSpec
    resources: ResolvedResources
    cluster: ClusterSpec
    local: LocalSpec = Field(default_factory=LocalSpec)
    backend: BackendName | None = None
    hostfile: str | None = None
    logging: LoggingSpec = Field(default_factory=LoggingSpec)

    def to_yaml(self) -> str:
        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml: ~10x faster for big sweeps
        return yaml.dump(self.model_dump(mode="json"), Dumper=dumper, sort_keys=False, allow_unicode=True)

    @classmethod
    def from_yaml_file(cls, path: Path) -> RunConfig:
        return cls.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))


def resolved_resources(
    *,
    nodes: int = 1,
    gpus_per_node: int = 1,
    zero_stage: int = 2,
    offload_optimizer: bool = False,
    offload_param: bool = False,
    gradient_checkpointing: bool = False,
    est_mem_gib: float = 0.0,
    fits: bool = True,
    est_reserved_gib: float | None = None,
) -> ResolvedResources:
    """A concrete resource choice (the planner passes what its policy chose; benches and tests state
    the layout they run)."""
    return ResolvedResources.model_validate(
        {
            "nodes": nodes,
            "gpus_per_node": gpus_per_node,
            "zero_stage": zero_stage,
            "offload_optimizer": offload_optimizer,
            "offload_param": offload_param,
            "gradient_checkpointing": gradient_checkpointing,
            "est_mem_gib": est_mem_gib,
            "fits": fits,
            "est_reserved_gib": est_reserved_gib,
        }
    )


def build_run_config(
    *,
    experiment: str,
    name: str,
    method: MethodSpec,
    resources: ResolvedResources,
    model: ModelSpec | None = None,
    data: DataSpec | None = None,
    training: TrainingSpec | None = None,
    run_id: str = "",
    swept: dict[str, Any] | None = None,
    tokenizer: TokenizerSpec | None = None,
    template: str = "chatglm",
    eval: EvalSpec | None = None,
    cluster: ClusterSpec | None = None,
    local: LocalSpec | None = None,
    backend: BackendName | None = None,
    hostfile: str | None = None,
    logging: LoggingSpec | None = None,
) -> RunConfig:
    """One run's RunConfig. Sections left out get their defaults: the built-in tiny model on the
    bundled dialogue data, the schema's training, eval, tokenizer, cluster, local and logging settings.
    ``run_id`` is filled in by the planner (launcher.rundir.identity.run_id_of) once the run is final."""
    return RunConfig(
        experiment=experiment,
        name=name,
        run_id=run_id,
        method=method,
        swept=swept or {},
        model=model or ModelSpec(builtin="tiny-glm"),
        tokenizer=tokenizer or TokenizerSpec(),
        data=data or DataSpec(builtin="dialogue"),
        template=template,
        training=training or TrainingSpec(),
        eval=eval or EvalSpec(),
        resources=resources,
        cluster=cluster or ClusterSpec(),
        local=local or LocalSpec(),
        backend=backend,
        hostfile=hostfile,
        logging=logging or LoggingSpec(),
    )
