"""The embedded default backend: every run on this machine, `world_size` rank processes each.

Why the ranks are spawned here (torchrun-style env) rather than through submitit's LocalExecutor:
submitit's local controller waits for *all* tasks of a job, so a rank that crashes leaves its
siblings blocked in a gloo collective until the process-group timeout; its logs go to its own
pickle folder, not `logs/rank{N}.log`; and its default 2-minute timeout kills real runs. Here the
supervisor polls every rank, kills the siblings of a crashed rank at once (SIGKILL to each rank's
process group), records FAILED with the rank, exit code and the last line of its log, and forwards
Ctrl-C as SIGTERM so the trainer checkpoints and exits resumable.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from launcher.backends.base import NoProgress, ProgressViewFactory, SubmittedRun
from launcher.backends.container import (
    container_problems,
    host_env,
    interpreter_argv,
    local_container_problem,
)
from launcher.backends.launch_env import TORCHRUN_KEYS, free_port, torchrun_env
from launcher.errors import UserError
from launcher.rundir.paths import (
    RENDEZVOUS_FILE_ENV,
    ExperimentPaths,
    RunPaths,
    RunState,
    read_json,
    tail_lines,
    utc_now,
    write_json_atomic,
)
from launcher.rundir.status import ATTEMPT_ID_ENV, read_status, update_status

if TYPE_CHECKING:
    from rich.console import Console

    from launcher.rundir.run_config import RunConfig
    from launcher.spec.schema import JobSpec

# = launcher.train.entry.PREEMPTED_EXIT_CODE; not imported because that module pulls in torch.
PREEMPTED_EXIT_CODE = 3
SUPERVISOR_FILE = "local.json"  # inside the run's logs/: supervisor pid, rank pids, cancel flag
# Environment a rank must not inherit: the trainer prefers submitit/Slurm variables over RANK/WORLD_SIZE,
# so a `launcher submit --backend local` typed inside a Slurm allocation would otherwise misroute ranks.
_STRIP_ENV_PREFIXES = ("SLURM_", "SUBMITIT_")
_STRIP_ENV_KEYS = TORCHRUN_KEYS


def visible_gpus() -> list[str]:
    """GPU ids this machine lets us use: CUDA_VISIBLE_DEVICES if set, else torch's device count."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch / broken driver: plain CPU
        return []


def _usable_cores() -> int:
    """The cores this process may run on (its affinity: a cgroup or taskset may allow fewer than the
    machine has)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _start_ticks(pid: int) -> str | None:
    """The process start time (clock ticks since boot, /proc/PID/stat field 22); None off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def supervisor_job_id(pid: int | None = None) -> str:
    """This process as a local "job id": 'PID@START' so a reused pid is never mistaken for it."""
    pid = os.getpid() if pid is None else pid
    ticks = _start_ticks(pid)
    return f"{pid}@{ticks}" if ticks else str(pid)


def job_alive(job_id: str) -> bool:
    pid_text, _, ticks = job_id.partition("@")
    if not pid_text.isdigit() or not pid_alive(int(pid_text)):
        return False
    return not ticks or _start_ticks(int(pid_text)) in (None, ticks)


def last_log_line(path: Path, max_chars: int = 300) -> str:
    """The last non-blank line of a log (usually the exception), for a FAILED reason."""
    lines = [line.strip() for line in tail_lines(path, 8192) if line.strip()]
    return lines[-1][:max_chars] if lines else ""


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


# Last log lines that show a rank only lost its peers (the effect of another rank's crash, not the cause).
_PEER_LOSS_MARKERS = ("closed by peer", "reset by peer", "broken pipe", "remote worker", "connection refused")


def _root_failure(failed: list[tuple[RankProcess, int, str]]) -> tuple[RankProcess, int, str] | None:
    """The failure that caused the others: the first rank whose error is not a lost connection."""
    for entry in failed:
        if not any(marker in entry[2].lower() for marker in _PEER_LOSS_MARKERS):
            return entry
    return failed[0] if failed else None


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """Children get SIGTERM when the supervisor dies (even by SIGKILL): no orphaned ranks (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError:
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))

    return preexec


# --- supervisor state shared with `launcher cancel` / `launcher status` in other processes -------------


def supervisor_file(paths: RunPaths) -> Path:
    return paths.logs / SUPERVISOR_FILE


def read_supervisor(paths: RunPaths) -> dict[str, Any]:
    try:
        data = read_json(supervisor_file(paths))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def cancel_requested(paths: RunPaths) -> bool:
    return bool(read_supervisor(paths).get("cancel_requested"))


# --- processes ---------------------------------------------------------------------------------------


@dataclass
class RankProcess:
    rank: int
    popen: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]
    label: str = ""

    def __post_init__(self) -> None:
        self.label = self.label or f"rank {self.rank}"


@dataclass
class ActiveRun:
    run: RunConfig
    paths: RunPaths
    procs: list[RankProcess]
    gpus: list[str]
    started_at: float
    cpu_cores: int = 0
    """Cores this run holds on a machine without GPUs (``cpu_cores_needed``), given back at its end."""
    first_exit_at: float | None = None
    failure: str | None = None
    exit_codes: dict[int, int] = field(default_factory=dict)
    kill_at: float | None = None
    killed: bool = False
    failed_ranks: list[tuple[RankProcess, int, str]] = field(default_factory=list)
    """(rank, exit code, last log line) of ranks that failed on their own, in the order seen."""


@dataclass
class QueuedRun:
    run: RunConfig
    paths: RunPaths


class SupervisedBackend(ABC):
    """A backend whose runs this process starts and supervises to their end (`wait()`): a queue with
    a concurrency limit and a GPU pool, cancel, Ctrl-C handling, failure recording. Subclasses say how
    a run is checked and started through four hooks: ``prepare``, ``launch``, ``gpu_pool`` and
    ``max_concurrent_runs``. LocalBackend starts the ranks itself; HostfileBackend starts one
    `deepspeed --hostfile` launcher per run."""

    name: str

    def __init__(
        self,
        spec: JobSpec | None,
        *,
        train_command: Sequence[str] | None = None,
        console: Console | None = None,
        show_progress: bool | None = None,
        progress_view: ProgressViewFactory | None = None,
        poll_interval_s: float = 0.5,
        stop_grace_s: float = 180.0,
        sibling_exit_timeout_s: float = 300.0,
        sibling_kill_grace_s: float = 5.0,
    ) -> None:
        self.spec = spec
        # The rank command without its RUN_DIR argument; tests substitute a stand-in trainer. None: each
        # run's own interpreter (cluster.python, maybe inside cluster.container) with launcher.train.
        self.train_command = list(train_command) if train_command else None
        self.console = console
        self.show_progress = show_progress
        self.progress_view: ProgressViewFactory = progress_view or NoProgress
        self.poll_interval_s = poll_interval_s
        self.stop_grace_s = stop_grace_s
        self.sibling_exit_timeout_s = sibling_exit_timeout_s
        self.sibling_kill_grace_s = sibling_kill_grace_s
        self._queue: list[QueuedRun] = []
        self._ports: set[int] = set()
        self._gpus: list[str] | None = None

    # --- hooks: what a supervised backend must say -----------------------------------------------

    @abstractmethod
    def prepare(self, exp: ExperimentPaths, runs: list[RunConfig]) -> dict[str, str]:
        """Check that every run can start (raise UserError, nothing queued, if one cannot) and write
        what it needs before queueing; returns run name -> the command it will run (as printed)."""

    @abstractmethod
    def launch(self, queued: QueuedRun, gpus: list[str]) -> list[RankProcess]:
        """Start one run with ``gpus`` (from ``gpu_pool``); the processes the supervisor polls. Each
        must be in its own session, and nothing may outlive a launch that fails half-way."""

    @abstractmethod
    def gpu_pool(self) -> list[str]:
        """The GPU ids this machine hands to runs (CUDA_VISIBLE_DEVICES values); [] when runs need
        none from here (CPU, or the hosts assign them)."""

    @abstractmethod
    def max_concurrent_runs(self, queue: list[QueuedRun]) -> int:
        """How many runs of ``queue`` may run at once."""

    def cpu_core_pool(self) -> int:
        """Cores runs share on a machine that hands out no GPUs; 0: no core accounting (the default:
        the hosts, not this machine, run the ranks)."""
        return 0

    def cpu_cores_needed(self, run: RunConfig) -> int:
        """Cores one run holds while it runs (counted against ``cpu_core_pool``)."""
        return 0

    # --- Backend protocol --------------------------------------------------------------------------

    def submit(self, exp: ExperimentPaths, runs: list[RunConfig], *, dry_run: bool) -> list[SubmittedRun]:
        """Queue the runs for ``wait`` (this process supervises them): each gets its supervisor file
        and PENDING with this process as its job id. Every run is checked before any is queued."""
        commands = self.prepare(exp, runs)
        submitted = []
        for run in runs:
            paths = exp.run(run.name)
            job_id = None if dry_run else supervisor_job_id()
            if not dry_run:
                paths.logs.mkdir(parents=True, exist_ok=True)
                write_json_atomic(
                    supervisor_file(paths),
                    {"supervisor_pid": os.getpid(), "submitted_at": utc_now(), "cancel_requested": False},
                )
                update_status(paths, RunState.PENDING, backend=self.name, job_id=job_id)
                self._queue.append(QueuedRun(run, paths))
            submitted.append(
                SubmittedRun(run.name, run.run_id, self.name, job_id=job_id, command=commands[run.name])
            )
        return submitted

    def cancel(self, exp: ExperimentPaths, runs: list[SubmittedRun]) -> None:
        """Ask the supervisor (maybe another process) to stop these runs; SIGTERM their ranks."""
        for sub in runs:
            paths = exp.run(sub.name)
            info = read_supervisor(paths)
            info["cancel_requested"] = True
            write_json_atomic(supervisor_file(paths), info)
            for pid in info.get("rank_pids") or []:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(int(pid), signal.SIGTERM)
        deadline = time.monotonic() + 60.0
        for sub in runs:
            for pid in read_supervisor(exp.run(sub.name)).get("rank_pids") or []:
                while pid_alive(int(pid)) and time.monotonic() < deadline:
                    time.sleep(0.2)

    def live_states(self, runs: list[SubmittedRun]) -> dict[str, str]:
        """A run whose supervising `launcher submit` process is gone can't be running: PREEMPTED
        (a resubmit resumes it). Runs with a live supervisor: {} (their files are current)."""
        states: dict[str, str] = {}
        for sub in runs:
            if sub.job_id and not job_alive(sub.job_id):
                states[sub.name] = RunState.PREEMPTED.value
        return states

    def pending_reasons(self, runs: list[SubmittedRun]) -> dict[str, str]:
        return {}  # queued runs here wait for the runs ahead of them (local.max_concurrent_runs)

    # --- commands ----------------------------------------------------------------------------------

    def _child_env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(_STRIP_ENV_PREFIXES) and k not in _STRIP_ENV_KEYS
        }
        env.update(extra)
        return env

    # --- supervision -------------------------------------------------------------------------------

    def wait(self, exp: ExperimentPaths) -> dict[str, str]:
        """Run every queued run to its end; returns run name -> final state. Ctrl-C stops them resumably."""
        queue = list(self._queue)
        self._queue.clear()
        states: dict[str, str] = {}
        if not queue:
            return states
        max_concurrent = self.max_concurrent_runs(queue)
        free_gpus = list(self.gpu_pool())
        active: list[ActiveRun] = []
        progress = self.progress_view([q.paths for q in queue], console=self.console, live=self.show_progress)
        previous_sigterm = _raise_on_sigterm()
        try:
            with progress:
                while queue or active:
                    while queue and len(active) < max_concurrent:
                        free_cores = self.cpu_core_pool() - sum(item.cpu_cores for item in active)
                        started = self._start_next(queue, free_gpus, free_cores, states)
                        if started is None:
                            break  # the next run waits for a running one to give its GPUs back
                        if started is not False:
                            active.append(started)
                    for item in list(active):
                        if self._poll(item):
                            active.remove(item)
                            free_gpus.extend(item.gpus)
                            states[item.run.name] = self._finalize(item, interrupted=False)
                    progress.update()
                    if queue or active:
                        time.sleep(self.poll_interval_s)
                progress.update()
        except KeyboardInterrupt:
            self._stop(active, queue, states)
            raise
        finally:
            _restore_sigterm(previous_sigterm)
        return states

    def _start_next(
        self, queue: list[QueuedRun], free_gpus: list[str], free_cores: int, states: dict[str, str]
    ) -> ActiveRun | Literal[False] | None:
        """Start the head of the queue: its ActiveRun; None if it must wait for GPUs or cores; False if
        it ended without starting (cancelled meanwhile, or its ranks could not be spawned)."""
        head = queue[0]
        if cancel_requested(head.paths):
            queue.pop(0)
            states[head.run.name] = self._record(
                head.paths, RunState.CANCELLED, "cancelled before it started"
            )
            return False
        need = head.run.resources.world_size if self.gpu_pool() else 0
        cores = self.cpu_cores_needed(head.run)
        if need > len(free_gpus) or cores > free_cores:
            return None
        gpus = free_gpus[:need]
        del free_gpus[:need]
        queue.pop(0)
        # Before the ranks exist: rank 0 writes RUNNING once its engine is ready, and must not be undone.
        self._record(head.paths, RunState.STARTING, None)
        try:
            procs = self.launch(head, gpus)
        except OSError as exc:  # e.g. the train command is missing: this run fails, the others go on
            free_gpus.extend(gpus)
            reason = f"could not start its ranks: {exc}"
            states[head.run.name] = self._record(head.paths, RunState.FAILED, reason)
            return False
        return ActiveRun(head.run, head.paths, procs, gpus, time.monotonic(), cpu_cores=cores)

    def _poll(self, item: ActiveRun) -> bool:
        """Advance one run's bookkeeping; True when all its ranks have exited."""
        now = time.monotonic()
        for proc in item.procs:
            code = proc.popen.poll()
            if code is None or proc.rank in item.exit_codes:
                continue
            item.exit_codes[proc.rank] = code
            item.first_exit_at = item.first_exit_at or now
            killed_by_us = item.killed and code == -signal.SIGKILL
            if code not in (0, PREEMPTED_EXIT_CODE) and not killed_by_us:
                detail = last_log_line(proc.log_path)
                item.failed_ranks.append((proc, code, detail))
                if item.failure is None:
                    item.failure = f"{proc.label} {_exit_text(code)}" + (f": {detail}" if detail else "")
                    # Siblings blocked in a collective never return: a short grace lets ranks that did
                    # see an error exit (and log it) on their own, then the rest are killed.
                    item.kill_at = now + self.sibling_kill_grace_s
        if item.kill_at is not None and now >= item.kill_at and not item.killed:
            self._kill(item, signal.SIGKILL)
            item.killed = True
        alive = [p for p in item.procs if p.rank not in item.exit_codes]
        if (
            alive
            and item.first_exit_at is not None
            and now - item.first_exit_at > self.sibling_exit_timeout_s
            and item.failure is None
        ):
            item.failure = (
                f"{', '.join(p.label for p in alive)} still running "
                f"{self.sibling_exit_timeout_s:.0f}s after another rank exited; killed"
            )
            self._kill(item, signal.SIGKILL)
            item.killed = True
        if alive:
            return False
        for proc in item.procs:
            proc.log.close()
        return True

    def _kill(self, item: ActiveRun, sig: signal.Signals) -> None:
        for proc in item.procs:
            if proc.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.popen.pid, sig)

    def _record(self, paths: RunPaths, state: RunState, reason: str | None, **extra: Any) -> str:
        """Record a run's state; returns the state status.json holds (a COMPLETED run stays so). The
        supervisor goes on with the other runs even when the record cannot be written (a full disk):
        it says so where it prints."""
        try:
            return str(update_status(paths, state, reason, **extra)["state"])
        except OSError as exc:
            self._say(f"{paths.name}: {state.value} ({reason}), but status.json could not be written: {exc}")
            return state.value

    def _say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text)

    def _finalize(self, item: ActiveRun, *, interrupted: bool) -> str:
        """Decide the run's final state from the ranks' exit codes and what the trainer recorded."""
        status = read_status(item.paths)
        recorded = status.get("state")
        codes = {"exit_codes": {str(r): c for r, c in sorted(item.exit_codes.items())}}
        if cancel_requested(item.paths):
            return self._record(item.paths, RunState.CANCELLED, "cancelled by user", **codes)
        if item.failure is not None and not interrupted:
            reason = item.failure
            root = _root_failure(item.failed_ranks)
            if root is not None:
                proc, code, detail = root
                reason = f"{proc.label} {_exit_text(code)}" + (f": {detail}" if detail else "")
                # The trainer's own record is cleaner, but only if it is the root rank's: a survivor's
                # "connection closed by peer" can land in status.json after the real error.
                trainer_said = recorded == RunState.FAILED.value and status.get("reason")
                if trainer_said and status.get("failed_rank") == proc.rank:
                    reason = f"{status['reason']} ({proc.label} {_exit_text(code)})"
            return self._record(item.paths, RunState.FAILED, reason, **codes)
        if interrupted or PREEMPTED_EXIT_CODE in item.exit_codes.values():
            if recorded in (RunState.COMPLETED.value, RunState.FAILED.value, RunState.PREEMPTED.value):
                return str(recorded)
            reason = "stopped; resumes from its last checkpoint"
            return self._record(item.paths, RunState.PREEMPTED, reason, **codes)
        if recorded != RunState.COMPLETED.value:
            reason = (
                f"all ranks exited 0 but the run recorded {recorded}, not COMPLETED "
                f"(see {item.paths.rank_log(0)})"
            )
            return self._record(item.paths, RunState.FAILED, reason, **codes)
        return RunState.COMPLETED.value

    def _stop(self, active: list[ActiveRun], queue: list[QueuedRun], states: dict[str, str]) -> None:
        """Ctrl-C: SIGTERM every rank (the trainer checkpoints and exits), wait, then SIGKILL leftovers.
        A second Ctrl-C skips the wait."""
        out = self._say
        out(
            f"stopping {len(active)} running run(s): ranks save a checkpoint and exit "
            f"(up to {self.stop_grace_s:.0f}s; Ctrl-C again to kill now)"
        )
        for item in active:
            self._kill(item, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace_s
        try:
            while any(p.popen.poll() is None for item in active for p in item.procs):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
        for item in active:
            self._kill(item, signal.SIGKILL)
            for proc in item.procs:
                proc.popen.wait()
                item.exit_codes.setdefault(proc.rank, proc.popen.returncode)
                proc.log.close()
            states[item.run.name] = self._finalize(item, interrupted=True)
        for queued in queue:
            reason = "not started: submit was interrupted"
            states[queued.run.name] = self._record(queued.paths, RunState.PLANNED, reason)
        out("stopped; run the same `launcher submit` again to resume from the checkpoints")


class LocalBackend(SupervisedBackend):
    """Runs queued runs on this machine with a concurrency limit; `wait()` supervises them to the end."""

    name = "local"

    def prepare(self, exp: ExperimentPaths, runs: list[RunConfig]) -> dict[str, str]:
        """Check that every run can start here; run name -> the command it will run (as printed)."""
        gpus = self.gpu_pool()
        for run in runs:
            problems = container_problems(run.cluster)
            problem = local_container_problem(run.cluster)
            if problems or problem:
                raise UserError("\n".join(problems or [str(problem)]) + "\nNothing was started.")
            if gpus and run.resources.world_size > len(gpus):
                raise UserError(
                    f"run {run.name!r} needs {run.resources.world_size} GPUs (nodes x gpus_per_node) "
                    f"but this machine shows {len(gpus)}; lower resources.gpus_per_node / nodes, "
                    "or use --backend slurm"
                )
        return {run.name: self.describe_command(exp.run(run.name), run) for run in runs}

    def threads_per_rank(self, run: RunConfig) -> int:
        """``local.cpu_threads_per_rank``, else this machine's cores shared by the ranks of as many runs
        as may run at once."""
        return run.local.cpu_threads_per_rank or max(
            1, _usable_cores() // max(1, run.resources.world_size * run.local.max_concurrent_runs)
        )

    def cpu_core_pool(self) -> int:
        return 0 if self.gpu_pool() else _usable_cores()

    def cpu_cores_needed(self, run: RunConfig) -> int:
        """Ranks x threads per rank: a run starts when that many cores are free, so runs side by side
        never share a core (their throughput is then comparable). A run bigger than the machine takes
        all of it, alone."""
        pool = self.cpu_core_pool()
        return min(pool, run.resources.world_size * self.threads_per_rank(run)) if pool else 0

    def rank_env(self, run: RunConfig, rank: int, port: int, gpus: list[str]) -> dict[str, str]:
        env = torchrun_env(rank, run.resources.world_size, port)
        env.update({"OMP_NUM_THREADS": str(self.threads_per_rank(run)), "PYTHONUNBUFFERED": "1"})
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        return env

    def rank_argv(self, paths: RunPaths, run: RunConfig) -> list[str]:
        """What one rank runs: the train command (the run's interpreter, in its container) + RUN_DIR."""
        command = self.train_command or [
            *interpreter_argv(run.cluster, paths.root.resolve(), [run]),
            "-u",
            "-m",
            "launcher.train",
        ]
        return [*command, str(paths.root.resolve())]

    def describe_command(self, paths: RunPaths, run: RunConfig) -> str:
        """What each rank runs (printed by --dry-run); MASTER_PORT is picked free when the run starts."""
        lines = []
        for rank in range(run.resources.world_size):
            env = self.rank_env(run, rank, 0, [])
            env["MASTER_PORT"] = "<free port>"
            env_text = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items() if k != "PYTHONUNBUFFERED")
            env.update(host_env(run.cluster, [run]))
            argv = shlex.join(self.rank_argv(paths, run))
            lines.append(f"{env_text} {argv} > {shlex.quote(str(paths.rank_log(rank)))} 2>&1")
        return "\n".join(lines)

    def gpu_pool(self) -> list[str]:
        if self._gpus is None:
            self._gpus = visible_gpus()
        return self._gpus

    def launch(self, queued: QueuedRun, gpus: list[str]) -> list[RankProcess]:
        """Start one run's rank processes, each in its own session (Ctrl-C reaches only the supervisor)."""
        run, paths = queued.run, queued.paths
        port = free_port(self._ports)
        self._ports.add(port)
        paths.logs.mkdir(parents=True, exist_ok=True)
        # rank 0 binds its own port and publishes it here (MASTER_PORT stays as a fallback for trainers
        # that don't read it); an earlier attempt's port is stale
        paths.rendezvous_port.unlink(missing_ok=True)
        preexec = _pdeathsig_preexec()
        attempt = {
            ATTEMPT_ID_ENV: uuid.uuid4().hex,  # failure records of other launches are history
            RENDEZVOUS_FILE_ENV: str(paths.rendezvous_port.resolve()),
        }
        procs: list[RankProcess] = []
        try:
            for rank in range(run.resources.world_size):
                log_path = paths.rank_log(rank)
                # append: a resumed run keeps the earlier attempt's log; closed when the rank exits
                log = open(log_path, "ab")  # noqa: SIM115
                log.write(f"\n=== launcher local: rank {rank} started {utc_now()} ===\n".encode())
                log.flush()
                popen = subprocess.Popen(
                    self.rank_argv(paths, run),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self._child_env(
                        {**self.rank_env(run, rank, port, gpus), **attempt, **host_env(run.cluster, [run])}
                    ),
                    start_new_session=True,
                    preexec_fn=preexec,
                )
                procs.append(RankProcess(rank, popen, log_path, log))
            info = read_supervisor(paths)
            info.update(
                {
                    "supervisor_pid": os.getpid(),
                    "rank_pids": [p.popen.pid for p in procs],
                    "master_port": port,
                    "gpus": gpus,
                    "started_at": utc_now(),
                }
            )
            write_json_atomic(supervisor_file(paths), info)  # `launcher cancel` finds the ranks here
        except BaseException:
            # Ctrl-C, a failed spawn half-way or a full disk: no rank may outlive a half-started run.
            for proc in procs:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait()
                proc.log.close()
            raise
        return procs

    def max_concurrent_runs(self, queue: list[QueuedRun]) -> int:
        if self.spec is not None:
            return self.spec.local.max_concurrent_runs
        return queue[0].run.local.max_concurrent_runs


class _Terminated(KeyboardInterrupt):
    """SIGTERM to the supervisor takes the Ctrl-C path (children checkpoint, nothing orphaned)."""


def _raise_on_sigterm() -> Any:
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: object) -> None:
        raise _Terminated()

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
