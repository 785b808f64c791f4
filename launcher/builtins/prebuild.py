"""``python -m launcher.builtins.prebuild`` (run by ``make install``): build once what the default paths
need, so that no run waits for it later: the built-in tiny model and, on CPU, the DeepSpeed ops a run
JIT-compiles (cpu_adam, fused_adam, deepspeed_shm_comm) into this environment's ops directory.

Running it again builds nothing: the model is cached, and torch's ninja build finds every op up to date.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from launcher.builtins.ops_cache import DEEPSPEED_CPU_OPS, use_environment_ops_dir


def build_deepspeed_ops(builders: Sequence[str] = DEEPSPEED_CPU_OPS) -> list[str]:
    """Load (building where needed) each op for this machine's accelerator; returns the ops' names.
    Only the CPU accelerator's ops: CUDA ops are compiled with nvcc on a GPU node, not at install."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        print(f"prebuild: accelerator {accelerator.device_name()!r}: ops are built at the first run there")
        return []
    names = []
    for class_name in builders:
        builder = accelerator.create_op_builder(class_name)
        started = time.perf_counter()
        builder.load(verbose=False)
        names.append(builder.name)
        print(f"prebuild: op {builder.name} ready ({time.perf_counter() - started:.1f} s)")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.builtins.prebuild", description=__doc__)
    parser.add_argument("--no-model", action="store_true", help="skip the built-in tiny model")
    parser.add_argument("--no-ops", action="store_true", help="skip DeepSpeed's CPU ops")
    args = parser.parse_args(argv)
    print(f"prebuild: ops directory {use_environment_ops_dir()}")
    if not args.no_model:
        from launcher.builtins.tiny import ensure_tiny_model

        started = time.perf_counter()
        path = ensure_tiny_model()
        print(f"prebuild: built-in model ready at {path} ({time.perf_counter() - started:.1f} s)")
    if not args.no_ops:
        build_deepspeed_ops()
    return 0


if __name__ == "__main__":
    sys.exit(main())
