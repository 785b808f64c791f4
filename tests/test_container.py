"""Ranks inside a container on this machine (the local backend) and where containers are refused.

Apptainer is not installable on this machine (Debian 12 ships no package), so the run through it uses a
stand-in `apptainer` executable on PATH: it records the argv and environment it gets, makes the
APPTAINERENV_* variables plain (as Apptainer does) and runs the stand-in trainer. The Slurm scripts are
golden files in tests/test_slurm_golden.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from backend_helpers import STAND_IN, make_run, write_runs
from rich.console import Console

from launcher.backends.container import interpreter_argv, mounts
from launcher.backends.hostfile import HostfileBackend
from launcher.backends.local import LocalBackend
from launcher.builtins.cache import cache_dir
from launcher.cli import main
from launcher.errors import UserError
from launcher.rundir.paths import ExperimentPaths, read_json
from launcher.rundir.run_config import RunConfig
from launcher.rundir.status import read_status
from launcher.spec.schema import ClusterSpec, ContainerSpec
from launcher.submit.progress import RunsProgress

REPO = Path(__file__).resolve().parents[1]
CONTAINER = {"image": "/images/launcher.sif", "env": {"NOTE": "a,b c", "HF_HUB_OFFLINE": 1}}

FAKE_APPTAINER = f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
inside = {{k[len("APPTAINERENV_"):]: v for k, v in os.environ.items() if k.startswith("APPTAINERENV_")}}
with open(os.environ["FAKE_APPTAINER_LOG"], "a") as log:
    log.write(json.dumps({{"argv": args, "env": inside}}) + "\\n")
os.environ.update(inside)
os.execv(sys.executable, [sys.executable, "-u", {str(STAND_IN)!r}, args[-1]])
"""


def in_container(run: RunConfig, **container: object) -> RunConfig:
    cluster = ClusterSpec(container=ContainerSpec.model_validate({**CONTAINER, **container}))
    return run.model_copy(update={"cluster": cluster})


def test_local_backend_runs_each_rank_through_apptainer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apptainer").write_text(FAKE_APPTAINER)
    (bin_dir / "apptainer").chmod(0o755)
    log = tmp_path / "apptainer.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_APPTAINER_LOG", str(log))
    monkeypatch.setattr("launcher.backends.local.visible_gpus", lambda: [])
    run = in_container(make_run("r", world_size=2, max_steps=3))
    exp = write_runs(tmp_path / "exp", [run])
    backend = LocalBackend(
        None,
        console=Console(file=open(os.devnull, "w")),  # noqa: SIM115
        show_progress=False,
        progress_view=RunsProgress,
    )
    backend.poll_interval_s = 0.1
    backend.submit(exp, [run], dry_run=False)
    assert backend.wait(exp) == {"r": "COMPLETED"}
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    run_dir = str(exp.run("r").root.resolve())
    assert len(calls) == 2  # one per rank
    for call in calls:
        argv = call["argv"]
        assert argv[:2] == ["exec", "--nv"]
        assert argv[-6:] == ["/images/launcher.sif", "python3", "-u", "-m", "launcher.train", run_dir]
        binds = [argv[i + 1] for i, word in enumerate(argv) if word == "--bind"]
        assert binds == sorted([f"{run_dir}:{run_dir}", f"{cache_dir()}:{cache_dir()}"], key=len)
        # env values reach the container whole (apptainer's --env would cut "a,b c" at the comma)
        assert call["env"] == {"NOTE": "a,b c", "HF_HUB_OFFLINE": "1", "LAUNCHER_CACHE_DIR": str(cache_dir())}
    assert sorted(read_json(exp.run("r").logs / f"env{r}.json")["RANK"] for r in (0, 1)) == ["0", "1"]


def _spec(tmp_path: Path, cluster: dict[str, object]) -> Path:
    spec = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    spec.update(output_dir=str(tmp_path / "out"), cluster=cluster, methods=spec["methods"][2:3])
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    return path


@pytest.mark.parametrize(
    ("runtime", "message"),
    [
        ("apptainer", "the runs need Apptainer, but `apptainer` is not on PATH on this machine"),
        ("pyxis", "pyxis is a Slurm plugin (srun --container-image); run with --backend slurm"),
    ],
)
def test_local_submit_refuses_a_container_it_cannot_start(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    runtime: str,
    message: str,
) -> None:
    empty = tmp_path / "no-apptainer"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    spec = _spec(tmp_path, {"container": {"image": "/images/x.sif", "runtime": runtime}})
    assert main(["submit", str(spec), "--backend", "local"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Nothing was started" in err
    assert read_status(ExperimentPaths(tmp_path / "out" / "demo").run("lora"))["state"] == "PLANNED"


def test_hostfile_backend_refuses_containers(tmp_path: Path) -> None:
    run = in_container(make_run("r"))
    with pytest.raises(UserError, match="hostfile launcher starts the ranks with each host's own python"):
        HostfileBackend(None, hostfile=tmp_path / "hosts.txt").command(
            run, write_runs(tmp_path, [run]).run("r")
        )


def test_rank_interpreter_and_mounts() -> None:
    plain = make_run("r")
    assert interpreter_argv(plain.cluster, Path("/exp"), [plain]) == [sys.executable]
    site = plain.model_copy(update={"cluster": ClusterSpec(python="/opt/py/bin/python")})
    assert interpreter_argv(site.cluster, Path("/exp"), [site]) == ["/opt/py/bin/python"]
    container = ContainerSpec(image="i", mounts=["/data", "/scratch:/s:ro", "/exp:/elsewhere"])
    # /data/x is inside a same-path mount; /scratch/y is mapped elsewhere, so it gets its own path too
    assert mounts(container, ["/data/x", "/scratch/y", "/exp/run"]) == [
        "/data:/data",
        "/scratch:/s:ro",
        "/exp:/elsewhere",
        "/exp/run:/exp/run",
        "/scratch/y:/scratch/y",
    ]
    with pytest.raises(UserError, match="cannot be mounted"):
        mounts(container, ["/odd,dir"])
