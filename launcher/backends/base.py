"""The one small interface every backend (slurm, local, hostfile) implements."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from launcher.errors import UserError

if TYPE_CHECKING:
    from launcher.rundir import ExperimentPaths
    from launcher.spec import JobSpec, RunConfig

BACKEND_NAMES: tuple[str, ...] = ("slurm", "local", "hostfile")


@dataclass
class SubmittedRun:
    name: str
    run_id: str
    backend: str
    job_id: str | None = None  # Slurm job id ("1234_0" for array tasks) or local pid group
    array_job_id: str | None = None
    array_index: int | None = None
    command: str | None = None  # the exact command / sbatch script path written (dry-run prints it)


class Backend(Protocol):
    name: str

    def submit(self, exp: ExperimentPaths, runs: list[RunConfig], *, dry_run: bool) -> list[SubmittedRun]: ...

    def cancel(self, exp: ExperimentPaths, runs: list[SubmittedRun]) -> None: ...

    # run name -> RunState value; {} if unknown; never hangs
    def live_states(self, runs: list[SubmittedRun]) -> dict[str, str]: ...


def default_backend_name(spec: JobSpec | None) -> str:
    """The spec's backend, else slurm when `sbatch` is on PATH, else local."""
    if spec is not None and getattr(spec, "backend", None):
        return str(spec.backend)
    return "slurm" if shutil.which("sbatch") else "local"


def get_backend(name: str, spec: JobSpec | None) -> Backend:
    """Build a backend by name; imports lazily so `launcher status` never pays for submitit/torch."""
    if name == "slurm":
        from launcher.backends.slurm import SlurmBackend

        return SlurmBackend(spec)
    if name == "local":
        from launcher.backends.local import LocalBackend

        return LocalBackend(spec)
    if name == "hostfile":
        from launcher.backends.hostfile import HostfileBackend

        return HostfileBackend(spec)
    raise UserError(f"unknown backend {name!r}; valid choices: {', '.join(BACKEND_NAMES)}")
