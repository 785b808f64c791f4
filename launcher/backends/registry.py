"""The backends by name: `--backend`, the spec's `backend:` and the manifest's records all go
through ``get_backend``. Each backend is imported only when built, so `launcher status` of a local
experiment never imports submitit, and `submit --backend slurm` never imports torch."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.errors import UserError

if TYPE_CHECKING:
    from rich.console import Console

    from launcher.backends.base import Backend, ProgressViewFactory
    from launcher.spec.schema import JobSpec

Factory = Callable[
    ["JobSpec | None", "Console | None", "Path | None", "ProgressViewFactory | None"], "Backend"
]


def _slurm(
    spec: JobSpec | None, console: Console | None, hostfile: Path | None, view: ProgressViewFactory | None
) -> Backend:
    # lazy: a backend's module loads only when that backend is built
    from launcher.backends.slurm import SlurmBackend

    return SlurmBackend(spec)


def _local(
    spec: JobSpec | None, console: Console | None, hostfile: Path | None, view: ProgressViewFactory | None
) -> Backend:
    # lazy: a backend's module loads only when that backend is built
    from launcher.backends.local import LocalBackend

    return LocalBackend(spec, console=console, progress_view=view)


def _hostfile(
    spec: JobSpec | None, console: Console | None, hostfile: Path | None, view: ProgressViewFactory | None
) -> Backend:
    # lazy: a backend's module loads only when that backend is built
    from launcher.backends.hostfile import HostfileBackend

    return HostfileBackend(spec, hostfile=hostfile, console=console, progress_view=view)


BACKENDS: dict[str, Factory] = {"slurm": _slurm, "local": _local, "hostfile": _hostfile}
BACKEND_NAMES: tuple[str, ...] = tuple(BACKENDS)


def default_backend_name(spec: JobSpec | None) -> str:
    """The spec's backend, else slurm when `sbatch` is on PATH, else local."""
    if spec is not None and spec.backend:
        return str(spec.backend)
    return "slurm" if shutil.which("sbatch") else "local"


def get_backend(
    name: str,
    spec: JobSpec | None,
    *,
    console: Console | None = None,
    hostfile: Path | None = None,
    progress_view: ProgressViewFactory | None = None,
) -> Backend:
    """Build a backend by name. ``console``: where a supervising backend shows progress, and
    ``progress_view`` what it shows there (none when not given); ``hostfile``: the hostfile backend's
    `--hostfile` (an error for the others)."""
    factory = BACKENDS.get(name)
    if factory is None:
        raise UserError(f"unknown backend {name!r}; valid choices: {', '.join(BACKEND_NAMES)}")
    if hostfile is not None and name != "hostfile":
        raise UserError("--hostfile only applies to --backend hostfile")
    return factory(spec, console, hostfile, progress_view)
