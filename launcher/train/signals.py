"""SIGTERM / SIGUSR2 (Slurm's warning before a time limit or preemption) -> a flag the loop polls.

The handler only records the signal: saving a checkpoint from inside a signal handler would run
collectives at an arbitrary point. The loop checks the flag at each optimizer-step boundary, all ranks
agree on it through the per-step all_reduce, and everyone saves together.

``install`` replaces whatever handler was there before (submitit installs its own for USR2/TERM in
the job process): this run's own checkpoint-and-exit must win; the previous handlers are restored by
``uninstall``.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

PREEMPT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR2)


class PreemptionFlag:
    """Set by a preemption signal; read by the training loop."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[signal.Signals, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name

    def install(self) -> bool:
        """Take over SIGTERM and SIGUSR2; False when not on the main thread (handlers cannot be set)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig in PREEMPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return True

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
