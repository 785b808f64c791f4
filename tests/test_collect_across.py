"""`launcher collect EXP_A EXP_B`: one table and plots across experiments, significance only between runs
evaluated on the same examples, the hyperparameters that differ (swept or not), and a spec file for EXP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from collect_fixtures import default_result, make_config, make_run, perturb, references, samples, write_spec

from launcher.cli import main
from launcher.collect import collect_experiments
from launcher.collect.collection import comparison_dir
from launcher.collect.table import fmt_delta, fmt_note, render_markdown
from launcher.errors import UserError


def _runs(exp: Path, lrs: dict[str, float], *, ids_offset: int = 0, max_source_length: int = 512) -> None:
    refs = references(30)
    ids = [f"ex{i + ids_offset:04d}" for i in range(30)]
    for index, (name, lr) in enumerate(lrs.items()):
        preds = perturb(refs, 0.05 + 0.2 * index, seed=index)
        cfg = make_config(name, experiment=exp.name, max_source_length=max_source_length)
        cfg.training.learning_rate = lr
        make_run(
            exp,
            name,
            result=default_result(name, bleu=None),
            samples=samples(refs, preds, ids=ids),
            config=cfg,
        )
    write_spec(exp, baseline=next(iter(lrs)))


@pytest.fixture
def two_experiments(tmp_path: Path) -> tuple[Path, Path, Path]:
    """base: lora + lora-lr3 on ex0000..; longer: the same names, longer sources, same examples;
    shifted: another eval set (ids shifted)."""
    base, longer, shifted = tmp_path / "base", tmp_path / "longer", tmp_path / "shifted"
    _runs(base, {"lora": 1e-4, "lora-lr3": 1e-3})
    _runs(longer, {"lora": 1e-4}, max_source_length=1024)
    _runs(shifted, {"lora": 1e-4}, ids_offset=7)
    return base, longer, shifted


def test_one_table_with_significance_only_on_the_same_examples(two_experiments) -> None:
    base, longer, shifted = two_experiments
    collection = collect_experiments([base, longer, shifted], write=False)
    names = [r.name for r in collection.rows]
    assert names == ["base/lora", "base/lora-lr3", "longer/lora", "shifted/lora"]
    assert collection.baseline == "base/lora"  # the first experiment's spec baseline
    same = collection.row("longer/lora")
    assert same.get("bleu_delta") is not None and same.get("bleu_p_value") is not None
    other = collection.row("shifted/lora")
    assert other.get("bleu_delta") is None and other.get("bleu_p_value") is None
    assert fmt_delta(other) == "n/a"
    assert "no ΔBLEU: not the baseline's eval examples: samples cover other examples" in fmt_note(other)
    table = render_markdown(collection)
    assert "| shifted/lora |" in table and "n/a" in table and "not the baseline's eval examples" in table
    assert [r.get("experiment") for r in collection.rows] == ["base", "base", "longer", "shifted"]


def test_the_table_shows_the_hyperparameters_that_differ_swept_or_not(two_experiments) -> None:
    base, longer, _ = two_experiments
    collection = collect_experiments([base, longer], write=False)
    values = {r.name: r.get("hyperparameters") for r in collection.rows}
    # Neither was swept (run.yaml "swept" is empty): the learning rate and the source length differ.
    assert all(not r.get("swept") for r in collection.rows)
    assert values["base/lora"] == {"training.learning_rate": 1e-4, "training.max_source_length": 512}
    assert values["base/lora-lr3"] == {"training.learning_rate": 1e-3, "training.max_source_length": 512}
    assert values["longer/lora"] == {"training.learning_rate": 1e-4, "training.max_source_length": 1024}
    assert "learning_rate=0.001 max_source_length=512" in render_markdown(collection)
    alone = collect_experiments([longer], write=False)
    assert alone.rows[0].get("hyperparameters") == {}  # nothing differs in a one-run table


def test_cli_writes_the_joint_table_and_plots_beside_the_first_experiment(
    two_experiments, capsys: pytest.CaptureFixture[str]
) -> None:
    base, longer, _ = two_experiments
    assert main(["collect", str(base), str(longer), "--baseline", "longer/lora", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["base/lora", "base/lora-lr3", "longer/lora"]
    assert [r["baseline"] for r in rows] == [False, False, True]
    out = comparison_dir([base, longer])
    assert out == base.parent / "compare_base+longer"
    for name in ("summary.md", "summary.csv", "summary.json", "loss.png", "memory.png"):
        assert (out / name).is_file(), name
    assert not (base / "summary.md").exists()  # the experiments' own summaries are left alone
    assert main(["collect", str(base), str(longer), "--baseline", "lora-lr3", "--no-write"]) == 0
    assert "baseline base/lora-lr3" in capsys.readouterr().out


def test_two_experiments_of_one_name_and_an_unknown_baseline_are_user_errors(
    two_experiments, tmp_path
) -> None:
    base, _, _ = two_experiments
    twin = tmp_path / "elsewhere" / "base"
    _runs(twin, {"lora": 1e-4})
    with pytest.raises(UserError, match="given twice: base"):
        collect_experiments([base, twin], write=False)
    with pytest.raises(UserError, match="--baseline nope: no run of that name"):
        collect_experiments([base, two_experiments[1]], baseline="nope", write=False)


def test_collect_accepts_the_spec_as_status_does(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(
        f"experiment: fromspec\noutput_dir: {tmp_path / 'out'}\nmodel: {{builtin: tiny-glm}}\n"
        "data: {builtin: dialogue}\nmethods: [{method: lora}]\n"
    )
    assert main(["plan", str(spec), "--write"]) == 0
    capsys.readouterr()
    assert main(["collect", str(spec), "--format", "json", "--no-write"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["state"]) for r in rows] == [("lora", "PLANNED")]


def test_very_many_runs_compare_their_swept_values_only(two_experiments, monkeypatch) -> None:
    from launcher.collect import hyperparams

    base, _, _ = two_experiments
    monkeypatch.setattr(hyperparams, "MAX_RUNS_READ", 1)
    collection = collect_experiments([base], write=False)
    assert all(r.get("hyperparameters") == {} for r in collection.rows)  # nothing was swept
    assert any("compares swept values only" in w for w in collection.warnings)
