"""The torchrun-style environment one rank is started with, and a free rendezvous port.

Torch-free on purpose: the local backend, the trainer and the tests all start ranks this way.
"""

from __future__ import annotations

import socket

TORCHRUN_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port(exclude: set[int] | None = None) -> int:
    """A TCP port the OS just reported free on 127.0.0.1 (not one handed out earlier by us)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if not exclude or port not in exclude:
            return port
    raise RuntimeError("no free TCP port found on 127.0.0.1")


def torchrun_env(rank: int, world_size: int, port: int, master_addr: str = "127.0.0.1") -> dict[str, str]:
    """The variables torchrun sets for one rank of a single-node job (every rank is local)."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(port),
    }
