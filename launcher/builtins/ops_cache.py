"""Where DeepSpeed's JIT-compiled ops (cpu_adam, fused_adam, deepspeed_shm_comm) are built: one
directory per environment.

torch's default, ``~/.cache/torch_extensions/py311_cpu/<op>/``, is shared by every venv and container
on the machine (or on a cluster's shared ``$HOME``), and each op's ``build.ninja`` names the
interpreter's include and library paths. Two environments then rebuild each other's ops on every
start (50-200 s each on a loaded 2-core box). Keyed by Python, torch and DeepSpeed versions and the
install paths, each environment builds an op once and every later run reuses it.

Torch-free on purpose: every process that may build an op sets it first (a rank's entrypoint, the
prebuild, the tests' conftest); a bench's ranks run the entrypoint.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

TORCH_EXTENSIONS_ENV = "TORCH_EXTENSIONS_DIR"
"""Read by torch.utils.cpp_extension (and so by DeepSpeed's JIT builds) at build time."""
KEYED_MARKER_ENV = "LAUNCHER_OPS_DIR_SET"
"""The value we set: a child started with another interpreter (cluster.python, a container) inherits
both variables and recomputes its own directory; a TORCH_EXTENSIONS_DIR the user set is left alone."""
CPU_OP_BUILDERS = {
    "cpu_adam": "CPUAdamBuilder",
    "fused_adam": "FusedAdamBuilder",
    "deepspeed_shm_comm": "ShareMemCommBuilder",
}
"""DeepSpeed's CPU ops (op name -> builder class): cpu_adam (Adam with optimizer offload), fused_adam
(Adam without), deepspeed_shm_comm (shared-memory all-reduce for inference tensor parallelism). A CPU
run builds none by default (Adam runs as torch's AdamW: launcher.train.schedule.cpu_optimizer_op;
the shm op is skipped: launcher.train.distributed); ``prebuild --ops`` builds them on request."""


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _location(name: str) -> str:
    try:
        return str(Path(str(importlib.metadata.distribution(name).locate_file(""))).resolve())
    except importlib.metadata.PackageNotFoundError:
        return ""


def environment_key() -> str:
    """``py311-torch2.13.0+cpu-ds0.19.8-<hash of the interpreter prefix and install paths>``."""
    identity = "\n".join(
        (
            str(Path(sys.prefix).resolve()),
            str(Path(sys.executable).resolve()),
            _location("torch"),
            _location("deepspeed"),
        )
    )
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return f"{py}-torch{_version('torch')}-ds{_version('deepspeed')}-{digest}"


def default_extensions_root() -> Path:
    """torch's own root (``$XDG_CACHE_HOME`` or ``~/.cache``, then ``torch_extensions``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "torch_extensions"


def environment_ops_dir() -> Path:
    return default_extensions_root() / environment_key()


def use_environment_ops_dir(environ: MutableMapping[str, str] | None = None) -> Path:
    """Point TORCH_EXTENSIONS_DIR at this environment's directory unless the user chose one; returns
    the directory ops are built in."""
    env = os.environ if environ is None else environ
    current = env.get(TORCH_EXTENSIONS_ENV)
    if current and current != env.get(KEYED_MARKER_ENV):
        return Path(current)  # the user's choice
    target = str(environment_ops_dir())
    env[TORCH_EXTENSIONS_ENV] = target
    env[KEYED_MARKER_ENV] = target
    return Path(target)


def op_is_built(op_name: str, environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether ``op_name`` (e.g. "cpu_adam") has a compiled library in this environment's directory."""
    root = use_environment_ops_dir(environ)
    return (root / op_name / f"{op_name}.so").is_file()
