"""Rendering ds_config.json from the templates, and filling the scheduler's step counts."""

from __future__ import annotations

from pathlib import Path

from launcher.dsconfig import fill_scheduler_auto, render_ds_config
from launcher.plan import build_plan
from launcher.spec import JobSpec, load_spec

SPEC = """\
experiment: sw
model: {builtin: tiny-glm}
data: {builtin: dialogue}
training: {precision: fp32}
methods:
  - method: lora
  - method: freeze
    trainable_layers: 1
sweep:
  grid:
    training.learning_rate: [1.0e-4, 1.0e-3]
    method.r: [4, 8]
  zip:
    training.max_source_length: [64, 128]
    training.max_target_length: [16, 32]
  seeds: [1, 2]
"""


def _spec(tmp_path: Path, text: str = SPEC) -> tuple[JobSpec, Path]:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return load_spec(path), path


def test_render_and_fill(tmp_path: Path) -> None:
    spec, path = _spec(
        tmp_path,
        SPEC.split("sweep:")[0].replace(
            "{precision: fp32}", "{precision: bf16, lr_scheduler: cosine, gradient_accumulation_steps: 4}"
        ),
    )
    run = build_plan(spec, path)[0]
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
