"""Build DeepSpeed's CPU ops into this environment's ops directory, safely, and ``python -m
launcher.builtins.prebuild`` (run by ``make install``): build once what the default paths need, so
that no run waits for it later. On a CPU host that is the built-in tiny model only: the default runs
JIT-build no op (launcher/builtins/ops_cache.py says why); ``--ops`` builds DeepSpeed's CPU ops too,
for configs that ask for DeepSpeed's own optimizers (``torch_adam: false``).

Running it again builds nothing: the model is cached, and torch's ninja build finds every op up to date.

torch guards a build with a plain lock file that only its builder removes: a rank killed while it
compiles (a time-out, Ctrl-C, a preemption) leaves it behind, and every later run then waits on it
forever. Here each build also holds a kernel lock (flock, released when its holder dies, however it
dies); whoever holds that lock and still finds torch's lock file knows its builder is gone.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from launcher.builtins.ops_cache import CPU_OP_BUILDERS, op_is_built, use_environment_ops_dir

T = TypeVar("T")


def build_ops(op_names: Sequence[str]) -> list[str]:
    """Load each op (building it where needed) for this machine's accelerator; returns the ops loaded.
    Only the CPU accelerator's ops: CUDA ops are compiled with nvcc on a GPU node, at the first run."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return []
    root = use_environment_ops_dir()
    loaded = []
    for name in op_names:
        builder = accelerator.create_op_builder(CPU_OP_BUILDERS[name])
        # DeepSpeed keeps the loaded module: its own load of the op later in this process reuses it.
        build_under_lock(root, name, functools.partial(builder.load, verbose=False))
        loaded.append(name)
    return loaded


def build_under_lock(root: Path, name: str, load: Callable[[], T]) -> T:
    """``load()`` (torch's JIT build of op ``name`` in ``root``) while holding ``root/.name.flock``."""
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / f".{name}.flock"):
        stale = root / name / "lock"
        if stale.exists():  # we hold the flock every builder holds: torch's lock outlived its builder
            stale.unlink()
        return load()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.builtins.prebuild", description=__doc__)
    parser.add_argument("--no-model", action="store_true", help="skip the built-in tiny model")
    parser.add_argument(
        "--ops",
        nargs="*",
        choices=sorted(CPU_OP_BUILDERS),
        default=None,
        help="also build these DeepSpeed CPU ops (all of them when none is named)",
    )
    args = parser.parse_args(argv)
    if not args.no_model:
        from launcher.builtins.tiny import ensure_tiny_model

        started = time.perf_counter()
        path = ensure_tiny_model()
        print(f"prebuild: built-in model ready at {path} ({time.perf_counter() - started:.1f} s)")
    if args.ops is not None:
        print(f"prebuild: ops directory {use_environment_ops_dir()}")
        for name in args.ops or CPU_OP_BUILDERS:
            started = time.perf_counter()
            was_built = op_is_built(name)
            if build_ops([name]):
                what = "already built" if was_built else "built"
                print(f"prebuild: op {name} {what} ({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
