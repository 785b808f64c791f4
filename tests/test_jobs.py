"""Every shipped jobs/*.yaml validates and plans; every rendered ds_config parses with DeepSpeed's class."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.plan.planner import load_and_plan, write_run_dirs
from launcher.rundir.ds_config import fill_scheduler_auto
from launcher.rundir.run_config import RunConfig
from launcher.rundir.status import read_status


class _DataParallel:
    """The data-parallel size DeepSpeedConfig checks the batch arithmetic against (no process group)."""

    def __init__(self, world_size: int):
        self.world_size = world_size

    def get_data_parallel_world_size(self) -> int:
        return self.world_size


JOBS = sorted((Path(__file__).parent.parent / "jobs").glob("*.yaml"))


def test_the_shipped_jobs_exist() -> None:
    names = {p.name for p in JOBS}
    assert {"demo.yaml", "compare_methods.yaml", "history_length.yaml", "multinode_full.yaml"} <= names
    for path in JOBS:
        assert path.read_text().startswith("# "), f"{path.name} must start with the command that runs it"
        assert "launcher " in path.read_text().splitlines()[0]


@pytest.mark.parametrize("job", JOBS, ids=[p.name for p in JOBS])
def test_job_validates_plans_and_renders_deepspeed_configs(
    job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import deepspeed.runtime.config as ds_runtime_config
    from deepspeed.runtime.config import DeepSpeedConfig

    # DeepSpeedConfig reads the world size from the process group; stand in for one of the planned size.
    monkeypatch.setattr(ds_runtime_config.dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.chdir(tmp_path)
    plan = load_and_plan(job)
    runs = plan.runs
    assert runs and all(r.resources.fits for r in runs)
    assert load_and_plan(job).runs[0].run_id == runs[0].run_id  # stable ids
    exp = write_run_dirs(plan)
    for run in runs:
        paths = exp.run(run.name)
        assert RunConfig.from_yaml_file(paths.run_yaml) == run
        assert read_status(paths)["state"] == "PLANNED"
        ds = json.loads(paths.ds_config.read_text())
        filled = fill_scheduler_auto(ds, total_num_steps=100, warmup_ratio=run.training.warmup_ratio)
        world = run.resources.world_size
        parsed = DeepSpeedConfig(filled, mpu=_DataParallel(world))  # DeepSpeed's own validation
        assert parsed.train_batch_size == ds["train_batch_size"]
        assert parsed.zero_optimization_stage == run.resources.zero_stage
    assert json.loads(exp.plan_json.read_text())["runs"][0]["run_id"] == runs[0].run_id


def test_demo_is_the_embedded_default() -> None:
    plan = load_and_plan(Path(__file__).parent.parent / "jobs" / "demo.yaml")
    spec = plan.spec
    assert spec.model.builtin == "tiny-glm" and spec.data.builtin == "dialogue" and spec.backend == "local"
    runs = {r.method.method: r for r in plan.runs}
    assert set(runs) == {"freeze", "ptuning", "lora", "full"}
    full = runs["full"].resources
    assert (full.world_size, full.zero_stage, full.offload_optimizer, full.offload_param) == (
        2,
        3,
        True,
        True,
    )
