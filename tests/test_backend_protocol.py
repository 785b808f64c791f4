"""The supervised backends' protocol: the hooks a backend overrides are the documented abstract hooks
of SupervisedBackend (no private method of another backend is overridden), and the benches build
backends through the registry like the CLI does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from launcher.backends.hostfile import HostfileBackend
from launcher.backends.local import LocalBackend, QueuedRun, RankProcess, SupervisedBackend
from launcher.rundir.paths import ExperimentPaths
from launcher.rundir.run_config import RunConfig

BENCH = Path(__file__).resolve().parent.parent / "bench"
HOOKS = {"prepare", "launch", "gpu_pool", "max_concurrent_runs"}


def test_hooks_are_documented_abstract_methods() -> None:
    assert SupervisedBackend.__abstractmethods__ == HOOKS
    assert all(getattr(SupervisedBackend, hook).__doc__ for hook in HOOKS)
    for backend in (LocalBackend, HostfileBackend):
        assert not backend.__abstractmethods__, backend
        assert issubclass(backend, SupervisedBackend)
    assert not issubclass(HostfileBackend, LocalBackend)  # siblings: neither leans on the other's internals


def test_no_backend_overrides_a_private_method() -> None:
    for backend in (LocalBackend, HostfileBackend):
        private = [
            name
            for name in vars(backend)
            if name.startswith("_")
            and not name.startswith(("__", "_abc"))
            and hasattr(SupervisedBackend, name)
        ]
        assert not private, f"{backend.__name__} overrides {private}"


def test_a_backend_missing_a_hook_cannot_be_built() -> None:
    class NoLaunch(SupervisedBackend):
        name = "no-launch"

        def prepare(self, exp: ExperimentPaths, runs: list[RunConfig]) -> dict[str, str]:
            return {}

        def gpu_pool(self) -> list[str]:
            return []

        def max_concurrent_runs(self, queue: list[QueuedRun]) -> int:
            return 1

    with pytest.raises(TypeError, match="launch"):
        NoLaunch(None)  # type: ignore[abstract]
    assert RankProcess  # the type launch returns is part of the protocol's module


def test_benches_get_backends_from_the_registry() -> None:
    direct = [
        f"{source.name}: {match.group(0)}"
        for source in sorted(BENCH.glob("*.py"))
        for match in re.finditer(r"\b(Slurm|Local|Hostfile)Backend\(", source.read_text(encoding="utf-8"))
    ]
    assert not direct, direct
