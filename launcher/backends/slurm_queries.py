"""What Slurm says about jobs: squeue first (queued, running, recently ended), then sacct (ended jobs),
every call under a timeout so `launcher status` never hangs.

Without accounting (no slurmdbd) sacct fails; jobs that left squeue are then simply unknown here and
the caller falls back to the run dir's status.json. Slurm's COMPLETED is deliberately not reported:
a job that exited cleanly may have ended with a PREEMPTED run (requeue limit reached) and only the
run dir knows; every other state is.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

from launcher.rundir.attempts import attempt_job_ids
from launcher.rundir.paths import ExperimentPaths, RunState, read_json

QUERY_TIMEOUT_S = 10.0

_PENDING = {
    "PENDING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESV_DEL_HOLD",
    "CONFIGURING",
    "SPECIAL_EXIT",
}
_RUNNING = {"RUNNING", "COMPLETING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "RESIZING", "STOPPED"}
_FAILED = {"FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "TIMEOUT"}


def map_slurm_state(raw: str) -> RunState | None:
    """A Slurm job state (squeue %T or sacct State, e.g. "CANCELLED by 0") as a RunState; None = ask
    the run dir (COMPLETED and anything unrecognised)."""
    word = raw.strip().split(" ")[0].rstrip("+").upper() if raw.strip() else ""
    if word in _PENDING:
        return RunState.PENDING
    if word in _RUNNING:
        return RunState.RUNNING
    if word == "PREEMPTED":
        return RunState.PREEMPTED
    if word in _FAILED:
        return RunState.FAILED
    if word == "CANCELLED":
        return RunState.CANCELLED
    return None


Runner = Callable[[list[str]], str | None]


def run_query(cmd: list[str], timeout_s: float = QUERY_TIMEOUT_S) -> str | None:
    """stdout of a scheduler query, or None when the command is missing, fails or takes too long."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def parse_pipe_table(text: str) -> dict[str, str]:
    """``JOBID|STATE`` lines -> {job id: state}; array ranges like 12_[0-3] are kept as written."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 2 and parts[0]:
            out[parts[0]] = parts[1]
    return out


def squeue_rows(runner: Runner = run_query) -> dict[str, tuple[str, str]] | None:
    """{job id: (state, reason)} for every job of this user Slurm still remembers (queued, running and
    ended within MinJobAge), array tasks one per line. Querying all rather than by id: squeue rejects
    the whole call when one id has been purged. The reason (%r) says why a job waits ("Priority",
    "Resources", "Dependency", "BeginTime", ...) or "None"."""
    user = os.environ.get("USER") or os.environ.get("LOGNAME")
    cmd = ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T|%r"]
    cmd += [f"--user={user}"] if user else ["--me"]
    out = runner(cmd)
    if out is None:
        return None
    rows = {}
    for line in out.splitlines():
        job_id, _, rest = line.strip().partition("|")
        state, _, reason = rest.partition("|")
        if job_id and state:
            rows[job_id] = (state, reason.strip())
    return rows


def squeue_states(runner: Runner = run_query) -> dict[str, str] | None:
    rows = squeue_rows(runner)
    return None if rows is None else {job_id: state for job_id, (state, _) in rows.items()}


def pending_reasons(job_ids: Iterable[str], runner: Runner = run_query) -> dict[str, str]:
    """{job id: squeue's reason} for the queued jobs among ``job_ids``; {} when squeue does not answer."""
    rows = squeue_rows(runner) or {}
    reasons = {
        job_id: reason
        for job_id, (state, reason) in rows.items()
        if map_slurm_state(state) == RunState.PENDING
    }
    out = {}
    for job_id in dict.fromkeys(job_ids):
        reason = lookup(reasons, job_id) if job_id else None
        if reason and reason != "None":
            out[job_id] = reason
    return out


def sacct_states(job_ids: Iterable[str], runner: Runner = run_query) -> dict[str, str] | None:
    """Final states from accounting; None when accounting is disabled or unreachable."""
    # The array's own id too: tasks never split off are recorded under it alone.
    ids = sorted({j for j in job_ids if j} | {j.split("_")[0] for j in job_ids if "_" in j})
    if not ids:
        return {}
    out = runner(
        [
            "sacct",
            "--noheader",
            "--parsable2",
            "--allocations",
            "--format=JobID,State",
            "--jobs",
            ",".join(ids),
        ]
    )
    return None if out is None else parse_pipe_table(out)


def _in_array_range(spec: str, index: int) -> bool:
    """Whether ``index`` is in an array range as squeue/sacct print it: "0-3,5,7-9%2"."""
    for part in spec.split("%")[0].split(","):
        low, _, high = part.partition("-")
        try:
            if int(low) <= index <= int(high or low):
                return True
        except ValueError:
            continue
    return False


def lookup(table: dict[str, str], job_id: str) -> str | None:
    """The state of ``job_id`` ("12" or array task "12_3"); array tasks Slurm has not split off yet
    are listed as one record ("12_[3-9%2]" while queued, plain "12" once cancelled or ended)."""
    if job_id in table:
        return table[job_id]
    array_id, sep, index_text = job_id.partition("_")
    if not sep or not index_text.isdigit():
        return None
    index = int(index_text)
    for key, state in table.items():
        head, _, rest = key.partition("_")
        if head == array_id and rest.startswith("[") and _in_array_range(rest.strip("[]"), index):
            return state
    return table.get(array_id)


def query_job_states(job_ids: Iterable[str], runner: Runner = run_query) -> dict[str, RunState | None]:
    """{job id: RunState or None}; ids neither squeue nor sacct knows are left out (use the run dir)."""
    wanted = [j for j in dict.fromkeys(job_ids) if j]
    if not wanted:
        return {}
    found: dict[str, str] = {}
    queue = squeue_states(runner) or {}
    missing = []
    for job_id in wanted:
        state = lookup(queue, job_id)
        if state is not None:
            found[job_id] = state
        else:
            missing.append(job_id)
    if missing:
        accounted = sacct_states(missing, runner) or {}
        for job_id in missing:
            state = lookup(accounted, job_id)
            if state is not None:
                found[job_id] = state
    return {job_id: map_slurm_state(raw) for job_id, raw in found.items()}


def accounting_enabled(runner: Runner = run_query) -> bool:
    """True when sacct answers (slurmdbd configured and reachable)."""
    return runner(["sacct", "--noheader", "--allocations", "--format=JobID", "--starttime=now"]) is not None


def sacct_elapsed(job_ids: Iterable[str], runner: Runner = run_query) -> list[tuple[str, str, float]] | None:
    """Every allocation of the jobs as (JobID, JobIDRaw, elapsed seconds), requeued attempts included
    (``--duplicates``), each once even when two of the ids name it; None when accounting is disabled
    or unreachable. Queue time is not elapsed. An array task is ``1234_3`` as JobID and its own number
    as JobIDRaw (SLURM_JOB_ID in the task)."""
    wanted = sorted({j for j in job_ids if j})
    if not wanted:
        return []
    out = runner(
        [
            "sacct",
            "--noheader",
            "--parsable2",
            "--allocations",
            "--duplicates",
            "--format=JobID,JobIDRaw,Start,ElapsedRaw",
            "--jobs",
            ",".join(wanted),
        ]
    )
    if out is None:
        return None
    records: dict[tuple[str, str], tuple[str, str, float]] = {}
    for line in out.splitlines():
        parts = [part.strip() for part in line.strip().split("|")]
        if len(parts) >= 4 and parts[3].isdigit():  # an attempt is its raw id and its start
            records[(parts[1], parts[2])] = (parts[0], parts[1], float(parts[3]))
    return list(records.values())


def _slurm_job_ids(exp: ExperimentPaths) -> dict[str, set[str]]:
    """{run dir: every Slurm job id it had}: the manifest's (as ``1234_3``) and those its attempts
    recorded (SLURM_JOB_ID), so a run resubmitted with --retry-failed counts its earlier jobs too. The
    manifest is read as the file it is (``runs: {run id: {name, backend, job_id}}``)."""
    try:
        runs = read_json(exp.manifest_json).get("runs") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    out: dict[str, set[str]] = {}
    for entry in runs.values() if isinstance(runs, dict) else []:
        if not isinstance(entry, dict) or entry.get("backend") != "slurm" or not entry.get("name"):
            continue
        paths = exp.run(str(entry["name"]))
        ids = {str(entry["job_id"])} if entry.get("job_id") else set()
        out[str(paths.root.resolve())] = ids | set(attempt_job_ids(paths))
    return out


def slurm_elapsed_by_run_dir(exp_roots: Iterable[Path], runner: Runner = run_query) -> dict[str, float]:
    """Slurm's elapsed seconds of every job of every run that went to Slurm, summed per run directory
    (resolved); {} without Slurm runs or accounting (the collector then uses attempts.jsonl)."""
    job_ids: dict[str, set[str]] = {}
    for root in exp_roots:
        job_ids.update(_slurm_job_ids(ExperimentPaths(Path(root))))
    wanted = set().union(*job_ids.values()) if job_ids else set()
    records = sacct_elapsed(wanted, runner) if wanted else None
    if not records:
        return {}
    totals: dict[str, float] = {}
    for run_dir, ids in job_ids.items():
        # each allocation once, whether the run knows it as 1234_3 or by its raw id
        seconds = sum(elapsed for job, raw, elapsed in records if job in ids or raw in ids)
        if seconds > 0:
            totals[run_dir] = seconds
    return totals
