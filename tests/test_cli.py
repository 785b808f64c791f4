"""The command line as a whole: --version, exit codes, and a reader that closes the pipe early."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from backend_helpers import make_run, write_runs

from launcher import __version__
from launcher.cli import BROKEN_PIPE_EXIT_CODE, main
from launcher.rundir.paths import RunState
from launcher.rundir.status import update_status

REPO = Path(__file__).resolve().parents[1]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"launcher {__version__}"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject  # the package metadata reads launcher.__version__
    assert 'version = {attr = "launcher.__version__"}' in pyproject


def test_status_exits_1_when_a_run_failed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exp = write_runs(tmp_path / "exp", [make_run("a"), make_run("b")])
    update_status(exp.run("a"), RunState.COMPLETED)
    update_status(exp.run("b"), RunState.CANCELLED)
    assert main(["status", str(exp.root)]) == 0  # cancelled by the user: not a failure
    update_status(exp.run("b"), RunState.RUNNING)  # resubmitted
    update_status(exp.run("b"), RunState.FAILED, "boom")
    for extra in ([], ["--json"], ["--watch", "--interval", "0.5"]):
        assert main(["status", str(exp.root), *extra]) == 1, extra
    capsys.readouterr()


@pytest.mark.parametrize("command", [["status", "--json"], ["status"], ["plan"]])
def test_a_closed_pipe_ends_quietly(tmp_path: Path, command: list[str]) -> None:
    """`launcher status EXP --json | head`: the reader is gone before launcher writes (print or rich);
    no traceback, and the exit code a shell reports for SIGPIPE, not status's "a run FAILED"."""
    exp = write_runs(tmp_path / "exp", [make_run(f"r{i}") for i in range(3)])
    update_status(exp.run("r0"), RunState.COMPLETED)  # submitted: an unsubmitted one is refused (exit 2)
    target = str(REPO / "jobs" / "demo.yaml") if command[0] == "plan" else str(exp.root)
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", command[0], target, *command[1:]],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # long before the interpreter has started
    _, err = proc.communicate(timeout=60)
    assert err.decode() == ""
    assert proc.returncode == BROKEN_PIPE_EXIT_CODE == 141
