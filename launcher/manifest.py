"""`<experiment>/manifest.json`: what was submitted where, so a second `launcher submit` never duplicates.

Keyed by run id (the stable hash of a run's config); each entry records the backend, the job id /
array index, how many times the run was submitted and a hash of its run.yaml. Read-modify-write
happens under an exclusive file lock, so two concurrent submits of the same spec cannot lose entries.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.errors import UserError
from launcher.rundir import ExperimentPaths, read_json, utc_now, write_json_atomic

if TYPE_CHECKING:
    from launcher.backends.base import SubmittedRun
    from launcher.spec import RunConfig

MANIFEST_VERSION = 1
# Fields of run.yaml that choose WHERE a run executes, not WHAT it computes: switching
# `--backend local` to slurm must not read as a changed config.
_PLACEMENT_KEYS = ("backend", "hostfile")
_ESTIMATE_KEYS = ("est_mem_gib", "fits")


def config_hash(run: RunConfig) -> str:
    """A short stable hash of everything that defines the run's result."""
    data = run.model_dump(mode="json")
    for key in _PLACEMENT_KEYS:
        data.pop(key, None)
    for key in _ESTIMATE_KEYS:  # a better memory model must not read as a changed run
        data.get("resources", {}).pop(key, None)
    blob = json.dumps(data, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


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
    config_hash: str | None = None

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
            config_hash=text("config_hash"),
        )


@dataclass
class Manifest:
    entries: dict[str, ManifestEntry] = field(default_factory=dict)

    def by_name(self, name: str) -> tuple[str, ManifestEntry] | None:
        for run_id, entry in self.entries.items():
            if entry.name == name:
                return run_id, entry
        return None

    def record(self, submitted: SubmittedRun, hash_: str) -> ManifestEntry:
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
            config_hash=hash_,
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
    lock_path: Path = exp.root / ".manifest.lock"
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            manifest = load_manifest(exp)
            yield manifest
            save_manifest(exp, manifest)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def submission_lock(exp: ExperimentPaths, timeout_s: float = 60.0) -> Iterator[None]:
    """Exclusive per-experiment lock for `launcher submit` (decide + submit + record)."""
    exp.root.mkdir(parents=True, exist_ok=True)
    with open(exp.root / ".submit.lock", "a+") as lock:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise UserError(
                        f"another `launcher submit` of {exp.root} has been submitting for {timeout_s:.0f}s; "
                        "let it finish, then check `launcher status`"
                    ) from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
