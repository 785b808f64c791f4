"""A small sweep spec shared by the sweep and DeepSpeed-config tests, and the loader they use."""

from __future__ import annotations

from pathlib import Path

from launcher.plan.planner import Plan, load_and_plan

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


def load_text_plan(tmp_path: Path, text: str = SPEC) -> Plan:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return load_and_plan(path)
