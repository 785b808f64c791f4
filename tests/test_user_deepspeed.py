"""`resources.deepspeed: PATH`: the DeepSpeed JSON people already have (LLaMA-Factory's
ds_z3_offload_config.json, axolotl's zero3_bf16_cpuoffload_all.json, ChatGLM-Finetuning's
ds_zero3_offload.json; sources in tests/fixtures/deepspeed/SOURCES.md) plans with its "auto" values
filled from the spec, refuses contradictions with the spec, and trains on the built-in model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher.errors import UserError
from launcher.plan.planner import load_and_plan, write_run_dirs
from launcher.rundir.paths import read_json

FIXTURES = Path(__file__).parent / "fixtures" / "deepspeed"
# Each file with the spec settings it was written for (written-out values must agree with the spec).
FILES: dict[str, dict[str, Any]] = {
    "llamafactory_ds_z3_offload_config.json": {"precision": "fp32"},
    "axolotl_zero3_bf16_cpuoffload_all.json": {"precision": "bf16"},
    "chatglm_finetuning_ds_zero3_offload.json": {
        "precision": "fp16",
        "per_device_batch_size": 4,
        "gradient_accumulation_steps": 8,
    },
}


def _spec(
    tmp_path: Path, file: str, training: dict[str, Any], resources: dict[str, Any] | None = None
) -> Path:
    spec = {
        "experiment": "userds",
        "output_dir": str(tmp_path / "runs"),
        "model": {"builtin": "tiny-glm"},
        "data": {"builtin": "dialogue", "max_train_examples": 64, "max_eval_examples": 4},
        "template": "chatglm",
        "training": {"max_steps": 2, "learning_rate": 1e-3, "logging_steps": 1, **training},
        "eval": {"num_samples": 2, "max_new_tokens": 4},
        "methods": [{"method": "full"}],
        "resources": {"gpus_per_node": 1, "deepspeed": str(FIXTURES / file), **(resources or {})},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.parametrize("file", list(FILES))
def test_third_party_config_plans_with_autos_filled(file: str, tmp_path: Path) -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    plan = load_and_plan(_spec(tmp_path, file, FILES[file]))
    run = plan.runs[0]
    assert (run.resources.zero_stage, run.resources.offload_optimizer, run.resources.offload_param) == (
        3,
        True,
        True,
    )
    ds = json.loads(write_run_dirs(plan).run(run.name).ds_config.read_text())
    user = json.loads((FIXTURES / file).read_text())
    assert ds["train_micro_batch_size_per_gpu"] == run.training.per_device_batch_size
    assert ds["gradient_clipping"] == run.training.max_grad_norm
    assert ds["optimizer"]["params"]["lr"] == 1e-3 and ds["optimizer"]["type"] == "AdamW"
    assert ds["bf16"]["enabled"] is (run.training.precision == "bf16")
    assert ds["fp16"]["enabled"] is (run.training.precision == "fp16")
    autos = re.findall(r'"(\w+)": "auto"', json.dumps(ds))
    assert sorted(autos) == ["total_num_steps", "warmup_num_steps"]  # the trainer's, nothing else
    for key, value in user.get("zero_optimization", {}).items():  # the rest passes through as written
        if value != "auto":
            assert ds["zero_optimization"][key] == value, key
    ds["scheduler"]["params"].update(total_num_steps=10, warmup_num_steps=1)
    DeepSpeedConfig(ds)  # DeepSpeed's own validation (world size 1)


@pytest.mark.parametrize(
    ("file", "training", "resources", "expected"),
    [
        (
            "llamafactory_ds_z3_offload_config.json",
            {"precision": "fp32"},
            {"zero_stage": 2},
            "resources.zero_stage: run full: 2 contradicts llamafactory_ds_z3_offload_config.json's "
            "zero_optimization.stage (3)",
        ),
        (
            "axolotl_zero3_bf16_cpuoffload_all.json",
            {"precision": "fp32"},
            {},
            "bf16.enabled is True but the spec gives False",
        ),
        (
            "chatglm_finetuning_ds_zero3_offload.json",
            {"precision": "fp16"},
            {},
            "train_batch_size is 32 but the spec gives 1; train_micro_batch_size_per_gpu is 4 but the spec "
            "gives 1",
        ),
    ],
    ids=["zero-stage", "precision", "batch"],
)
def test_contradictions_with_the_spec_are_refused(
    file: str, training: dict[str, Any], resources: dict[str, Any], expected: str, tmp_path: Path
) -> None:
    with pytest.raises(UserError, match=re.escape(expected)) as info:
        load_and_plan(_spec(tmp_path, file, training, resources))
    assert "spec.yaml:" in str(info.value)


def test_missing_or_broken_file_is_a_spec_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "zero_optimization": {"stage": 3,}\n}\n')
    with pytest.raises(UserError, match=re.escape(f"{broken}:2: not valid JSON")):
        load_and_plan(_spec(tmp_path, str(broken), {"precision": "fp32"}))


@pytest.mark.slow
@pytest.mark.parametrize("file", list(FILES))
def test_third_party_config_trains(file: str, tmp_path: Path) -> None:
    """Two steps through the real entrypoint; ds_config.json is what DeepSpeed ran with."""
    import torch

    if FILES[file]["precision"] == "fp16" and not torch.cuda.is_available():
        pytest.skip("DeepSpeed's CPU accelerator refuses fp16 ('Type fp16 is not supported on your device')")
    plan = load_and_plan(_spec(tmp_path, file, FILES[file]))
    paths = write_run_dirs(plan).run(plan.runs[0].name)
    command = [sys.executable, "-m", "launcher.train", str(paths.root)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    result = read_json(paths.result_json)
    assert result["state"] == "COMPLETED", proc.stderr[-3000:]
    assert result["zero_stage"] == 3 and result["offload_param"] is True
