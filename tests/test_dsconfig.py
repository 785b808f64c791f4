"""Rendering ds_config.json from the templates, and filling the scheduler's step counts."""

from __future__ import annotations

from pathlib import Path

import pytest
from spec_helpers import SPEC, load_text_plan

from launcher.plan.dsconfig import TEMPLATES, load_template, render_ds_config, template_name
from launcher.rundir.ds_config import fill_scheduler_auto


def test_render_and_fill(tmp_path: Path) -> None:
    plan = load_text_plan(
        tmp_path,
        SPEC.split("sweep:")[0].replace(
            "{precision: fp32}", "{precision: bf16, lr_scheduler: cosine, gradient_accumulation_steps: 4}"
        ),
    )
    run = plan.runs[0]
    ds = render_ds_config(run, 128)
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["train_batch_size"] == 4 * run.training.per_device_batch_size
    assert ds["scheduler"]["type"] == "WarmupCosineLR"
    assert ds["scheduler"]["params"]["total_num_steps"] == "auto"
    filled = fill_scheduler_auto(ds, 50, 0.1)
    assert filled["scheduler"]["params"]["warmup_num_steps"] == 5
    assert (
        fill_scheduler_auto(ds, 50, 0.0)["scheduler"]["params"]["warmup_num_steps"] == 1
    )  # DeepSpeed rejects 0


COMBOS = [
    (0, False, False),
    (1, True, False),
    (2, False, False),
    (2, True, False),
    (3, False, False),
    (3, True, False),
    (3, False, True),
    (3, True, True),
]


@pytest.mark.parametrize(("zero", "offload_opt", "offload_param"), COMBOS)
@pytest.mark.parametrize(
    ("precision", "scheduler"), [("bf16", "linear"), ("fp16", "constant"), ("fp32", "cosine")]
)
def test_every_template_renders_a_config_deepspeed_accepts(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    zero: int,
    offload_opt: bool,
    offload_param: bool,
    precision: str,
    scheduler: str,
) -> None:
    import deepspeed.runtime.config as ds_runtime_config
    from deepspeed.runtime.config import DeepSpeedConfig

    monkeypatch.setattr(ds_runtime_config.dist, "get_rank", lambda *a, **k: 0)
    text = SPEC.split("sweep:")[0].replace(
        "{precision: fp32}",
        f"{{precision: {precision}, lr_scheduler: {scheduler}, gradient_accumulation_steps: 2}}",
    )
    flags = f"offload_optimizer: {str(offload_opt).lower()}, offload_param: {str(offload_param).lower()}"
    text += f"resources: {{nodes: 2, gpus_per_node: 2, zero_stage: {zero}, {flags}}}\n"
    run = load_text_plan(tmp_path, text).runs[0]
    ds = render_ds_config(run, 4096)
    assert template_name(zero, offload_opt, offload_param).startswith("zero3" if zero == 3 else "zero2")
    assert ("offload_optimizer" in ds["zero_optimization"]) == offload_opt
    assert ("offload_param" in ds["zero_optimization"]) == offload_param
    assert ds["zero_optimization"].get("reduce_bucket_size") == 4096 * 4096
    filled = fill_scheduler_auto(ds, 100, 0.1)

    class DataParallel:
        def get_data_parallel_world_size(self) -> int:
            return 4

    parsed = DeepSpeedConfig(filled, mpu=DataParallel())
    assert parsed.zero_optimization_stage == zero
    assert (parsed.train_batch_size, parsed.gradient_accumulation_steps) == (
        run.training.per_device_batch_size * 8,
        2,
    )
    assert parsed.bfloat16_config.enabled == (precision == "bf16")
    assert parsed.float16_config.enabled == (precision == "fp16")
    assert parsed.scheduler_params["warmup_num_steps"] == 10


def test_templates_are_readable_json_with_auto_markers() -> None:
    for name in TEMPLATES:
        template = load_template(name)
        assert template["_comment"] and template["train_batch_size"] == "auto"
        assert template["zero_optimization"]["stage"] == (3 if name.startswith("zero3") else 2)
