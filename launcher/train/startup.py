"""Start-up as a rank sees it: the DeepSpeed ops it needs, built before the slow steps with the phase
reported, and ``startup_s`` (process start to the first optimizer step) for result.json."""

from __future__ import annotations

import time
from typing import Any

from launcher.builtins.ops_cache import op_is_built
from launcher.builtins.prebuild import build_ops
from launcher.rundir.startup import process_started_at, report_startup_phase
from launcher.train.schedule import cpu_optimizer_op

_started_at: float | None = None
_first_step_at: float | None = None


def begin_run() -> None:
    """At the start of a run in this process: the clock starts at the process's start for its first
    run (a rank), at this call for later ones (runs trained one after another in one process)."""
    global _started_at, _first_step_at
    _started_at = process_started_at() if _started_at is None else time.time()
    _first_step_at = None


def prepare_ops(ds_config: dict[str, Any], on_cpu: bool) -> None:
    """Before the process group and the engine: the CPU op this run's optimizer JIT-builds (none by
    default: ``cpu_optimizer_op``), built once per environment under a lock that a killed builder
    cannot leave held (launcher/builtins/prebuild.py)."""
    op = cpu_optimizer_op(ds_config) if on_cpu else None
    if op is None:
        return
    if not op_is_built(op):
        report_startup_phase(f"building DeepSpeed ops ({op}; once per environment)")
    build_ops([op])


def report_rendezvous_phase(world_size: int) -> None:
    if world_size > 1:
        report_startup_phase(f"waiting for the rendezvous of {world_size} ranks")
    else:
        report_startup_phase("starting the process group")


def record_first_optimizer_step() -> None:
    """Called after every optimizer step; only the first one of this run counts."""
    global _first_step_at
    if _first_step_at is None:
        _first_step_at = time.time()


def startup_s() -> float | None:
    """Seconds from this run's start (its process's start for a rank) to its first optimizer step."""
    if _first_step_at is None:
        return None
    return round(_first_step_at - (_started_at or process_started_at()), 3)
