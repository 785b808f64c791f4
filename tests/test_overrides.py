"""Command-line overrides (`launcher validate|plan|submit SPEC KEY=VALUE ...`): every part of the spec
can be set, each override is validated like the file, its errors point at it, and the experiment records
the effective spec."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from launcher.cli import main
from launcher.errors import SpecError
from launcher.plan.planner import load_and_plan
from launcher.spec.schema import LoraMethod

DEMO = Path(__file__).resolve().parents[1] / "jobs" / "demo.yaml"


def plan_with(*overrides: str, spec: Path = DEMO):  # type: ignore[no-untyped-def]
    return load_and_plan(spec, overrides=overrides)


def test_every_part_of_the_spec_can_be_overridden() -> None:
    plan = plan_with(
        "training.max_steps=7",
        "methods.lora.r=16",  # a method by its name
        "methods.lora.target_modules=[q_proj, v_proj]",
        "methods.full.resources.gpus_per_node=1",
        "methods.ptuning.overrides.training.warmup_ratio=0.5",  # a dotted key of a free mapping
        "sweep.grid.training.seed=[1, 2]",
        "cluster.extra_sbatch.reservation=llm week",
        "cluster.container.image=/images/x.sif",  # a section the file does not have
        "resources.zero_stage=3",  # the file's `resources` is auto (the default)
        "eval.num_samples=",  # empty: null
    )
    runs = {r.name: r for r in plan.runs}
    assert sorted(runs) == sorted(
        f"{m}-seed{s}" for m in ("freeze", "ptuning", "lora", "full") for s in (1, 2)
    )
    lora = runs["lora-seed1"]
    assert isinstance(lora.method, LoraMethod) and lora.method.r == 16
    assert lora.method.target_modules == ["q_proj", "v_proj"]
    assert {r.training.max_steps for r in runs.values()} == {7}
    assert runs["full-seed2"].resources.world_size == 1
    assert runs["ptuning-seed1"].training.warmup_ratio == 0.5 and lora.training.warmup_ratio == 0.1
    assert lora.cluster.extra_sbatch == {"reservation": "llm week"}
    assert lora.cluster.container is not None and lora.cluster.container.image == "/images/x.sif"
    assert lora.resources.zero_stage == 3 and lora.eval.num_samples is None


# (overrides, the error lines expected, each a list of fragments)
BAD: list[tuple[list[str], list[list[str]]]] = [
    (
        ["training.learnin_rate=1e-4"],
        [
            [
                "<override 1>: training.learnin_rate: unknown key 'learnin_rate' under training",
                "did you mean training.learning_rate?",
            ]
        ],
    ),
    (["trainig.max_steps=3"], [["<override 1>: trainig.max_steps:", "did you mean training.max_steps?"]]),
    (["lr=3e-4"], [["<override 1>: lr:", "did you mean training.learning_rate?"]]),
    (
        ["methods.lroa.r=4"],
        [
            [
                "<override 1>: methods.lroa.r: no method named 'lroa'; did you mean lora?",
                "methods: freeze, ptuning, lora, full",
            ]
        ],
    ),
    (["methods.lora.rank=4"], [["unknown key 'rank' under methods.lora; did you mean methods.lora.r?"]]),
    (["training.max_steps"], [["<override 1>: training.max_steps: not KEY=VALUE"]]),
    (["training.max_steps=[1"], [["<override 1>:1:3: <yaml>:"]]),
    (["training.max_steps.x=1"], [["training.max_steps is a single value (or a list), not a section"]]),
    (["training.max_steps=abc"], [["<override 1>: training.max_steps: must be a valid integer", "'abc'"]]),
    (["methods.lora.r=0"], [["<override 1>: methods[2].r: must be greater than or equal to 1"]]),
    (
        ["sweep.grid.training.lr=[1, 2]"],
        [["<override 1>: sweep.grid.training.lr: unknown key", "did you mean training.learning_rate?"]],
    ),
    (
        ["training.max_steps=3", "training.max_steps=4"],
        [["<override 2>: training.max_steps: given twice", "also <override 1>"]],
    ),
    (
        ["eval.num_samples=2", "training.precision=fp8"],  # a good one before: numbers count them all
        [["<override 2>: training.precision:", "choose one of: bf16, fp16, fp32"]],
    ),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_overrides_point_at_the_override(overrides: list[str], expected: list[list[str]]) -> None:
    with pytest.raises(SpecError) as info:
        plan_with(*overrides)
    problems = info.value.problems
    assert len(problems) == len(expected), problems
    for line, fragments in zip(problems, expected, strict=True):
        for fragment in fragments:
            assert fragment in line, (fragment, line)


def test_cli_exit_2_and_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for command in (["validate"], ["plan", "--write"], ["submit", "--dry-run", "--backend", "local"]):
        assert main([command[0], str(DEMO), "training.learnin_rate=1e-4", *command[1:]]) == 2
        assert "did you mean training.learning_rate?" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_effective_spec_is_recorded_and_identifies_the_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """spec.yaml holds the file with the overrides applied (and lists them); planning it alone gives the
    same runs, ids included. Another value is another run id."""
    monkeypatch.chdir(tmp_path)
    overrides = ["training.max_steps=7", "methods.lora.r=16", f"output_dir={tmp_path / 'out'}"]
    assert main(["plan", str(DEMO), *overrides, "--write"]) == 0
    recorded = tmp_path / "out" / "demo" / "spec.yaml"
    text = recorded.read_text()
    assert all(f"#   {o}\n" in text for o in overrides)
    assert yaml.safe_load(text)["methods"][2]["r"] == 16
    with_overrides = {r.name: r.run_id for r in plan_with(*overrides).runs}
    assert {r.name: r.run_id for r in load_and_plan(recorded).runs} == with_overrides
    assert plan_with(*overrides[:1]).runs[2].run_id != with_overrides["lora"]
    assert main(["validate", str(DEMO), *overrides]) == 0
    assert "with 3 override(s): ok (4 runs" in capsys.readouterr().out


def test_submit_takes_overrides_after_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--only lora training.max_steps=2`: --only would swallow the override; a run name has no '='."""
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            ["submit", str(DEMO), "--backend", "local", "--dry-run", "--only", "lora", "training.max_steps=2"]
        )
        == 0
    )
    run = yaml.safe_load((tmp_path / "runs" / "demo" / "runs" / "lora" / "run.yaml").read_text())
    assert run["training"]["max_steps"] == 2


def test_an_override_reads_values_as_the_file_does(tmp_path: Path) -> None:
    """Values are YAML read by the spec file's own loader (one rule for number-looking values such as
    1e-4): an override gives exactly the runs the same value in the file gives."""
    from launcher.spec.overrides import parse_value

    base = yaml.safe_load(DEMO.read_text())
    base["methods"] = [{"method": "lora"}]
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(base))
    swept = tmp_path / "swept.yaml"
    swept.write_text(plain.read_text() + "sweep:\n  grid:\n    training.learning_rate: [1e-4, 2e-4]\n")
    from_file = load_and_plan(swept).runs
    from_override = load_and_plan(plain, overrides=["sweep.grid.training.learning_rate=[1e-4, 2e-4]"]).runs
    assert [(r.name, r.run_id) for r in from_override] == [(r.name, r.run_id) for r in from_file]
    assert [r.training.learning_rate for r in from_override] == [1e-4, 2e-4]
    lr = load_and_plan(plain, overrides=["training.learning_rate=1e-4"]).runs[0].training.learning_rate
    assert lr == 1e-4
    assert parse_value("[0.5, 3, true, null, '7', a b]", 1) == [0.5, 3, True, None, "7", "a b"]


def test_null_clears_a_key_that_cannot_be_null() -> None:
    """`methods.full.overrides=null` removes the full run's overrides (their default, none, applies), so
    the learning rate can then be swept; a key that may be null is set to null (eval.num_samples: all)."""
    plan = plan_with(
        "methods.full.overrides=null",
        "sweep.grid.training.learning_rate=[1e-4, 2e-4]",
        "eval.num_samples=null",
    )
    full = {r.name: r for r in plan.runs if r.method.method == "full"}
    assert sorted(full) == ["full-lr1e-4", "full-lr2e-4"]
    assert [full[n].training.learning_rate for n in sorted(full)] == [1e-4, 2e-4]
    assert all(r.eval.num_samples is None for r in plan.runs)
