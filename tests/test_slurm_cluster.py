"""The Slurm backend against the REAL two-node test cluster (tests/slurm/cluster.sh up).

Skipped when no cluster answers, unless LAUNCHER_REQUIRE_SLURM=1 (CI), where they fail instead.
Runs use the built-in tiny model with tiny budgets; requeued jobs are released at once
(`scontrol update StartTime=now`) instead of waiting Slurm's ~2 min BeginTime.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher.rundir.paths import ExperimentPaths, RunState, iter_jsonl, read_json
from launcher.rundir.status import read_status

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
POLL_S = 0.5


def _cluster_answers() -> bool:
    try:
        out = subprocess.run(
            ["sinfo", "--noheader", "--Node", "--format=%N %t"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return False
    lines = {tuple(line.split()) for line in out.stdout.splitlines() if line.strip()}
    nodes = {name for name, state in lines if state.rstrip("*") in ("idle", "mix", "alloc", "comp")}
    return out.returncode == 0 and {"node1", "node2"} <= nodes


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster() -> None:
    if not _cluster_answers():
        message = "the test Slurm cluster is not up (bash tests/slurm/cluster.sh up)"
        if os.environ.get("LAUNCHER_REQUIRE_SLURM") == "1":
            pytest.fail(message + " and LAUNCHER_REQUIRE_SLURM=1")
        pytest.skip(message)


# --- helpers ----------------------------------------------------------------------------------------


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(POLL_S)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def squeue_row(job_id: str) -> tuple[str, str] | None:
    """(state, reason) of a job Slurm still remembers."""
    out = subprocess.run(
        ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T|%r"],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout
    for line in out.splitlines():
        parts = line.strip().split("|")
        if parts[0] == job_id:
            return parts[1], parts[2]
    return None


def release_if_begin_time(job_id: str) -> bool:
    """A requeued job waits ~2 min (Reason=BeginTime): start it now."""
    row = squeue_row(job_id)
    if row and row[0] == "PENDING" and row[1] == "BeginTime":
        subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True, timeout=10)
        return True
    return False


def scontrol(*args: str) -> None:
    subprocess.run(["scontrol", *args], check=True, timeout=10, capture_output=True)


def state_of(exp: ExperimentPaths, name: str) -> str:
    return str(read_status(exp.run(name))["state"])


def steps_logged(exp: ExperimentPaths, name: str) -> int:
    return max((int(m.get("step", 0)) for m in iter_jsonl(exp.run(name).metrics_jsonl)), default=0)


def losses(exp: ExperimentPaths, name: str) -> dict[int, float]:
    return {int(m["step"]): float(m["loss"]) for m in iter_jsonl(exp.run(name).metrics_jsonl)}


def tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return f"<{path} unreadable>"


def diagnostics(exp: ExperimentPaths) -> str:
    parts = []
    for run in exp.run_dirs():
        parts.append(f"== {run.name}: {read_status(run)}")
        for log in sorted(run.logs.glob("*")):
            parts.append(f"-- {log.name}\n{tail(log, 1500)}")
    return "\n".join(parts)


def write_spec(
    directory: Path,
    experiment: str,
    methods: list[dict[str, Any]],
    *,
    training: dict[str, Any] | None = None,
    resources: dict[str, Any] | None = None,
    cluster: dict[str, Any] | None = None,
    sweep: dict[str, Any] | None = None,
) -> Path:
    spec: dict[str, Any] = {
        "experiment": experiment,
        "output_dir": str(directory / "out"),
        "backend": "slurm",
        "model": {"builtin": "tiny-glm"},
        "data": {"builtin": "dialogue", "max_train_examples": 64, "max_eval_examples": 8},
        "training": {
            "max_steps": 4,
            "per_device_batch_size": 2,
            "max_source_length": 32,
            "max_target_length": 16,
            "logging_steps": 1,
            "save_steps": 1000,
            "precision": "fp32",
            "learning_rate": 1e-3,
            "warmup_ratio": 0.25,
            **(training or {}),
        },
        "eval": {"num_samples": 4, "max_new_tokens": 8, "batch_size": 4},
        "methods": methods,
        "resources": {"nodes": 1, "gpus_per_node": 1, **(resources or {})},
        "cluster": {"partition": "low", "time_min": 10, "cpus_per_task": 1, **(cluster or {})},
    }
    if sweep:
        spec["sweep"] = sweep
    path = directory / f"{experiment}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def submit(spec_path: Path, **kwargs: Any) -> tuple[Any, Any]:
    """`launcher submit SPEC --backend slurm` through the real orchestration; returns (outcome, backend)."""
    from rich.console import Console

    from launcher.backends.slurm import SlurmBackend
    from launcher.submit.submission import submit_spec

    backend = SlurmBackend(None, **kwargs)
    console = Console(file=open(os.devnull, "w"), width=200)  # noqa: SIM115
    outcome = submit_spec(spec_path, backend=backend, console=console)
    return outcome, backend


def wait_final(exp: ExperimentPaths, names: list[str], timeout_s: float) -> dict[str, str]:
    def done() -> dict[str, str] | None:
        states = {n: state_of(exp, n) for n in names}
        return states if all(RunState(s).is_final for s in states.values()) else None

    try:
        return wait_for(done, timeout_s, f"runs {names} to finish")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{diagnostics(exp)}") from None


@pytest.fixture
def tiny_ready(tiny_model_dir: Path, dialogue_files: tuple[Path, Path]) -> None:
    """Build the tiny model and data once before jobs start (ranks would race to build it)."""


# --- the cluster itself ------------------------------------------------------------------------------


# Runs inside each task (a command, not a function of this test module: the job can't import it).
WHERE = (
    "import json, os; from submitit.helpers import TorchDistributedEnvironment as T; e = T(); "
    "print(json.dumps({'node': os.environ.get('SLURMD_NODENAME'), 'rank': e.rank, 'world': e.world_size, "
    "'master': f'{e.master_addr}:{e.master_port}'}))"
)


def test_cluster_runs_two_nodes_two_tasks_each(tmp_path: Path) -> None:
    """The cluster is real: a 2-node x 2-task submitit job with 2 (fake) GPUs per node."""
    import submitit

    executor = submitit.SlurmExecutor(folder=tmp_path / "logs")
    # time=10: submitit warns with USR2 90 s before the limit; a 2-minute limit would signal the job
    # 30 s after it starts, which a loaded machine can spend just starting Python.
    executor.update_parameters(nodes=2, ntasks_per_node=2, gpus_per_node=2, cpus_per_task=1, time=10)
    job = executor.submit(submitit.helpers.CommandFunction([sys.executable, "-c", WHERE]))
    results = [json.loads(out) for out in job.results()]
    assert sorted(r["rank"] for r in results) == [0, 1, 2, 3]
    assert {r["node"] for r in results} == {"node1", "node2"}
    assert len({r["master"] for r in results}) == 1
    assert {r["world"] for r in results} == {4}


# --- a sweep as one array + the collector; idempotent re-submission --------------------------------------


@pytest.mark.slow
def test_sweep_array_collector_and_no_duplicates(tmp_path: Path, tiny_ready: None) -> None:
    spec_path = write_spec(
        tmp_path,
        "sweep2",
        [{"method": "lora", "r": 4}, {"method": "freeze", "trainable_layers": 1}],
    )
    outcome, backend = submit(spec_path)
    exp = outcome.exp
    assert backend.sbatch_calls == 2  # one array for both runs (same shape) + the collector job
    names = sorted(s.name for s in outcome.submitted)
    assert len(names) == 2
    array_ids = {s.array_job_id for s in outcome.submitted}
    assert len(array_ids) == 1 and None not in array_ids
    manifest = read_json(exp.manifest_json)
    assert sorted(e["job_id"] for e in manifest["runs"].values()) == sorted(
        s.job_id for s in outcome.submitted
    )

    # Submitting again while the runs are queued or running submits nothing.
    again, backend2 = submit(spec_path)
    assert backend2.sbatch_calls == 0 and again.submitted == []
    live = backend.live_states(outcome.submitted)
    assert set(live.values()) <= {"PENDING", "RUNNING"} and set(live) == set(names)

    states = wait_final(exp, names, 240)
    assert states == {n: "COMPLETED" for n in names}, diagnostics(exp)
    collector = backend.collector_job_id
    wait_for(lambda: exp.summary_json.is_file() and exp.summary_md.is_file(), 120, "the collector's table")
    rows = read_json(exp.summary_json)
    assert sorted(r["name"] for r in rows) == names
    assert all(r["state"] == "COMPLETED" and r["train_loss_final"] is not None for r in rows)
    assert collector
    wait_for(lambda: (squeue_row(collector) or ("",))[0] == "COMPLETED", 60, "the collector job to end")
    assert exp.loss_png.is_file()
    for name in names:
        assert read_status(exp.run(name))["attempt"] == 1
        assert (exp.run(name).logs / "slurm_rank0.out").is_symlink()

    # And once everything is done: still nothing to submit, no new job in the queue.
    third, backend3 = submit(spec_path)
    assert backend3.sbatch_calls == 0 and third.submitted == []
    assert all(d.action == "skip" for d in third.decisions)


# --- pre-flight and the demo on this cluster -------------------------------------------------------------


def launcher_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_preflight_refuses_what_the_cluster_cannot_run(tmp_path: Path) -> None:
    """The real sinfo: 2-CPU nodes with 2 GPUs. Asking 4 CPUs per rank (the old default) or a partition
    that does not exist is exit 2 with the fix, and nothing reaches the queue."""
    spec = write_spec(
        tmp_path,
        "preflight",
        [{"method": "full"}],
        resources={"gpus_per_node": 2},
        cluster={"cpus_per_task": 4},
    )
    before = subprocess.run(["squeue", "--noheader", "--format=%i"], capture_output=True, text=True).stdout
    proc = launcher_cli("submit", str(spec), "--backend", "slurm", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "2 task(s) x 4 CPUs = 8 CPUs per node, but partition low's nodes have at most 2" in proc.stderr
    assert "set cluster.cpus_per_task <= 1, or auto" in proc.stderr
    spec.write_text(spec.read_text().replace("partition: low", "partition: hihg"))
    proc = launcher_cli("submit", str(spec), "--backend", "slurm", cwd=tmp_path)
    assert proc.returncode == 2
    assert "'hihg' is not a partition of this cluster; did you mean high?" in proc.stderr
    after = subprocess.run(["squeue", "--noheader", "--format=%i"], capture_output=True, text=True).stdout
    assert set(after.split()) <= set(before.split())  # no job was queued


@pytest.mark.slow
def test_the_demo_runs_on_the_test_cluster(tmp_path: Path, tiny_ready: None) -> None:
    """`launcher submit jobs/demo.yaml --backend slurm`, shortened by command-line overrides to a few
    steps: all four methods (1-rank array and the 2-rank ZeRO-3 offload job, CPUs per rank from sinfo),
    then the collector."""
    shorter = [
        f"output_dir={tmp_path / 'out'}",
        "training.max_steps=2",
        "training.logging_steps=1",
        "training.save_steps=1000",
        "training.eval_steps=null",
        "data.max_train_examples=32",
        "data.max_eval_examples=4",
        "eval.num_samples=4",
        "eval.max_new_tokens=8",
    ]
    proc = launcher_cli(
        "submit", str(REPO / "jobs" / "demo.yaml"), *shorter, "--backend", "slurm", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    exp = ExperimentPaths(tmp_path / "out" / "demo")
    names = ["freeze", "ptuning", "lora", "full"]
    seen: set[str] = set()

    def ended() -> bool:
        states = {state_of(exp, n) for n in names}
        seen.update(states)
        return all(RunState(s).is_final for s in states)

    wait_for(ended, 420, "the demo's runs to end")
    assert {n: state_of(exp, n) for n in names} == {n: "COMPLETED" for n in names}, diagnostics(exp)
    assert "STARTING" in seen  # written by the Slurm task while the ranks load
    assert "#   training.max_steps=2\n" in exp.spec_yaml.read_text()  # the effective spec is recorded
    wait_for(exp.summary_json.is_file, 120, "the collector's table")
    assert read_json(exp.run("full").result_json)["world_size"] == 2
    scripts = [p.read_text() for p in (exp.logs / "slurm").glob("*_submission.sh")]
    assert scripts and all("#SBATCH --cpus-per-task=1\n" in text for text in scripts)


# --- 2 nodes x 2 ranks, ZeRO-3 + offload -----------------------------------------------------------------


@pytest.mark.slow
def test_two_node_zero3_offload_full_run(tmp_path: Path, tiny_ready: None) -> None:
    spec_path = write_spec(
        tmp_path,
        "multinode",
        [{"method": "full"}],
        training={"max_steps": 3, "save_steps": 2, "per_device_batch_size": 1},
        resources={
            "nodes": 2,
            "gpus_per_node": 2,
            "zero_stage": 3,
            "offload_optimizer": True,
            "offload_param": True,
        },
    )
    outcome, backend = submit(spec_path)
    exp = outcome.exp
    assert backend.sbatch_calls == 2
    (run,) = outcome.submitted
    assert run.array_job_id is None  # a single run is a plain job
    states = wait_final(exp, [run.name], 300)
    assert states[run.name] == "COMPLETED", diagnostics(exp)
    paths = exp.run(run.name)
    result = read_json(paths.result_json)
    assert (result["world_size"], result["nodes"], result["zero_stage"]) == (4, 2, 3)
    assert result["offload_optimizer"] and result["offload_param"]

    launches = [read_json(paths.logs / f"launch_rank{r}.json") for r in range(4)]
    assert len({(x["master_addr"], x["master_port"]) for x in launches}) == 1  # ranks agree on the master
    assert {x["slurm_nodename"] for x in launches} == {"node1", "node2"}
    assert launches[0]["master_addr"] == "node1"

    ckpts = sorted(p for p in paths.checkpoints.iterdir() if p.is_dir())
    assert ckpts, f"no checkpoint in {paths.checkpoints}"
    files = {p.name for p in ckpts[-1].rglob("*") if p.is_file()}
    for rank in range(4):
        assert any(f"zero_pp_rank_{rank}_" in f and "optim_states" in f for f in files), (rank, sorted(files))
        assert f"rng_state_rank{rank}.pt" in files


# --- preemption and requeue -----------------------------------------------------------------------------

LONG_TRAINING = {
    "max_steps": 150,
    "per_device_batch_size": 4,
    "max_source_length": 64,
    "max_target_length": 32,
}


def _drive_until_final(exp: ExperimentPaths, name: str, job_id: str, timeout_s: float) -> str:
    """Wait for a final state, releasing the job whenever it waits on BeginTime after a requeue."""

    def done() -> str | None:
        release_if_begin_time(job_id)
        state = state_of(exp, name)
        return state if RunState(state).is_final else None

    try:
        return str(wait_for(done, timeout_s, f"{name} to finish"))
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{diagnostics(exp)}") from None


def _signalled(pid: int, signum: int) -> bool:
    """Whether the stopped process ``pid`` got ``signum``: pending, or already running again (slurmstepd
    sends SIGCONT along with a job signal) or gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    mask = 0
    for line in status.splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")):
            mask |= int(line.split()[1], 16)
        if line.startswith("State:") and "stopped" not in line:
            return True
    return bool(mask & (1 << (signum - 1)))


def launch_pid(exp: ExperimentPaths, name: str, attempt: int) -> int | None:
    """The pid of rank 0 of this attempt (the task records it in logs/launch_rank0.json)."""
    try:
        launch = read_json(exp.run(name).logs / "launch_rank0.json")
    except (OSError, ValueError):
        return None
    return int(launch["pid"]) if int(launch["attempt"]) == attempt else None


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """Hold the rank still (SIGSTOP) while Slurm acts, so the signal is sure to land mid-training
    however fast this machine trains; slurmstepd sends SIGCONT with its signals, and so do we after."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def _submit_high_priority_job() -> str:
    """A job in the `high` partition that needs both GPUs of node2: it preempts what runs there."""
    cmd = ["sbatch", "--parsable", "-p", "high", "-w", "node2", "--gpus-per-node=2", "-o", "/dev/null"]
    return subprocess.run(
        [*cmd, "--wrap", "sleep 3"], capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()


@pytest.mark.slow
def test_preemption_and_requeue_resume_with_the_same_loss_curve(tmp_path: Path, tiny_ready: None) -> None:
    """A high-priority job preempts the run (partition_prio, REQUEUE); later `scontrol requeue` stops it
    again; it resumes from its checkpoint each time and ends with the loss curve of an uninterrupted
    twin (which runs alongside on the other node)."""
    methods = [{"method": "lora", "r": 4}]
    ref_spec = write_spec(
        tmp_path, "twin_ref", methods, training=LONG_TRAINING, cluster={"extra_sbatch": {"nodelist": "node1"}}
    )
    victim_spec = write_spec(
        tmp_path,
        "twin_victim",
        methods,
        training=LONG_TRAINING,
        cluster={"extra_sbatch": {"nodelist": "node2"}},
    )
    ref, _ = submit(ref_spec, with_collector=False)
    victim, _ = submit(victim_spec, with_collector=False)
    (vrun,) = victim.submitted
    (rrun,) = ref.submitted
    vexp, rexp = victim.exp, ref.exp
    job_id = str(vrun.job_id)

    # 1) preemption by a job in the high partition that needs both GPUs of node2
    wait_for(lambda: steps_logged(vexp, vrun.name) >= 3, 180, "the victim to train a few steps")
    pid = launch_pid(vexp, vrun.name, attempt=1)
    assert pid is not None
    with frozen(pid):
        high = _submit_high_priority_job()
        wait_for(lambda: _signalled(pid, signal.SIGTERM), 60, "Slurm to preempt the victim")
    wait_for(lambda: state_of(vexp, vrun.name) == "PREEMPTED", 90, "the victim to checkpoint on preemption")
    first_stop = read_status(vexp.run(vrun.name))
    assert "received; checkpoint saved" in str(first_stop["reason"]), first_stop
    wait_for(lambda: squeue_row(high) in (None, ("COMPLETED", "None")), 60, "the high-priority job")

    # 2) it comes back (same job id), resumes; then an admin requeue mid-run
    def resumed_and_training() -> int | None:
        release_if_begin_time(job_id)
        status = read_status(vexp.run(vrun.name))
        training = status["state"] == "RUNNING" and int(status.get("step") or 0) > int(first_stop["step"])
        return launch_pid(vexp, vrun.name, attempt=2) if training else None

    pid = wait_for(resumed_and_training, 180, "the victim to resume after preemption")
    with frozen(pid):
        scontrol("requeue", job_id)
        wait_for(lambda: _signalled(pid, signal.SIGTERM), 60, "Slurm to stop the victim for the requeue")
    wait_for(lambda: state_of(vexp, vrun.name) == "PREEMPTED", 90, "the victim to checkpoint on requeue")

    assert _drive_until_final(vexp, vrun.name, job_id, 300) == "COMPLETED"
    assert wait_final(rexp, [rrun.name], 300)[rrun.name] == "COMPLETED", diagnostics(rexp)

    status = read_status(vexp.run(vrun.name))
    assert int(status["attempt"]) == 3, status
    log = (vexp.run(vrun.name).logs / "rank0.log").read_text(errors="replace")
    assert log.count("resumed from step") == 2, log[-3000:]
    curve, reference = losses(vexp, vrun.name), losses(rexp, rrun.name)
    assert sorted(curve) == sorted(reference) == list(range(1, LONG_TRAINING["max_steps"] + 1))
    for step, loss in reference.items():
        assert curve[step] == pytest.approx(loss, rel=1e-4, abs=1e-5), (step, curve[step], loss)


def _elapsed_s(job_id: str) -> int:
    cmd = ["squeue", "--noheader", f"--jobs={job_id}", "--format=%M"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    days, _, clock = out.rpartition("-")
    seconds = 0
    for part in clock.split(":"):
        seconds = seconds * 60 + int(part)
    return seconds + int(days or 0) * 86400


@pytest.mark.slow
def test_time_limit_warning_checkpoints_requeues_and_finishes(tmp_path: Path, tiny_ready: None) -> None:
    """The job's time limit is cut mid-run to 90 s from now: Slurm sends USR2 signal_delay_s before the
    limit, the run checkpoints, rank 0 requeues it, the next attempt resumes and finishes.

    slurmctld checks time limits only every 30 s. So the test freezes the rank (SIGSTOP) while it waits
    for Slurm's signal, and lets it go on as soon as the signal is pending: the run is then sure to be
    mid-training when the warning lands, however fast this machine trains."""
    spec_path = write_spec(
        tmp_path,
        "timelimit",
        [{"method": "lora", "r": 4}],
        training=LONG_TRAINING,
        cluster={"time_min": 10, "signal_delay_s": 120},
    )
    outcome, _ = submit(spec_path, with_collector=False)
    exp = outcome.exp
    (run,) = outcome.submitted
    job_id = str(run.job_id)
    wait_for(lambda: steps_logged(exp, run.name) >= 2, 180, "a few steps")
    pid = launch_pid(exp, run.name, attempt=1)
    assert pid is not None
    with frozen(pid):
        limit_s = _elapsed_s(job_id) + 90  # 90 s left < signal_delay_s: the warning is due now
        scontrol("update", f"jobid={job_id}", f"TimeLimit={limit_s // 60}:{limit_s % 60:02d}")
        wait_for(lambda: _signalled(pid, signal.SIGUSR2), 45, "Slurm's USR2 (next time-limit check)")
    wait_for(lambda: state_of(exp, run.name) == "PREEMPTED", 60, "the checkpoint on the time-limit warning")
    stopped = read_status(exp.run(run.name))
    # The warning signal made it checkpoint; rank 0 requeued it.
    assert stopped["requeued"] is True and "SIGUSR2" in str(stopped["reason"]), stopped

    def pending_again() -> bool:
        row = squeue_row(job_id)
        return bool(row and row[0] == "PENDING")

    wait_for(pending_again, 60, "the job to be requeued")
    scontrol("update", f"jobid={job_id}", "TimeLimit=10")
    assert _drive_until_final(exp, run.name, job_id, 300) == "COMPLETED"
    status = read_status(exp.run(run.name))
    assert int(status["attempt"]) == 2
    steps = LONG_TRAINING["max_steps"]
    assert sorted(losses(exp, run.name)) == list(range(1, steps + 1))
    log = (exp.run(run.name).logs / "rank0.log").read_text(errors="replace")
    assert log.count("resumed from step") == 1


# --- cancel, status without accounting ------------------------------------------------------------------


def _shim(directory: Path, name: str, script: str) -> None:
    path = directory / name
    path.write_text(script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_cancel_and_status_without_accounting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from launcher.backends.slurm_queries import accounting_enabled, query_job_states
    from launcher.submit.status_view import collect_rows

    spec_path = write_spec(
        tmp_path, "cancelme", [{"method": "lora"}], sweep={"grid": {"training.seed": [1, 2]}}
    )
    outcome, backend = submit(spec_path, hold=True)  # held: queued, never started
    exp = outcome.exp
    ids = [str(s.job_id) for s in outcome.submitted]
    assert {squeue_row(i)[0] for i in ids} == {"PENDING"}  # type: ignore[index]
    assert set(backend.live_states(outcome.submitted).values()) == {"PENDING"}
    # `launcher status` says why they wait: squeue's reason for a held job
    assert {(r.state, r.pending_reason) for r in collect_rows(exp)} == {("PENDING", "JobHeldUser")}

    backend.cancel(exp, outcome.submitted)
    subprocess.run(["scancel", str(backend.collector_job_id)], check=True, timeout=10)
    for s in outcome.submitted:
        assert state_of(exp, s.name) == "CANCELLED"
    wait_for(lambda: set(query_job_states(ids).values()) == {RunState.CANCELLED}, 30, "Slurm: CANCELLED")
    assert set(backend.live_states(outcome.submitted).values()) == {"CANCELLED"}

    # Without accounting sacct fails; squeue still knows (MinJobAge) -> CANCELLED.
    shims = tmp_path / "shims"
    shims.mkdir()
    _shim(
        shims, "sacct", "#!/bin/sh\necho 'sacct: error: Slurm accounting storage is disabled' >&2\nexit 1\n"
    )
    monkeypatch.setenv("PATH", f"{shims}{os.pathsep}{os.environ['PATH']}")
    assert not accounting_enabled()
    assert set(backend.live_states(outcome.submitted).values()) == {"CANCELLED"}

    # squeue answers nothing (job purged) and no accounting: unknown here, the run dir says CANCELLED.
    _shim(shims, "squeue", "#!/bin/sh\nexit 0\n")
    assert query_job_states(ids) == {}
    rows = {r.name: r for r in collect_rows(exp)}
    assert {r.state for r in rows.values()} == {"CANCELLED"}

    # squeue hanging must not hang status: the query gives up after its timeout.
    _shim(shims, "squeue", "#!/bin/sh\nsleep 30\n")
    from launcher.backends import slurm_queries

    monkeypatch.setattr(slurm_queries, "QUERY_TIMEOUT_S", 1.0)
    started = time.monotonic()
    assert query_job_states(ids, lambda cmd: slurm_queries.run_query(cmd, timeout_s=1.0)) == {}
    assert time.monotonic() - started < 5


def test_sacct_reports_jobs_that_left_the_queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With accounting (slurmdbd), a job squeue no longer lists is still known through sacct."""
    from launcher.backends.slurm_queries import accounting_enabled, query_job_states

    if not accounting_enabled():
        pytest.skip("the cluster runs without slurmdbd (LAUNCHER_SLURM_ACCOUNTING=0)")
    job = subprocess.run(
        ["sbatch", "--parsable", "--hold", "-o", "/dev/null", "--wrap", "true"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout.strip()
    subprocess.run(["scancel", job], check=True, timeout=10)
    shims = tmp_path / "shims"
    shims.mkdir()
    _shim(shims, "squeue", "#!/bin/sh\nexit 0\n")
    monkeypatch.setenv("PATH", f"{shims}{os.pathsep}{os.environ['PATH']}")
    states = wait_for(lambda: query_job_states([job]).get(job), 30, "sacct to record the job")
    assert states == RunState.CANCELLED


# --- a rank crashes ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_crash_on_one_rank_fails_that_run_only(tmp_path: Path, tiny_ready: None) -> None:
    """Array task 0's rank 1 raises at step 2: that run ends FAILED with the error in its status, the
    step is killed (no rank left hanging in a collective), and the other run of the array completes."""
    crash = 'if [ "$SLURM_ARRAY_TASK_ID" = 0 ]; then export LAUNCHER_TEST_CRASH_AT_STEP=1:2; fi'
    spec_path = write_spec(
        tmp_path,
        "crash",
        [{"method": "lora", "r": 4}],
        training={"max_steps": 4},
        resources={"nodes": 1, "gpus_per_node": 2},
        cluster={"setup": [crash]},
        sweep={"grid": {"training.seed": [1, 2]}},
    )
    outcome, backend = submit(spec_path, with_collector=False)
    exp = outcome.exp
    by_index = {s.array_index: s for s in outcome.submitted}
    crashed, healthy = by_index[0], by_index[1]
    started = time.monotonic()
    states = wait_final(exp, [crashed.name, healthy.name], 300)
    assert states == {crashed.name: "FAILED", healthy.name: "COMPLETED"}, diagnostics(exp)
    status = read_status(exp.run(crashed.name))
    assert "simulated crash of rank 1 at step 2" in str(status["reason"])
    assert status["failed_rank"] == 1
    wait_for(
        lambda: (squeue_row(str(crashed.job_id)) or ("",))[0] == "FAILED", 60, "Slurm to mark the job FAILED"
    )
    assert backend.live_states([crashed])[crashed.name] == "FAILED"
    assert time.monotonic() - started < 300


def _queued_job_ids() -> set[str]:
    out = subprocess.run(
        ["squeue", "--noheader", "--format=%A"], capture_output=True, text=True, timeout=10
    ).stdout
    return set(out.split())


@pytest.fixture(autouse=True)
def _cancel_leftover_jobs() -> Iterator[None]:
    """A failing test must not leave jobs that hold the nodes for the next one."""
    before = _queued_job_ids()
    yield
    leftover = sorted(_queued_job_ids() - before)
    if leftover:
        subprocess.run(["scancel", *leftover], check=False, timeout=10)


@pytest.mark.slow
def test_cancel_a_running_run_is_not_requeued(tmp_path: Path, tiny_ready: None) -> None:
    """scancel's SIGTERM makes the run checkpoint like a preemption; it must end CANCELLED, not requeue."""
    spec_path = write_spec(tmp_path, "cancel_running", [{"method": "lora", "r": 4}], training=LONG_TRAINING)
    outcome, backend = submit(spec_path, with_collector=False)
    exp = outcome.exp
    (run,) = outcome.submitted
    wait_for(lambda: steps_logged(exp, run.name) >= 2, 180, "a few steps")
    backend.cancel(exp, outcome.submitted)
    wait_for(lambda: (squeue_row(str(run.job_id)) or ("CANCELLED",))[0] == "CANCELLED", 60, "the job to end")
    status = read_status(exp.run(run.name))
    assert status["state"] == "CANCELLED", status
    assert not status.get("requeued")
    time.sleep(2)  # a requeue would show up as PENDING again by now
    assert (squeue_row(str(run.job_id)) or ("CANCELLED",))[0] == "CANCELLED"
    assert read_status(exp.run(run.name))["state"] == "CANCELLED"
