"""The resource policy: nodes, GPUs, ZeRO stage, offload and checkpointing for one run.

Explicit values always win. Unset values come from the method's defaults (launcher.plan.methods), or, with
``resources: auto``, from the cheapest configuration the memory model says fits ``cluster.gpu_mem_gib``:
fewest GPUs first, then no offload before optimizer offload before parameter offload, then gradient
checkpointing off before on. A run that cannot fit is an error that says what to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from launcher.plan.archs import ArchInfo
from launcher.plan.memory_model import MemoryEstimate, ParamLayout, estimate
from launcher.plan.methods import ResourceChoice, method_info, supports_gradient_checkpointing
from launcher.rundir.run_config import ResolvedResources
from launcher.spec.schema import ClusterSpec, MethodSpec, TrainingSpec
from launcher.spec.zero_offload import offload_conflicts, offload_works


class ResourceProblem(ValueError):
    """A resource request that is contradictory or cannot fit; ``key`` is the dotted key to fix."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


# (zero_stage, offload_optimizer, offload_param) from cheapest to most offloaded.
_ZERO_LADDER: tuple[tuple[int, bool, bool], ...] = (
    (2, False, False),
    (3, False, False),
    (2, True, False),
    (3, True, False),
    (3, True, True),
)
MAX_NODES = 16


def seq_len(training: TrainingSpec) -> int:
    return training.max_length or (training.max_source_length + training.max_target_length)


def run_estimate(
    arch: ArchInfo,
    method: MethodSpec,
    training: TrainingSpec,
    c: ResourceChoice,
    layout: ParamLayout | None = None,
    *,
    on_cpu: bool = False,
) -> MemoryEstimate:
    """The run's estimate with the trainer's target-only loss; ``on_cpu``: for CPU ranks (no CUDA)."""
    return estimate(
        arch,
        method,
        world_size=c.world_size,
        zero_stage=c.zero_stage,
        offload_optimizer=c.offload_optimizer,
        offload_param=c.offload_param,
        gradient_checkpointing=c.gradient_checkpointing,
        precision=training.precision,
        micro_batch=training.per_device_batch_size,
        seq_len=seq_len(training),
        loss_positions=training.max_target_length + 1,  # the response and its eos: our loss's logits
        layout=layout,
        on_cpu=on_cpu,
        packed=training.packing,
    )


def _world_shapes(cluster: ClusterSpec, explicit: dict[str, Any]) -> list[tuple[int, int]]:
    """(nodes, gpus_per_node) in order of total GPUs: a node is filled before a second one is used."""
    per_node = [g for g in (1, 2, 4, 8, 16) if g <= cluster.max_gpus_per_node]
    if cluster.max_gpus_per_node not in per_node:
        per_node.append(cluster.max_gpus_per_node)
    shapes = [(1, g) for g in per_node]
    shapes += [(n, cluster.max_gpus_per_node) for n in (2, 4, 8, MAX_NODES)]
    if "gpus_per_node" in explicit:
        g = explicit["gpus_per_node"]
        shapes = [(n, g) for n in (1, 2, 4, 8, MAX_NODES)]
    if "nodes" in explicit:
        n = explicit["nodes"]
        shapes = (
            [(n, g) for g in per_node]
            if "gpus_per_node" not in explicit
            else [(n, explicit["gpus_per_node"])]
        )
    return sorted(set(shapes), key=lambda s: (s[0] * s[1], s[0]))


def _advice(c: ResourceChoice, method: MethodSpec) -> str:
    fixes = []
    if not c.gradient_checkpointing and supports_gradient_checkpointing(method):
        fixes.append("gradient_checkpointing: true")
    if c.zero_stage < 3:
        fixes.append("zero_stage: 3")
    if not c.offload_optimizer:
        fixes.append("offload_optimizer: true")
    if c.zero_stage == 3 and not c.offload_param:
        fixes.append("offload_param: true")
    fixes.append("more GPUs (gpus_per_node / nodes)")
    fixes.append("a smaller training.per_device_batch_size or max_source_length")
    return "; try " + ", ".join(fixes) + ", or resources: auto"


def _checkpointing_request(
    explicit: dict[str, Any], training: TrainingSpec, method: MethodSpec
) -> bool | None:
    """Gradient checkpointing as asked for (resources, else training; None: not asked), checked."""
    gc_explicit = explicit.get("gradient_checkpointing")
    gc_training = training.gradient_checkpointing
    if gc_explicit is not None and gc_training is not None and gc_explicit != gc_training:
        raise ResourceProblem(
            "resources.gradient_checkpointing",
            f"contradicts training.gradient_checkpointing ({gc_training}); set it in one place",
        )
    if gc_explicit is None:
        gc_explicit = training.gradient_checkpointing
    if gc_explicit and not supports_gradient_checkpointing(method):
        key = (
            "resources.gradient_checkpointing"
            if "gradient_checkpointing" in explicit
            else "training.gradient_checkpointing"
        )
        raise ResourceProblem(
            key,
            "P-Tuning v2 (prefix tuning) cannot train with gradient checkpointing (peft refuses it); "
            "set gradient_checkpointing: false or use ptuning version: v1",
        )
    return gc_explicit


def _check_offload(explicit: dict[str, Any]) -> None:
    conflicts = offload_conflicts(
        explicit.get("zero_stage"),
        offload_optimizer=explicit.get("offload_optimizer"),
        offload_param=explicit.get("offload_param"),
    )
    if conflicts:  # the spec's checks report these first; this guards direct callers
        key, message = max(conflicts)  # offload_param before offload_optimizer
        raise ResourceProblem(f"resources.{key}", message)


@dataclass(frozen=True)
class _Sizing:
    """Estimates one choice of resources for a run against the cluster's GPU memory."""

    arch: ArchInfo
    method: MethodSpec
    training: TrainingSpec
    mem_gib: float
    layout: ParamLayout | None

    def fits(self, c: ResourceChoice) -> tuple[bool, MemoryEstimate]:
        est = run_estimate(self.arch, self.method, self.training, c, self.layout)
        return est.device_gib <= self.mem_gib, est


def _resolved(c: ResourceChoice, est: MemoryEstimate) -> ResolvedResources:
    return ResolvedResources(
        **c.__dict__,
        est_mem_gib=round(est.allocated_gib, 2),
        est_reserved_gib=round(est.device_gib, 2),
        fits=True,
    )


def _explicit_choice(
    method: MethodSpec, explicit: dict[str, Any], gc_request: bool | None, sizing: _Sizing
) -> ResolvedResources:
    """``resources`` not auto: the method's defaults with the explicit values; it must fit."""
    defaults = method_info(method).defaults
    gc_default = defaults.gradient_checkpointing and supports_gradient_checkpointing(method)
    zero = explicit.get("zero_stage", defaults.zero_stage)
    c = ResourceChoice(
        nodes=explicit.get("nodes", 1 if "gpus_per_node" in explicit else defaults.nodes),
        gpus_per_node=explicit.get("gpus_per_node", defaults.gpus_per_node),
        zero_stage=zero,
        offload_optimizer=explicit.get(
            "offload_optimizer", defaults.offload_optimizer and offload_works("offload_optimizer", zero)
        ),
        offload_param=explicit.get(
            "offload_param", defaults.offload_param and offload_works("offload_param", zero)
        ),
        gradient_checkpointing=gc_default if gc_request is None else bool(gc_request),
    )
    ok, est = sizing.fits(c)
    if not ok:
        raise ResourceProblem(
            "resources",
            f"needs ~{est.device_gib:.1f} GiB per GPU (nvidia-smi) with {c.nodes}x{c.gpus_per_node} GPUs,"
            f" ZeRO-{c.zero_stage}"
            f"{', offload' if c.offload_optimizer else ''} but cluster.gpu_mem_gib is {sizing.mem_gib:g}"
            + _advice(c, method),
        )
    return _resolved(c, est)


def _zero_ladder(stage: int | None) -> tuple[tuple[int, bool, bool], ...]:
    """(zero_stage, offload_optimizer, offload_param) to try, cheapest first; at a fixed stage, only the
    offloads that work with it."""
    if stage is None:
        return _ZERO_LADDER
    return tuple(
        (stage, oo, op)
        for oo, op in ((False, False), (True, False), (True, True))
        if (not op or offload_works("offload_param", stage))
        and (not oo or offload_works("offload_optimizer", stage))
    )


def _auto_choice(
    method: MethodSpec,
    explicit: dict[str, Any],
    gc_request: bool | None,
    cluster: ClusterSpec,
    sizing: _Sizing,
) -> ResolvedResources:
    """``resources: auto``: the cheapest choice that fits, fewest GPUs first, then the least offload."""
    defaults = method_info(method).defaults
    gc_default = defaults.gradient_checkpointing and supports_gradient_checkpointing(method)
    gc_options = (
        [gc_request] if gc_request is not None else ([gc_default, True] if not gc_default else [True])
    )
    if not supports_gradient_checkpointing(method):
        gc_options = [False]
    last: tuple[ResourceChoice, float] | None = None
    for nodes, gpus in _world_shapes(cluster, explicit):
        for zero, off_opt, off_param in _zero_ladder(explicit.get("zero_stage")):
            if explicit.get("offload_optimizer", off_opt) != off_opt:
                continue
            if explicit.get("offload_param", off_param) != off_param:
                continue
            for gc in dict.fromkeys(gc_options):
                c = ResourceChoice(nodes, gpus, zero, off_opt, off_param, bool(gc))
                ok, est = sizing.fits(c)
                last = (c, est.device_gib)
                if ok:
                    return _resolved(c, est)
    if last is None:
        raise ResourceProblem("resources", "no configuration satisfies the explicit resource values")
    c, gib = last
    raise ResourceProblem(
        "resources",
        f"does not fit cluster.gpu_mem_gib {sizing.mem_gib:g} with any configuration tried (the last, "
        f"{c.nodes}x{c.gpus_per_node} GPUs ZeRO-{c.zero_stage} with offload, needs ~{gib:.1f} GiB per GPU); "
        "lower training.per_device_batch_size or max_source_length, or use a partition with larger GPUs",
    )


def resolve_resources(
    *,
    method: MethodSpec,
    explicit: dict[str, Any],
    auto: bool,
    training: TrainingSpec,
    cluster: ClusterSpec,
    arch: ArchInfo,
    layout: ParamLayout | None = None,
) -> ResolvedResources:
    """Choose the run's resources; raises ResourceProblem naming the key to change."""
    explicit = {k: v for k, v in explicit.items() if v is not None}
    gc_request = _checkpointing_request(explicit, training, method)
    _check_offload(explicit)
    sizing = _Sizing(arch, method, training, cluster.gpu_mem_gib, layout)
    if not auto:
        return _explicit_choice(method, explicit, gc_request, sizing)
    return _auto_choice(method, explicit, gc_request, cluster, sizing)
