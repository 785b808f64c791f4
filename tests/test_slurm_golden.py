"""Golden sbatch scripts and the injection table for the Slurm backend (fast, no cluster).

The scripts are produced by the real submission path (submitit's SlurmExecutor, the backend's
grouping into arrays); only the subprocess boundary is replaced: fake `sbatch`, `srun` and `scontrol`
executables on PATH record the script and answer like Slurm. Regenerate the golden files with
`LAUNCHER_UPDATE_GOLDEN=1 pytest tests/test_slurm_golden.py`.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from launcher.backends import slurm as slurm_mod
from launcher.backends.slurm import SlurmBackend, cluster_problems, group_by_shape, parse_max_array_size
from launcher.backends.slurm_queries import map_slurm_state, query_job_states
from launcher.errors import UserError
from launcher.rundir.paths import ExperimentPaths, RunState
from launcher.rundir.run_config import RunConfig
from launcher.rundir.status import read_status
from launcher.spec.schema import ClusterSpec

GOLDEN = Path(__file__).parent / "golden"

FAKE_SBATCH = """#!/bin/sh
# Records the script it is given and answers like sbatch.
if grep -q -- "--qos=nosuch" "$1"; then
    echo "sbatch: error: Batch job submission failed: Invalid qos specification" >&2
    exit 1
fi
n=$(ls "$FAKE_SLURM_DIR"/call_*.sh 2>/dev/null | wc -l)
n=$((n + 1))
cp "$1" "$FAKE_SLURM_DIR/call_$n.sh"
echo "Submitted batch job $((1000 + n))"
"""
FAKE_SCANCEL = """#!/bin/sh
echo "$@" >> "$FAKE_SLURM_DIR/scancel.txt"
"""
# `sinfo --Node --format=%P|%N|%c|%m|%G|%l|%s`: a partition for the ordinary scripts and the two of
# the all-options one (nodes with 4 GPUs, 32 CPUs, 64 GB).
FAKE_SINFO = """#!/bin/sh
echo "low*|n1|2|8000|gpu:2|infinite|1-infinite"
echo "low*|n2|2|8000|gpu:2|infinite|1-infinite"
echo "gpu|g1|32|65536|gpu:a100:4(S:0-1)|2-00:00:00|1-infinite"
echo "gpu-long|g1|32|65536|gpu:a100:4(S:0-1)|7-00:00:00|1-infinite"
"""
FAKE_SCONTROL = """#!/bin/sh
echo "MaxArraySize            = ${FAKE_MAX_ARRAY_SIZE:-1001}"
"""


def make_run(name: str, *, nodes: int = 1, gpus: int = 1, **cluster: Any) -> RunConfig:
    return RunConfig.model_validate(
        {
            "experiment": "golden exp",
            "name": name,
            "run_id": f"id-{name}",
            "method": {"method": "lora"},
            "model": {"builtin": "tiny-glm"},
            "tokenizer": {},
            "data": {"builtin": "dialogue"},
            "template": "chatglm",
            "training": {"max_steps": 2},
            "eval": {},
            "resources": {
                "nodes": nodes,
                "gpus_per_node": gpus,
                "zero_stage": 3 if nodes > 1 else 0,
                "offload_optimizer": nodes > 1,
                "offload_param": nodes > 1,
                "gradient_checkpointing": False,
                "est_mem_gib": 1.0,
                "fits": True,
            },
            "cluster": cluster,
        }
    )


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    calls.mkdir()
    for name, text in (
        ("sbatch", FAKE_SBATCH),
        ("scontrol", FAKE_SCONTROL),
        ("scancel", FAKE_SCANCEL),
        ("sinfo", FAKE_SINFO),
        ("srun", "#!/bin/sh\nexit 0\n"),
    ):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(calls))
    slurm_mod.max_array_size.cache_clear()
    yield calls
    slurm_mod.max_array_size.cache_clear()


def _exp(tmp_path: Path, name: str = "golden exp") -> ExperimentPaths:
    exp = ExperimentPaths(tmp_path / "out dir" / name)
    (exp.runs_dir).mkdir(parents=True)
    return exp


def _prepare(exp: ExperimentPaths, runs: list[RunConfig]) -> None:
    for run in runs:
        exp.run(run.name).root.mkdir(parents=True, exist_ok=True)


def normalise(text: str, exp: ExperimentPaths) -> str:
    folder = str(slurm_mod.slurm_log_folder(ExperimentPaths(exp.root.resolve())))
    for form in (shlex.quote(folder), folder):
        text = text.replace(form, "<LOGS>")
    text = text.replace(str(exp.root.resolve()), "<EXP>")  # container mounts name the experiment dir
    return text.replace(shlex.quote(sys.executable), "<PYTHON>").replace(sys.executable, "<PYTHON>")


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("LAUNCHER_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden file {path} (LAUNCHER_UPDATE_GOLDEN=1 to write it)"
    assert text == path.read_text(), (
        f"{name} differs from the golden file (LAUNCHER_UPDATE_GOLDEN=1 to accept)"
    )


def calls(calls_dir: Path) -> list[str]:
    return [
        p.read_text() for p in sorted(calls_dir.glob("call_*.sh"), key=lambda p: int(p.stem.split("_")[1]))
    ]


# --- golden scripts through the real submission path -------------------------------------------------


def test_sweep_is_one_array_per_shape_plus_collector(tmp_path: Path, fake_slurm: Path) -> None:
    exp = _exp(tmp_path)
    runs = [make_run(f"lora_lr{i}", cpus_per_task=1, time_min=10, partition="low") for i in range(3)]
    runs.append(make_run("full", nodes=2, gpus=2, cpus_per_task=1, time_min=20, partition="low", mem_gb=4))
    _prepare(exp, runs)
    backend = SlurmBackend(None)
    submitted = backend.submit(exp, runs, dry_run=False)

    scripts = calls(fake_slurm)
    assert backend.sbatch_calls == 3 == len(scripts)  # two shapes + the collector
    assert [s.job_id for s in submitted] == ["1001_0", "1001_1", "1001_2", "1002"]
    assert [s.array_index for s in submitted] == [0, 1, 2, None]
    assert submitted[0].command and Path(submitted[0].command).name == "1001_submission.sh"
    check_golden("array_1node_1gpu.sbatch", normalise(scripts[0], exp))
    check_golden("single_2node_2gpu.sbatch", normalise(scripts[1], exp))
    check_golden("collector.sbatch", normalise(scripts[2], exp))
    assert "#SBATCH --dependency=afterany:1001:1002" in scripts[2]
    assert "#SBATCH --array=0-2%3" in scripts[0]
    assert "#SBATCH --ntasks-per-node=2" in scripts[1] and "#SBATCH --gpus-per-node=2" in scripts[1]
    status = read_status(exp.run("lora_lr1"))
    assert status["state"] == RunState.PENDING.value and status["job_id"] == "1001_1"


def test_all_options_golden(tmp_path: Path, fake_slurm: Path) -> None:
    exp = _exp(tmp_path)
    cluster = {
        "partition": "gpu,gpu-long",
        "account": "proj-42",
        "qos": "normal",
        "time_min": 90,
        "constraint": "a100&(ib|roce)",
        "mem_gb": 64,
        "cpus_per_task": 8,
        "exclusive": True,
        "extra_sbatch": {"reservation": "llm week", "mail_type": "END,FAIL", "nice": 10, "requeue": True},
        "setup": ["module load cuda/12.4", "source '/opt/my env/bin/activate'"],
        "array_parallelism": 2,
        "signal_delay_s": 300,
    }
    runs = [make_run(f"r{i}", nodes=1, gpus=4, **cluster) for i in range(5)]
    _prepare(exp, runs)
    SlurmBackend(None, with_collector=False).submit(exp, runs, dry_run=False)
    (script,) = calls(fake_slurm)
    check_golden("all_options.sbatch", normalise(script, exp))
    assert "#SBATCH --array=0-4%2" in script
    assert "#SBATCH --signal=USR2@300" in script
    assert "#SBATCH --reservation='llm week'" in script


# --- containers: Apptainer around the rank's python, pyxis on srun ---------------------------------------

CONTAINER_RUN = {
    "model": {"path": "/models/glm-6b"},
    "data": {"train_file": "/data/sets/train.json", "eval_file": "/data/sets/eval.json"},
}
CONTAINER = {
    "mounts": ["/scratch/shared:/shared:ro", "/data"],
    "env": {"HF_HUB_OFFLINE": 1, "NCCL_IB_HCA": "mlx5_0,mlx5_1", "NOTE": "a b $(x)"},
}


def container_run(name: str, runtime: str, image: str, **cluster: Any) -> RunConfig:
    run = make_run(
        name,
        gpus=2,
        cpus_per_task=1,
        partition="low",
        container={"image": image, "runtime": runtime, **CONTAINER},
        **cluster,
    )
    return run.model_copy(
        update={
            "model": run.model.model_validate(CONTAINER_RUN["model"]),
            "data": run.data.model_validate(CONTAINER_RUN["data"]),
        }
    )


@pytest.mark.parametrize(
    ("runtime", "image", "golden"),
    [
        ("apptainer", "/images/launcher 1.0.sif", "apptainer_2gpu.sbatch"),
        ("pyxis", "nvcr.io#nvidia/pytorch:24.05-py3", "pyxis_2gpu.sbatch"),
    ],
)
def test_container_golden(tmp_path: Path, fake_slurm: Path, runtime: str, image: str, golden: str) -> None:
    """Each rank runs the image's python3: Apptainer wraps it, pyxis puts the image on srun. The
    experiment dir, the model and the data dirs are mounted at their own paths (/data is given)."""
    exp = _exp(tmp_path)
    runs = [container_run(f"r{i}", runtime, image, srun_args=["--mpi=pmix"]) for i in range(2)]
    _prepare(exp, runs)
    SlurmBackend(None).submit(exp, runs, dry_run=False)
    script, collector = calls(fake_slurm)
    check_golden(golden, normalise(script, exp))
    assert sys.executable not in script  # not the host venv's python
    command = shlex.split(next(line for line in script.splitlines() if line.startswith("srun ")))
    python_at = command.index("python3")
    assert command[python_at + 1 :] == [
        "-u",
        "-m",
        "submitit.core._submit",
        str(slurm_mod.slurm_log_folder(ExperimentPaths(exp.root.resolve()))),
    ]
    root = str(exp.root.resolve())
    if runtime == "apptainer":
        assert command[command.index("apptainer") : command.index("apptainer") + 3] == [
            "apptainer",
            "exec",
            "--nv",
        ]
        binds = [command[i + 1] for i, word in enumerate(command) if word == "--bind"]
        assert binds == [
            "/scratch/shared:/shared:ro",
            "/data:/data",
            "/models/glm-6b:/models/glm-6b",
            f"{root}:{root}",
        ]
        assert command[python_at - 1] == image
        assert "export APPTAINERENV_NCCL_IB_HCA=mlx5_0,mlx5_1" in script.splitlines()
        assert "export APPTAINERENV_NOTE='a b $(x)'" in script.splitlines()
    else:
        assert f"--container-image={image}" in command and "--mpi=pmix" in command
        assert (
            f"--container-mounts=/scratch/shared:/shared:ro,/data:/data,/models/glm-6b:/models/glm-6b,{root}:{root}"
            in command
        )
        assert "--container-env=HF_HUB_OFFLINE,NCCL_IB_HCA,NOTE" in command
        assert "export NOTE='a b $(x)'" in script.splitlines()
    assert sys.executable not in collector and "python3 -u -m submitit.core._submit" in collector
    for text in (script, collector):
        subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_rank_python_is_configurable_without_a_container(tmp_path: Path, fake_slurm: Path) -> None:
    exp = _exp(tmp_path)
    runs = [make_run("r0", cpus_per_task=1, python="/opt/site python/bin/python3.11")]
    _prepare(exp, runs)
    SlurmBackend(None, with_collector=False).submit(exp, runs, dry_run=False)
    assert "--kill-on-bad-exit=1 '/opt/site python/bin/python3.11' -u -m submitit" in calls(fake_slurm)[0]


def test_dry_run_writes_the_same_script_and_submits_nothing(tmp_path: Path, fake_slurm: Path) -> None:
    exp = _exp(tmp_path)
    runs = [make_run(f"r{i}", cpus_per_task=1, time_min=10) for i in range(2)]
    _prepare(exp, runs)
    dry = SlurmBackend(None).submit(exp, runs, dry_run=True)
    assert calls(fake_slurm) == []
    assert all(r.job_id is None for r in dry)
    dry_text = Path(dry[0].command or "").read_text()
    assert read_status(exp.run("r0"))["state"] == RunState.PLANNED.value
    SlurmBackend(None).submit(exp, runs, dry_run=False)
    assert normalise(dry_text, exp) == normalise(calls(fake_slurm)[0], exp)


def test_array_split_at_max_array_size(
    tmp_path: Path, fake_slurm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_MAX_ARRAY_SIZE", "4")
    exp = _exp(tmp_path)
    runs = [make_run(f"r{i:02d}", cpus_per_task=1) for i in range(10)]
    _prepare(exp, runs)
    backend = SlurmBackend(None)
    submitted = backend.submit(exp, runs, dry_run=False)
    scripts = calls(fake_slurm)
    assert backend.sbatch_calls == 4  # 4 + 4 + 2, then the collector
    assert [s.split("#SBATCH --array=")[1].split("\n")[0] for s in scripts[:3]] == ["0-3%4", "0-3%4", "0-1%2"]
    assert "afterany:1001:1002:1003" in scripts[3]
    assert submitted[9].job_id == "1003_1"


def test_refused_sbatch_withdraws_what_was_queued(tmp_path: Path, fake_slurm: Path) -> None:
    exp = _exp(tmp_path)
    runs = [make_run("ok"), make_run("bad", nodes=2, gpus=2, qos="nosuch")]
    _prepare(exp, runs)
    with pytest.raises(UserError) as info:
        SlurmBackend(None).submit(exp, runs, dry_run=False)
    message = str(info.value)
    assert "Invalid qos specification" in message and "bad" in message and "Withdrawn: 1001" in message
    assert (fake_slurm / "scancel.txt").read_text().split() == ["1001"]
    assert read_status(exp.run("ok"))["state"] == RunState.PLANNED.value  # nothing recorded as submitted


def test_preflight_refuses_before_any_sbatch(tmp_path: Path, fake_slurm: Path) -> None:
    exp = _exp(tmp_path)
    runs = [make_run("ok", cpus_per_task=1), make_run("full", gpus=2, cpus_per_task=4)]
    _prepare(exp, runs)
    with pytest.raises(UserError) as info:
        SlurmBackend(None).submit(exp, runs, dry_run=False)
    message = str(info.value)
    assert "runs full (1 node(s) x 2 GPU(s)): cluster.cpus_per_task: 2 task(s) x 4 CPUs" in message
    assert "set cluster.cpus_per_task <= 1, or auto" in message and "Nothing was submitted" in message
    assert calls(fake_slurm) == [] and not (fake_slurm / "scancel.txt").exists()
    assert read_status(exp.run("ok"))["state"] == RunState.PLANNED.value


def test_auto_cpus_come_from_sinfo(tmp_path: Path, fake_slurm: Path) -> None:
    exp = _exp(tmp_path)
    runs = [make_run("small"), make_run("big", gpus=4, partition="gpu")]  # cpus_per_task: auto (default)
    _prepare(exp, runs)
    SlurmBackend(None, with_collector=False).submit(exp, runs, dry_run=False)
    small, big = calls(fake_slurm)
    assert "#SBATCH --cpus-per-task=1\n" in small and "export OMP_NUM_THREADS=1\n" in small  # 2 CPUs, 2 GPUs
    assert "#SBATCH --cpus-per-task=8\n" in big and "export OMP_NUM_THREADS=8\n" in big  # 32 CPUs, 4 GPUs


def test_without_sinfo_auto_is_refused_and_numbers_go_unchecked(
    tmp_path: Path, fake_slurm: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sinfo = next(Path(p) for p in os.environ["PATH"].split(os.pathsep) if (Path(p) / "sinfo").exists())
    (sinfo / "sinfo").write_text(
        "#!/bin/sh\necho 'sinfo: error: Unable to contact slurm controller' >&2\nexit 1\n"
    )
    exp = _exp(tmp_path)
    auto = [make_run("auto")]
    _prepare(exp, auto)
    with pytest.raises(UserError, match="cpus_per_task: auto takes the CPUs per GPU from `sinfo`"):
        SlurmBackend(None).submit(exp, auto, dry_run=False)
    assert calls(fake_slurm) == []
    dry = SlurmBackend(None, with_collector=False).submit(exp, auto, dry_run=True)  # shows 1
    assert "#SBATCH --cpus-per-task=1\n" in Path(dry[0].command or "").read_text()
    fixed = [make_run("fixed", cpus_per_task=64)]
    _prepare(exp, fixed)
    SlurmBackend(None, with_collector=False).submit(exp, fixed, dry_run=False)
    assert "#SBATCH --cpus-per-task=64" in calls(fake_slurm)[0]
    assert "no pre-flight check" in capsys.readouterr().err


def test_parse_max_array_size() -> None:
    assert parse_max_array_size("MaxArraySize            = 1001\nMaxJobCount = 10000\n") == 1001
    assert parse_max_array_size("nothing") is None


def test_group_by_shape_keeps_order_and_separates_shapes() -> None:
    runs = [make_run("a"), make_run("b", nodes=2, gpus=2), make_run("c"), make_run("d", time_min=5)]
    groups = group_by_shape(runs, max_size=1001)
    assert [[r.name for r in members] for _, members in groups] == [["a", "c"], ["b"], ["d"]]


# --- injection table ------------------------------------------------------------------------------------

# (cluster overrides, fragment expected in the error). Every one must be rejected before sbatch runs.
REJECTED: list[tuple[dict[str, Any], str]] = [
    ({"partition": "low\n#SBATCH --qos=high"}, "cluster.partition"),
    ({"partition": "low; rm -rf ~"}, "cluster.partition"),
    ({"partition": "low high"}, "cluster.partition"),
    ({"account": "$(whoami)"}, "cluster.account"),
    ({"qos": "`id`"}, "cluster.qos"),
    ({"qos": "normal'"}, "cluster.qos"),
    ({"constraint": "a100 && $(id)"}, "cluster.constraint"),
    ({"constraint": "a100\nrm"}, "cluster.constraint"),
    ({"extra_sbatch": {"comment": "x\n#SBATCH --partition=high"}}, "newline"),
    ({"extra_sbatch": {"mail-user\n#SBATCH": "x"}}, "not an sbatch option name"),
    ({"extra_sbatch": {"--reservation": "x"}}, "not an sbatch option name"),
    ({"extra_sbatch": {"comment=x --qos": "y"}}, "not an sbatch option name"),
    ({"extra_sbatch": {"array": "0-9999"}}, "sets --array itself"),
    ({"extra_sbatch": {"output": "/tmp/x"}}, "sets --output itself"),
    ({"extra_sbatch": {"dependency": "afterok:1"}}, "sets --dependency itself"),
    ({"setup": ["module load cuda\nrm -rf /"]}, "cluster.setup[1]"),
    ({"setup": ["echo ok", "echo \r bad"]}, "cluster.setup[2]"),
    ({"time_min": 2, "signal_delay_s": 120}, "cluster.signal_delay_s"),
    ({"srun_args": ["--mpi=pmix\n--x"]}, "cluster.srun_args[0]"),
    ({"srun_args": ["rm -rf ~"]}, "is not an srun option"),
    ({"srun_args": ["--output=/tmp/x"]}, "sets --output itself"),
    ({"srun_args": ["--container-image=x"]}, "use cluster.container"),
    ({"python": "python3\nrm -rf /"}, "cluster.python"),
    ({"container": {"image": "img\n"}}, "cluster.container.image"),
    ({"container": {"image": "i", "mounts": ["/a:/b,/c:/d"]}}, "cluster.container.mounts[0]"),
    ({"container": {"image": "i", "mounts": ["relative/path"]}}, "absolute paths"),
    ({"container": {"image": "i", "env": {"A-B": "x"}}}, "not an environment variable name"),
    ({"container": {"image": "i", "env": {"A": "x\ny"}}}, "cluster.container.env.A"),
]

# Values that are legal and must arrive at Slurm byte for byte (quoted, one line each).
QUOTED: list[tuple[str, str]] = [
    ("comment", "a b;c $(x) `y` \"q\" 's' & | > < * ? ~ #!"),
    ("reservation", "res with spaces"),
    ("mail-type", "END,FAIL"),
]


@pytest.mark.parametrize(("cluster", "fragment"), REJECTED, ids=[str(i) for i in range(len(REJECTED))])
def test_injection_rejected(tmp_path: Path, fake_slurm: Path, cluster: dict[str, Any], fragment: str) -> None:
    exp = _exp(tmp_path)
    runs = [make_run("r0", **cluster)]
    _prepare(exp, runs)
    with pytest.raises(UserError) as info:
        SlurmBackend(None).submit(exp, runs, dry_run=False)
    assert fragment in str(info.value)
    assert calls(fake_slurm) == []
    assert read_status(exp.run("r0"))["state"] == RunState.PLANNED.value


@pytest.mark.parametrize("bad", ["with%percent", "new\nline"])
def test_unsafe_output_paths_rejected(tmp_path: Path, fake_slurm: Path, bad: str) -> None:
    exp = _exp(tmp_path, name=bad)
    runs = [make_run("r0")]
    _prepare(exp, runs)
    with pytest.raises(UserError, match="output directory"):
        SlurmBackend(None).submit(exp, runs, dry_run=False)
    assert calls(fake_slurm) == []


def _sbatch_directives(script: str) -> list[str]:
    """The #SBATCH lines sbatch reads: those before the first command line."""
    out = []
    for line in script.splitlines()[1:]:
        if line.startswith("#SBATCH"):
            out.append(line)
        elif line.strip() and not line.startswith("#"):
            break
    return out


def test_quoted_values_and_paths_survive(tmp_path: Path, fake_slurm: Path) -> None:
    """Spaces, quotes and shell metacharacters in paths and option values stay one quoted word."""
    exp = _exp(tmp_path, name="exp 'quoted' $(x) ;x")
    cluster = {"extra_sbatch": dict(QUOTED), "setup": ["#SBATCH --partition=high", "echo done"]}
    runs = [make_run("r0", **cluster), make_run("r1", **cluster)]
    _prepare(exp, runs)
    SlurmBackend(None, with_collector=False).submit(exp, runs, dry_run=False)
    (script,) = calls(fake_slurm)
    directives = _sbatch_directives(script)
    # The setup line that looks like a directive comes after a command: sbatch ignores it.
    assert "#SBATCH --partition=high" not in directives
    # Each directive is `--key=<one shell word>` and the word decodes to the spec's value.
    decoded = {}
    for line in directives:
        key, _, value = line[len("#SBATCH --") :].partition("=")
        words = shlex.split(value) if value else []
        assert len(words) <= 1, line
        decoded[key] = words[0] if words else True
    for key, value in QUOTED:
        assert decoded[key] == value
    assert decoded["job-name"] == "golden_exp"
    log_dir = slurm_mod.slurm_log_folder(ExperimentPaths(exp.root.resolve()))
    assert str(decoded["output"]).startswith(str(log_dir) + "/")
    # The command line's arguments parse back to the real folder (bash -n also checks the syntax).
    command = next(line for line in script.splitlines() if line.startswith("srun "))
    assert shlex.split(command)[-1] == str(log_dir)
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_cluster_problems_accepts_ordinary_values() -> None:
    cluster = ClusterSpec(
        partition="gpu,gpu-long",
        account="proj_1",
        qos="high.prio",
        constraint="[a100*2&ib]|h100",
        extra_sbatch={"mail_type": "END", "reservation": "r 1", "requeue": True},
        setup=["module load cuda/12.4", "export X='a b'"],
    )
    assert cluster_problems(cluster) == []


# --- state mapping and the never-hang query --------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "state"),
    [
        ("PENDING", RunState.PENDING),
        ("REQUEUED", RunState.PENDING),
        ("RUNNING", RunState.RUNNING),
        ("COMPLETING", RunState.RUNNING),
        ("PREEMPTED", RunState.PREEMPTED),
        ("TIMEOUT", RunState.FAILED),
        ("NODE_FAIL", RunState.FAILED),
        ("OUT_OF_MEMORY", RunState.FAILED),
        ("CANCELLED by 0", RunState.CANCELLED),
        ("CANCELLED+", RunState.CANCELLED),
        ("COMPLETED", None),
        ("", None),
    ],
)
def test_map_slurm_state(raw: str, state: RunState | None) -> None:
    assert map_slurm_state(raw) == state


def test_query_falls_back_from_squeue_to_sacct_to_unknown() -> None:
    seen: list[str] = []

    def runner(cmd: list[str]) -> str | None:
        seen.append(cmd[0])
        if cmd[0] == "squeue":
            return "7_0|RUNNING\n7_[1-3%2]|PENDING\n"
        if cmd[0] == "sacct":
            assert "--jobs" in cmd and cmd[cmd.index("--jobs") + 1] == "5,6,8,8_1"
            return "5|CANCELLED by 0\n8|CANCELLED by 0\n"
        raise AssertionError(cmd)

    states = query_job_states(["7_0", "7_3", "5", "6", "8_1"], runner)
    assert states == {
        "7_0": RunState.RUNNING,
        "7_3": RunState.PENDING,  # a task not split off yet: listed in its array's range
        "5": RunState.CANCELLED,
        "8_1": RunState.CANCELLED,  # a cancelled unsplit array is recorded under the array id
    }
    assert seen == ["squeue", "sacct"]

    # accounting disabled (sacct fails) and squeue unreachable: nothing known, no exception
    assert query_job_states(["5"], lambda cmd: None) == {}


# --- requeue bookkeeping of the task (rank 0), scontrol at the subprocess boundary ------------------------


@pytest.mark.parametrize(
    ("restarts", "scontrol_reply", "expect_call", "requeued", "reason_part"),
    [
        (0, "", True, True, "requeued: attempt 2 of at most 3 next"),
        (1, "scontrol: error: Job is pending execution for job 77", True, True, "attempt 3 of at most 3"),
        (0, "scontrol: error: Invalid job id specified", True, False, "`scontrol requeue` failed"),
        (2, "", False, False, "stopped after 2 requeues (cluster.max_requeues=2)"),
    ],
)
def test_task_requeue_is_bounded_and_recorded(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    restarts: int,
    scontrol_reply: str,
    expect_call: bool,
    requeued: bool,
    reason_part: str,
) -> None:
    from launcher.backends.slurm_task import SlurmTask
    from launcher.rundir.paths import RunPaths
    from launcher.rundir.status import update_status

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.txt"
    fail = "exit 1" if scontrol_reply else "exit 0"
    script = bin_dir / "scontrol"
    record = f'echo "$@" >> {shlex.quote(str(log))}'
    script.write_text(f'#!/bin/sh\n{record}\necho "{scontrol_reply}" >&2\n{fail}\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", str(restarts))
    paths = RunPaths(tmp_path / "run")
    update_status(paths, RunState.PREEMPTED, reason="SIGUSR2 received; checkpoint saved at step 5", step=5)

    done = SlurmTask(max_requeues=2).requeue(paths, attempt=restarts + 1)

    assert done is requeued
    assert (log.read_text().split() == ["requeue", "77"]) if expect_call else not log.exists()
    status = read_status(paths)
    assert status["state"] == "PREEMPTED" and status["attempt"] == restarts + 1
    assert reason_part in status["reason"]
    assert status["step"] == 5  # the trainer's keys survive
    if expect_call:
        assert status["reason"].startswith("SIGUSR2 received")
