"""The local backend with real rank processes (a stand-in trainer; the real trainer at the end)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from backend_helpers import STAND_IN_COMMAND, make_run, write_runs
from rich.console import Console

from launcher.backends.local import PREEMPTED_EXIT_CODE, LocalBackend, job_alive, supervisor_job_id
from launcher.errors import UserError
from launcher.rundir.paths import RENDEZVOUS_FILE_ENV, ExperimentPaths, iter_jsonl, read_json
from launcher.rundir.status import read_status
from launcher.submit.progress import RunsProgress


def _backend(**kw: object) -> LocalBackend:
    kw.setdefault("console", Console(file=open(os.devnull, "w"), width=150))  # noqa: SIM115
    kw.setdefault("show_progress", False)
    kw.setdefault("progress_view", RunsProgress)
    kw.setdefault("poll_interval_s", 0.1)
    return LocalBackend(None, train_command=STAND_IN_COMMAND, **kw)  # type: ignore[arg-type]


def _env(exp: ExperimentPaths, run: str, rank: int) -> dict:
    return read_json(exp.run(run).logs / f"env{rank}.json")


def test_preempted_exit_code_matches_trainer() -> None:
    from launcher.train.entry import PREEMPTED_EXIT_CODE as trainer_code

    assert trainer_code == PREEMPTED_EXIT_CODE


def test_two_concurrent_runs_of_two_ranks_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A launcher typed inside a Slurm allocation must not leak SLURM_* into local ranks.
    monkeypatch.setenv("SLURM_PROCID", "7")
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr("launcher.backends.local.visible_gpus", lambda: [])
    monkeypatch.setattr("launcher.backends.local._usable_cores", lambda: 4)  # 2 runs x 2 ranks fit
    runs = [make_run(n, world_size=2, max_steps=6, max_concurrent=2) for n in ("a", "b")]
    exp = write_runs(tmp_path / "exp", runs)
    backend = _backend()
    submitted = backend.submit(exp, runs, dry_run=False)
    assert [s.job_id for s in submitted] == [supervisor_job_id()] * 2
    assert submitted[0].job_id.startswith(f"{os.getpid()}@")
    assert read_status(exp.run("a"))["state"] == "PENDING"
    states = backend.wait(exp)
    assert states == {"a": "COMPLETED", "b": "COMPLETED"}
    for name in ("a", "b"):
        envs = [_env(exp, name, r) for r in (0, 1)]
        assert [e["RANK"] for e in envs] == ["0", "1"]
        assert envs[0]["state_at_start"] == "STARTING"  # written before rank 0 could say RUNNING
        assert {e["WORLD_SIZE"] for e in envs} == {"2"}
        assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"]
        # rank 0 binds its own port and publishes it here; the others read it (no EADDRINUSE race)
        published = str(exp.run(name).rendezvous_port.resolve())
        assert [e[RENDEZVOUS_FILE_ENV] for e in envs] == [published, published]
        assert envs[0]["slurm_vars"] == []
        assert "stand-in rank 1/2" in exp.run(name).rank_log(1).read_text()
        assert [m["step"] for m in iter_jsonl(exp.run(name).metrics_jsonl)] == [1, 2, 3, 4, 5, 6]
    # Both ran at the same time (concurrency 2) on different rendezvous ports.
    a0, b0 = _env(exp, "a", 0), _env(exp, "b", 0)
    assert a0["MASTER_PORT"] != b0["MASTER_PORT"]
    assert abs(a0["start"] - b0["start"]) < 3.0


def test_concurrency_limit_and_distinct_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("launcher.backends.local.visible_gpus", lambda: ["0", "1", "2", "3"])
    runs = [make_run(n, world_size=2, max_steps=8, max_concurrent=2) for n in ("a", "b", "c")]
    exp = write_runs(tmp_path / "exp", runs)
    backend = _backend()
    backend.submit(exp, runs, dry_run=False)
    assert backend.wait(exp) == {"a": "COMPLETED", "b": "COMPLETED", "c": "COMPLETED"}
    gpus = {n: _env(exp, n, 0)["CUDA_VISIBLE_DEVICES"] for n in "abc"}
    assert gpus["a"] != gpus["b"] and {gpus["a"], gpus["b"]} == {"0,1", "2,3"}
    assert _env(exp, "a", 1)["CUDA_VISIBLE_DEVICES"] == gpus["a"]  # both ranks of a run see the same cards
    # c waited for a free slot: it started after a or b had finished.
    ends = [_env(exp, n, 0)["start"] for n in "ab"]
    assert _env(exp, "c", 0)["start"] > min(ends) + 8 * 0.05 * 0.8


def test_runs_side_by_side_on_cpu_never_share_a_core(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPUs, 2 cores, 2 runs at once allowed: two 1-rank runs start together; a 2-rank run waits
    until both cores are free, and the run behind it until it gives them back."""
    monkeypatch.setattr("launcher.backends.local.visible_gpus", lambda: [])
    monkeypatch.setattr("launcher.backends.local._usable_cores", lambda: 2)
    monkeypatch.setenv("STAND_IN_STEP_S", "0.1")
    runs = [
        make_run("one-a", max_steps=8, max_concurrent=2),
        make_run("one-b", max_steps=8, max_concurrent=2),
        make_run("two", world_size=2, max_steps=8, max_concurrent=2),
        make_run("one-c", max_steps=8, max_concurrent=2),
    ]
    exp = write_runs(tmp_path / "exp", runs)
    backend = _backend()
    backend.submit(exp, runs, dry_run=False)
    assert set(backend.wait(exp).values()) == {"COMPLETED"}
    start = {name: _env(exp, name, 0)["start"] for name in ("one-a", "one-b", "two", "one-c")}
    run_s = 8 * 0.1 * 0.8  # at least this long: 8 steps of 0.1 s
    assert abs(start["one-a"] - start["one-b"]) < run_s  # side by side, one core each
    assert start["two"] > max(start["one-a"], start["one-b"]) + run_s  # waited for both cores
    assert start["one-c"] > start["two"] + run_s  # waited for the 2-rank run to give a core back
    assert {_env(exp, name, 0)["OMP_NUM_THREADS"] for name in start} == {"1"}


def test_run_needing_more_gpus_than_the_machine_has_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("launcher.backends.local.visible_gpus", lambda: ["0"])
    run = make_run("big", world_size=2)
    exp = write_runs(tmp_path / "exp", [run])
    with pytest.raises(UserError, match="needs 2 GPUs"):
        _backend().submit(exp, [run], dry_run=False)
    assert read_status(exp.run("big"))["state"] == "PLANNED"


def test_crashed_rank_kills_siblings_and_other_runs_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("launcher.backends.local.visible_gpus", lambda: [])
    monkeypatch.setenv("STAND_IN_CRASH", "bad:1:3")  # rank 1 of run "bad" raises at step 3
    runs = [make_run("bad", world_size=2, max_steps=6, max_concurrent=2), make_run("good", max_steps=6)]
    exp = write_runs(tmp_path / "exp", runs)
    backend = _backend()
    backend.submit(exp, runs, dry_run=False)
    start = time.monotonic()
    states = backend.wait(exp)
    assert time.monotonic() - start < 30  # rank 0 was blocked for 1000 s: it was killed, not waited for
    assert states == {"bad": "FAILED", "good": "COMPLETED"}
    status = read_status(exp.run("bad"))
    assert status["reason"].startswith("rank 1 exited with code 1")
    assert "RuntimeError: simulated crash of rank 1 at step 3" in status["reason"]
    assert status["exit_codes"]["0"] == -signal.SIGKILL
    assert not job_alive(str(_env(exp, "bad", 0)["pid"]))


@pytest.fixture
def ctrl_c_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt in this process, as at a terminal: a runner that starts the tests
    as a background job (`cmd &`, nohup) hands them SIGINT ignored, and Python keeps that."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("ctrl_c_raises")
def test_ctrl_c_checkpoints_and_resubmit_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("launcher.backends.local.visible_gpus", lambda: [])
    monkeypatch.setenv("STAND_IN_STEP_S", "0.2")
    runs = [make_run("r", world_size=2, max_steps=40), make_run("queued", max_steps=3)]
    exp = write_runs(tmp_path / "exp", runs)
    backend = _backend()
    backend.submit(exp, runs, dry_run=False)

    def press_ctrl_c() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            metrics = list(iter_jsonl(exp.run("r").metrics_jsonl))
            if len(metrics) >= 3:
                break
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        backend.wait(exp)
    status = read_status(exp.run("r"))
    assert status["state"] == "PREEMPTED"
    assert status["reason"].startswith("SIGTERM received")  # the ranks got SIGTERM, not SIGKILL
    checkpoint_steps = [int(p.name.split("_")[1]) for p in (exp.run("r").checkpoints).glob("step_*")]
    assert checkpoint_steps and 3 <= checkpoint_steps[0] < 40
    assert read_status(exp.run("queued"))["state"] == "PLANNED"  # never started
    for rank in (0, 1):
        assert not job_alive(str(_env(exp, "r", rank)["pid"]))

    monkeypatch.setenv("STAND_IN_STEP_S", "0.01")
    again = _backend()
    again.submit(exp, runs, dry_run=False)
    assert again.wait(exp) == {"r": "COMPLETED", "queued": "COMPLETED"}
    assert _env(exp, "r", 0)["start"] > 0
    metrics_steps = [m["step"] for m in iter_jsonl(exp.run("r").metrics_jsonl)]
    assert (
        metrics_steps[-1] == 40 and metrics_steps.count(checkpoint_steps[0] + 1) == 1
    )  # resumed, not restarted


def test_cancel_from_outside_marks_cancelled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("launcher.backends.local.visible_gpus", lambda: [])
    monkeypatch.setenv("STAND_IN_STEP_S", "0.2")
    runs = [make_run("long", world_size=2, max_steps=100), make_run("later", max_steps=2)]
    exp = write_runs(tmp_path / "exp", runs)
    backend = _backend()
    submitted = backend.submit(exp, runs, dry_run=False)

    def cancel_soon() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not exp.run("long").metrics_jsonl.exists():
            time.sleep(0.1)
        _backend().cancel(exp, submitted)  # another LocalBackend instance: like `launcher cancel`

    thread = threading.Thread(target=cancel_soon, daemon=True)
    thread.start()
    states = backend.wait(exp)
    thread.join(30)
    assert states == {"long": "CANCELLED", "later": "CANCELLED"}
    assert read_status(exp.run("later"))["reason"] == "cancelled before it started"
    assert not exp.run("later").rank_log(0).exists()


def test_live_states_sees_a_dead_supervisor(tmp_path: Path) -> None:
    from launcher.backends.base import SubmittedRun

    backend = _backend()
    dead = SubmittedRun("x", "id-x", "local", job_id="999999999")
    alive = SubmittedRun("y", "id-y", "local", job_id=supervisor_job_id())
    reused = SubmittedRun("z", "id-z", "local", job_id=f"{os.getpid()}@1")  # same pid, other start time
    assert job_alive(supervisor_job_id())
    assert backend.live_states([dead, alive, reused]) == {"x": "PREEMPTED", "z": "PREEMPTED"}


def test_dry_run_prints_commands_and_starts_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("launcher.backends.local.visible_gpus", lambda: [])
    run = make_run("d", world_size=2)
    exp = write_runs(tmp_path / "exp", [run])
    backend = _backend()
    [sub] = backend.submit(exp, [run], dry_run=True)
    assert sub.job_id is None and sub.command is not None
    lines = sub.command.splitlines()
    assert len(lines) == 2 and "RANK=1" in lines[1] and "WORLD_SIZE=2" in lines[1]
    assert str(exp.run("d").root.resolve()) in lines[0] and "rank1.log" in lines[1]
    assert backend.wait(exp) == {}
    assert read_status(exp.run("d"))["state"] == "PLANNED"


def test_status_json_reports_json_decodable(tmp_path: Path) -> None:
    # The supervisor's side file is plain JSON that `launcher cancel` in another process reads.
    run = make_run("s")
    exp = write_runs(tmp_path / "exp", [run])
    backend = _backend()
    backend.submit(exp, [run], dry_run=False)
    info = json.loads((exp.run("s").logs / "local.json").read_text())
    assert info["supervisor_pid"] == os.getpid() and info["cancel_requested"] is False
    assert backend.wait(exp) == {"s": "COMPLETED"}


def test_root_failure_prefers_the_real_error_over_lost_connections() -> None:
    from launcher.backends.local import RankProcess, _root_failure

    def rank(n: int) -> RankProcess:
        return RankProcess(n, None, Path(f"rank{n}.log"), None)  # type: ignore[arg-type]

    survivor = (rank(0), 1, "RuntimeError: [../gloo/transport/tcp/pair.cc:553] Connection closed by peer")
    culprit = (rank(1), 1, "RuntimeError: CUDA out of memory")
    assert _root_failure([survivor, culprit]) == culprit
    assert _root_failure([survivor]) == survivor and _root_failure([]) is None


def test_live_progress_display_renders_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    monkeypatch.setattr("launcher.backends.local.visible_gpus", lambda: [])
    runs = [make_run("p1", max_steps=4), make_run("p2", max_steps=4)]
    exp = write_runs(tmp_path / "exp", runs)
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=150)
    backend = _backend(console=console, show_progress=True)
    backend.submit(exp, runs, dry_run=False)
    assert backend.wait(exp) == {"p1": "COMPLETED", "p2": "COMPLETED"}
    screen = buffer.getvalue()
    assert "p1" in screen and "p2" in screen and "4/4" in screen and "COMPLETED" in screen
    assert "loss  0.5000" in screen  # the stand-in's last loss (2 / step 4)


SUPERVISOR = """
import sys
sys.path.insert(0, {tests!r})
from backend_helpers import STAND_IN_COMMAND, make_run, write_runs
from launcher.backends.local import LocalBackend
from launcher.submit.manifest import locked_manifest
from launcher.submit.progress import RunsProgress
runs = [make_run("orphan", world_size=2, max_steps=200)]
exp = write_runs(__import__("pathlib").Path({root!r}), runs)
backend = LocalBackend(
    None, train_command=STAND_IN_COMMAND, show_progress=False, progress_view=RunsProgress, poll_interval_s=0.1
)
subs = backend.submit(exp, runs, dry_run=False)
with locked_manifest(exp) as m:
    m.record(subs[0])
backend.wait(exp)
"""


def test_killed_supervisor_leaves_no_orphan_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`launcher submit` killed with SIGKILL: its ranks get SIGTERM (PDEATHSIG), checkpoint and exit;
    status then reports the run PREEMPTED so the next submit resumes it."""
    import subprocess
    import sys

    from launcher.submit.manifest import load_manifest
    from launcher.submit.status_view import collect_rows

    monkeypatch.setenv("STAND_IN_STEP_S", "0.1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    root = tmp_path / "exp"
    code = SUPERVISOR.format(tests=str(Path(__file__).parent), root=str(root))
    supervisor = subprocess.Popen([sys.executable, "-c", code])
    exp = ExperimentPaths(root)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(list(iter_jsonl(exp.run("orphan").metrics_jsonl))) < 2:
        time.sleep(0.1)
    ranks = [_env(exp, "orphan", r)["pid"] for r in (0, 1)]
    supervisor.kill()
    supervisor.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(job_alive(str(pid)) for pid in ranks):
        time.sleep(0.1)
    assert not any(job_alive(str(pid)) for pid in ranks)
    assert read_status(exp.run("orphan"))["state"] == "PREEMPTED"  # the ranks checkpointed on SIGTERM
    assert list(exp.run("orphan").checkpoints.glob("step_*"))
    [sub] = load_manifest(exp).submitted_runs()
    assert _backend().live_states([sub]) == {"orphan": "PREEMPTED"}
    assert [r.state for r in collect_rows(exp)] == ["PREEMPTED"]


def test_a_run_whose_ranks_cannot_start_fails_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("launcher.backends.local.visible_gpus", lambda: [])
    runs = [make_run("x"), make_run("y")]
    exp = write_runs(tmp_path / "exp", runs)
    backend = LocalBackend(
        None,
        train_command=[str(tmp_path / "no-such-python")],
        show_progress=False,
        progress_view=RunsProgress,
    )
    backend.submit(exp, runs, dry_run=False)
    assert backend.wait(exp) == {"x": "FAILED", "y": "FAILED"}
    assert "could not start its ranks" in read_status(exp.run("x"))["reason"]
