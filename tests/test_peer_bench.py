"""bench/peer_bench.py's pieces that need no LLaMA-Factory: arguments, the tiny Qwen2 it builds, the data
and both configs (ours goes through the real planner). The bench itself is never run here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import peer_bench  # noqa: E402


def test_arguments() -> None:
    args, settings = peer_bench.parse_args(["--quick"])
    assert settings.repeats == 1 and settings.examples == 600 and args.methods == ["lora", "full"]
    _, full = peer_bench.parse_args(["--methods", "lora"])
    assert full.repeats == 3 and full.examples == 3000
    with pytest.raises(SystemExit):
        peer_bench.parse_args(["--repeats", "0"])


def test_model_data_and_configs(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    from launcher.plan.planner import load_and_plan

    _, settings = peer_bench.parse_args(["--quick"])
    model_dir = peer_bench.build_qwen2(tmp_path / "qwen2-tiny")
    config = AutoConfig.from_pretrained(model_dir)
    assert config.model_type == "qwen2" and config.num_hidden_layers == 2
    assert config.vocab_size == len(AutoTokenizer.from_pretrained(model_dir))
    train, eval_ = peer_bench.write_data(tmp_path, settings)
    records = json.loads(train.read_text(encoding="utf-8"))
    assert len(records) == settings.examples and set(records[0]) == {"instruction", "input", "output"}
    lengths = sorted(len(r["instruction"]) + len(r["output"]) for r in records)
    assert lengths[-1] > 2 * lengths[0]  # varied lengths
    assert json.loads((tmp_path / "data" / "dataset_info.json").read_text())["eval"] == {
        "file_name": "eval.json"
    }

    for method in ("lora", "full"):
        theirs = peer_bench.llamafactory_config(
            settings, method, model_dir, tmp_path / "data", tmp_path / "o"
        )
        ours = peer_bench.our_spec(settings, method, model_dir, train, eval_, tmp_path / "runs")
        assert theirs["finetuning_type"] == ours["methods"][0]["method"] == method
        assert theirs["per_device_train_batch_size"] == ours["training"]["per_device_batch_size"]
        assert theirs["gradient_accumulation_steps"] == ours["training"]["gradient_accumulation_steps"]
        assert theirs["learning_rate"] == ours["training"]["learning_rate"]
        assert theirs["cutoff_len"] == ours["training"]["max_length"] and theirs["num_train_epochs"] == 1.0
        spec = tmp_path / f"{method}.yaml"
        import yaml

        spec.write_text(yaml.safe_dump(ours))
        plan = load_and_plan(spec)  # the spec we would train is valid for the real planner
        assert [r.name for r in plan.runs] == [method]
