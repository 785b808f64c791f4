"""The spec schema and loader: positions, defaults, absolute paths in run.yaml, safe YAML only."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.errors import SpecError
from launcher.plan.planner import load_and_plan
from launcher.rundir.run_config import RunConfig
from launcher.spec.schema import LoraMethod
from launcher.spec.yaml_source import format_path, load_yaml_with_positions

SPEC = """\
experiment: s
model:
  path: models/m
  arch: chatglm2-6b
data:
  train_file: data/train.jsonl
  eval_file: data/eval.jsonl
methods:
  - method: lora
    r: 16
    lora_alpha: 64
    target_modules: [q_proj]
"""


def test_positions_of_keys_values_and_items() -> None:
    data, smap = load_yaml_with_positions(SPEC, "x.yaml")
    assert data["methods"][0]["r"] == 16
    assert smap.where(("methods", 0, "r")) == "x.yaml:10:5"
    assert smap.where(("methods", 0, "r"), prefer_value=True) == "x.yaml:10:8"
    assert smap.where(("methods", 0, "target_modules", 0)) == "x.yaml:12:22"
    assert smap.where(("methods", 0, "nope")) == "x.yaml:9:5"  # the closest ancestor
    assert format_path(("methods", 0, "lora_alpha")) == "methods[0].lora_alpha"


def test_valid_spec_loads_with_defaults_and_paths_become_absolute(tmp_path: Path) -> None:
    path = tmp_path / "jobs" / "s.yaml"
    path.parent.mkdir()
    path.write_text(SPEC)
    plan = load_and_plan(path)
    spec = plan.spec
    method = spec.methods[0]
    assert isinstance(method, LoraMethod) and method.lora_alpha == 64 and method.lora_dropout == 0.05
    assert spec.resources == "auto" and spec.training.precision == "bf16"
    assert len(plan.warnings) == 3  # model dir and both data files are not on this machine
    run = plan.runs[0]
    assert run.data.train_file == str(tmp_path / "jobs" / "data" / "train.jsonl")
    assert run.model.path == str(tmp_path / "jobs" / "models" / "m")
    assert RunConfig.model_validate_json(run.model_dump_json()) == run


def test_local_config_json_is_counted_on_the_meta_device(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    model_dir = tmp_path / "m"
    LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, vocab_size=300
    ).save_pretrained(model_dir)
    path = tmp_path / "s.yaml"
    path.write_text(SPEC.replace("  path: models/m\n  arch: chatglm2-6b", "  path: m"))
    plan = load_and_plan(path)
    from launcher.plan.archs import arch_from_model_dir

    arch = arch_from_model_dir(str(model_dir))
    assert arch.num_layers == 3 and arch.total_params == 2 * 300 * 64 + 3 * arch.params_per_layer + 64
    assert plan.runs[0].resources.fits and plan.archs[plan.runs[0].name].num_layers == 3


def test_only_safe_yaml(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("!!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError, match=r"s\.yaml:1:1"):
        load_and_plan(path)


def test_missing_file_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such file"):
        load_and_plan(tmp_path / "nope.yaml")
