"""What each Slurm task runs (pickled by submitit): one rank of one run, plus the collector job.

A task records where it runs (``logs/launch_rank{N}.json``: host, master address, job id, attempt),
links submitit's scheduler logs into the run dir, then calls ``launcher.train.entry.train_run``. The
training installs its own SIGUSR2/SIGTERM handlers over submitit's: on Slurm's warning (time limit or
preemption) it saves a checkpoint and returns "PREEMPTED". Rank 0 then requeues the job (the same run
dir, so the next attempt resumes from the checkpoint) unless the run already used its
``cluster.max_requeues`` requeues. A failed ``scontrol requeue`` is logged, never the run's failure:
under preemption Slurm requeues the job itself and may kill the call.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from launcher.rundir.paths import RunPaths, RunState, write_json_atomic
from launcher.rundir.status import ATTEMPT_ID_ENV, failure_reason, read_status, record_failure, update_status

log = logging.getLogger("launcher.slurm")
REQUEUE_TIMEOUT_S = 30.0


def restart_count() -> int:
    """How many times Slurm has requeued this job (0 on the first attempt)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def slurm_job_id() -> str | None:
    """The id to requeue: SLURM_JOB_ID is the task's own id, also for array tasks."""
    return os.environ.get("SLURM_JOB_ID")


class _EarlySignals:
    """Records USR2/TERM that arrive before the training takes over the handlers (e.g. during imports),
    instead of submitit's handler failing the job as "not checkpointable"."""

    def __init__(self) -> None:
        self.received: str | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name

    def install(self) -> _EarlySignals:
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                signal.signal(sig, self._handle)
        return self


def _link(target: Path, link: Path) -> None:
    with contextlib.suppress(OSError):
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)


def _record_launch(paths: RunPaths, rank: int, attempt: int) -> None:
    """Where this rank runs and which master it uses: the multi-node test checks the ranks agree."""
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    job_env = JobEnvironment()
    dist = TorchDistributedEnvironment()
    paths.logs.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        paths.logs / f"launch_rank{rank}.json",
        {
            "rank": rank,
            "world_size": dist.world_size,
            "local_rank": dist.local_rank,
            "node": job_env.node,
            "hostname": socket.gethostname(),
            "slurm_nodename": os.environ.get("SLURMD_NODENAME"),
            "master_addr": dist.master_addr,
            "master_port": dist.master_port,
            "job_id": job_env.job_id,
            "slurm_job_id": slurm_job_id(),
            "attempt": attempt,
            "pid": os.getpid(),
        },
    )
    # submitit's per-task logs, reachable from the run dir (`launcher logs` reads them there).
    _link(job_env.paths.stdout, paths.logs / f"slurm_rank{rank}.out")
    _link(job_env.paths.stderr, paths.logs / f"slurm_rank{rank}.err")


def mark_cancelled(paths: RunPaths) -> None:
    """`launcher cancel` stopped this run: CANCELLED, whatever the ranks made of the SIGTERM."""
    status = read_status(paths)
    kept = f"; checkpoint kept at step {status['step']}" if status.get("step") else ""
    update_status(paths, RunState.CANCELLED, f"cancelled by the user (scancel){kept}")


@dataclass(frozen=True)
class SlurmTask:
    """The callable every rank of an array task runs with its run dir."""

    max_requeues: int = 3

    def __call__(self, run_dir: str) -> str:
        early = _EarlySignals().install()
        paths = RunPaths(Path(run_dir))
        rank = int(os.environ.get("SLURM_PROCID", "0"))
        attempt = restart_count() + 1
        os.environ[ATTEMPT_ID_ENV] = f"{slurm_job_id()}:{restart_count()}"  # shared by this attempt's ranks
        _record_launch(paths, rank, attempt)
        if rank == 0:  # before the ranks load anything; rank 0 writes RUNNING once its engine is ready
            update_status(paths, RunState.STARTING, attempt=attempt, job_id=slurm_job_id())
        if early.received:
            outcome = RunState.PREEMPTED.value  # nothing trained since the last checkpoint: just requeue
        else:
            # lazy: the compute node's rank entrypoint (torch); a named exception in tests/test_layers.py
            from launcher.train.entry import train_run

            try:
                outcome = train_run(paths.root)
            except Exception as exc:  # the trainer recorded it already, unless it failed before training
                record_failure(paths, rank, failure_reason(exc))
                raise
        if rank == 0:
            if outcome == RunState.PREEMPTED.value and read_status(paths).get("cancel_requested"):
                mark_cancelled(paths)
            elif outcome == RunState.PREEMPTED.value:
                self.requeue(paths, attempt)
            else:
                update_status(paths, attempt=attempt)
        return outcome

    def requeue(self, paths: RunPaths, attempt: int) -> bool:
        """Requeue this job with the same run dir, at most max_requeues times; record it in status.json."""
        requeues_done = attempt - 1
        if requeues_done >= self.max_requeues:
            update_status(
                paths,
                RunState.PREEMPTED,
                reason=(
                    f"stopped after {requeues_done} requeues (cluster.max_requeues={self.max_requeues}); "
                    "the checkpoint is kept: run `launcher submit` again to resume from it"
                ),
                attempt=attempt,
                requeued=False,
            )
            return False
        job_id = slurm_job_id()
        why = read_status(paths).get("reason") or "stopped by a signal"
        # Written before the call: the requeue kills this job's processes.
        update_status(
            paths,
            RunState.PREEMPTED,
            reason=f"{why}; requeued: attempt {attempt + 1} of at most {self.max_requeues + 1} next",
            attempt=attempt,
            requeued=True,
        )
        if job_id is None:
            return False
        try:
            proc = subprocess.run(
                ["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=REQUEUE_TIMEOUT_S
            )
        except (OSError, subprocess.SubprocessError) as exc:
            # Killed or timed out: under preemption Slurm is requeueing the job itself at this moment.
            log.warning("scontrol requeue %s failed: %s (Slurm requeues preempted jobs itself)", job_id, exc)
            return True
        if proc.returncode != 0:
            message = (proc.stderr or proc.stdout).strip()
            log.warning("scontrol requeue %s: %s", job_id, message)
            # "Job is pending execution": Slurm (preemption, an admin) already requeued it.
            if "pending" not in message.lower():
                update_status(
                    paths,
                    RunState.PREEMPTED,
                    reason=f"{why}; `scontrol requeue` failed ({message}): `launcher submit` again to resume",
                    requeued=False,
                )
                return False
        return True


def collect_task(exp_root: str) -> str:
    """The collector job: the comparison table for everything in the experiment, whatever ended how."""
    # lazy: the compute node's collector job; a named exception in tests/test_layers.py
    from launcher.backends.slurm_queries import slurm_elapsed_by_run_dir
    from launcher.collect import collect_experiment, print_summary

    collection = collect_experiment(Path(exp_root), elapsed_s=slurm_elapsed_by_run_dir([Path(exp_root)]))
    print_summary(collection)
    return str(exp_root)
