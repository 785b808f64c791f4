"""A full disk, for real (a small tmpfs) and at the supervisor's write boundary: every write names
the file it could not write, a run ends FAILED with "disk full" and that path, the supervisor goes on
with the other runs, and the older checkpoint stays usable."""

from __future__ import annotations

import errno
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
from backend_helpers import STAND_IN_COMMAND, make_run, write_runs
from fs_helpers import needs_root, small_fs
from rich.console import Console

from launcher.backends.local import LocalBackend, pid_alive, read_supervisor
from launcher.errors import DiskFullError
from launcher.rundir.paths import RunPaths, RunState, append_jsonl, iter_jsonl, read_json, write_json_atomic
from launcher.rundir.status import failure_reason, read_status, record_failure, update_status
from launcher.submit.progress import RunsProgress


def _fill(directory: Path) -> None:
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError:
        pass
    finally:
        os.close(fd)


@needs_root
def test_writes_on_a_full_disk_name_their_file_and_the_failure_is_recorded(tmp_path: Path) -> None:
    with small_fs(tmp_path / "fs", "256k") as fs:
        paths = RunPaths(fs / "run")
        update_status(paths, RunState.RUNNING, step=3, total_steps=10, job_id="7")
        _fill(fs)
        with pytest.raises(DiskFullError) as appended:
            append_jsonl(paths.metrics_jsonl, {"step": 4, "loss": 1.0})
        assert str(appended.value) == f"disk full: no space left on device writing {paths.metrics_jsonl}"
        assert appended.value.errno == errno.ENOSPC
        with pytest.raises(DiskFullError, match=r"writing .*result\.json"):
            write_json_atomic(paths.result_json, {"state": "COMPLETED", "padding": "x" * 8192})
        assert not [p for p in paths.root.iterdir() if p.name.endswith(".tmp")]  # no temp file left

        record_failure(paths, 0, failure_reason(appended.value))  # no room for new files: in place
        status = read_status(paths)
        assert status["state"] == "FAILED" and status["job_id"] == "7"
        assert status["reason"] == f"disk full: no space left on device writing {paths.metrics_jsonl}"


def test_a_full_disk_in_the_supervisor_fails_that_run_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The supervisor cannot write run "a"'s logs/local.json when its ranks start: "a" is FAILED with
    the path, its ranks are gone, "b" runs to the end; and when even status.json cannot be written,
    the supervisor says so and goes on instead of ending in a traceback."""
    monkeypatch.setattr("launcher.backends.local.visible_gpus", lambda: [])
    runs = [make_run(n, world_size=2, max_steps=3) for n in ("a", "b")]
    exp = write_runs(tmp_path / "exp", runs)
    console_file = tmp_path / "console.txt"
    backend = LocalBackend(
        None,
        train_command=STAND_IN_COMMAND,
        console=Console(file=open(console_file, "w"), width=300),  # noqa: SIM115
        show_progress=False,
        progress_view=RunsProgress,
        poll_interval_s=0.1,
    )
    backend.submit(exp, runs, dry_run=False)
    import launcher.backends.local as local

    real_write = local.write_json_atomic

    def full_for_a(path: Path, obj: object) -> None:
        if path.parent == exp.run("a").logs and "rank_pids" in obj:  # type: ignore[operator]
            raise DiskFullError(path)
        real_write(path, obj)

    monkeypatch.setattr(local, "write_json_atomic", full_for_a)
    assert backend.wait(exp) == {"a": "FAILED", "b": "COMPLETED"}
    status = read_status(exp.run("a"))
    local_json = exp.run("a").logs / "local.json"
    assert (
        status["reason"]
        == f"could not start its ranks: disk full: no space left on device writing {local_json}"
    )
    env = exp.run("a").logs / "env0.json"
    if env.exists():  # the rank started before the write failed: it was stopped, not orphaned
        assert not pid_alive(int(read_json(env)["pid"]))
    assert "rank_pids" not in read_supervisor(exp.run("a"))

    # status.json itself cannot be written either: the supervisor reports it and carries on.
    more = [make_run("c", max_steps=2)]
    write_runs(exp.root, more)
    backend.submit(exp, more, dry_run=False)
    monkeypatch.setattr(
        local, "write_json_atomic", lambda path, obj: (_ for _ in ()).throw(DiskFullError(path))
    )

    def no_status(paths: RunPaths, state: object = None, reason: object = None, **fields: object) -> dict:
        raise DiskFullError(paths.status_json)

    monkeypatch.setattr(local, "update_status", no_status)
    assert backend.wait(exp) == {"c": "FAILED"}
    backend.console.file.flush()  # type: ignore[union-attr]
    assert "status.json could not be written: disk full: no space left on device writing" in (
        console_file.read_text()
    )


SPEC = """\
experiment: full-disk
output_dir: {output_dir}
model: {{builtin: tiny-glm}}
data: {{builtin: dialogue, max_train_examples: 32, max_eval_examples: 2}}
training:
  precision: fp32
  learning_rate: 1.0e-3
  max_steps: 4
  save_steps: 2
  save_total_limit: 2
  logging_steps: 1
  per_device_batch_size: 2
  max_source_length: 32
  max_target_length: 8
eval: {{num_samples: 2, max_new_tokens: 2, batch_size: 2}}
methods:
  - method: full
    resources: {{nodes: 1, gpus_per_node: 1, zero_stage: 2, offload_optimizer: false,
                 offload_param: false, gradient_checkpointing: false}}
local: {{cpu_threads_per_rank: 1}}
"""


@needs_root
@pytest.mark.slow
def test_checkpoint_on_a_full_disk_fails_the_run_and_keeps_the_older_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path
) -> None:
    """Full fine-tuning of the tiny model into a 14 MiB file system: the step-2 checkpoint (9 MiB)
    fits, the step-4 one does not. The run ends FAILED with "disk full" and the checkpoint's path
    (no traceback, nothing left RUNNING); with room again, --retry-failed resumes from step 2."""
    from launcher.submit.submission import submit_spec
    from launcher.train import checkpoint as ckpt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("launcher.backends.local.visible_gpus", lambda: [])
    with small_fs(tmp_path / "fs", "14m") as fs:
        spec = tmp_path / "full.yaml"
        spec.write_text(textwrap.dedent(SPEC.format(output_dir=fs)))
        console = Console(file=open(tmp_path / "console.txt", "w"), width=300)  # noqa: SIM115
        outcome = submit_spec(spec, backend_name="local", console=console)
        paths = outcome.exp.run("full")
        status = read_status(paths)
        assert outcome.final_states == {"full": "FAILED"}, status
        reason = str(status["reason"])
        assert reason.startswith(
            f"disk full: no space left on device writing {paths.checkpoints / '.tmp-global_step4'}"
        ), reason
        assert [step for step, _ in ckpt.complete_checkpoints(paths.checkpoints)] == [2]
        assert not [p for p in paths.checkpoints.iterdir() if p.name.startswith(".tmp-")]
        assert "Traceback" not in (tmp_path / "console.txt").read_text()

        subprocess.run(["mount", "-o", "remount,size=64m", str(fs)], check=True)
        retried = submit_spec(spec, backend_name="local", console=console, retry_failed=True)
        assert retried.final_states == {"full": "COMPLETED"}, read_status(paths)
        assert "resumed from step 2" in paths.rank_log(0).read_text()
        assert [m["step"] for m in iter_jsonl(paths.metrics_jsonl)] == [1, 2, 3, 4]
