"""`launcher status` / `logs` / `cancel`: rows from run-dir files merged with the live view."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from backend_helpers import make_run, write_runs

from launcher.backends.base import SubmittedRun
from launcher.cli import main
from launcher.rundir.paths import ExperimentPaths, RunState, append_jsonl
from launcher.rundir.status import read_status, update_status
from launcher.submit.manifest import locked_manifest
from launcher.submit.status_row import estimate_eta_s, merge_state, read_status_row, tail_jsonl
from launcher.submit.status_view import call_with_timeout, collect_rows


def test_tail_jsonl_skips_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"step": i}) + "\n" for i in range(1, 5000)) + '{"step": 50')
    assert tail_jsonl(path, 2) == [{"step": 4998}, {"step": 4999}]
    assert tail_jsonl(tmp_path / "missing.jsonl") == []


def test_eta_from_recent_rate() -> None:
    records = [{"step": 10, "elapsed_s": 100.0}, {"step": 20, "elapsed_s": 120.0}]  # 2 s/step lately
    assert estimate_eta_s(records, 20, 50) == pytest.approx(60.0)
    assert estimate_eta_s(records[-1:], 20, 50) == pytest.approx(180.0)  # average 6 s/step
    assert estimate_eta_s(records, 50, 50) == 0.0
    assert estimate_eta_s([], 1, 5) is None and estimate_eta_s(records, 20, None) is None


@pytest.mark.parametrize(
    ("files", "live", "merged"),
    [
        ("COMPLETED", "RUNNING", "COMPLETED"),  # the trainer's final word wins
        ("PREEMPTED", "PENDING", "PENDING"),  # requeued after preemption
        ("RUNNING", "FAILED", "FAILED"),  # killed without writing (OOM, node lost)
        ("RUNNING", "PREEMPTED", "PREEMPTED"),  # local supervisor gone
        ("PLANNED", "PREEMPTED", "PLANNED"),  # never started: the scheduler's guess does not apply
        ("PENDING", None, "PENDING"),
        # The job runs but no rank has reported RUNNING: its ranks are loading.
        ("PENDING", "RUNNING", "STARTING"),
        ("STARTING", "RUNNING", "STARTING"),
        ("PREEMPTED", "RUNNING", "STARTING"),  # requeued and started again
        ("RUNNING", "RUNNING", "RUNNING"),
        ("STARTING", "PENDING", "PENDING"),  # requeued before its ranks were ready
        ("STARTING", "FAILED", "FAILED"),  # killed while loading
    ],
)
def test_merge_state(files: str, live: str | None, merged: str) -> None:
    assert merge_state(files, live) == merged


def test_run_row_from_files(tmp_path: Path) -> None:
    exp = write_runs(tmp_path / "exp", [make_run("r")])
    paths = exp.run("r")
    update_status(paths, RunState.RUNNING, step=20, total_steps=50, attempt=2)
    for step, elapsed in ((10, 100.0), (20, 120.0)):
        append_jsonl(
            paths.metrics_jsonl,
            {"step": step, "loss": 1.0 / step, "tokens_per_s": 321.0, "elapsed_s": elapsed},
        )
    row = read_status_row(paths, attempts=1, backend="slurm", job_id="5_0")
    assert (row.state, row.step, row.total_steps, row.attempts) == ("RUNNING", 20, 50, 2)
    assert row.loss == pytest.approx(0.05) and row.tokens_per_s == 321.0 and row.eta_s == pytest.approx(60.0)
    failed = read_status_row(paths, live_state="FAILED", backend="slurm", job_id="5_0")
    assert failed.state == "FAILED" and "5_0" in (failed.reason or "") and failed.eta_s is None


def test_a_starting_run_says_what_it_is_doing(tmp_path: Path) -> None:
    """status and the live view show the start-up phase rank 0 reports, until the run is RUNNING."""
    import io

    from rich.console import Console

    from launcher.rundir.startup import report_startup_phase, startup_reporting
    from launcher.submit.progress import RunsProgress

    exp = write_runs(tmp_path / "exp", [make_run("r")])
    paths = exp.run("r")
    update_status(paths, RunState.STARTING)
    out = io.StringIO()
    with RunsProgress([paths], console=Console(file=out, width=200), live=False) as view:
        for phase in ("building the built-in model (once, ~1 min)", "building DeepSpeed ops (cpu_adam)"):
            with startup_reporting(paths, writes_status=True):
                report_startup_phase(phase)
            row = read_status_row(paths)
            assert (row.state, row.reason) == ("STARTING", phase)
            view.update()
        with startup_reporting(paths, writes_status=False):  # ranks other than 0 write nothing
            report_startup_phase("loading weights")
        assert read_status_row(paths).reason == "building DeepSpeed ops (cpu_adam)"
        update_status(paths, RunState.RUNNING, step=0, total_steps=5)
        view.update()
    assert "startup" not in read_status(paths)
    assert read_status_row(paths).reason is None
    assert out.getvalue().splitlines() == [
        "r: STARTING (building the built-in model (once, ~1 min))",
        "r: STARTING (building DeepSpeed ops (cpu_adam))",
        "r: RUNNING",
    ]
    # A job the scheduler runs while the files still say PENDING: STARTING, with the phase if any.
    update_status(paths, RunState.PENDING)
    assert read_status_row(paths, live_state="RUNNING").reason is None


def test_a_hanging_scheduler_query_does_not_hang_status() -> None:
    start = time.monotonic()
    assert call_with_timeout(lambda: time.sleep(30) or {"x": "RUNNING"}, 0.3, {}) == {}
    assert time.monotonic() - start < 2
    assert call_with_timeout(lambda: 1 / 0, 1.0, "fallback") == "fallback"


def _experiment(tmp_path: Path):
    exp = write_runs(tmp_path / "exp", [make_run("done"), make_run("orphan"), make_run("fresh")])
    update_status(exp.run("done"), RunState.COMPLETED, step=5, total_steps=5)
    update_status(exp.run("orphan"), RunState.RUNNING, step=2, total_steps=5)
    with locked_manifest(exp) as manifest:
        manifest.record(SubmittedRun("done", "id-done", "local", job_id="999999999@1"))
        manifest.record(SubmittedRun("orphan", "id-orphan", "local", job_id="999999999@1"))
    return exp


def test_collect_rows_merges_the_local_live_view(tmp_path: Path) -> None:
    exp = _experiment(tmp_path)
    rows = {r.name: r for r in collect_rows(exp)}
    assert rows["done"].state == "COMPLETED" and rows["done"].attempts == 1
    assert rows["orphan"].state == "PREEMPTED"  # its `launcher submit` process is gone
    assert rows["fresh"].state == "PLANNED" and rows["fresh"].backend is None


def test_status_cli_json_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exp = _experiment(tmp_path)
    assert main(["status", str(exp.root), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in data] == ["done", "fresh", "orphan"]  # no plan.json: name order
    assert {d["name"]: d["state"] for d in data}["orphan"] == "PREEMPTED"
    assert main(["status", str(exp.root)]) == 0
    table = capsys.readouterr().out
    assert "COMPLETED" in table and "5/5" in table
    assert main(["status", str(tmp_path / "nope")]) == 2


def test_status_watch_ends_when_all_runs_ended(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exp = write_runs(tmp_path / "exp", [make_run("a")])
    update_status(exp.run("a"), RunState.FAILED, "boom")
    assert main(["status", str(exp.root), "--watch", "--interval", "0.5"]) == 1  # a run FAILED
    assert "FAILED" in capsys.readouterr().out


def test_logs_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exp = write_runs(tmp_path / "exp", [make_run("r")])
    exp.run("r").logs.mkdir()
    exp.run("r").rank_log(1).write_text("line1\nline2\nline3\n")
    assert main(["logs", str(exp.root), "r", "--rank", "1", "-n", "2"]) == 0
    assert capsys.readouterr().out == "line2\nline3\n"
    assert main(["logs", str(exp.root), "r", "--rank", "3"]) == 2
    assert "rank1.log" in capsys.readouterr().err
    assert main(["logs", str(exp.root), "rr"]) == 2
    assert "did you mean 'r'" in capsys.readouterr().err
    update_status(exp.run("r"), RunState.COMPLETED)
    assert main(["logs", str(exp.root), "r", "--rank", "1", "-f"]) == 0  # a finished run: prints and ends
    assert "line3" in capsys.readouterr().out
    # A Slurm run without a trainer log yet: the scheduler's task log of its job.
    with locked_manifest(exp) as manifest:
        manifest.record(SubmittedRun("r", "id-r", "slurm", job_id="12_3"))
    (exp.logs / "slurm").mkdir(parents=True)
    (exp.logs / "slurm" / "12_3_2_log.out").write_text("srun task 2 output\n")
    assert main(["logs", str(exp.root), "r", "--rank", "2"]) == 0
    assert capsys.readouterr().out == "srun task 2 output\n"


def test_cancel_cli_marks_unfinished_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exp = write_runs(tmp_path / "exp", [make_run("done"), make_run("queued"), make_run("planned")])
    update_status(exp.run("done"), RunState.COMPLETED)
    update_status(exp.run("queued"), RunState.PENDING, job_id="x")
    assert main(["cancel", str(exp.root)]) == 0
    assert "cancelled: queued" in capsys.readouterr().out
    assert read_status(exp.run("queued"))["state"] == "CANCELLED"
    assert read_status(exp.run("queued"))["job_id"] == "x"
    assert read_status(exp.run("done"))["state"] == "COMPLETED"
    assert read_status(exp.run("planned"))["state"] == "PLANNED"
    assert main(["cancel", str(exp.root), "nope"]) == 2


def test_status_shows_slurms_pending_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """squeue's %r for queued Slurm runs (array tasks not split off yet included), in --json and in the
    table's reason column; nothing for running ones. squeue is a stand-in on PATH."""
    exp = write_runs(tmp_path / "exp", [make_run("a"), make_run("b"), make_run("c")])
    with locked_manifest(exp) as manifest:
        for name, job in (("a", "41_0"), ("b", "41_1"), ("c", "42")):
            manifest.record(SubmittedRun(name, f"id-{name}", "slurm", job_id=job))
            update_status(exp.run(name), RunState.PENDING, backend="slurm", job_id=job)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    squeue = bin_dir / "squeue"
    squeue.write_text(
        '#!/bin/sh\necho "$@" >> "$0.calls"\n'
        'printf "41_0|PENDING|Priority\\n41_[1-3]|PENDING|Resources\\n42|RUNNING|None\\n"\n'
    )
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    found = {r.name: r for r in collect_rows(exp)}
    assert (found["a"].pending_reason, found["b"].pending_reason) == ("Priority", "Resources")
    assert found["c"].state == "STARTING" and found["c"].pending_reason is None
    assert "--format=%i|%T|%r" in (bin_dir / "squeue.calls").read_text()
    capsys.readouterr()
    assert main(["status", str(exp.root), "--json"]) == 0
    assert {d["name"]: d["pending_reason"] for d in json.loads(capsys.readouterr().out)}["b"] == "Resources"
    assert main(["status", str(exp.root), "--wide"]) == 0
    assert "squeue: Priority" in capsys.readouterr().out


def test_status_keeps_the_spec_order_and_refuses_an_unsubmitted_spec(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Runs in the spec's order (plan.json), as plan and collect show them, not by name; a spec whose
    runs were never submitted gets a message and exit 2, not an empty table with exit 0."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"experiment: order\noutput_dir: {tmp_path / 'runs'}\nmodel: {{builtin: tiny-glm}}\n"
        "data: {builtin: dialogue}\nmethods:\n  - {method: ptuning}\n  - {method: lora}\n"
        "  - {method: freeze, trainable_layers: 1}\n"
    )
    assert main(["status", str(spec)]) == 2
    assert "nothing planned or submitted yet; submit first: launcher submit" in capsys.readouterr().err
    assert main(["plan", str(spec), "--write"]) == 0
    assert main(["status", str(spec)]) == 2
    assert "3 run(s) planned, none submitted" in capsys.readouterr().err
    exp = tmp_path / "runs" / "order"
    update_status(ExperimentPaths(exp).run("lora"), RunState.COMPLETED)
    assert main(["status", str(spec), "--json"]) == 0
    names = [row["name"] for row in json.loads(capsys.readouterr().out)]
    assert names == ["ptuning", "lora", "freeze"]


def test_collect_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exp = _experiment(tmp_path)
    assert main(["collect", str(exp.root), "--json", "--no-write"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in (rows if isinstance(rows, list) else rows["rows"])][:1] == ["done"]
