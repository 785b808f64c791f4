"""The run-directory contract: the single owner of every file name, plus atomic writes.

The run directory is the only thing that passes between submit, train and collect
(docs/run_directory.md). Names here are public: users' scripts, the tests and the collector read them.
status.json's content and merge policy belong to launcher.rundir.status.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

from launcher.errors import DiskFullError

RENDEZVOUS_FILE_ENV = "LAUNCHER_RENDEZVOUS_FILE"
"""Set by a single-node launcher (the local backend): rank 0's store binds a port the OS picks and
writes it to this file, the other ranks read it there. No port is picked before the bind, so
concurrent launches on one node cannot take each other's port (EADDRINUSE)."""


class RunState(str, Enum):
    PLANNED = "PLANNED"
    PENDING = "PENDING"
    STARTING = "STARTING"
    """The scheduler started the job; its ranks are loading (imports, model, data, engine)."""
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    PREEMPTED = "PREEMPTED"

    @property
    def is_final(self) -> bool:
        return self in (RunState.COMPLETED, RunState.FAILED, RunState.CANCELLED)


@dataclass(frozen=True)
class RunPaths:
    """Every file of one run: ``<experiment>/runs/<run_name>/``."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def run_yaml(self) -> Path:
        return self.root / "run.yaml"

    @property
    def ds_config(self) -> Path:
        return self.root / "ds_config.json"

    @property
    def status_json(self) -> Path:
        return self.root / "status.json"

    @property
    def metrics_jsonl(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def eval_jsonl(self) -> Path:
        """Eval loss / BLEU at eval steps during training (the final numbers are in result.json)."""
        return self.root / "eval.jsonl"

    @property
    def samples_jsonl(self) -> Path:
        return self.root / "samples.jsonl"

    @property
    def result_json(self) -> Path:
        return self.root / "result.json"

    @property
    def attempts_jsonl(self) -> Path:
        """One line when an attempt starts and one when it ends (rank 0): the run's real wall time."""
        return self.root / "attempts.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def lora_init(self) -> Path:
        """The LoRA adapter as PiSSA/OLoRA initialised it, before training: the export subtracts it so
        that final/ loads on the original base model."""
        return self.root / "lora_init"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files (rank 0): ``tensorboard --logdir <experiment>`` shows every run."""
        return self.root / "tensorboard"

    def rank_log(self, rank: int) -> Path:
        return self.logs / f"rank{rank}.log"

    @property
    def rendezvous_port(self) -> Path:
        """Where rank 0 of a single-node launch publishes the port its store bound (RENDEZVOUS_FILE_ENV)."""
        return self.logs / "rendezvous_port"


def experiment_dir(output_dir: str, experiment: str) -> Path:
    """``<output_dir>/<experiment>``, absolute; a relative output_dir is relative to the current
    directory (the one place this is decided: validation checks it is writable, planning writes there)."""
    return (Path(output_dir).expanduser() / experiment).absolute()


@dataclass(frozen=True)
class ExperimentPaths:
    """Files of one experiment: ``<output_dir>/<experiment>/``."""

    root: Path

    @property
    def spec_yaml(self) -> Path:
        return self.root / "spec.yaml"

    @property
    def plan_json(self) -> Path:
        return self.root / "plan.json"

    @property
    def manifest_json(self) -> Path:
        return self.root / "manifest.json"

    @property
    def summary_md(self) -> Path:
        return self.root / "summary.md"

    @property
    def summary_csv(self) -> Path:
        return self.root / "summary.csv"

    @property
    def summary_json(self) -> Path:
        return self.root / "summary.json"

    @property
    def loss_png(self) -> Path:
        return self.root / "loss.png"

    @property
    def memory_png(self) -> Path:
        return self.root / "memory.png"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def logs(self) -> Path:
        """Scheduler logs of experiment-level jobs (the collector job)."""
        return self.root / "logs"

    def run(self, name: str) -> RunPaths:
        return RunPaths(self.runs_dir / name)

    def run_dirs(self) -> list[RunPaths]:
        """Every run directory, sorted by name (finished or not)."""
        if not self.runs_dir.is_dir():
            return []
        return [RunPaths(p) for p in sorted(self.runs_dir.iterdir()) if p.is_dir()]

    def run_dirs_in_plan_order(self) -> list[RunPaths]:
        """Every run directory in plan.json's order, which is the spec's (methods, then sweep values),
        as `plan` and `collect` show them; run dirs the plan does not name follow by name."""
        try:
            planned = read_json(self.plan_json).get("runs") or []
            position = {str(run["name"]): index for index, run in enumerate(planned)}
        except (OSError, ValueError, AttributeError, TypeError, KeyError):
            position = {}  # no plan.json (or a damaged one): name order
        return sorted(self.run_dirs(), key=lambda p: (position.get(p.name, len(position)), p.name))


# The keys of result.json, in the order summary.json shows them (trainer writes, collector reads).
RESULT_KEYS: tuple[str, ...] = (
    "run_id",
    "name",
    "method",
    "state",
    "steps",
    "epochs",
    "train_loss_final",
    "train_loss_min",
    "eval_loss",
    "bleu",
    "chrf",
    "bleu4_chatglm",
    "rouge1",
    "rouge2",
    "rougeL",
    "peak_mem_gib",
    "peak_mem_kind",
    "peak_mem_reserved_gib",
    "tokens_per_s",
    "train_tokens",
    "train_time_s",
    "startup_s",
    "world_size",
    "nodes",
    "gpus_per_node",
    "zero_stage",
    "offload_optimizer",
    "offload_param",
    "gradient_checkpointing",
    "truncated_frac",
    "query_cut_frac",
    "template_used",
    "eval_set_hash",
    "train_examples",
    "seed",
    "swept",
    "versions",
    "reason",
)


# --- atomic writes -------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _clean_floats(value: Any) -> Any:
    """JSON has no NaN/inf: store them as null so every reader can parse the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean_floats(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean_floats(v) for v in value]
    return value


def to_json(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(_clean_floats(obj), indent=indent, ensure_ascii=False, default=_json_default)


def _umask_mode() -> int:
    """The mode a plain open() would give: mkstemp's 0600 would hide results from collaborators."""
    current = os.umask(0)
    os.umask(current)
    return 0o666 & ~current


_FILE_MODE = _umask_mode()  # read once: os.umask is process-global, so don't toggle it per write


def write_bytes_atomic(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over the target.

    Readers see the old file or the new one, never a half-written one. ``mode``: e.g. 0o755 for a
    script (default: what a plain open() would give). A full disk raises DiskFullError naming ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE if mode is None else mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        _raise_disk_full(exc, path)
        raise


def _raise_disk_full(exc: BaseException, path: Path) -> None:
    """OSError(ENOSPC) from a write names no file: re-raise it as DiskFullError naming ``path``."""
    if isinstance(exc, OSError) and not isinstance(exc, DiskFullError) and exc.errno in DiskFullError.ERRNOS:
        raise DiskFullError(path, exc.errno) from exc


def write_text_atomic(path: Path, text: str, *, mode: int | None = None) -> None:
    write_bytes_atomic(path, text.encode("utf-8"), mode=mode)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, to_json(obj) + "\n")


def append_jsonl(path: Path, obj: Any) -> None:
    """Append one line and flush it to disk (a crash loses at most the line being written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(to_json(obj, indent=None) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        _raise_disk_full(exc, path)
        raise


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def iter_jsonl(path: Path, skipped: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Yield the well-formed objects of a JSONL file; a torn or corrupt line is reported in ``skipped``."""
    if not path.exists():
        return
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                if skipped is not None:
                    skipped.append(f"{path}:{number}: not valid JSON, skipped")
                continue
            if isinstance(obj, dict):
                yield obj


def tail_lines(path: Path, max_bytes: int) -> list[str]:
    """The lines of a file's last ``max_bytes`` (logs and metrics grow long; their ends matter). A
    line cut by the window's start is dropped; a missing file has no lines."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            lines = handle.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return []
    return lines[1:] if size > max_bytes else lines


def file_fingerprint(path: Path) -> list[int] | None:
    """[size, mtime in ns]: whether a file changed since a cache read it (None: no such file)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


# --- time ---------------------------------------------------------------------------------------


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
