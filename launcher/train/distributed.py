"""Who am I in the job: rank, local rank, world size and the rendezvous address, plus the process group.

Sources, first match wins:
1. inside a submitit job (Slurm or submitit's local executor): submitit's ``TorchDistributedEnvironment``
   (it reads SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS and the first host of the node list for us);
2. torchrun / the DeepSpeed launcher: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT;
3. a single process (rank 0 of 1) - a laptop run.

The rendezvous port: a port picked free by the launcher can be taken by another process before rank 0
binds it (EADDRINUSE on a busy node). So rank 0 binds port 0 itself (the OS picks a free one, nothing
can take it in between) whenever the other ranks can learn it: always for one rank, and for a
single-node launch that names a rendezvous file (``RENDEZVOUS_FILE_ENV``), where rank 0 publishes it.
Multi-node jobs (Slurm, hostfile, torchrun) keep the env:// rendezvous at MASTER_ADDR:MASTER_PORT.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Literal

import torch

from launcher.rundir.paths import RENDEZVOUS_FILE_ENV

DIST_TIMEOUT_ENV = "LAUNCHER_DIST_TIMEOUT_S"
DEFAULT_DIST_TIMEOUT_S = 600.0
"""A crashed or killed rank must not hang the others forever: collectives give up after this."""

Source = Literal["submitit", "torchrun", "single"]


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    source: Source

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def detect_dist_env() -> DistEnv:
    """Read the rank layout from the environment (no process group is created here)."""
    if os.environ.get("SUBMITIT_EXECUTOR"):
        from submitit.helpers import TorchDistributedEnvironment

        sub = TorchDistributedEnvironment()
        return DistEnv(
            rank=sub.rank,
            local_rank=sub.local_rank,
            world_size=sub.world_size,
            master_addr=sub.master_addr,
            master_port=int(sub.master_port),
            source="submitit",
        )
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return DistEnv(
            rank=int(os.environ["RANK"]),
            local_rank=int(os.environ.get("LOCAL_RANK", os.environ["RANK"])),
            world_size=int(os.environ["WORLD_SIZE"]),
            master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(os.environ.get("MASTER_PORT", "29500")),
            source="torchrun",
        )
    # One process alone: port 0 lets the rendezvous store bind a port the OS picks as it binds, so
    # there is no port to choose beforehand and none to lose to another process in between.
    return DistEnv(
        rank=0, local_rank=0, world_size=1, master_addr="127.0.0.1", master_port=0, source="single"
    )  # port 0: the store binds whatever port the OS picks (create_process_group)


def dist_timeout_s() -> float:
    raw = os.environ.get(DIST_TIMEOUT_ENV)
    if not raw:
        return DEFAULT_DIST_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError as exc:
        raise ValueError(f"{DIST_TIMEOUT_ENV}={raw!r} is not a number of seconds") from exc
    if value <= 0:
        raise ValueError(f"{DIST_TIMEOUT_ENV}={raw!r} must be > 0 seconds")
    return value


def backend_name() -> str:
    """nccl on GPUs, gloo on CPU."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def device_for(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        # Under submitit CUDA_VISIBLE_DEVICES may already be narrowed to one card; count what we see.
        index = env.local_rank % max(1, torch.cuda.device_count())
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def _publish_port(path: Path, port: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(str(port))
    os.replace(tmp, path)  # atomic: a reader never sees half a number


def _published_port(path: Path, timeout_s: float) -> int:
    """The port rank 0 published (it may still be loading torch: wait for it, up to the timeout)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int(path.read_text())
        time.sleep(0.05)
    raise TimeoutError(f"rank 0 did not publish its rendezvous port in {path} within {timeout_s:.0f} s")


def _own_port_store(env: DistEnv, timeout: timedelta) -> torch.distributed.TCPStore | None:
    """The rendezvous store on a port rank 0 bound itself, or None where the ranks cannot learn it
    (multi-node: env:// at MASTER_ADDR:MASTER_PORT)."""
    published = os.environ.get(RENDEZVOUS_FILE_ENV)
    if env.world_size > 1 and not published:
        return None
    if env.rank == 0:
        store = torch.distributed.TCPStore(
            env.master_addr, 0, env.world_size, is_master=True, timeout=timeout, wait_for_workers=False
        )
        if published:
            _publish_port(Path(published), store.port)
        return store
    port = _published_port(Path(str(published)), timeout.total_seconds())
    return torch.distributed.TCPStore(env.master_addr, port, env.world_size, is_master=False, timeout=timeout)


def create_process_group(env: DistEnv) -> None:
    """The torch process group, with the rendezvous above; MASTER_PORT then names the port in use."""
    if torch.distributed.is_initialized():
        return
    timeout = timedelta(seconds=dist_timeout_s())
    store = _own_port_store(env, timeout)
    if store is None:
        torch.distributed.init_process_group(
            backend_name(), init_method="env://", rank=env.rank, world_size=env.world_size, timeout=timeout
        )
        return
    os.environ["MASTER_PORT"] = str(store.port)
    torch.distributed.init_process_group(
        backend_name(), store=store, rank=env.rank, world_size=env.world_size, timeout=timeout
    )


def init_distributed(env: DistEnv) -> None:
    """Export the env:// variables DeepSpeed reads, create the process group (also for 1 rank:
    DeepSpeed needs one) and hand it to DeepSpeed, which wraps an existing group."""
    import deepspeed

    if torch.distributed.is_initialized():
        return
    os.environ.update(
        {
            "RANK": str(env.rank),
            "LOCAL_RANK": str(env.local_rank),
            "WORLD_SIZE": str(env.world_size),
            "MASTER_ADDR": env.master_addr,
            "MASTER_PORT": str(env.master_port),
        }
    )
    create_process_group(env)
    skip_inference_shm_op()
    deepspeed.init_distributed(
        dist_backend=backend_name(),
        auto_mpi_discovery=False,
        timeout=timedelta(seconds=dist_timeout_s()),
        rank=env.rank,
        world_size=env.world_size,
    )


def skip_inference_shm_op() -> None:
    """Keep DeepSpeed from JIT-building its shared-memory all-reduce op on CPU hosts.

    On the CPU accelerator, DeepSpeed builds deepspeed_shm_comm whenever it wraps a process group
    (28 s once per environment on a 2-core machine, then a load at every start), yet only
    inference's tensor-parallel all-reduce uses it: training's collectives go through gloo either
    way. DeepSpeed consults ``deepspeed.ops.__compatible_ops__`` (a dict it keeps for edits)
    before building the op.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def shutdown_distributed() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _all_reduce(
    values: list[float], device: torch.device, op: torch.distributed.ReduceOp.RedOpType
) -> list[float]:
    """A few numbers reduced over ranks in one collective (a no-op for one process)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor, op=op)
    return [float(v) for v in tensor.tolist()]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    return _all_reduce(values, device, torch.distributed.ReduceOp.SUM)


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    return _all_reduce(values, device, torch.distributed.ReduceOp.MAX)


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
