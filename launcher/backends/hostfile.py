"""Multi-node without Slurm: DeepSpeed's own launcher (`deepspeed --hostfile ...`) per run.

DeepSpeed's runner reads an MPI-style hostfile (`host slots=N`), ssh-es (pdsh) to every host and
starts `python -u -m launcher.train RUN_DIR` once per slot with RANK / LOCAL_RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT set; its per-node `deepspeed.launcher.launch` kills the other ranks when
one fails. We validate the hostfile first (its own parser only says "bad entry"), write the exact
command to `<run>/logs/launch.sh`, run it (one run at a time: a run uses the hosts it asks for) and
supervise it like a local run, so Ctrl-C (SIGTERM -> checkpoint) and FAILED reasons behave the same.

Requirements on the hosts (DeepSpeed's, not ours): passwordless ssh + pdsh for more than one host, the
same Python environment and a shared filesystem holding the run directory at the same path.
"""

from __future__ import annotations

import hashlib
import re
import shlex
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.backends.launch_env import free_port
from launcher.backends.local import (
    QueuedRun,
    RankProcess,
    SupervisedBackend,
    read_supervisor,
    supervisor_file,
)
from launcher.errors import UserError
from launcher.rundir.paths import (
    RENDEZVOUS_FILE_ENV,
    ExperimentPaths,
    RunPaths,
    utc_now,
    write_json_atomic,
    write_text_atomic,
)
from launcher.rundir.status import ATTEMPT_ID_ENV

if TYPE_CHECKING:
    from rich.console import Console

    from launcher.backends.base import ProgressViewFactory
    from launcher.rundir.run_config import RunConfig
    from launcher.spec.schema import JobSpec

_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
# DeepSpeed's own parser wants exactly `HOST slots=N` (no spaces around '=').
_LINE_RE = re.compile(r"^(?P<host>\S+)\s+slots=(?P<slots>\S+)$")
LOCAL_HOSTNAMES = frozenset({"localhost", "127.0.0.1", "::1"})
DEEPSPEED_LOG = "deepspeed.log"


@dataclass(frozen=True)
class HostSlots:
    host: str
    slots: int


def parse_hostfile(path: Path) -> list[HostSlots]:
    """Read `host slots=N` lines ('#' comments and blank lines allowed); any bad line -> UserError
    with file:line and the expected form."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise UserError(f"{path}: hostfile not found (expected lines like 'node1 slots=8')") from exc
    hosts: list[HostSlots] = []
    seen: dict[str, int] = {}
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE_RE.match(line)
        if not match:
            problems.append(f"{path}:{number}: {raw.strip()!r} is not 'HOST slots=N' (e.g. 'node1 slots=8')")
            continue
        host, slots_text = match["host"], match["slots"]
        if not _HOST_RE.match(host):
            problems.append(f"{path}:{number}: {host!r} is not a valid host name")
            continue
        if not slots_text.isdigit() or int(slots_text) < 1:
            problems.append(f"{path}:{number}: slots={slots_text} must be a whole number >= 1")
            continue
        if host in seen:
            problems.append(f"{path}:{number}: host {host!r} is already listed on line {seen[host]}")
            continue
        seen[host] = number
        hosts.append(HostSlots(host, int(slots_text)))
    if not problems and not hosts:
        problems.append(f"{path}: no hosts; add lines like 'node1 slots=8'")
    if problems:
        raise UserError("bad hostfile:\n" + "\n".join(f"  {p}" for p in problems))
    return hosts


def format_hostfile(hosts: Sequence[HostSlots]) -> str:
    return "".join(f"{h.host} slots={h.slots}\n" for h in hosts)


# --- Slurm node lists -------------------------------------------------------------------------------


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: 'a[1-2],b' -> ['a[1-2]', 'b']."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise UserError(f"bad Slurm node list {text!r}: unbalanced ']'")
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if depth != 0:
        raise UserError(f"bad Slurm node list {text!r}: unbalanced '['")
    parts.append(current)
    return [p for p in (p.strip() for p in parts) if p]


def _expand_ranges(body: str, nodelist: str) -> list[str]:
    values: list[str] = []
    for item in body.split(","):
        item = item.strip()
        if re.fullmatch(r"\d+", item):
            values.append(item)
            continue
        match = re.fullmatch(r"(\d+)-(\d+)", item)
        if not match or int(match[1]) > int(match[2]):
            raise UserError(f"bad Slurm node list {nodelist!r}: range {item!r}")
        width = len(match[1])  # node[01-03] keeps the zero padding
        values.extend(str(n).zfill(width) for n in range(int(match[1]), int(match[2]) + 1))
    return values


def expand_nodelist(nodelist: str) -> list[str]:
    """Pure-Python `scontrol show hostnames`: 'gpu[01-02,5],cpu-a[1-2]-x' -> every host, in order."""
    hosts: list[str] = []
    for part in _split_top_level(nodelist):
        expanded = [""]
        rest = part
        while rest:
            start = rest.find("[")
            if start < 0:
                expanded = [e + rest for e in expanded]
                break
            end = rest.find("]", start)
            prefix, body, rest = rest[:start], rest[start + 1 : end], rest[end + 1 :]
            expanded = [e + prefix + v for e in expanded for v in _expand_ranges(body, nodelist)]
        hosts.extend(expanded)
    return hosts


def slurm_hostnames(nodelist: str, timeout_s: float = 10.0) -> list[str]:
    """Expand with `scontrol show hostnames` when available (exact Slurm semantics), else in Python."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=True,
            ).stdout
            hosts = out.split()
            if hosts:
                return hosts
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_nodelist(nodelist)


def _first_count(value: str) -> int | None:
    """'4(x2),2' -> 4 (Slurm's per-node count syntax); '' -> None."""
    match = re.match(r"\s*(\d+)", value or "")
    return int(match[1]) if match else None


def hostfile_from_slurm_env(env: dict[str, str], slots: int | None = None) -> list[HostSlots]:
    """Hosts of the current allocation with `slots` each (default: GPUs, else tasks, per node)."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise UserError(
            "SLURM_JOB_NODELIST is not set: run `launcher hostfile` inside a Slurm allocation "
            "(salloc/sbatch), or write the hostfile by hand ('node1 slots=8' per line)"
        )
    if slots is None:
        slots = _first_count(env.get("SLURM_GPUS_ON_NODE", "")) or _first_count(
            env.get("SLURM_NTASKS_PER_NODE", "") or env.get("SLURM_TASKS_PER_NODE", "")
        )
    if not slots or slots < 1:
        raise UserError("cannot tell slots per node (no SLURM_GPUS_ON_NODE); pass --slots N")
    return [HostSlots(host, slots) for host in slurm_hostnames(nodelist)]


# --- the backend -----------------------------------------------------------------------------------


def deepspeed_executable() -> list[str]:
    """The `deepspeed` runner of this Python environment (falls back to `python -m`)."""
    sibling = Path(sys.executable).parent / "deepspeed"
    if sibling.exists():
        return [str(sibling)]
    found = shutil.which("deepspeed")
    if found:
        return [found]
    return [sys.executable, "-m", "deepspeed.launcher.runner"]


def _is_local_host(host: str) -> bool:
    return host in LOCAL_HOSTNAMES or host in (socket.gethostname(), socket.getfqdn())


def _write_launch_script(paths: RunPaths, argv: list[str]) -> None:
    """logs/launch.sh: the exact command of the run, executable, to rerun it by hand."""
    script = "#!/bin/bash\n# written by `launcher submit --backend hostfile`; runs this run as is\n"
    write_text_atomic(paths.logs / "launch.sh", script + shlex.join(argv) + "\n", mode=0o755)


def _stable_port(run_id: str) -> int:
    """A remote master's port can't be probed from here; derive one per run in [29500, 30500)."""
    return 29500 + int(hashlib.sha256(run_id.encode()).hexdigest(), 16) % 1000


class HostfileBackend(SupervisedBackend):
    """One `deepspeed --hostfile` process per run, runs one after another."""

    name = "hostfile"

    def __init__(
        self,
        spec: JobSpec | None,
        *,
        hostfile: Path | None = None,
        train_module: str = "launcher.train",
        console: Console | None = None,
        show_progress: bool | None = None,
        progress_view: ProgressViewFactory | None = None,
        poll_interval_s: float = 0.5,
        stop_grace_s: float = 180.0,
    ) -> None:
        super().__init__(
            spec,
            console=console,
            show_progress=show_progress,
            progress_view=progress_view,
            poll_interval_s=poll_interval_s,
            stop_grace_s=stop_grace_s,
        )
        self.hostfile = hostfile
        self.train_module = train_module

    def _hostfile_for(self, run: RunConfig) -> Path:
        if self.hostfile is not None:
            return self.hostfile.resolve()
        if run.hostfile:
            return Path(run.hostfile)
        raise UserError(
            "the hostfile backend needs a hostfile: set `hostfile: hostfiles/NAME.txt` in the spec "
            "(lines like 'node1 slots=8') or pass --hostfile"
        )

    def command(self, run: RunConfig, paths: RunPaths, port: int | None = None) -> list[str]:
        """The exact `deepspeed` command for one run (validated against the hostfile)."""
        if run.cluster.container is not None:
            raise UserError(
                "cluster.container: DeepSpeed's hostfile launcher starts the ranks with each host's own "
                "python; run containers with --backend slurm, or --backend local (Apptainer)"
            )
        hostfile = self._hostfile_for(run)
        hosts = parse_hostfile(hostfile)
        nodes, gpus = run.resources.nodes, run.resources.gpus_per_node
        if nodes > len(hosts):
            raise UserError(
                f"run {run.name!r} needs {nodes} nodes but {hostfile} lists {len(hosts)} host(s); "
                "add hosts or lower resources.nodes"
            )
        short = [h for h in hosts[:nodes] if h.slots < gpus]
        if short:
            raise UserError(
                f"run {run.name!r} needs {gpus} GPUs per node but {hostfile} gives "
                + ", ".join(f"{h.host} slots={h.slots}" for h in short)
                + "; raise slots or lower resources.gpus_per_node"
            )
        used = hosts[:nodes]
        master = used[0].host
        all_local = all(_is_local_host(h.host) for h in used)
        master_addr = "127.0.0.1" if _is_local_host(master) else master
        if port is None:
            port = _stable_port(run.run_id)
        argv = [
            *deepspeed_executable(),
            "--hostfile",
            str(hostfile),
            "--master_addr",
            master_addr,
            "--master_port",
            str(port),
            "--num_nodes",
            str(nodes),
            "--num_gpus",
            str(gpus),
        ]
        if all_local:
            # DeepSpeed ssh-checks the first host whenever a hostfile is given; this machine needs none.
            argv.append("--no_ssh_check")
        argv += [
            "--no_local_rank",  # the trainer reads LOCAL_RANK from the environment
            "--enable_each_rank_log",
            str(paths.logs.resolve()),
            "--module",
            self.train_module,
            str(paths.root.resolve()),
        ]
        return argv

    def describe_command(self, paths: RunPaths, run: RunConfig) -> str:
        return shlex.join(self.command(run, paths))

    def prepare(self, exp: ExperimentPaths, runs: list[RunConfig]) -> dict[str, str]:
        """Validate every run against the hostfile, then write each run's logs/launch.sh."""
        commands = {run.name: self.command(run, exp.run(run.name)) for run in runs}
        for run in runs:
            _write_launch_script(exp.run(run.name), commands[run.name])
        return {name: shlex.join(argv) for name, argv in commands.items()}

    def launch(self, queued: QueuedRun, gpus: list[str]) -> list[RankProcess]:
        run, paths = queued.run, queued.paths
        hosts = parse_hostfile(self._hostfile_for(run))
        port = free_port(self._ports) if _is_local_host(hosts[0].host) else None
        argv = self.command(run, paths, port)
        _write_launch_script(paths, argv)  # with the port this attempt really uses
        rendezvous: dict[str, str] = {}
        if run.resources.nodes == 1 and port is not None:
            # one node, this one: rank 0 binds its own port and publishes it (every rank sees the file;
            # ranks on other hosts would not, so multi-node keeps --master_port)
            paths.rendezvous_port.unlink(missing_ok=True)
            rendezvous = {RENDEZVOUS_FILE_ENV: str(paths.rendezvous_port.resolve())}
        log_path = paths.logs / DEEPSPEED_LOG
        log = open(log_path, "ab")  # noqa: SIM115 - closed by the supervisor when the launcher exits
        log.write(f"\n=== launcher hostfile: started {utc_now()} ===\n$ {shlex.join(argv)}\n".encode())
        log.flush()
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self._child_env({"PYTHONUNBUFFERED": "1", ATTEMPT_ID_ENV: uuid.uuid4().hex, **rendezvous}),
            start_new_session=True,
        )
        info = read_supervisor(paths)
        info.update({"rank_pids": [popen.pid], "started_at": utc_now(), "command": argv})
        write_json_atomic(supervisor_file(paths), info)
        return [RankProcess(0, popen, log_path, log, label="the deepspeed launcher")]

    def max_concurrent_runs(self, queue: list[QueuedRun]) -> int:
        return 1  # the hosts are shared by every run of the experiment: one deepspeed job at a time

    def gpu_pool(self) -> list[str]:
        return []  # GPUs are the hosts' business (DeepSpeed sets CUDA_VISIBLE_DEVICES per node)
