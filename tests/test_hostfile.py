"""Hostfiles (parse, validate, write from Slurm), the exact `deepspeed` command, and a real run of it."""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

import pytest
from backend_helpers import make_run, write_runs
from rich.console import Console

from launcher.backends.hostfile import (
    HostfileBackend,
    HostSlots,
    expand_nodelist,
    format_hostfile,
    hostfile_from_slurm_env,
    parse_hostfile,
)
from launcher.cli import main
from launcher.errors import UserError
from launcher.rundir.paths import RENDEZVOUS_FILE_ENV, iter_jsonl, read_json
from launcher.rundir.status import read_status
from launcher.submit.progress import RunsProgress

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hosts.txt"
    path.write_text(text)
    return path


def test_parse_valid_hostfile_with_comments(tmp_path: Path) -> None:
    path = _write(tmp_path, "# two nodes\nnode1 slots=8\n\nnode-2.cluster slots=4  # fewer\n")
    assert parse_hostfile(path) == [HostSlots("node1", 8), HostSlots("node-2.cluster", 4)]
    assert format_hostfile(parse_hostfile(path)) == "node1 slots=8\nnode-2.cluster slots=4\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("node1 slots=8\nnode2\n", r"hosts.txt:2: 'node2' is not 'HOST slots=N'"),
        ("node1 slots=0\n", r"hosts.txt:1: slots=0 must be a whole number >= 1"),
        ("node1 slots=two\n", r"hosts.txt:1: slots=two must be a whole number"),
        ("node1 slots=2\nnode1 slots=2\n", r"hosts.txt:2: host 'node1' is already listed on line 1"),
        ("node;rm slots=2\n", r"hosts.txt:1: 'node;rm' is not a valid host name"),
        ("node1 slots=2 extra\n", r"hosts.txt:1: .* is not 'HOST slots=N'"),
        ("node1 slots = 2\n", r"hosts.txt:1: .* is not 'HOST slots=N'"),  # DeepSpeed rejects spaces
        ("# only a comment\n", r"no hosts"),
    ],
)
def test_bad_hostfile_lines_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_hostfile(_write(tmp_path, text))


def test_every_shipped_hostfile_is_valid() -> None:
    shipped = sorted((REPO / "hostfiles").glob("*.txt"))
    assert shipped, "hostfiles/*.txt examples are missing"
    for path in shipped:
        assert parse_hostfile(path)


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node1", ["node1"]),
        ("node[1-3]", ["node1", "node2", "node3"]),
        ("gpu[01-02,7],cpu", ["gpu01", "gpu02", "gpu7", "cpu"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("a[9-11]x,b", ["a9x", "a10x", "a11x", "b"]),
    ],
)
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


def test_expand_nodelist_rejects_garbage() -> None:
    with pytest.raises(UserError, match="unbalanced"):
        expand_nodelist("node[1-2")
    with pytest.raises(UserError, match="range"):
        expand_nodelist("node[3-1]")


def test_hostfile_from_slurm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("launcher.backends.hostfile.shutil.which", lambda name: None)  # pure-Python path
    env = {"SLURM_JOB_NODELIST": "node[1-2]", "SLURM_GPUS_ON_NODE": "4"}
    assert hostfile_from_slurm_env(env) == [HostSlots("node1", 4), HostSlots("node2", 4)]
    assert hostfile_from_slurm_env(env, slots=2)[1] == HostSlots("node2", 2)
    tasks = {"SLURM_JOB_NODELIST": "n1", "SLURM_TASKS_PER_NODE": "2(x1)"}
    assert hostfile_from_slurm_env(tasks) == [HostSlots("n1", 2)]
    with pytest.raises(UserError, match="SLURM_JOB_NODELIST is not set"):
        hostfile_from_slurm_env({})
    with pytest.raises(UserError, match="--slots"):
        hostfile_from_slurm_env({"SLURM_JOB_NODELIST": "n1"})


def test_hostfile_command_writes_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[1-2]")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "2")
    out = tmp_path / "hf.txt"
    assert main(["hostfile", "--output", str(out)]) == 0
    assert out.read_text() == "node1 slots=2\nnode2 slots=2\n"
    assert main(["hostfile", "--check", str(out)]) == 0
    assert "2 host(s), 4 slot(s)" in capsys.readouterr().out
    bad = _write(tmp_path, "node1 slots=x\n")
    assert main(["hostfile", "--check", str(bad)]) == 2


def test_deepspeed_command_for_two_nodes(tmp_path: Path) -> None:
    hosts = _write(tmp_path, "node1 slots=4\nnode2 slots=4\nnode3 slots=4\n")
    run = make_run("two-node", world_size=2, nodes=2)
    exp = write_runs(tmp_path / "exp", [run])
    backend = HostfileBackend(None, hostfile=hosts)
    argv = backend.command(run, exp.run(run.name))
    flags = argv[1:]
    assert flags[flags.index("--hostfile") + 1] == str(hosts.resolve())
    assert flags[flags.index("--master_addr") + 1] == "node1"  # the first host, never `hostname -I` over ssh
    assert 29500 <= int(flags[flags.index("--master_port") + 1]) < 30500
    assert flags[flags.index("--num_nodes") + 1] == "2" and flags[flags.index("--num_gpus") + 1] == "2"
    assert "--no_ssh_check" not in flags  # remote hosts: DeepSpeed's ssh check is useful
    # Options before the module (argparse REMAINDER), then `-m launcher.train RUN_DIR`.
    assert flags[-3:] == ["--module", "launcher.train", str(exp.run(run.name).root.resolve())]
    assert "--no_local_rank" in flags


def test_hostfile_too_small_for_the_run(tmp_path: Path) -> None:
    hosts = _write(tmp_path, "node1 slots=2\n")
    exp = write_runs(tmp_path / "exp", [make_run("r", world_size=4)])
    with pytest.raises(UserError, match=r"needs 4 GPUs per node .* node1 slots=2"):
        HostfileBackend(None, hostfile=hosts).submit(exp, [make_run("r", world_size=4)], dry_run=True)
    with pytest.raises(UserError, match=r"needs 2 nodes"):
        HostfileBackend(None, hostfile=hosts).submit(exp, [make_run("r", nodes=2)], dry_run=True)
    with pytest.raises(UserError, match="needs a hostfile"):
        HostfileBackend(None).submit(exp, [make_run("r")], dry_run=True)


def test_dry_run_writes_launch_script(tmp_path: Path) -> None:
    hosts = _write(tmp_path, "localhost slots=2\n")
    run = make_run("local2", world_size=2)
    exp = write_runs(tmp_path / "exp", [run])
    [sub] = HostfileBackend(None, hostfile=hosts).submit(exp, [run], dry_run=True)
    script = (exp.run("local2").logs / "launch.sh").read_text()
    assert sub.command is not None and sub.command in script
    argv = shlex.split(sub.command)
    assert "--no_ssh_check" in argv and argv[argv.index("--master_addr") + 1] == "127.0.0.1"
    assert read_status(exp.run("local2"))["state"] == "PLANNED"
    assert os.access(exp.run("local2").logs / "launch.sh", os.X_OK)


def test_real_deepspeed_launcher_runs_two_ranks_on_localhost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`deepspeed --hostfile (localhost slots=2) ... --module` really starts 2 ranks on this CPU box."""
    tests_dir = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")]))
    hosts = _write(tmp_path, "localhost slots=2\n")
    runs = [make_run("ds", world_size=2, max_steps=4)]
    exp = write_runs(tmp_path / "exp", runs)
    console = Console(file=open(os.devnull, "w"))  # noqa: SIM115
    backend = HostfileBackend(
        None,
        hostfile=hosts,
        train_module="stand_in_trainer",
        console=console,
        show_progress=False,
        progress_view=RunsProgress,
    )
    [sub] = backend.submit(exp, runs, dry_run=False)
    assert backend.wait(exp) == {"ds": "COMPLETED"}
    envs = [read_json(exp.run("ds").logs / f"env{r}.json") for r in (0, 1)]
    assert [e["RANK"] for e in envs] == ["0", "1"] and {e["WORLD_SIZE"] for e in envs} == {"2"}
    assert envs[0]["MASTER_ADDR"] == "127.0.0.1" and envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"]
    published = str(exp.run("ds").rendezvous_port.resolve())  # one node: rank 0 binds its own port
    assert [e[RENDEZVOUS_FILE_ENV] for e in envs] == [published, published]
    assert [m["step"] for m in iter_jsonl(exp.run("ds").metrics_jsonl)] == [1, 2, 3, 4]
    log = (exp.run("ds").logs / "deepspeed.log").read_text()
    assert "deepspeed.launcher.launch" in log
    assert list((exp.run("ds").logs).glob("*_rank1.log"))  # DeepSpeed's per-rank log
    assert sub.job_id is not None
    # launch.sh is rewritten with the port this attempt used, and can still be run by hand
    launch = exp.run("ds").logs / "launch.sh"
    assert os.access(launch, os.X_OK) and f"--master_port {envs[0]['MASTER_PORT']}" in launch.read_text()


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="needs Slurm's scontrol (the CI cluster has it)")
def test_scontrol_and_python_expansion_agree() -> None:
    from launcher.backends.hostfile import slurm_hostnames

    for nodelist in ("node[1-2]", "gpu[01-03,7],cpu", "rack[1-2]-n[1-2]"):
        assert slurm_hostnames(nodelist) == expand_nodelist(nodelist)
