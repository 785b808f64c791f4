"""Malformed specs: every message names the key path, the line, and (where it helps) the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from fs_helpers import needs_root, small_fs

from launcher.cli import main
from launcher.errors import SpecError
from launcher.plan.planner import load_and_plan

BASE = """\
experiment: t
model:
  builtin: tiny-glm
data:
  builtin: dialogue
training:
  precision: fp32
  per_device_batch_size: 2
methods:
  - method: lora
    r: 8
  - method: freeze
    trainable_layers: 1
"""

# (name, spec text, expected line, substrings the message must contain)
CASES: list[tuple[str, str, int, list[str]]] = [
    ("unknown top key", BASE + "trainig: {}\n", 14, ["trainig", "did you mean training?"]),
    (
        "typo in method key",
        BASE.replace("    r: 8", "    lora_alph: 8"),
        11,
        ["methods[0].lora_alph", "did you mean lora_alpha?"],
    ),
    (
        "unknown method",
        BASE.replace("method: lora", "method: lorra"),
        10,
        ["methods[0].method", "lorra", "did you mean lora?"],
    ),
    (
        "missing method key",
        BASE.replace("  - method: lora\n    r: 8", "  - r: 8"),
        10,
        ["methods[0].method", "missing"],
    ),
    (
        "bad precision",
        BASE.replace("precision: fp32", "precision: fp8"),
        7,
        ["training.precision", "bf16, fp16, fp32"],
    ),
    ("negative lr", BASE + "  \n", 0, []),  # placeholder replaced below
    (
        "string batch",
        BASE.replace("per_device_batch_size: 2", "per_device_batch_size: two"),
        8,
        ["training.per_device_batch_size", "integer"],
    ),
    (
        "zero batch",
        BASE.replace("per_device_batch_size: 2", "per_device_batch_size: 0"),
        8,
        ["training.per_device_batch_size", "greater than or equal to 1"],
    ),
    ("missing experiment", BASE.replace("experiment: t\n", ""), 1, ["experiment", "missing required key"]),
    ("missing methods", BASE.split("methods:")[0], 1, ["methods", "missing required key"]),
    ("empty methods", BASE.split("methods:")[0] + "methods: []\n", 9, ["methods", "at least 1"]),
    (
        "model both",
        BASE.replace("  builtin: tiny-glm", "  builtin: tiny-glm\n  path: /m"),
        3,
        ["model.builtin", "exactly one"],
    ),
    (
        "model neither",
        BASE.replace("  builtin: tiny-glm", "  trust_remote_code: true"),
        2,
        ["model", "exactly one"],
    ),
    (
        "unknown builtin model",
        BASE.replace("builtin: tiny-glm", "builtin: tiny-gpt"),
        3,
        ["model.builtin", "tiny-glm"],
    ),
    (
        "unknown arch",
        BASE.replace("  builtin: tiny-glm", "  path: /nowhere/m\n  arch: chatglm-6"),
        4,
        ["model.arch", "did you mean chatglm-6b?"],
    ),
    ("data neither", BASE.replace("  builtin: dialogue", "  format: auto"), 4, ["data", "train_file"]),
    (
        "data only train",
        BASE.replace("  builtin: dialogue", "  train_file: a.json"),
        4,
        ["data.eval_file", "missing"],
    ),
    (
        "ptuning v2 + checkpointing",
        BASE + "  - method: ptuning\n    version: v2\n    resources: {gradient_checkpointing: true}\n",
        16,
        ["gradient_checkpointing", "P-Tuning v2"],
    ),
    (
        "offload param without zero3",
        BASE + "resources: {zero_stage: 2, offload_param: true}\n",
        14,
        ["resources.offload_param", "zero_stage: 3"],
    ),
    (
        "offload optimizer zero0",
        BASE + "resources: {zero_stage: 0, offload_optimizer: true}\n",
        14,
        ["resources.offload_optimizer", "zero_stage"],
    ),
    ("bad zero stage", BASE + "resources: {zero_stage: 4}\n", 14, ["resources.zero_stage", "0, 1, 2, 3"]),
    ("resources string", BASE + "resources: automatic\n", 14, ["resources", "'auto'", "a mapping"]),
    (
        "duplicate method names",
        BASE + "  - method: lora\n    r: 4\n",
        14,
        ["methods[2].method", "duplicate run name"],
    ),
    (
        "unknown sweep key",
        BASE + "sweep:\n  grid:\n    training.learning_rat: [1.0e-4, 1.0e-3]\n",
        16,
        ["sweep.grid.training.learning_rat", "did you mean training.learning_rate?"],
    ),
    (
        "zip unequal",
        BASE
        + "sweep:\n  zip:\n    training.max_source_length: [64, 128]\n    training.max_target_length: [16]\n",
        17,
        ["sweep.zip.training.max_target_length", "equal lengths"],
    ),
    (
        "bad swept value",
        BASE + "sweep:\n  grid:\n    training.learning_rate: [1.0e-4, -1]\n",
        16,
        ["sweep.grid.training.learning_rate[1]", "greater than 0"],
    ),
    (
        "unknown override key",
        BASE.replace("    r: 8", "    r: 8\n    overrides: {training.lr: 0.1}"),
        12,
        ["methods[0].overrides.training.lr", "did you mean training.learning_rate?"],
    ),
    (
        "method param for no method",
        BASE + "sweep:\n  grid:\n    method.pre_seq_len: [8, 16]\n",
        16,
        ["method.pre_seq_len", "no method"],
    ),
    (
        "global batch not divisible",
        BASE.replace("  per_device_batch_size: 2", "  per_device_batch_size: 2\n  global_batch_size: 3"),
        9,
        ["training.global_batch_size", "multiple"],
    ),
    (
        "freeze without layers",
        BASE.replace("    trainable_layers: 1\n", ""),
        12,
        ["methods[1]", "trainable_layers"],
    ),
    (
        "freeze too many layers",
        BASE.replace("trainable_layers: 1", "trainable_layers: 99"),
        13,
        ["methods[1].trainable_layers", "99"],
    ),
    (
        "lora target not in model",
        BASE.replace("    r: 8", "    r: 8\n    target_modules: [query_key_value]"),
        12,
        ["methods[0].target_modules", "q_proj"],
    ),
    (
        "bad regex",
        BASE.replace("    trainable_layers: 1", "    trainable_patterns: ['layers.(1']"),
        13,
        ["trainable_patterns[0]", "regex"],
    ),
    ("bad template", BASE + "template: nonsense\n", 14, ["template", "chatglm"]),
    ("bad baseline", BASE + "baseline: loar\n", 14, ["baseline", "no run is named"]),
    ("cannot fit", BASE + "cluster: {gpu_mem_gib: 0.1}\n", 10, ["gpu_mem_gib", "per_device_batch_size"]),
    ("yaml syntax", BASE + "sweep: [a, b\n", 15, ["<yaml>"]),
    ("duplicate yaml key", BASE + "experiment: u\n", 14, ["experiment", "duplicate key"]),
    ("top level list", "- a\n- b\n", 1, ["YAML mapping"]),
    (
        "bad experiment name",
        BASE.replace("experiment: t", "experiment: a/b"),
        1,
        ["experiment", "directory name"],
    ),
]
CASES[5] = (
    "negative lr",
    BASE.replace("  precision: fp32", "  precision: fp32\n  learning_rate: -1"),
    8,
    ["training.learning_rate", "greater than 0"],
)


def _training(line: str) -> str:
    return BASE.replace("  precision: fp32", f"  precision: fp32\n  {line}")


# Numbers are finite, in range and of their type; names fit in a directory name.
CASES += [
    ("infinite lr", _training("learning_rate: .inf"), 8, ["training.learning_rate", "finite number"]),
    ("infinite weight decay", _training("weight_decay: .inf"), 8, ["training.weight_decay", "finite"]),
    ("nan warmup", _training("warmup_ratio: .nan"), 8, ["training.warmup_ratio", "finite number"]),
    ("negative seed", _training("seed: -1"), 8, ["training.seed", "greater than or equal to 0"]),
    ("seed beyond numpy", _training("seed: 4294967296"), 8, ["training.seed", "less than or equal"]),
    ("boolean max_steps", _training("max_steps: true"), 8, ["training.max_steps", "integer, got True"]),
    ("fractional max_steps", _training("max_steps: 2.5"), 8, ["training.max_steps", "integer"]),
    ("quoted number", _training("learning_rate: '1e-4'"), 8, ["training.learning_rate", "number"]),
    ("empty seeds", BASE + "sweep: {seeds: []}\n", 14, ["sweep.seeds", "at least 1"]),
    ("negative swept seed", BASE + "sweep: {seeds: [1, -2]}\n", 14, ["sweep.seeds[1]", "greater than"]),
    ("infinite swept lr", BASE + "sweep: {grid: {training.learning_rate: [1e-4, .inf]}}\n", 14, ["finite"]),
    (
        "key in the wrong section",
        BASE + "learning_rate: 1e-4\n",
        14,
        ["did you mean training.learning_rate?"],
    ),
    (
        "top-level key in a section",
        _training("experiment: x"),
        8,
        ["training.experiment", "did you mean experiment (top level)?"],
    ),
    (
        "300-character experiment",
        BASE.replace("experiment: t", "experiment: " + "e" * 300),
        1,
        ["experiment", "300 characters", "at most 200"],
    ),
    (
        "300-character method name",
        BASE.replace("    r: 8", "    r: 8\n    name: " + "m" * 300),
        12,
        ["methods[0].name", "300 characters"],
    ),
    (
        "swept run name too long",
        BASE.replace("    r: 8", "    r: 8\n    name: " + "m" * 195)
        + "sweep: {grid: {training.learning_rate: [1e-4, 2e-4]}}\n",
        12,
        ["methods[0].name", "202 characters", "sweep fewer keys"],
    ),
]


@pytest.mark.parametrize(("name", "text", "line", "needles"), CASES, ids=[c[0] for c in CASES])
def test_malformed_spec_names_key_and_line(
    tmp_path: Path, name: str, text: str, line: int, needles: list[str]
) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    with pytest.raises(SpecError) as info:
        load_and_plan(spec)
    problems = info.value.problems
    matching = [p for p in problems if all(n in p for n in needles)]
    assert matching, f"{name}: no problem mentions {needles}: {problems}"
    assert any(p.startswith(f"{spec}:{line}:") for p in matching), f"{name}: expected line {line}: {matching}"


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        BASE.replace("    r: 8", "    lora_alph: 8").replace("precision: fp32", "precision: fp8")
        + "trainig: {}\n"
    )
    with pytest.raises(SpecError) as info:
        load_and_plan(spec)
    assert len(info.value.problems) == 3
    assert str(info.value).startswith("3 problems in the job spec:")


def test_missing_paths_warn_at_plan_and_fail_at_submit(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        BASE.replace("  builtin: dialogue", "  train_file: data/train.json\n  eval_file: data/dev.json")
    )
    loaded = load_and_plan(spec)
    assert any("data.train_file" in w and "does not exist" in w for w in loaded.warnings)
    with pytest.raises(SpecError) as info:
        load_and_plan(spec, check_paths=True)
    assert any(p.startswith(f"{spec}:5:") and "data.train_file" in p for p in info.value.problems)


def test_cli_validate_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text(BASE.replace("method: lora", "method: lorra"))
    assert main(["validate", str(spec)]) == 2
    assert main(["plan", str(spec), "--write"]) == 2
    err = capsys.readouterr().err
    assert "did you mean lora?" in err and f"{spec}:10:" in err
    assert not (tmp_path / "runs").exists()


def test_an_output_dir_that_cannot_be_written_is_found_at_validate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not a traceback at `plan --write` or submit: validate says which directory and why (exit 2)."""
    blocker = tmp_path / "results"
    blocker.write_text("a file where the experiments should go\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(BASE + f"output_dir: {blocker / 'deeper'}\n")
    for command in (["validate"], ["plan", "--write"], ["submit", "--dry-run", "--backend", "local"]):
        assert main([*command, str(spec)]) == 2, command
        err = capsys.readouterr().err
        assert f"{spec}:14:" in err and f"{blocker} is a file" in err, err
    assert blocker.read_text().startswith("a file")


@needs_root
def test_a_read_only_output_dir_is_found_at_validate(tmp_path: Path) -> None:
    with small_fs(tmp_path / "ro", "1m", read_only=True) as read_only:
        spec = tmp_path / "spec.yaml"
        spec.write_text(BASE + f"output_dir: {read_only}\n")
        with pytest.raises(SpecError, match=rf"output_dir: cannot write in {read_only} \(a read-only file"):
            load_and_plan(spec)


def test_a_long_name_is_refused_cleanly_when_runs_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With runs/ on disk (after `make demo`), checking where the experiment would go used to stat a
    300-character name: an OSError traceback instead of the name's problem."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    spec = tmp_path / "spec.yaml"
    spec.write_text(BASE.replace("experiment: t", "experiment: " + "e" * 300))
    assert main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "is 300 characters" in err and "Traceback" not in err
    assert list((tmp_path / "runs").iterdir()) == []


def test_overrides_after_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """KEY=VALUE anywhere on the line (`validate spec.yaml --check-paths training.max_steps=2`), as
    before the options; anything else left over is still an error."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(BASE.replace("experiment: t", f"experiment: t\noutput_dir: {tmp_path / 'runs'}"))
    assert main(["validate", str(spec), "--no-read-inputs", "training.max_steps=2", "methods.lora.r=4"]) == 0
    assert "with 2 override(s)" in capsys.readouterr().out
    assert (
        main(["validate", str(spec), "training.max_steps=2", "--no-read-inputs", "training.max_stepz=3"]) == 2
    )
    assert "did you mean training.max_steps?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as leftover:
        main(["validate", str(spec), "--no-read-inputs", "stray"])
    assert leftover.value.code == 2
