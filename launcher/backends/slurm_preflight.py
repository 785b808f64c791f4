"""Cluster pre-flight: every resource shape is checked against what ``sinfo`` says the cluster has,
before any ``sbatch``.

Without it, a request no node can satisfy is refused by sbatch with "Requested node configuration is
not available" (which of nodes, CPUs, GPUs or memory?), and a time limit above the partition's leaves
the job PENDING forever. Here each such request is an error in the spec's terms, with the fix. The
check uses the nodes' configured sizes, not their current load or state: a busy or drained node can
still run the job later.

``cluster.cpus_per_task: auto`` is resolved here as well: the CPUs per GPU of the partition's nodes
(CPUs / GPUs of each node; CPUs / tasks on nodes without GPUs), the smallest such share among the
nodes that could host the request.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field

SINFO_FORMAT = "%P|%N|%c|%m|%G|%l|%s"
"""Partition (``*`` marks the default), node, CPUs, memory MB, gres, partition time limit, job size."""
SINFO_COMMAND = ["sinfo", "--noheader", "--Node", f"--format={SINFO_FORMAT}"]
MB_PER_GB = 1024  # sbatch's --mem=NGB is N x 1024 MB


@dataclass(frozen=True)
class Node:
    name: str
    cpus: int
    mem_mb: int | None
    gpus: int


@dataclass
class Partition:
    name: str
    default: bool
    time_limit_min: int | None
    """None: no limit (infinite)."""
    max_nodes: int | None
    nodes: list[Node] = field(default_factory=list)


@dataclass(frozen=True)
class Request:
    """One allocation as the Slurm backend asks for it (one rank per GPU)."""

    nodes: int
    gpus_per_node: int
    cpus_per_task: int | None
    """None: ``auto``."""
    mem_gb: int | None
    time_min: int
    partition: str | None

    @property
    def tasks_per_node(self) -> int:
        return self.gpus_per_node


class PreflightProblem(Exception):
    """A request the cluster cannot run; the message names the spec key and the fix."""


def parse_time_limit_min(text: str) -> int | None:
    """sinfo's ``%l`` ("infinite", "30:00", "4:00:00", "2-00:00:00", "1-12") in minutes; None = no limit."""
    text = text.strip()
    if text.lower() in ("infinite", "unlimited", "n/a", ""):
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # days-hours[:minutes[:seconds]]
        parts += [0] * (3 - len(parts))
        hours, minutes, seconds = parts
        return int(days) * 1440 + hours * 60 + minutes + (1 if seconds else 0)
    if len(parts) == 3:
        hours, minutes, seconds = parts
    elif len(parts) == 2:
        hours, (minutes, seconds) = 0, parts
    else:
        hours, minutes, seconds = 0, parts[0], 0
    return hours * 60 + minutes + (1 if seconds else 0)


def parse_gpus(gres: str) -> int:
    """GPUs in a gres string: "gpu:2", "gpu:a100:4(S:0-1)", "gpu:a100:2,gpu:v100:2" -> 4, "(null)" -> 0."""
    total = 0
    for item in re.split(r",(?![^()]*\))", gres):
        item = re.sub(r"\(.*\)$", "", item.strip())
        parts = item.split(":")
        if parts[0] == "gpu" and len(parts) >= 2:
            count = re.match(r"\d+", parts[-1])
            total += int(count.group(0)) if count else 0
    return total


def _max_nodes(size: str) -> int | None:
    high = size.strip().rpartition("-")[2]
    return int(high) if high.isdigit() else None


def parse_sinfo(text: str) -> dict[str, Partition]:
    """``sinfo --Node --format=SINFO_FORMAT`` output -> partitions with their nodes."""
    partitions: dict[str, Partition] = {}
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 7:
            continue
        name, node, cpus, mem, gres, limit, size = fields
        default = name.endswith("*")
        name = name.rstrip("*")
        part = partitions.get(name)
        if part is None:
            part = partitions[name] = Partition(name, default, parse_time_limit_min(limit), _max_nodes(size))
        digits = re.match(r"\d+", mem.strip())
        part.nodes.append(
            Node(
                node,
                int(cpus.rstrip("+")),
                int(digits.group(0)) if digits else None,
                parse_gpus(gres),
            )
        )
    return partitions


def query_partitions(runner: Callable[[list[str]], str | None]) -> dict[str, Partition] | None:
    """The cluster's partitions from sinfo; None when sinfo does not answer."""
    out = runner(SINFO_COMMAND)
    if out is None:
        return None
    partitions = parse_sinfo(out)
    return partitions or None


# --- the check -----------------------------------------------------------------------------------------


def _cpus_per_gpu(node: Node, tasks_per_node: int) -> int:
    return max(1, node.cpus // max(node.gpus, tasks_per_node, 1))


def _fits_except_cpus(node: Node, request: Request) -> bool:
    mem_ok = request.mem_gb is None or node.mem_mb is None or node.mem_mb >= request.mem_gb * MB_PER_GB
    return node.gpus >= request.gpus_per_node and mem_ok and node.cpus >= request.tasks_per_node


def _cpus_fit(node: Node, request: Request, cpus_per_task: int) -> bool:
    return node.cpus >= request.tasks_per_node * cpus_per_task


def _unmet(request: Request, part: Partition, cpus_per_task: int | None) -> list[str]:
    """Why fewer than ``request.nodes`` nodes of the partition can take the request, one reason per limit."""
    where = f"partition {part.name}"
    n = request.nodes
    reasons = []
    if request.time_min and part.time_limit_min is not None and request.time_min > part.time_limit_min:
        reasons.append(
            f"cluster.time_min: {request.time_min} min is over {where}'s time limit of "
            f"{part.time_limit_min} min (the job would stay PENDING); set cluster.time_min <= "
            f"{part.time_limit_min}"
        )
    if part.max_nodes is not None and n > part.max_nodes:
        reasons.append(
            f"resources.nodes: {n} is over {where}'s maximum job size of {part.max_nodes} nodes; "
            f"use at most {part.max_nodes} nodes with more GPUs each"
        )
    if len(part.nodes) < n:
        reasons.append(f"resources.nodes: {n} nodes, but {where} has {len(part.nodes)}")
    most_gpus = max(node.gpus for node in part.nodes)
    if sum(node.gpus >= request.gpus_per_node for node in part.nodes) < n:
        fix = (
            f"set resources.gpus_per_node <= {most_gpus} (and more resources.nodes)"
            if most_gpus
            else "choose a partition with GPUs (cluster.partition)"
        )
        reasons.append(
            f"resources.gpus_per_node: {request.gpus_per_node} GPUs per node, but {where}'s nodes have "
            f"at most {most_gpus} (gres gpu); {fix}"
        )
    if request.mem_gb is not None:
        sizes = [node.mem_mb for node in part.nodes if node.mem_mb is not None]
        need_mb = request.mem_gb * MB_PER_GB
        if sizes and sum(size >= need_mb for size in sizes) < n:
            reasons.append(
                f"cluster.mem_gb: {request.mem_gb} GB per node, but {where}'s nodes have at most "
                f"{max(sizes)} MB; set cluster.mem_gb <= {max(sizes) // MB_PER_GB} or leave it unset"
            )
    cpus = cpus_per_task or 1
    most_cpus = max(node.cpus for node in part.nodes)
    if sum(node.cpus >= request.tasks_per_node * cpus for node in part.nodes) < n:
        allowed = most_cpus // request.tasks_per_node
        if cpus_per_task is not None and allowed >= 1:
            reasons.append(
                f"cluster.cpus_per_task: {request.tasks_per_node} task(s) x {cpus} CPUs = "
                f"{request.tasks_per_node * cpus} CPUs per node, but {where}'s nodes have at most "
                f"{most_cpus}; set cluster.cpus_per_task <= {allowed}, or auto (the CPUs per GPU the "
                "nodes have)"
            )
        else:
            reasons.append(
                f"resources.gpus_per_node: {request.tasks_per_node} ranks per node (one per GPU) need "
                f"{request.tasks_per_node} CPUs or more, but {where}'s nodes have at most {most_cpus}; "
                f"set resources.gpus_per_node <= {most_cpus}"
            )
    if not reasons:
        reasons.append(
            f"no {n} node(s) of {where} meet all of: {request.gpus_per_node} GPUs, "
            f"{request.tasks_per_node * (cpus_per_task or 1)} CPUs"
            + (f", {request.mem_gb} GB" if request.mem_gb is not None else "")
            + "; lower one of them"
        )
    return reasons


def _check_partition(request: Request, part: Partition) -> tuple[int | None, list[str]]:
    """(CPUs per task, []) when the partition can run the request; (None, reasons) otherwise."""
    time_ok = part.time_limit_min is None or request.time_min <= part.time_limit_min
    size_ok = part.max_nodes is None or request.nodes <= part.max_nodes
    candidates = [node for node in part.nodes if _fits_except_cpus(node, request)]
    cpus = request.cpus_per_task
    if cpus is None and len(candidates) >= request.nodes:
        # auto: the smallest per-GPU share of the nodes that could host it, so any of them can, and a
        # job never takes CPUs that the node's other GPUs need
        cpus = min(_cpus_per_gpu(node, request.tasks_per_node) for node in candidates)
    enough = cpus is not None and sum(_cpus_fit(node, request, cpus) for node in candidates) >= request.nodes
    if enough and time_ok and size_ok:
        return cpus, []
    return None, _unmet(request, part, request.cpus_per_task)


def check_request(request: Request, partitions: dict[str, Partition]) -> int:
    """The CPUs per task to ask for (``auto`` resolved); PreflightProblem if no named partition can run it."""
    if request.partition is None:
        defaults = [p for p in partitions.values() if p.default]
        if not defaults:
            raise PreflightProblem(
                f"cluster.partition: not set and the cluster has no default partition; choose one of: "
                f"{', '.join(partitions)}"
            )
        names = [defaults[0].name]
    else:
        names = request.partition.split(",")
    unknown = [name for name in names if name not in partitions]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(partitions), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise PreflightProblem(
            f"cluster.partition: {', '.join(repr(u) for u in unknown)} is not a partition of this cluster"
            f"{hint} (partitions: {', '.join(partitions)})"
        )
    reasons: list[str] = []
    chosen: list[int] = []
    for name in names:  # sbatch takes any partition of a list that can run the job
        cpus, why = _check_partition(request, partitions[name])
        if cpus is not None:
            chosen.append(cpus)
        reasons += why
    if chosen:
        return min(chosen)
    raise PreflightProblem("; ".join(reasons))
