"""docs/spec_reference.md is generated from the schema's field docs and must be current."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from train_helpers import REPO

from launcher.spec.reference import render
from launcher.spec.schema import DataSpec, JobSpec


def test_the_spec_reference_is_current() -> None:
    written = (REPO / "docs" / "spec_reference.md").read_text(encoding="utf-8")
    assert written == render(), "regenerate: python -m launcher.spec.reference > docs/spec_reference.md"


def test_every_key_with_its_documentation() -> None:
    text = render()
    for name in JobSpec.model_fields:
        assert f"| `{name}` |" in text
    columns = DataSpec.model_fields["columns"].description
    assert columns and "AdvertiseGen" in columns
    assert f"| `columns` | mapping string → string \\| null | `null` | {' '.join(columns.split())} |" in text
    assert "| `learning_rate` | number | `0.0001` |" in text
    assert "## methods[] with method: lora" in text and "## cluster.container" in text


def test_the_readme_path_from_a_model_directory_and_a_jsonl_file(
    tmp_path: Path, family_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's minimal spec, with a model directory and JSONL files of the shape it shows, plans."""
    from launcher.builtins import cache as cache_module
    from launcher.plan.planner import load_and_plan

    monkeypatch.setattr(cache_module, "cache_dir", lambda: tmp_path / "cache")  # pre-flight memos
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[
        readme.index("**From your Hugging Face model directory and your JSONL file to a table.**") :
    ]
    spec_text = section[section.index("```yaml\n") + 8 : section.index("```\n")]
    model = re.search(r"model: \{path: (\S+)\}", spec_text)
    assert model is not None
    (tmp_path / "mine.yaml").write_text(
        spec_text.replace(model.group(1), str(family_dirs["qwen2"])), encoding="utf-8"
    )
    records = [
        {
            "messages": [
                {"role": "user", "content": f"3加{n}等于几？"},
                {"role": "assistant", "content": f"等于{3 + n}。"},
            ]
        }
        for n in range(20)
    ]
    (tmp_path / "mine.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
    )
    plan = load_and_plan(tmp_path / "mine.yaml", check_paths=True)
    assert [run.name for run in plan.runs] == ["lora"]
    assert plan.preflight is not None and plan.preflight.records == 20
    for command in (
        "launcher plan    mine.yaml",
        "launcher submit  mine.yaml --backend local",
        "launcher collect runs/mine",
    ):
        assert command in section
