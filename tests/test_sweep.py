"""Sweep expansion: grid x zip x seeds, method axes, readable names, stable run ids, run-dir rewrites."""

from __future__ import annotations

from pathlib import Path

import pytest
from spec_helpers import SPEC, load_text_plan

from launcher.errors import SpecError, UserError
from launcher.plan.planner import load_and_plan, write_run_dirs
from launcher.plan.sweep import expand, format_value


def test_grid_zip_seeds_and_method_axes(tmp_path: Path) -> None:
    spec = load_text_plan(tmp_path).spec
    runs = expand(spec)
    lora = [r for r in runs if r.method.method == "lora"]
    freeze = [r for r in runs if r.method.method == "freeze"]
    assert len(lora) == 2 * 2 * 2 * 2 and len(freeze) == 2 * 2 * 2  # method.r only applies to lora
    assert lora[0].name == "lora-lr1e-4-r4-src64-tgt16-seed1"
    assert {r.method.r for r in lora} == {4, 8}  # type: ignore[union-attr]
    assert all(
        r.config["training"]["max_target_length"] == r.config["training"]["max_source_length"] // 4
        for r in runs
    )
    assert len({r.name for r in runs}) == len(runs)
    assert expand(spec)[3].swept == runs[3].swept  # pure


def test_run_ids_stable_and_config_sensitive(tmp_path: Path) -> None:
    plan = load_text_plan(tmp_path)
    ids = [r.run_id for r in plan.runs]
    assert ids == [r.run_id for r in load_and_plan(plan.spec_path).runs]
    assert len(set(ids)) == len(ids)
    other = load_text_plan(tmp_path, SPEC.replace("precision: fp32", "precision: bf16"))
    assert set(ids).isdisjoint(r.run_id for r in other.runs)


def test_format_value() -> None:
    assert format_value(1e-4) == "1e-4" and format_value(2e-5) == "2e-5" and format_value(0.5) == "0.5"
    assert format_value(True) == "on" and format_value(["q", "v"]) == "q+v"


def test_rewriting_a_changed_run_is_refused_unless_forced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write_run_dirs(load_text_plan(tmp_path, SPEC.split("sweep:")[0]))
    changed = load_text_plan(tmp_path, SPEC.split("sweep:")[0].replace("fp32", "bf16"))
    with pytest.raises(UserError, match="different configuration"):
        write_run_dirs(changed)
    exp = write_run_dirs(changed, force=True)
    assert "bf16" in exp.run("lora").run_yaml.read_text()


def test_the_architecture_is_resolved_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Validate, plan and write run dirs: one resolution per model, kept in the Plan."""
    import launcher.plan.planner as planner

    monkeypatch.chdir(tmp_path)
    calls: list[object] = []
    real = planner.resolve_arch
    monkeypatch.setattr(planner, "resolve_arch", lambda *args: calls.append(args) or real(*args))
    plan = load_text_plan(tmp_path)
    exp = write_run_dirs(plan)
    assert len(calls) == 1 and len(plan.runs) == 24 and len(exp.run_dirs()) == 24
    assert {a.hidden_size for a in plan.archs.values()} == {128}


def test_number_looking_sweep_values_are_numbers(tmp_path: Path) -> None:
    """YAML 1.1 (PyYAML) reads `1e-4` as a string; specs read it as the number everyone means."""
    text = SPEC.split("sweep:")[0].replace("  - method: freeze\n    trainable_layers: 1\n", "")
    plan = load_text_plan(tmp_path, text + "sweep:\n  grid:\n    training.learning_rate: [1e-4, 2E-4]\n")
    assert [r.name for r in plan.runs] == ["lora-lr1e-4", "lora-lr2e-4"]
    assert [r.training.learning_rate for r in plan.runs] == [1e-4, 2e-4]


def test_one_methods_colliding_names_are_blamed_on_the_sweep_values(tmp_path: Path) -> None:
    text = SPEC.split("sweep:")[0].replace("  - method: freeze\n    trainable_layers: 1\n", "")
    with pytest.raises(SpecError) as info:
        load_text_plan(tmp_path, text + "sweep:\n  grid:\n    training.learning_rate: [1.0e-4, 1.00001e-4]\n")
    [problem] = info.value.problems
    assert "sweep.grid.training.learning_rate: duplicate run name 'lora-lr1e-4'" in problem
    assert "methods[" not in problem and "`name:`" not in problem  # one method: nothing to rename
    assert "training.learning_rate: 0.0001 and 0.000100001" in problem
