"""What a run is doing while it is STARTING, and when its process started.

A rank reports each start-up phase (waiting for the rendezvous, building the built-in model, loading
weights, building DeepSpeed ops...) through ``report_startup_phase``; rank 0 writes it to status.json
as ``startup``, where `launcher status` and the live view show it until the run is RUNNING. The sink
is process-wide so that code below the trainer (the built-in model's builder) can report without
knowing the run directory.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from launcher.rundir.paths import RunPaths
from launcher.rundir.status import update_status

log = logging.getLogger("launcher.startup")

_sink: Callable[[str], None] | None = None


def report_startup_phase(text: str) -> None:
    """Log the phase; in a rank that reports (rank 0 of a run), also write it to status.json."""
    log.info("start-up: %s", text)
    if _sink is not None:
        _sink(text)


@contextlib.contextmanager
def startup_reporting(paths: RunPaths, writes_status: bool) -> Iterator[None]:
    """While inside, phases go to ``paths``' status.json (only when ``writes_status``: rank 0)."""
    global _sink
    previous = _sink
    if writes_status:

        def write(text: str) -> None:
            update_status(paths, startup=text)

        _sink = write
    try:
        yield
    finally:
        _sink = previous


def process_started_at() -> float:
    """Unix time this process started (the kernel's record, so imports count too)."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # no psutil, or no /proc: the first call is the best we know
        return _IMPORTED_AT


_IMPORTED_AT = time.time()
