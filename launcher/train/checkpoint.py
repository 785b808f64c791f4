"""DeepSpeed checkpoints that are either complete or invisible, keep-last-K, and exact resume.

Layout under ``<run>/checkpoints/``::

    global_step20/          # published: every rank finished writing it (DeepSpeed files +
                            #   rng_state_rank{N}.pt + trainer_state.json)
    global_step30/
    latest                  # DeepSpeed's pointer file (for its own tools, e.g. zero_to_fp32.py)
    .tmp-global_step40/     # being written; never loaded, removed on the next start

Publishing is a rename of the temporary directory after a barrier, so a run killed at any moment
leaves at most an invisible ``.tmp-`` directory. The data position (epoch, micro-batches consumed),
the global step, token count and train time travel in DeepSpeed's ``client_state``; the RNG states
(python, numpy, torch, cuda) are per rank, so each rank writes its own file next to it.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from launcher.errors import DiskFullError
from launcher.rundir.paths import write_json_atomic, write_text_atomic
from launcher.train.distributed import barrier

log = logging.getLogger(__name__)

TAG_PREFIX = "global_step"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".deleting-"
CLIENT_STATE_KEY = "launcher_train_state"
LOW_SPACE_BYTES = 64 * 2**20  # a checkpoint write that failed with less free than this ran out of space
_TAG_RE = re.compile(rf"^{TAG_PREFIX}(\d+)$")


@dataclass
class TrainState:
    """Where training stands; everything needed to continue exactly where it stopped."""

    global_step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Current epoch index (0-based)."""
    batches_done: int = 0
    """Micro-batches of ``epoch`` this rank has already consumed (the same on every rank)."""
    micro_steps: int = 0
    """Micro-batches consumed since the start of training (all epochs)."""
    tokens: int = 0
    """Real (non-pad) tokens processed so far, summed over ranks."""
    train_time_s: float = 0.0
    """Seconds spent in the training loop, summed over restarts."""
    peak_memory: dict[str, Any] | None = None
    """Peak memory (max over ranks and over the attempts so far) when this state was saved, as
    ``dataclasses.asdict(PeakMemory)``: a resumed run reports the peak of the whole run, not its last
    attempt's."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        known = {k: data[k] for k in asdict(cls()) if k in data}
        return cls(**known)


def tag_for_step(step: int) -> str:
    return f"{TAG_PREFIX}{step}"


def complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Published checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found: list[tuple[int, Path]] = []
    for entry in ckpt_dir.iterdir():
        match = _TAG_RE.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_complete(ckpt_dir: Path) -> Path | None:
    found = complete_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def remove_incomplete(ckpt_dir: Path) -> list[str]:
    """Delete leftovers of a save or a prune that was interrupted (rank 0, before any save)."""
    removed: list[str] = []
    if not ckpt_dir.is_dir():
        return removed
    for entry in ckpt_dir.iterdir():
        if entry.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rng_state_rank{rank}.pt"


def save_checkpoint(
    engine: Any,
    ckpt_dir: Path,
    state: TrainState,
    *,
    rank: int,
    keep: int,
    exclude_frozen: bool,
) -> Path:
    """Write a checkpoint for ``state.global_step`` and publish it. Every rank must call this."""
    tag = tag_for_step(state.global_step)
    final_dir = ckpt_dir / tag
    if final_dir.is_dir():  # already published (e.g. the end-of-training save right after a resume)
        return final_dir
    tmp_tag = TMP_PREFIX + tag
    tmp_dir = ckpt_dir / tmp_tag
    try:
        engine.save_checkpoint(
            str(ckpt_dir),
            tag=tmp_tag,
            client_state={CLIENT_STATE_KEY: asdict(state)},
            save_latest=False,
            exclude_frozen_parameters=exclude_frozen,
        )
        tmp_dir.mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), _rng_file(tmp_dir, rank))
    except Exception as exc:
        if not _out_of_space(exc, ckpt_dir):
            raise
        # The half-written checkpoint goes (its space lets the failure be recorded); the published
        # ones were never touched, so the run resumes from the newest of them.
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise DiskFullError(tmp_dir) from exc
    barrier()  # every rank's files are on disk
    if rank == 0:
        write_json_atomic(tmp_dir / "trainer_state.json", asdict(state))
        tmp_dir.rename(final_dir)
        write_text_atomic(ckpt_dir / "latest", tag)
        _prune(ckpt_dir, keep)
        log.info("checkpoint published: %s", final_dir)
    barrier()  # nobody moves on (or exits) before the checkpoint is visible
    return final_dir


def _out_of_space(exc: BaseException, ckpt_dir: Path) -> bool:
    """torch.save reports a full disk as a RuntimeError without an errno ("unexpected pos", "file
    write failed"): an errno in the exception chain, or a nearly full file system, says it was one."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DiskFullError.ERRNOS:
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(ckpt_dir).free < LOW_SPACE_BYTES
    except OSError:
        return False


def _prune(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` published checkpoints; rename before deleting so a half-deleted one is
    never mistaken for a complete one."""
    found = complete_checkpoints(ckpt_dir)
    for _, path in found[: max(0, len(found) - keep)]:
        trash = path.with_name(TRASH_PREFIX + path.name)
        path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)


def load_latest(engine: Any, ckpt_dir: Path, *, rank: int, exclude_frozen: bool) -> TrainState | None:
    """Load the newest published checkpoint into ``engine`` and restore this rank's RNG; None if there
    is none. Every rank must call this."""
    tag_dir = latest_complete(ckpt_dir)
    if tag_dir is None:
        return None
    load_path, client_state = engine.load_checkpoint(
        str(ckpt_dir),
        tag=tag_dir.name,
        load_module_strict=not exclude_frozen,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None or not client_state or CLIENT_STATE_KEY not in client_state:
        raise RuntimeError(f"checkpoint {tag_dir} could not be loaded (no training state in it)")
    state = TrainState.from_dict(client_state[CLIENT_STATE_KEY])
    rng_path = _rng_file(tag_dir, rank)
    if rng_path.exists():
        _set_rng_state(torch.load(rng_path, weights_only=False))
    else:  # the world size changed since the save: the run continues, but not bit-exactly
        log.warning("no RNG state for rank %d in %s; continuing with fresh RNG", rank, tag_dir)
    return state
