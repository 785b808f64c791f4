"""`launcher submit`: selection, idempotency through the manifest, changed configs, dry runs.

Most tests plan a real spec (launcher.plan.planner) and run the local backend with real rank processes of a
stand-in trainer; the slow test at the end runs the real trainer on the built-in tiny model.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from backend_helpers import STAND_IN_COMMAND, make_run
from rich.console import Console

from launcher.backends.local import LocalBackend, supervisor_job_id
from launcher.cli import main
from launcher.errors import UserError
from launcher.rundir.paths import RunPaths, RunState, iter_jsonl, read_json
from launcher.rundir.status import read_status, update_status
from launcher.submit.manifest import load_manifest
from launcher.submit.progress import RunsProgress
from launcher.submit.submission import decide, select_runs, submit_spec

SPEC = """\
experiment: exp
output_dir: out
model: {builtin: tiny-glm}
data: {builtin: dialogue}
training:
  precision: fp32
  learning_rate: LR
  max_steps: 4
  per_device_batch_size: 2
methods:
  - method: lora
    resources: {nodes: 1, gpus_per_node: 2, zero_stage: 0}
  - method: freeze
    trainable_layers: 1
    resources: {nodes: 1, gpus_per_node: 1, zero_stage: 0}
local:
  max_concurrent_runs: 2
"""


def _console() -> Console:
    return Console(file=open(os.devnull, "w"), width=160)


def _spec(tmp_path: Path, lr: str = "1.0e-4") -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC.replace("LR", lr))
    return path


def _stand_in() -> LocalBackend:
    return LocalBackend(
        None,
        train_command=STAND_IN_COMMAND,
        console=_console(),
        show_progress=False,
        progress_view=RunsProgress,
    )


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # output_dir is relative to the current directory
    monkeypatch.setattr("launcher.backends.local.visible_gpus", lambda: [])
    collected: list[Path] = []
    monkeypatch.setattr(
        "launcher.submit.submission.run_collector", lambda exp, console: collected.append(exp.root)
    )
    return tmp_path


# --- pure decisions -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "retry", "force", "action"),
    [
        ("PLANNED", False, False, "submit"),
        ("PREEMPTED", False, False, "submit"),
        ("COMPLETED", False, False, "skip"),
        ("PENDING", False, False, "skip"),
        ("RUNNING", True, False, "skip"),
        ("FAILED", False, False, "skip"),
        ("FAILED", True, False, "submit"),
        ("CANCELLED", True, False, "submit"),
        ("COMPLETED", False, True, "submit"),
        ("RUNNING", False, True, "submit"),
    ],
)
def test_decide(state: str, retry: bool, force: bool, action: str) -> None:
    [d] = decide([make_run("r")], {"r": state}, {}, retry_failed=retry, force=force)
    assert d.action == action
    assert d.cancel_first == (force and state == "RUNNING")
    assert d.archive_first == (force and state != "PLANNED")


def test_select_runs() -> None:
    runs = [make_run(n) for n in ("lora_r8", "lora_r16", "full")]
    assert [r.name for r in select_runs(runs, ["lora_*"])] == ["lora_r8", "lora_r16"]
    assert [r.name for r in select_runs(runs, ["full"])] == ["full"]
    assert select_runs(runs, None) == runs
    with pytest.raises(UserError, match=r"--only 'ful' matches no run \(did you mean 'full'\?\)"):
        select_runs(runs, ["ful"])


def test_every_backend_is_built_by_the_registry_with_the_whole_protocol(tmp_path: Path) -> None:
    from launcher.backends.registry import BACKEND_NAMES, get_backend

    console = _console()
    for name in BACKEND_NAMES:
        backend = get_backend(name, None, console=console)
        assert backend.name == name
        for method in ("submit", "wait", "cancel", "live_states"):
            assert callable(getattr(backend, method)), (name, method)
    hosts = tmp_path / "hosts.txt"
    assert get_backend("hostfile", None, hostfile=hosts).hostfile == hosts  # type: ignore[attr-defined]
    assert get_backend("local", None, console=console).console is console  # type: ignore[attr-defined]
    with pytest.raises(UserError, match="--hostfile only applies to --backend hostfile"):
        get_backend("slurm", None, hostfile=hosts)
    with pytest.raises(UserError, match="valid choices: slurm, local, hostfile"):
        get_backend("k8s", None)


# --- with the planner and real processes ------------------------------------------------------------


def test_submit_twice_submits_nothing_the_second_time(in_tmp: Path) -> None:
    spec = _spec(in_tmp)
    first = submit_spec(spec, backend=_stand_in(), console=_console())
    assert first.final_states == {"lora": "COMPLETED", "freeze": "COMPLETED"}
    exp = first.exp
    assert exp.root == in_tmp / "out" / "exp"
    manifest = load_manifest(exp)
    assert sorted(e.name for e in manifest.entries.values()) == ["freeze", "lora"]
    assert {e.attempts for e in manifest.entries.values()} == {1}
    assert {e.backend for e in manifest.entries.values()} == {"local"}
    assert read_json(exp.run("lora").logs / "env1.json")["WORLD_SIZE"] == "2"  # 2 ranks from the plan

    second = submit_spec(spec, backend=_stand_in(), console=_console())
    assert second.submitted == [] and second.final_states == {}
    assert {d.why for d in second.decisions} == {"already completed"}
    assert {e.attempts for e in load_manifest(exp).entries.values()} == {1}


def test_in_flight_runs_are_not_duplicated(in_tmp: Path) -> None:
    spec = _spec(in_tmp)
    submit_spec(spec, backend=_stand_in(), console=_console(), only=["freeze"])
    exp = submit_spec(spec, backend=_stand_in(), console=_console(), dry_run=True).exp
    # lora looks queued by a live supervisor (this very process): a second submit must leave it alone.
    update_status(exp.run("lora"), RunState.PENDING, job_id=supervisor_job_id())
    outcome = submit_spec(spec, backend=_stand_in(), console=_console())
    assert outcome.submitted == []
    assert {d.run.name: d.why for d in outcome.decisions}["lora"] == "already pending; not submitted twice"


def test_failed_runs_need_retry_failed(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec(in_tmp)
    monkeypatch.setenv("STAND_IN_CRASH", "lora:1:2")
    first = submit_spec(spec, backend=_stand_in(), console=_console())
    assert first.final_states == {"lora": "FAILED", "freeze": "COMPLETED"}
    assert "simulated crash of rank 1" in read_status(first.exp.run("lora"))["reason"]
    monkeypatch.delenv("STAND_IN_CRASH")
    again = submit_spec(spec, backend=_stand_in(), console=_console())
    assert again.submitted == []
    assert {d.run.name: d.why for d in again.decisions}["lora"] == "failed; pass --retry-failed to resubmit"
    retry = submit_spec(spec, backend=_stand_in(), console=_console(), retry_failed=True)
    assert [s.name for s in retry.submitted] == ["lora"] and retry.final_states == {"lora": "COMPLETED"}
    entry = load_manifest(retry.exp).by_name("lora")
    assert entry is not None and entry[1].attempts == 2


def test_changed_config_is_reported_and_force_replaces(in_tmp: Path) -> None:
    spec = _spec(in_tmp)
    exp = submit_spec(spec, backend=_stand_in(), console=_console(), only=["lora"]).exp
    before = exp.run("lora").run_yaml.read_text()
    _spec(in_tmp, lr="3.0e-4")
    with pytest.raises(UserError, match=r"lora: training.learning_rate: 0.0001 -> 0.0003") as info:
        submit_spec(spec, backend=_stand_in(), console=_console())
    assert "nothing was submitted" in str(info.value) and "--force" in str(info.value)
    assert exp.run("lora").run_yaml.read_text() == before  # nothing rewritten
    assert "freeze" not in str(info.value)  # never submitted: re-planned silently, not a conflict
    assert read_status(exp.run("freeze"))["state"] == "PLANNED"
    # The CLI reports it with exit code 2.
    assert main(["submit", str(spec), "--backend", "local", "--dry-run"]) == 2

    forced = submit_spec(spec, backend=_stand_in(), console=_console(), force=True)
    assert forced.final_states == {"lora": "COMPLETED", "freeze": "COMPLETED"}
    [archived] = list((exp.root / "replaced").iterdir())
    assert archived.name.startswith("lora-") and (archived / "result.json").exists()
    assert "0.0003" in exp.run("lora").run_yaml.read_text()
    steps = [m["step"] for m in iter_jsonl(exp.run("lora").metrics_jsonl)]
    assert steps == [1, 2, 3, 4]  # started afresh, not resumed from the old checkpoint dir


def test_moving_a_finished_experiment_to_another_backend_resubmits_nothing(in_tmp: Path) -> None:
    """The natural next step after a local try: `backend: local` -> `backend: slurm` (and a partition).
    Where a run executes is not what it computes: nothing reads as changed, completed runs stay done."""
    spec = _spec(in_tmp)
    spec.write_text(spec.read_text() + "backend: local\n")
    first = submit_spec(spec, backend=_stand_in(), console=_console())
    assert first.final_states == {"lora": "COMPLETED", "freeze": "COMPLETED"}
    ids = {r.name: r.run_id for r in (d.run for d in first.decisions)}
    spec.write_text(spec.read_text().replace("backend: local", "backend: slurm\ncluster: {partition: gpu}"))

    moved = submit_spec(spec, console=_console(), dry_run=True)

    assert moved.backend == "slurm" and moved.submitted == []
    assert {d.run.name: d.why for d in moved.decisions} == {
        "lora": "already completed",
        "freeze": "already completed",
    }
    assert {d.run.name: d.run.run_id for d in moved.decisions} == ids
    assert "backend: slurm" in moved.exp.run("lora").run_yaml.read_text()


def test_dry_run_writes_run_dirs_and_submits_nothing(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = _spec(in_tmp)
    assert main(["submit", str(spec), "--backend", "local", "--dry-run", "--only", "lora"]) == 0
    out = capsys.readouterr().out
    exp_root = in_tmp / "out" / "exp"
    assert "would submit 1 run(s), skipped 0" in out  # --only: freeze is not even considered
    assert "RANK=1" in out and "-m launcher.train" in out and str(exp_root / "runs" / "lora") in out
    assert read_status(RunPaths(exp_root / "runs" / "lora"))["state"] == "PLANNED"
    assert not (exp_root / "manifest.json").exists()
    assert (exp_root / "plan.json").exists() and (exp_root / "runs" / "freeze" / "run.yaml").exists()


def test_hostfile_dry_run_through_the_cli(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = _spec(in_tmp)
    hosts = in_tmp / "hosts.txt"
    hosts.write_text("localhost slots=2\n")
    code = main(["submit", str(spec), "--backend", "hostfile", "--hostfile", str(hosts), "--dry-run"])
    assert code == 0
    out = capsys.readouterr().out
    assert "--hostfile" in out and "--num_gpus 2" in out and "--module launcher.train" in out
    assert main(["submit", str(spec), "--backend", "local", "--hostfile", str(hosts), "--dry-run"]) == 2


def test_unknown_only_name_exits_2(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", str(_spec(in_tmp)), "--backend", "local", "--dry-run", "--only", "lroa"]) == 2
    assert "did you mean 'lora'" in capsys.readouterr().err
    assert not (in_tmp / "out").exists()


# --- the real trainer ---------------------------------------------------------------------------------

REAL_SPEC = """\
experiment: real
output_dir: out
model: {builtin: tiny-glm}
data: {builtin: dialogue, max_train_examples: 64, max_eval_examples: 4}
training:
  precision: fp32
  learning_rate: 1.0e-3
  max_steps: 6
  warmup_ratio: 0.2
  per_device_batch_size: 2
  max_source_length: 64
  max_target_length: 16
  logging_steps: 1
  save_steps: 3
eval: {num_samples: 2, max_new_tokens: 4, batch_size: 2}
methods:
  - method: lora
    name: good
    overrides: {training.max_steps: 4}
    resources: {nodes: 1, gpus_per_node: 2, zero_stage: 2}
  - method: lora
    name: crashes
    overrides: {training.save_steps: 100}  # dies before its first checkpoint
    resources: {nodes: 1, gpus_per_node: 2, zero_stage: 2}
local:
  max_concurrent_runs: 1
  cpu_threads_per_rank: 1
"""


@pytest.mark.slow
def test_real_trainer_two_ranks_crash_and_idempotency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path
) -> None:
    """2-rank runs of the real trainer on the tiny model: one completes; in the other rank 1 dies at
    step 5 (the trainer's test hook), before any checkpoint, and the run ends FAILED with that error
    instead of hanging; the collector prints the table; a second submit submits nothing; with
    --retry-failed the failed run trains again from the start, logging each step once."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("launcher.backends.local.visible_gpus", lambda: [])
    monkeypatch.setenv("LAUNCHER_TEST_CRASH_AT_STEP", "1:5")  # "good" stops at step 4, before it
    spec = tmp_path / "real.yaml"
    spec.write_text(textwrap.dedent(REAL_SPEC))
    console = Console(file=open(tmp_path / "console.txt", "w"), width=200)  # noqa: SIM115
    outcome = submit_spec(spec, backend_name="local", console=console)
    exp = outcome.exp
    statuses = {n: read_status(exp.run(n)) for n in ("good", "crashes")}
    assert outcome.final_states == {"good": "COMPLETED", "crashes": "FAILED"}, statuses
    good = exp.run("good")
    result = read_json(good.result_json)
    assert result["world_size"] == 2 and result["steps"] == 4
    assert [m["step"] for m in iter_jsonl(good.metrics_jsonl)] == [1, 2, 3, 4]
    assert good.rank_log(1).exists() and "rank1" in good.rank_log(1).read_text()
    # The trainer's log lines reach rank{N}.log once, though the rank's stderr is that file too.
    logged = [line for line in good.rank_log(0).read_text().splitlines() if " [rank0] " in line]
    assert logged and len(logged) == len(set(logged)), "rank log lines written twice"
    reason = read_status(exp.run("crashes"))["reason"]
    assert "simulated crash of rank 1 at step 5" in reason
    console.file.flush()
    assert "good" in (tmp_path / "console.txt").read_text()  # the collector's table was printed
    assert exp.summary_json.exists()

    again = submit_spec(spec, backend_name="local", console=console)
    assert again.submitted == []
    assert {d.run.name: d.action for d in again.decisions} == {"good": "skip", "crashes": "skip"}

    monkeypatch.delenv("LAUNCHER_TEST_CRASH_AT_STEP")
    retried = submit_spec(spec, backend_name="local", console=console, retry_failed=True)
    assert retried.final_states == {"crashes": "COMPLETED"}
    steps = [m["step"] for m in iter_jsonl(exp.run("crashes").metrics_jsonl)]
    assert steps == [1, 2, 3, 4, 5, 6]  # the failed attempt's lines were dropped: each step once
