"""Ranks inside a container image (``cluster.container``) and the interpreter that runs them.

- **Apptainer** wraps the rank's python: ``apptainer exec --nv --bind SRC:DST ... IMAGE python3``. It
  works wherever ``apptainer`` is installed: in a Slurm task (after srun) and on this machine (the local
  backend). Env values travel as ``APPTAINERENV_NAME`` host variables (``--env`` splits values at
  commas).
- **pyxis** is a Slurm (SPANK) plugin: the container is an srun option (``--container-image``,
  ``--container-mounts``, ``--container-env``), and the rank command inside stays ``python3 ...``. Env
  values are exported in the batch script and named in ``--container-env`` so they win over the image's.

The python inside the image is used (``cluster.python``, default ``python3``), not the host venv's. The
image needs launcher and its dependencies installed. The experiment directory and every host path a run
reads (model, tokenizer, data files, the built-in cache) are mounted at their own paths, so run.yaml's
absolute paths hold inside; ``mounts`` adds more.

Every piece is one argv word (quoted by the caller); nothing here is raw shell.
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.builtins.cache import CACHE_ENV, cache_dir
from launcher.errors import CONTROL_CHARS, UserError, shown

if TYPE_CHECKING:
    from launcher.rundir.run_config import RunConfig
    from launcher.spec.schema import ClusterSpec, ContainerSpec

APPTAINER = "apptainer"
CONTAINER_PYTHON = "python3"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# srun options the launcher sets itself (logs, the container) or that would break one-rank-per-task.
RESERVED_SRUN_OPTIONS = frozenset(
    {
        "output",
        "error",
        "unbuffered",
        "ntasks",
        "ntasks-per-node",
        "nodes",
        "container-image",
        "container-mounts",
        "container-env",
    }
)


def rank_python(cluster: ClusterSpec) -> str:
    """The interpreter of a rank: cluster.python, else python3 in a container, else this python."""
    if cluster.python:
        return cluster.python
    return CONTAINER_PYTHON if cluster.container is not None else sys.executable


def env_text(value: str | int | float | bool) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _split_mount(mount: str) -> tuple[str, str, str]:
    src, _, rest = mount.partition(":")
    dst, _, flags = rest.partition(":")
    return src, dst or src, flags


def mounts(container: ContainerSpec, host_paths: Iterable[str]) -> list[str]:
    """``SRC:DST[:FLAGS]`` for every mount: the spec's, then each host path at its own path (a path
    already inside another mount is left out)."""
    out = []
    targets: list[str] = []
    for mount in container.mounts:
        src, dst, flags = _split_mount(mount)
        out.append(f"{src}:{dst}" + (f":{flags}" if flags else ""))
        if src == dst:  # a host path below it is at its own path inside too
            targets.append(src)
    for path in sorted(set(host_paths), key=lambda p: (len(p), p)):
        if not any(path == t or path.startswith(t.rstrip("/") + "/") for t in targets):
            if "," in path or ":" in path:  # the mount lists' separators
                raise UserError(
                    f"{path} cannot be mounted into the container (',' or ':' in the path); "
                    "move it, or mount a parent directory with cluster.container.mounts"
                )
            out.append(f"{path}:{path}")
            targets.append(path)
    return out


def _env(cluster: ClusterSpec, runs: Sequence[RunConfig]) -> dict[str, str]:
    env = {k: env_text(v) for k, v in (cluster.container.env if cluster.container else {}).items()}
    if any(run.model.builtin or run.data.builtin for run in runs):
        env.setdefault(CACHE_ENV, str(cache_dir()))  # the built-in model and data, mounted below
    return env


def host_env(cluster: ClusterSpec, runs: Sequence[RunConfig]) -> dict[str, str]:
    """Host variables that carry cluster.container.env into the container."""
    container = cluster.container
    if container is None:
        return {}
    env = _env(cluster, runs)
    if container.runtime == "apptainer":
        return {f"APPTAINERENV_{name}": value for name, value in env.items()}
    return env


def host_paths(work_dir: Path, runs: Sequence[RunConfig]) -> list[str]:
    """The host paths the ranks of these runs read or write (absolute, as run.yaml holds them).
    ``work_dir``: where they write (the experiment dir under Slurm, which holds submitit's files too;
    the run dir on this machine)."""
    paths = {str(work_dir)}
    for run in runs:
        paths.update(p for p in (run.model.path, run.tokenizer.path) if p)
        paths.update(str(Path(p).parent) for p in (run.data.train_file, run.data.eval_file) if p)
        if run.model.builtin or run.data.builtin:
            paths.add(str(cache_dir()))
    return sorted(paths)


def interpreter_argv(cluster: ClusterSpec, work_dir: Path, runs: Sequence[RunConfig]) -> list[str]:
    """The argv that starts a rank's python: the interpreter alone, or apptainer around it."""
    python = rank_python(cluster)
    container = cluster.container
    if container is None or container.runtime != "apptainer":
        return [python]
    argv = [APPTAINER, "exec", "--nv"]
    for mount in mounts(container, host_paths(work_dir, runs)):
        argv += ["--bind", mount]
    return [*argv, container.image, python]


def srun_container_args(cluster: ClusterSpec, work_dir: Path, runs: Sequence[RunConfig]) -> list[str]:
    """pyxis's srun options (empty for no container or Apptainer)."""
    container = cluster.container
    if container is None or container.runtime != "pyxis":
        return []
    args = [
        f"--container-image={container.image}",
        f"--container-mounts={','.join(mounts(container, host_paths(work_dir, runs)))}",
    ]
    env = _env(cluster, runs)
    if env:
        args.append(f"--container-env={','.join(env)}")
    return args


def env_exports(cluster: ClusterSpec, runs: Sequence[RunConfig]) -> list[str]:
    """Batch-script lines that set host_env (srun passes the job's environment on to the tasks)."""
    return [f"export {name}={shlex.quote(value)}" for name, value in host_env(cluster, runs).items()]


def container_problems(cluster: ClusterSpec) -> list[str]:
    """What in cluster.container / python / srun_args cannot become safe argv words (empty when fine)."""
    problems: list[str] = []
    if cluster.python is not None and (not cluster.python.strip() or CONTROL_CHARS.search(cluster.python)):
        problems.append(f"cluster.python: {shown(cluster.python)} is not an interpreter name or path")
    for i, arg in enumerate(cluster.srun_args):
        name = arg.lstrip("-").split("=", 1)[0]
        if not arg.startswith("-") or CONTROL_CHARS.search(arg):
            problems.append(
                f"cluster.srun_args[{i}]: {shown(arg)} is not an srun option; give one option per "
                "item, e.g. --mpi=pmix"
            )
        elif name in RESERVED_SRUN_OPTIONS:
            use = "cluster.container" if name.startswith("container-") else "the resources/cluster keys"
            problems.append(f"cluster.srun_args[{i}]: the launcher sets --{name} itself; use {use}")
    container = cluster.container
    if container is None:
        return problems
    if not container.image.strip() or CONTROL_CHARS.search(container.image):
        problems.append(f"cluster.container.image: {shown(container.image)} is not an image")
    for i, mount in enumerate(container.mounts):
        src, dst, _ = _split_mount(mount)
        if "," in mount or CONTROL_CHARS.search(mount) or not src.startswith("/") or not dst.startswith("/"):
            problems.append(
                f"cluster.container.mounts[{i}]: {shown(mount)} is not SRC[:DST[:FLAGS]] with absolute "
                "paths (no commas)"
            )
    for name, value in container.env.items():
        if not _ENV_NAME.match(name):
            problems.append(f"cluster.container.env: {shown(name)} is not an environment variable name")
        elif CONTROL_CHARS.search(env_text(value)):
            problems.append(
                f"cluster.container.env.{name}: the value contains a newline or control character"
            )
    return problems


def local_container_problem(cluster: ClusterSpec) -> str | None:
    """Why the local backend cannot start these ranks in their container (None when it can)."""
    container = cluster.container
    if container is None:
        return None
    if container.runtime == "pyxis":
        return (
            "cluster.container.runtime: pyxis is a Slurm plugin (srun --container-image); run with "
            "--backend slurm, or use runtime: apptainer on this machine"
        )
    if shutil.which(APPTAINER) is None:
        return (
            f"cluster.container: the runs need Apptainer, but `{APPTAINER}` is not on PATH on this machine; "
            "install Apptainer, or remove cluster.container to run with this machine's python"
        )
    return None
