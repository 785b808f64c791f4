"""docs/spec_reference.md is generated from the schema's field docs and must be current."""

from __future__ import annotations

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
