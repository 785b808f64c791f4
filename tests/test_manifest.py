"""manifest.json and run identity: run ids, submission records, locking, corrupt files."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
from backend_helpers import make_run

from launcher.backends.base import SubmittedRun
from launcher.errors import UserError
from launcher.rundir.identity import run_id_of
from launcher.rundir.paths import ExperimentPaths
from launcher.submit.manifest import load_manifest, locked_manifest


def test_run_id_is_stable_and_ignores_placement() -> None:
    a, b = make_run("r"), make_run("r")
    assert run_id_of(a) == run_id_of(b) and len(run_id_of(a)) == 12
    b.backend, b.hostfile = "slurm", "/hosts.txt"  # where it runs is not what it computes
    b.cluster.partition, b.local.max_concurrent_runs = "gpu", 4
    b.resources.est_mem_gib, b.resources.fits = 99.0, False  # nor what the planner estimated
    assert run_id_of(a) == run_id_of(b)
    assert run_id_of(make_run("r", lr=2e-4)) != run_id_of(a)


def test_record_counts_attempts_and_drops_replaced_entries(tmp_path: Path) -> None:
    exp = ExperimentPaths(tmp_path / "exp")
    with locked_manifest(exp) as manifest:
        manifest.record(SubmittedRun("r", "id1", "slurm", job_id="10_0", array_job_id="10", array_index=0))
    with locked_manifest(exp) as manifest:
        manifest.record(SubmittedRun("r", "id1", "slurm", job_id="11_3", array_job_id="11", array_index=3))
    entry = load_manifest(exp).entries["id1"]
    assert (entry.attempts, entry.job_id, entry.array_job_id, entry.array_index) == (2, "11_3", "11", 3)
    raw = json.loads(exp.manifest_json.read_text())
    assert set(raw["runs"]["id1"]) == {
        "name",
        "backend",
        "job_id",
        "array_job_id",
        "array_index",
        "attempts",
        "submitted_at",
    }
    with locked_manifest(exp) as manifest:  # a changed config under the same name replaces the entry
        manifest.record(SubmittedRun("r", "id2", "local", job_id="1@2"))
    loaded = load_manifest(exp)
    assert list(loaded.entries) == ["id2"] and loaded.entries["id2"].attempts == 1
    assert loaded.by_name("r") == ("id2", loaded.entries["id2"]) and loaded.by_name("x") is None


def test_corrupt_manifest_is_a_user_error(tmp_path: Path) -> None:
    exp = ExperimentPaths(tmp_path)
    exp.manifest_json.write_text("{not json")
    with pytest.raises(UserError, match="not a valid launcher manifest"):
        load_manifest(exp)
    exp.manifest_json.write_text('{"runs": {"x": {"backend": "local"}}}')  # no name
    with pytest.raises(UserError, match="not a valid launcher manifest"):
        load_manifest(exp)


def _add(root: str, index: int) -> None:
    exp = ExperimentPaths(Path(root))
    for k in range(10):
        with locked_manifest(exp) as manifest:
            manifest.record(SubmittedRun(f"r{index}-{k}", f"id{index}-{k}", "local"))


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_add, args=(str(tmp_path), i)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert len(load_manifest(ExperimentPaths(tmp_path)).entries) == 30


def test_submission_lock_excludes_a_second_submit(tmp_path: Path) -> None:
    from launcher.submit.manifest import submission_lock

    exp = ExperimentPaths(tmp_path / "exp")
    ctx = multiprocessing.get_context("fork")
    holding = ctx.Event()
    release = ctx.Event()

    def hold() -> None:
        with submission_lock(exp):
            holding.set()
            release.wait(30)

    proc = ctx.Process(target=hold)
    proc.start()
    assert holding.wait(30)
    with pytest.raises(UserError, match="another `launcher submit`"), submission_lock(exp, timeout_s=0.5):
        pass
    release.set()
    proc.join(30)
    with submission_lock(exp, timeout_s=5):  # free again
        pass
