"""The pre-flight on data as people have it: a template that cannot render the data's tools and a train
file smaller than one global batch stop validate/plan/submit with exit 2 before anything is queued;
data.columns is applied when the records are read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_preflight import cache, launcher_cli, record, write_spec  # noqa: F401 - cache is a fixture
from test_tool_calls import GLAIVE
from tool_templates import QWEN_TOOLS

from launcher.errors import SpecError
from launcher.plan.planner import load_and_plan


def _write(path: Path, records: list[object]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def test_a_template_that_cannot_render_tools_stops_submit(
    tmp_path: Path,
    family_dirs: dict[str, Path],
    cache: Path,  # noqa: F811
) -> None:
    _write(tmp_path / "train.jsonl", [GLAIVE, GLAIVE])
    _write(tmp_path / "eval.jsonl", [GLAIVE])
    model = tmp_path / "qwen2"
    shutil.copytree(family_dirs["qwen2"], model)  # ChatML without tools
    spec = write_spec(tmp_path, model)
    proc = launcher_cli("submit", str(spec), "--backend", "local")
    assert proc.returncode == 2, proc.stderr
    assert (
        f"template: template: the chat template of {model} does not render the tools or tool calls"
        in proc.stderr
    )
    assert "1 problem in the job spec" in proc.stderr  # once for the template, not once per record
    assert not (tmp_path / "runs").exists()
    with pytest.raises(SpecError, match="template: chatglm renders text turns only"):
        load_and_plan(write_spec(tmp_path, model, template="chatglm"), check_paths=True)
    (model / "chat_template.jinja").write_text(QWEN_TOOLS, encoding="utf-8")
    plan = load_and_plan(write_spec(tmp_path, model), check_paths=True)
    assert plan.preflight is not None and plan.preflight.records == 3


def test_fewer_records_than_one_global_batch(
    tmp_path: Path,
    family_dirs: dict[str, Path],
    cache: Path,  # noqa: F811
) -> None:
    _write(tmp_path / "eval.jsonl", [json.loads(record(0))])
    _write(tmp_path / "train.jsonl", [json.loads(record(0))])
    spec = write_spec(tmp_path, family_dirs["qwen2"], training="{per_device_batch_size: 2}")
    for _ in range(2):  # read, then remembered: refused both times
        with pytest.raises(SpecError) as err:
            load_and_plan(spec, check_paths=True)
        (problem,) = err.value.problems
        assert problem.endswith(
            "data.train_file: 1 training example(s) are fewer than one global batch of 2 "
            "(training.per_device_batch_size 2 x 1 GPU(s)), and every step needs a full one: add records or "
            "lower training.per_device_batch_size"
        )
    _write(tmp_path / "train.jsonl", [json.loads(record(i)) for i in range(2)])
    assert load_and_plan(spec, check_paths=True).preflight is not None


def test_columns_reach_the_preflight(tmp_path: Path, family_dirs: dict[str, Path], cache: Path) -> None:  # noqa: F811
    advertisegen = [{"content": "类型#上衣", "summary": "简约的上衣"}]
    _write(tmp_path / "train.jsonl", advertisegen)
    _write(tmp_path / "eval.jsonl", [{"content": "类型#裤子", "summary": "宽松的裤子"}])
    with pytest.raises(SpecError, match=r"set data.format and map them with data.columns"):
        load_and_plan(write_spec(tmp_path, family_dirs["qwen2"]), check_paths=True)
    data = (
        "{train_file: train.jsonl, eval_file: eval.jsonl, format: chatglm, "
        "columns: {prompt: content, response: summary}}"
    )
    spec = write_spec(tmp_path, family_dirs["qwen2"])
    spec.write_text(
        spec.read_text(encoding="utf-8").replace("{train_file: train.jsonl, eval_file: eval.jsonl}", data)
    )
    plan = load_and_plan(spec, check_paths=True)
    assert plan.preflight is not None and plan.preflight.records == 2
    spec.write_text(spec.read_text(encoding="utf-8").replace("prompt: content", "promt: content"))
    with pytest.raises(
        SpecError, match=r"data.columns.promt: not a field of the chatglm format; did you mean prompt\?"
    ):
        load_and_plan(spec, check_paths=True)
