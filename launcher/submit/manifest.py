"""`<experiment>/manifest.json`: what was submitted where, so a second `launcher submit` never duplicates.

Keyed by run id (launcher.rundir.identity: what the run computes, not where); each entry records the
backend, the job id / array index and how many times the run was submitted. Read-modify-write happens
under an exclusive file lock, so two concurrent submits of the same spec cannot lose entries.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from filelock import FileLock, Timeout

from launcher.backends.base import SubmittedRun
from launcher.errors import UserError
from launcher.rundir.paths import ExperimentPaths, read_json, utc_now, write_json_atomic

if TYPE_CHECKING:
    from launcher.backends.base import SubmittedRun

MANIFEST_VERSION = 1


@dataclass
class ManifestEntry:
    name: str
    backend: str
    job_id: str | None = None
    array_job_id: str | None = None
    array_index: int | None = None
    attempts: int = 0
    """How many times this run was submitted (scheduler requeues are counted in status.json)."""
    submitted_at: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ManifestEntry:
        def text(key: str) -> str | None:
            value = data.get(key)
            return None if value is None else str(value)

        index = data.get("array_index")
        return cls(
            name=str(data["name"]),
            backend=str(data["backend"]),
            job_id=text("job_id"),
            array_job_id=text("array_job_id"),
            array_index=None if index is None else int(index),
            attempts=int(data.get("attempts") or 0),
            submitted_at=text("submitted_at"),
        )


@dataclass
class Manifest:
    entries: dict[str, ManifestEntry] = field(default_factory=dict)

    def submitted_runs(self, names: Collection[str] | None = None) -> list[SubmittedRun]:
        """The recorded submissions (of ``names`` only, if given), as the backends take them."""
        return [
            SubmittedRun(
                name=e.name,
                run_id=run_id,
                backend=e.backend,
                job_id=e.job_id,
                array_job_id=e.array_job_id,
                array_index=e.array_index,
            )
            for run_id, e in self.entries.items()
            if names is None or e.name in names
        ]

    def by_name(self, name: str) -> tuple[str, ManifestEntry] | None:
        for run_id, entry in self.entries.items():
            if entry.name == name:
                return run_id, entry
        return None

    def record(self, submitted: SubmittedRun) -> ManifestEntry:
        """Record one submission; another entry under the same name (a replaced config) is dropped."""
        previous = self.entries.get(submitted.run_id)
        for run_id in [rid for rid, e in self.entries.items() if e.name == submitted.name]:
            if run_id != submitted.run_id:
                del self.entries[run_id]
        entry = ManifestEntry(
            name=submitted.name,
            backend=submitted.backend,
            job_id=submitted.job_id,
            array_job_id=submitted.array_job_id,
            array_index=submitted.array_index,
            attempts=(previous.attempts if previous else 0) + 1,
            submitted_at=utc_now(),
        )
        self.entries[submitted.run_id] = entry
        return entry

    def to_json(self) -> dict[str, Any]:
        return {
            "version": MANIFEST_VERSION,
            "runs": {run_id: asdict(entry) for run_id, entry in sorted(self.entries.items())},
        }


def load_manifest(exp: ExperimentPaths) -> Manifest:
    """The experiment's manifest; a missing file is an empty manifest, a corrupt one a UserError."""
    path = exp.manifest_json
    if not path.exists():
        return Manifest()
    try:
        data = read_json(path)
        runs = data["runs"]
        return Manifest({str(rid): ManifestEntry.from_dict(e) for rid, e in runs.items()})
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(
            f"{path}: not a valid launcher manifest ({exc}); move it away to start the experiment afresh"
        ) from exc


def save_manifest(exp: ExperimentPaths, manifest: Manifest) -> None:
    write_json_atomic(exp.manifest_json, manifest.to_json())


@contextlib.contextmanager
def locked_manifest(exp: ExperimentPaths) -> Iterator[Manifest]:
    """Load, yield for changes, save: all under an exclusive lock on `<experiment>/.manifest.lock`."""
    exp.root.mkdir(parents=True, exist_ok=True)
    with FileLock(exp.root / ".manifest.lock"):
        manifest = load_manifest(exp)
        yield manifest
        save_manifest(exp, manifest)


@contextlib.contextmanager
def submission_lock(exp: ExperimentPaths, timeout_s: float = 60.0) -> Iterator[None]:
    """Exclusive per-experiment lock for `launcher submit` (decide + submit + record)."""
    exp.root.mkdir(parents=True, exist_ok=True)
    try:
        lock = FileLock(exp.root / ".submit.lock", timeout=timeout_s, poll_interval=0.5).acquire()
    except Timeout:
        raise UserError(
            f"another `launcher submit` of {exp.root} has been submitting for {timeout_s:.0f}s; "
            "let it finish, then check `launcher status`"
        ) from None
    with lock:
        yield
