"""Rendezvous ports: concurrent launches on one node never collide, even when every launch was handed
the same MASTER_PORT and another process already listens on it (the EADDRINUSE a busy CI machine hit).
Real gloo process groups on CPU, one process per rank."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from launcher.backends.launch_env import torchrun_env
from launcher.rundir.paths import RENDEZVOUS_FILE_ENV

REPO = Path(__file__).resolve().parent.parent

_RANK = textwrap.dedent(
    """
    import torch
    from launcher.train.distributed import all_reduce_sum, create_process_group, detect_dist_env

    env = detect_dist_env()
    create_process_group(env)
    total = all_reduce_sum([float(env.rank + 1)], torch.device("cpu"))[0]
    print(f"sum={total:g}", flush=True)
    torch.distributed.destroy_process_group()
    """
)


def _start(rank: int, world_size: int, port: int, extra: dict[str, str]) -> subprocess.Popen[str]:
    env = {**os.environ, **torchrun_env(rank, world_size, port), "OMP_NUM_THREADS": "1", **extra}
    env["LAUNCHER_DIST_TIMEOUT_S"] = "60"
    return subprocess.Popen(
        [sys.executable, "-c", _RANK],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_concurrent_launches_on_a_taken_port_all_rendezvous(tmp_path: Path) -> None:
    """Two 2-rank launches and one 1-rank run at once, all told MASTER_PORT=P while P is taken:
    rank 0 binds a port of its own and publishes it, so every launch completes its all-reduce."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        launches = []
        for index in range(2):
            published = {RENDEZVOUS_FILE_ENV: str(tmp_path / f"launch{index}.port")}
            launches.append([_start(rank, 2, port, published) for rank in range(2)])
        launches.append([_start(0, 1, port, {})])  # one rank: nothing to publish, still its own port
        outputs = [[proc.communicate(timeout=120)[0] for proc in procs] for procs in launches]
    codes = [[proc.returncode for proc in procs] for procs in launches]
    assert codes == [[0, 0]] * 2 + [[0]], outputs
    assert all("sum=3" in out for procs in outputs[:2] for out in procs) and "sum=1" in outputs[2][0]
