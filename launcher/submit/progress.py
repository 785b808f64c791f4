"""The live progress view while the local and hostfile backends supervise their runs."""

from __future__ import annotations

from typing import Any

from launcher.rundir.paths import RunPaths, RunState
from launcher.submit.status_row import StatusRow, format_duration, read_status_row


class RunsProgress:
    """Progress over runs and steps while the local/hostfile backend supervises them.

    On a terminal: a live rich bar per run (step/total, state, loss, tokens/s, ETA), refreshed by the
    caller's loop (no refresh thread: the supervisor forks rank processes). Otherwise: one line per
    state change, so CI logs stay readable.
    """

    def __init__(self, runs: list[RunPaths], *, console: Any = None, live: bool | None = None) -> None:
        from rich.console import Console

        self.runs = runs
        self.console = console if console is not None else Console()
        self.live = self.console.is_terminal if live is None else live
        self._states: dict[str, str] = {}
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> RunsProgress:
        if self.live:
            from rich.progress import BarColumn, Progress, TextColumn

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[step]:>11}"),
                TextColumn("{task.fields[state]:<9}"),
                TextColumn("loss {task.fields[loss]:>7}"),
                TextColumn("{task.fields[tps]:>8} tok/s"),
                TextColumn("ETA {task.fields[eta]:>7}"),
                console=self.console,
                auto_refresh=False,
            )
            self._progress.start()
            for paths in self.runs:
                self._tasks[paths.name] = self._progress.add_task(
                    paths.name, total=None, step="-", state="PENDING", loss="-", tps="-", eta="-"
                )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.refresh()
            self._progress.stop()
            self._progress = None

    def update(self) -> None:
        for paths in self.runs:
            row = read_status_row(paths)
            if self._progress is not None:
                self._progress.update(
                    self._tasks[paths.name],
                    total=row.total_steps,
                    completed=row.step or 0,
                    step="-" if row.step is None else f"{row.step}/{row.total_steps or '?'}",
                    state=_state_cell(row),
                    loss="-" if row.loss is None else f"{row.loss:.4f}",
                    tps="-" if row.tokens_per_s is None else f"{row.tokens_per_s:,.0f}",
                    eta=format_duration(row.eta_s),
                )
            elif self._states.get(paths.name) != _state_cell(row):
                detail = f" ({row.reason})" if row.reason and row.state != RunState.RUNNING.value else ""
                self.console.print(
                    f"{paths.name}: {row.state}{detail}", highlight=False, markup=False, soft_wrap=True
                )
            self._states[paths.name] = _state_cell(row)
        if self._progress is not None:
            self._progress.refresh()


def _state_cell(row: StatusRow) -> str:
    """STARTING says what it is doing (building ops, loading weights...); other states stand alone."""
    if row.state == RunState.STARTING.value and row.reason:
        return f"{row.state}: {row.reason}"
    return row.state
