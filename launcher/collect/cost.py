"""What each run cost: its real wall time (queue excluded), GPU hours, and money at a price per GPU hour.

Wall time is Slurm's elapsed time of every attempt where accounting has it (``launcher collect`` asks
sacct and passes it in), else the sum of the attempts in the run's ``attempts.jsonl``. GPU hours are
GPUs x wall time of every attempt, wasted ones included: a preempted attempt was paid for too. The
training time (``train_time_s``, optimizer steps only) stays its own field.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

from launcher.collect.rows import RunRow
from launcher.rundir.attempts import wall_time

_IN_FLIGHT = ("STARTING", "RUNNING")


def _last_seen(row: RunRow, now: float) -> float:
    """When the run last showed life: now while it runs, else when its status last changed."""
    if row.get("state") in _IN_FLIGHT:
        return now
    try:
        return os.stat(row.run_paths().status_json).st_mtime
    except OSError:
        return now


def apply_cost(
    rows: list[RunRow],
    *,
    gpu_hour_price: float | None = None,
    elapsed_s: Mapping[str, float] | None = None,
    now: float | None = None,
) -> None:
    """Fill ``wall_time_s``, ``gpu_hours``, ``wall_source`` and (with a price) ``cost`` of every row.

    ``elapsed_s``: Slurm's elapsed seconds of all attempts, keyed by the run directory (resolved path).
    """
    now = time.time() if now is None else now
    for row in rows:
        if row.paths is None:
            continue
        world = row.get("world_size")
        gpus = int(world) if isinstance(world, int) and world > 0 else 1
        accounted = (elapsed_s or {}).get(str(row.paths.root.resolve()))
        if accounted is not None:
            seconds, gpu_seconds, source = float(accounted), gpus * float(accounted), "sacct"
        else:
            measured = wall_time(row.paths, _last_seen(row, now))
            if measured is None:
                continue
            seconds, gpu_seconds, source = measured.seconds, measured.gpu_seconds, "attempts"
            if measured.open_attempts and row.get("state") not in _IN_FLIGHT:
                row.warnings.append(
                    f"attempts.jsonl: {measured.open_attempts} of {measured.attempts} attempt(s) have no end "
                    "record (killed): counted until the next attempt started or the status last changed"
                )
        row.values["wall_time_s"] = seconds
        row.values["gpu_hours"] = gpu_seconds / 3600
        row.values["wall_source"] = source
        if gpu_hour_price is not None:
            row.values["cost"] = row.values["gpu_hours"] * gpu_hour_price
