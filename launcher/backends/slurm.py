"""The Slurm backend: one submitit job array per resource shape, plus a dependent collector job.

Runs that need the same allocation (nodes, GPUs, CPUs, memory, time, partition and the other sbatch
options) share one array, so a sweep of N runs costs one ``sbatch`` call per shape instead of N; an
array larger than the cluster's MaxArraySize is split. Every task of a run is one rank
(``tasks_per_node = gpus_per_node``) executing :class:`launcher.backends.slurm_task.SlurmTask`.

Spec strings reach the sbatch script only through submitit's quoting (``shlex.quote`` on every
``#SBATCH`` value, which sbatch's own parser undoes); anything that quoting cannot make safe (a
newline or control character, a ``%`` that sbatch would expand in a log path, an option name that is
not an option name, an option the launcher owns) is rejected here with a UserError before anything is
written or submitted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import shlex
import subprocess
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from launcher.backends.base import SubmittedRun
from launcher.backends.container import container_problems, env_exports, interpreter_argv, srun_container_args
from launcher.backends.slurm_preflight import PreflightProblem, Request, check_request, query_partitions
from launcher.backends.slurm_queries import Runner, pending_reasons, query_job_states, run_query
from launcher.backends.slurm_task import SlurmTask, collect_task
from launcher.errors import CONTROL_CHARS, UserError, shown
from launcher.rundir.paths import ExperimentPaths, RunState
from launcher.rundir.status import read_status, update_status

if TYPE_CHECKING:
    from launcher.rundir.run_config import RunConfig
    from launcher.spec.schema import ClusterSpec, JobSpec

DEFAULT_MAX_ARRAY_SIZE = 1001  # Slurm's default when `scontrol show config` cannot be read
SCONTROL_TIMEOUT_S = 15.0
SCANCEL_TIMEOUT_S = 30.0
COLLECTOR_TIME_MIN = 30
# sbatch options the launcher itself sets: a spec overriding them would break arrays, logs or requeue.
RESERVED_SBATCH_OPTIONS = frozenset(
    {
        "array",
        "output",
        "error",
        "open-mode",
        "signal",
        "dependency",
        "wrap",
        "parsable",
        "hold",
        "job-name",
        "nodes",
        "ntasks-per-node",
        "ntasks",
        "gpus-per-node",
        "cpus-per-task",
        "mem",
        "time",
        "partition",
        "account",
        "qos",
        "constraint",
        "exclusive",
        "chdir",
        "export",
    }
)
_OPTION_NAME = re.compile(r"^[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*$")
# Slurm names: partitions (comma lists allowed), accounts, QOS.
_SLURM_NAME = re.compile(r"^[A-Za-z0-9_.+-]+(?:,[A-Za-z0-9_.+-]+)*$")
# Node features: names combined with & | , * [ ] ( ) and counts.
_CONSTRAINT = re.compile(r"^[A-Za-z0-9_.,&|*\[\]():!=+-]+$")
# The environment every rank gets: flush logs at once, NCCL errors surface instead of hanging.
NCCL_ENV_SETUP: tuple[str, ...] = (
    "export PYTHONUNBUFFERED=1",
    "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
    "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}",
    "export TOKENIZERS_PARALLELISM=false",
)


# --- validation of spec strings ------------------------------------------------------------------


def cluster_problems(cluster: ClusterSpec) -> list[str]:
    """Everything in ``cluster:`` that cannot safely become an sbatch option (empty when all is well)."""
    problems: list[str] = []
    for key in ("partition", "account", "qos"):
        value = getattr(cluster, key)
        if value is not None and not _SLURM_NAME.match(value):
            problems.append(
                f"cluster.{key}: {shown(value)} is not a Slurm name "
                "(letters, digits, _ . + - and commas between names)"
            )
    if cluster.constraint is not None and not _CONSTRAINT.match(cluster.constraint):
        problems.append(
            f"cluster.constraint: {shown(cluster.constraint)} is not a Slurm feature expression "
            "(feature names joined by & | , with [ ] ( ) * and no spaces)"
        )
    for key, value in cluster.extra_sbatch.items():
        name = key.replace("_", "-")
        if not _OPTION_NAME.match(key):
            problems.append(
                f"cluster.extra_sbatch: {shown(key)} is not an sbatch option name "
                "(write it without dashes, e.g. reservation, mail-type)"
            )
        elif name in RESERVED_SBATCH_OPTIONS:
            problems.append(
                f"cluster.extra_sbatch.{key}: the launcher sets --{name} itself; "
                "use the matching cluster/resources key instead"
            )
        if isinstance(value, str) and CONTROL_CHARS.search(value):
            problems.append(
                f"cluster.extra_sbatch.{key}: {shown(value)} contains a newline or control character"
            )
    if cluster.signal_delay_s >= cluster.time_min * 60:
        problems.append(
            f"cluster.signal_delay_s: {cluster.signal_delay_s} s is not less than cluster.time_min "
            f"({cluster.time_min} min): the warning signal would come at the start and every attempt "
            "would stop at once; lower signal_delay_s or raise time_min"
        )
    problems += container_problems(cluster)
    for number, line in enumerate(cluster.setup, start=1):
        if CONTROL_CHARS.search(line.replace("\t", " ")):
            problems.append(
                f"cluster.setup[{number}]: {shown(line)} contains a newline or control character; "
                "give one shell line per list item"
            )
    return problems


def path_problems(label: str, path: Path) -> list[str]:
    """A path used in #SBATCH lines and srun arguments: quoting handles spaces and quotes, not these."""
    text = str(path)
    problems = []
    if CONTROL_CHARS.search(text):
        problems.append(f"{label}: {shown(text)} contains a newline or control character")
    if "%" in text:
        problems.append(f"{label}: {shown(text)} contains '%', which sbatch expands in log file names")
    return problems


def job_name(experiment: str, suffix: str = "") -> str:
    """A job name made only of safe characters (squeue columns, log names)."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment).strip("_") or "launcher"
    return f"{base}{suffix}"[:100]


# --- cluster facts -----------------------------------------------------------------------------------


def parse_max_array_size(config_text: str) -> int | None:
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", config_text, flags=re.MULTILINE)
    return int(match.group(1)) if match else None


@functools.lru_cache(maxsize=1)
def max_array_size() -> int:
    """The cluster's MaxArraySize (array indexes go up to MaxArraySize - 1); read once per process."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "config"],
            capture_output=True,
            text=True,
            timeout=SCONTROL_TIMEOUT_S,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return DEFAULT_MAX_ARRAY_SIZE
    return parse_max_array_size(out) or DEFAULT_MAX_ARRAY_SIZE


# --- shapes and executor parameters ----------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """What one allocation looks like; runs with equal shapes share a job array."""

    nodes: int
    gpus_per_node: int
    cpus_per_task: int | Literal["auto"]
    """``auto`` until the pre-flight (:func:`preflight`) resolves it from sinfo."""
    mem_gb: int | None
    time_min: int
    partition: str | None
    account: str | None
    qos: str | None
    constraint: str | None
    exclusive: bool
    extra_sbatch: tuple[tuple[str, str | int | bool], ...]
    setup: tuple[str, ...]
    signal_delay_s: int
    array_parallelism: int | None
    max_requeues: int
    container: str | None
    """cluster.container as JSON (runs in other images or runtimes never share an array)."""
    python: str | None
    srun_args: tuple[str, ...]
    cluster: ClusterSpec = field(compare=False, hash=False, repr=False)
    """The cluster section these fields came from (to build the rank command)."""

    @classmethod
    def of(cls, run: RunConfig) -> Shape:
        c = run.cluster
        return cls(
            nodes=run.resources.nodes,
            gpus_per_node=run.resources.gpus_per_node,
            cpus_per_task=c.cpus_per_task,
            mem_gb=c.mem_gb,
            time_min=c.time_min,
            partition=c.partition,
            account=c.account,
            qos=c.qos,
            constraint=c.constraint,
            exclusive=c.exclusive,
            extra_sbatch=tuple(sorted(c.extra_sbatch.items())),
            setup=tuple(c.setup),
            signal_delay_s=c.signal_delay_s,
            array_parallelism=c.array_parallelism,
            max_requeues=c.max_requeues,
            container=c.container.model_dump_json() if c.container else None,
            python=c.python,
            srun_args=tuple(c.srun_args),
            cluster=c,
        )

    def request(self) -> Request:
        return Request(
            nodes=self.nodes,
            gpus_per_node=self.gpus_per_node,
            cpus_per_task=None if self.cpus_per_task == "auto" else self.cpus_per_task,
            mem_gb=self.mem_gb,
            time_min=self.time_min,
            partition=self.partition,
        )

    def launch(self, exp_root: Path, members: Sequence[RunConfig]) -> RankLaunch:
        return RankLaunch.of(self.cluster, exp_root, members)

    def executor_parameters(
        self, count: int, *, hold: bool = False, launch: RankLaunch | None = None
    ) -> dict[str, Any]:
        """submitit SlurmExecutor parameters for an array of ``count`` runs of this shape."""
        assert self.cpus_per_task != "auto", "the pre-flight resolves cpus_per_task: auto first"
        launch = launch or RankLaunch()
        additional: dict[str, Any] = {"requeue": True}
        for key, value in self.extra_sbatch:
            if value is False:
                continue  # a false flag means "leave it out"
            additional[key.replace("_", "-")] = value
        if hold:
            additional["hold"] = True
        params: dict[str, Any] = {
            "nodes": self.nodes,
            "ntasks_per_node": self.gpus_per_node,  # one rank per GPU
            "gpus_per_node": self.gpus_per_node,
            "cpus_per_task": self.cpus_per_task,
            "time": self.time_min,
            "signal_delay_s": self.signal_delay_s,
            "array_parallelism": min(count, self.array_parallelism or count),
            "setup": [
                *NCCL_ENV_SETUP,
                f"export OMP_NUM_THREADS={self.cpus_per_task}",
                *launch.setup,
                *self.setup,
            ],
            "additional_parameters": additional,
            # One failing rank ends the whole step instead of leaving the others hung in a collective.
            "srun_args": ["--kill-on-bad-exit=1", *launch.srun_args, *self.srun_args],
        }
        optional = {
            "mem": f"{self.mem_gb}GB" if self.mem_gb is not None else None,
            "partition": self.partition,
            "account": self.account,
            "qos": self.qos,
            "constraint": self.constraint,
        }
        params.update({k: v for k, v in optional.items() if v is not None})
        if self.exclusive:
            params["exclusive"] = True
        return params


@dataclass(frozen=True)
class RankLaunch:
    """How srun starts a rank's python: the interpreter (maybe inside Apptainer), pyxis's srun options
    and the batch-script lines they need (launcher.backends.container)."""

    python: tuple[str, ...] = ()
    """argv of the interpreter; empty: the submitting python."""
    srun_args: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()

    @classmethod
    def of(cls, cluster: ClusterSpec, exp_root: Path, runs: Sequence[RunConfig]) -> RankLaunch:
        return cls(
            python=tuple(interpreter_argv(cluster, exp_root, runs)),
            srun_args=tuple(srun_container_args(cluster, exp_root, runs)),
            setup=tuple(env_exports(cluster, runs)),
        )

    @property
    def python_command(self) -> str:
        """submitit's ``python`` (a shell command): each word quoted."""
        return shlex.join(self.python) if self.python else shlex.quote(sys.executable)


def group_by_shape(runs: Sequence[RunConfig], max_size: int) -> list[tuple[Shape, list[RunConfig]]]:
    """Runs grouped by shape (in first-seen order), each group cut into arrays of at most max_size."""
    groups: dict[Shape, list[RunConfig]] = {}
    for run in runs:
        groups.setdefault(Shape.of(run), []).append(run)
    chunks: list[tuple[Shape, list[RunConfig]]] = []
    for shape, members in groups.items():
        for start in range(0, len(members), max_size):
            chunks.append((shape, members[start : start + max_size]))
    return chunks


Chunks = list[tuple[Shape, list["RunConfig"]]]


def preflight(chunks: Chunks, runner: Runner = run_query, *, dry_run: bool = False) -> Chunks:
    """Each shape checked against sinfo (launcher.backends.slurm_preflight), ``auto`` CPUs resolved.
    A request the cluster cannot run is a UserError naming the runs, the spec key and the fix."""
    partitions = query_partitions(runner)
    if partitions is None:
        auto = [m.name for shape, members in chunks if shape.cpus_per_task == "auto" for m in members]
        if auto and not dry_run:
            raise UserError(
                "cluster.cpus_per_task: auto takes the CPUs per GPU from `sinfo`, which did not answer "
                f"(runs {_names(auto)}); set a number in the spec. Nothing was submitted."
            )
        print(
            "warning: `sinfo` did not answer: no pre-flight check of the resources"
            + (" (cpus_per_task: auto is shown as 1)" if auto else ""),
            file=sys.stderr,
        )
        return [(_with_cpus(shape, 1), members) for shape, members in chunks]
    problems: list[str] = []
    checked: Chunks = []
    resolved: dict[Shape, int] = {}
    for shape, members in chunks:
        if shape not in resolved:
            try:
                resolved[shape] = check_request(shape.request(), partitions)
            except PreflightProblem as exc:
                label = f"{shape.nodes} node(s) x {shape.gpus_per_node} GPU(s)"
                problems.append(f"runs {_names([m.name for m in members])} ({label}): {exc}")
                continue
        checked.append((_with_cpus(shape, resolved[shape]), members))
    if problems:
        raise UserError(
            "cannot submit to Slurm: the cluster cannot run these requests (checked against `sinfo`):\n"
            + "\n".join(f"  {p}" for p in problems)
            + "\nNothing was submitted."
        )
    return checked


def _with_cpus(shape: Shape, cpus: int) -> Shape:
    return shape if shape.cpus_per_task != "auto" else dataclasses.replace(shape, cpus_per_task=cpus)


def _names(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def slurm_log_folder(exp: ExperimentPaths) -> Path:
    """Where submitit keeps pickles, sbatch scripts and the scheduler logs of this experiment."""
    return exp.logs / "slurm"


def _sbatch_message(exc: BaseException) -> str:
    """sbatch's own error lines, once each."""
    lines = [ln.strip() for ln in str(exc).replace("sbatch: ", "\nsbatch: ").splitlines() if ln.strip()]
    return "\n  ".join(dict.fromkeys(lines)) or type(exc).__name__


# --- the backend ---------------------------------------------------------------------------------------


class SlurmBackend:
    """Submits runs as submitit job arrays; status through squeue/sacct; cancel through scancel."""

    name = "slurm"

    def __init__(self, spec: JobSpec | None = None, *, hold: bool = False, with_collector: bool = True):
        self.spec = spec
        self.hold = hold
        """Submit held (``--hold``): the benchmark submits 1,000 runs without running them."""
        self.with_collector = with_collector
        self.collector_job_id: str | None = None
        self.sbatch_calls = 0
        """sbatch calls made by this backend (the benchmark reports it)."""

    # -- submit ------------------------------------------------------------------------------------

    def check(self, exp: ExperimentPaths, runs: Sequence[RunConfig]) -> None:
        problems = path_problems("output directory", exp.root.resolve())
        seen: set[int] = set()
        for run in runs:
            if id(run.cluster) in seen:
                continue
            seen.add(id(run.cluster))
            for problem in cluster_problems(run.cluster):
                if problem not in problems:
                    problems.append(problem)
        if problems:
            raise UserError(
                "cannot submit to Slurm:\n" + "\n".join(f"  {p}" for p in problems) + "\n"
                "Fix these values in the spec (they would be unsafe in an sbatch script)."
            )

    def submit(self, exp: ExperimentPaths, runs: list[RunConfig], *, dry_run: bool) -> list[SubmittedRun]:
        if not runs:
            return []
        self.check(exp, runs)
        folder = slurm_log_folder(ExperimentPaths(exp.root.resolve()))
        chunks = preflight(group_by_shape(runs, max_array_size()), dry_run=dry_run)
        exp_root = exp.root.resolve()
        # Built before any sbatch: a run whose paths cannot be mounted stops the whole submission.
        launches = [shape.launch(exp_root, members) for shape, members in chunks]
        if dry_run:
            return self._dry_run(folder, exp_root, chunks, launches)
        import submitit

        submitted: list[SubmittedRun] = []
        array_ids: list[str] = []
        pending: dict[str, dict[str, Any]] = {}
        for (shape, members), launch in zip(chunks, launches, strict=True):
            executor = submitit.SlurmExecutor(
                folder=folder, max_num_timeout=shape.max_requeues, python=launch.python_command
            )
            executor.update_parameters(
                job_name=job_name(members[0].experiment),
                **shape.executor_parameters(len(members), hold=self.hold, launch=launch),
            )
            run_dirs = [str(exp_root / "runs" / run.name) for run in members]
            task = SlurmTask(max_requeues=shape.max_requeues)
            try:
                jobs = executor.map_array(task, run_dirs)
            except (submitit.core.utils.FailedJobError, OSError) as exc:
                # All or nothing: what this call already queued is withdrawn, so a fixed spec can be
                # submitted again without duplicates.
                self._withdraw(array_ids)
                raise UserError(
                    f"sbatch refused the array for runs {', '.join(r.name for r in members)}:\n"
                    f"  {_sbatch_message(exc)}\n"
                    "Check cluster.partition / account / qos / extra_sbatch in the spec "
                    f"(`sinfo` lists partitions).{' Withdrawn: ' + ', '.join(array_ids) if array_ids else ''}"
                ) from exc
            self.sbatch_calls += 1
            for index, (run, job) in enumerate(zip(members, jobs, strict=True)):
                is_array = len(members) > 1
                array_job_id = job.job_id.split("_")[0]
                script = folder / f"{array_job_id}_submission.sh"
                item = SubmittedRun(
                    name=run.name,
                    run_id=run.run_id,
                    backend=self.name,
                    job_id=job.job_id,
                    array_job_id=array_job_id if is_array else None,
                    array_index=index if is_array else None,
                    command=str(script) if script.exists() else None,
                )
                submitted.append(item)
                pending[item.name] = {
                    "job_id": item.job_id,
                    "array_job_id": item.array_job_id,
                    "array_index": item.array_index,
                    "attempt": 0,
                    "max_requeues": shape.max_requeues,
                    "cancel_requested": False,
                }
            array_ids.append(jobs[0].job_id.split("_")[0])
        if self.with_collector:
            try:
                self._submit_collector(exp_root, folder, runs[0], array_ids, submitit, collect_task)
            except (submitit.core.utils.FailedJobError, OSError) as exc:
                self._withdraw(array_ids)
                raise UserError(
                    f"sbatch refused the collector job:\n  {_sbatch_message(exc)}\n"
                    f"Withdrawn: {', '.join(array_ids)}"
                ) from exc
        write_pending(exp, pending)
        return submitted

    @staticmethod
    def _withdraw(job_ids: list[str]) -> None:
        if job_ids:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(["scancel", *job_ids], capture_output=True, timeout=SCANCEL_TIMEOUT_S)

    def _submit_collector(
        self,
        exp_root: Path,
        folder: Path,
        first: RunConfig,
        array_ids: list[str],
        submitit: Any,
        collect_task: Any,
    ) -> str:
        """A 1-CPU job that waits for every array (afterany: whatever their outcome) and writes the table."""
        launch = RankLaunch.of(first.cluster, exp_root, [first])
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=0, python=launch.python_command)
        executor.update_parameters(**collector_parameters(first, array_ids, hold=self.hold, launch=launch))
        job = executor.submit(collect_task, str(exp_root))
        self.sbatch_calls += 1
        self.collector_job_id = str(job.job_id)
        return self.collector_job_id

    def _dry_run(
        self, folder: Path, exp_root: Path, chunks: Chunks, launches: list[RankLaunch]
    ) -> list[SubmittedRun]:
        """Write the exact sbatch scripts submitit would submit, submit nothing."""
        out_dir = folder / "dry-run"
        out_dir.mkdir(parents=True, exist_ok=True)
        submitted: list[SubmittedRun] = []
        for number, ((shape, members), launch) in enumerate(zip(chunks, launches, strict=True)):
            text = render_array_script(folder, members[0].experiment, shape, members, launch, hold=self.hold)
            script = out_dir / f"array{number}.sbatch"
            script.write_text(text, encoding="utf-8")
            for index, run in enumerate(members):
                submitted.append(
                    SubmittedRun(
                        name=run.name,
                        run_id=run.run_id,
                        backend=self.name,
                        array_index=index if len(members) > 1 else None,
                        command=str(script),
                    )
                )
        if self.with_collector:
            first = chunks[0][1][0]
            ids = [f"<array{n}>" for n in range(len(chunks))]
            launch = RankLaunch.of(first.cluster, exp_root, [first])
            params = collector_parameters(first, ids, hold=self.hold, launch=launch)
            (out_dir / "collector.sbatch").write_text(render_script(folder, params, launch), encoding="utf-8")
        return submitted

    def wait(self, exp: ExperimentPaths) -> dict[str, str]:
        """Nothing to supervise here: Slurm runs the jobs, the collector job writes the table."""
        return {}

    # -- cancel / live states ---------------------------------------------------------------------------

    def cancel(self, exp: ExperimentPaths, runs: list[SubmittedRun]) -> None:
        ids = [r.job_id for r in runs if r.job_id]
        # Marked first: a running rank that checkpoints on scancel's SIGTERM must not requeue itself.
        for run in runs:
            paths = exp.run(run.name)
            if paths.root.is_dir() and not RunState(read_status(paths)["state"]).is_final:
                update_status(paths, cancel_requested=True)
        if ids:
            try:
                subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=SCANCEL_TIMEOUT_S)
            except (OSError, subprocess.SubprocessError) as exc:
                raise UserError(f"scancel failed: {exc}; nothing was marked CANCELLED") from exc
        for run in runs:
            paths = exp.run(run.name)
            if not RunState(read_status(paths)["state"]).is_final:
                update_status(paths, RunState.CANCELLED, "cancelled by the user (scancel)")

    def pending_reasons(self, runs: list[SubmittedRun]) -> dict[str, str]:
        reasons = pending_reasons([r.job_id for r in runs if r.job_id])
        return {r.name: reasons[r.job_id] for r in runs if r.job_id and r.job_id in reasons}

    def live_states(self, runs: list[SubmittedRun]) -> dict[str, str]:
        job_ids = [r.job_id for r in runs if r.job_id]
        states = query_job_states(job_ids)
        out: dict[str, str] = {}
        for run in runs:
            if run.job_id and run.job_id in states and states[run.job_id] is not None:
                out[run.name] = states[run.job_id].value  # type: ignore[union-attr]
        return out


def write_pending(exp: ExperimentPaths, pending: dict[str, dict[str, Any]]) -> None:
    """PENDING + job ids into each run's status.json. Each write is atomic and fsynced (~5-10 ms);
    threads overlap the fsyncs so a 1,000-run sweep does not spend seconds here."""

    def write(item: tuple[str, dict[str, Any]]) -> None:
        update_status(exp.run(item[0]), RunState.PENDING, **item[1])

    if len(pending) < 8:
        for item in pending.items():
            write(item)
        return
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(write, pending.items()))


def collector_parameters(
    first: RunConfig, array_ids: Iterable[str], *, hold: bool = False, launch: RankLaunch | None = None
) -> dict[str, Any]:
    """The collector job: one task with the ranks' interpreter (the same container, if any)."""
    c = first.cluster
    launch = launch or RankLaunch()
    params: dict[str, Any] = {
        "job_name": job_name(first.experiment, "-collect"),
        "nodes": 1,
        "ntasks_per_node": 1,
        "cpus_per_task": 1,
        "time": COLLECTOR_TIME_MIN,
        "dependency": "afterany:" + ":".join(array_ids),
        "setup": [*NCCL_ENV_SETUP, *launch.setup],
    }
    if launch.srun_args:
        params["srun_args"] = list(launch.srun_args)
    if hold:
        params["additional_parameters"] = {"hold": True}
    optional = {"partition": c.partition, "account": c.account, "qos": c.qos}
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def render_script(
    folder: Path, params: dict[str, Any], launch: RankLaunch, map_count: int | None = None
) -> str:
    """The sbatch script submitit writes for these parameters (same function, nothing submitted)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([launch.python_command, "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, map_count=map_count, **params)


def render_array_script(
    folder: Path,
    experiment: str,
    shape: Shape,
    members: Sequence[RunConfig],
    launch: RankLaunch,
    *,
    hold: bool = False,
) -> str:
    count = len(members)
    params = {
        "job_name": job_name(experiment),
        **shape.executor_parameters(count, hold=hold, launch=launch),
    }
    return render_script(folder, params, launch, map_count=count if count > 1 else None)
