"""The one small interface every backend (slurm, local, hostfile) implements; the registry that builds
them by name is launcher.backends.registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from launcher.rundir.paths import ExperimentPaths, RunPaths
    from launcher.rundir.run_config import RunConfig


@dataclass
class SubmittedRun:
    name: str
    run_id: str
    backend: str
    job_id: str | None = None  # Slurm job id ("1234_0" for array tasks) or local pid group
    array_job_id: str | None = None
    array_index: int | None = None
    command: str | None = None  # the exact command / sbatch script path written (dry-run prints it)


class ProgressView(Protocol):
    """What a supervising backend (local, hostfile) shows while its runs train: a context manager the
    supervisor's loop refreshes. The caller hands the view in (``launcher submit`` passes
    launcher.submit.progress.RunsProgress), so backends import nothing from submit."""

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> None: ...

    def update(self) -> None: ...


class ProgressViewFactory(Protocol):
    def __call__(
        self, runs: list[RunPaths], *, console: Any = None, live: bool | None = None
    ) -> ProgressView: ...


class NoProgress:
    """The view of a backend built without one: shows nothing."""

    def __init__(self, runs: list[RunPaths], *, console: Any = None, live: bool | None = None) -> None:
        pass

    def __enter__(self) -> NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self) -> None:
        pass


class Backend(Protocol):
    """Everything `launcher submit`, `status` and `cancel` ask of a backend."""

    name: str

    def submit(self, exp: ExperimentPaths, runs: list[RunConfig], *, dry_run: bool) -> list[SubmittedRun]:
        """Queue the runs (their run dirs are written); with dry_run, only say what would run."""
        ...

    def wait(self, exp: ExperimentPaths) -> dict[str, str]:
        """Block until the runs this process supervises have ended: run name -> final state. A
        scheduler backend supervises nothing here and returns {} at once (its collector job writes
        the table when the runs end)."""
        ...

    def cancel(self, exp: ExperimentPaths, runs: list[SubmittedRun]) -> None: ...

    def live_states(self, runs: list[SubmittedRun]) -> dict[str, str]:
        """Run name -> RunState value where the backend knows better than the files; {} if it cannot
        tell; never hangs."""
        ...

    def pending_reasons(self, runs: list[SubmittedRun]) -> dict[str, str]:
        """Run name -> why the scheduler keeps it queued (Slurm's squeue reason); {} if it cannot tell."""
        ...
