"""Nothing is queued that cannot run: validate --check-paths, plan and submit read every record and
render it, load the tokenizer and the config, and check the weight files against the config, reporting
every problem at once (file:line, the key, the fix) with exit 2 before anything is submitted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from train_helpers import REPO

from launcher.errors import SpecError
from launcher.plan.planner import load_and_plan
from launcher.plan.preflight import check_model

LINES = 10_000
BROKEN_LINE = 7321
BAD_ROLE_LINE = 9000


def record(i: int) -> str:
    messages = [{"role": "user", "content": f"问题{i}"}, {"role": "assistant", "content": f"回答{i}"}]
    return json.dumps({"messages": messages}, ensure_ascii=False)


def write_spec(root: Path, model: Path, train: str = "train.jsonl", **extra: str) -> Path:
    settings = "".join(f"{key}: {value}\n" for key, value in extra.items())
    spec = root / "spec.yaml"
    spec.write_text(
        textwrap.dedent(
            f"""\
            experiment: preflight
            output_dir: {root / "runs"}
            model: {{path: {model}}}
            data: {{train_file: {train}, eval_file: eval.jsonl}}
            methods:
              - {{method: lora}}
            """
        )
        + settings,
        encoding="utf-8",
    )
    return spec


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache of its own for what the pre-flight remembers (the family models stay in the shared one)."""
    from launcher.builtins import cache as cache_module

    own = tmp_path / "preflight-cache"
    monkeypatch.setattr(cache_module, "cache_dir", lambda: own)
    return own


def launcher_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_a_broken_record_of_10k_stops_validate_plan_and_submit(
    tmp_path: Path, family_dirs: dict[str, Path]
) -> None:
    lines = [record(i) for i in range(LINES)]
    lines[BROKEN_LINE - 1] = lines[BROKEN_LINE - 1][:-2]  # cut off the closing brackets
    lines[BAD_ROLE_LINE - 1] = lines[BAD_ROLE_LINE - 1].replace('"assistant"', '"bot"')
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "eval.jsonl").write_text("\n".join(lines[:5]) + "\n", encoding="utf-8")
    spec = write_spec(tmp_path, family_dirs["qwen2"])
    train = tmp_path / "train.jsonl"
    for command in (["validate", "--check-paths"], ["plan"], ["submit", "--backend", "local"]):
        proc = launcher_cli(*command, str(spec))
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        assert f"data.train_file: {train}:{BROKEN_LINE}: invalid JSON" in proc.stderr, proc.stderr
        assert (
            f"data.train_file: {train}:{BAD_ROLE_LINE}: messages[1].role: 'bot' is not a speaker"
            in proc.stderr
        )
        assert "2 problems in the job spec" in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing planned, written or submitted


def test_every_data_problem_with_its_line_and_remembered_when_fixed(
    tmp_path: Path, family_dirs: dict[str, Path], cache: Path
) -> None:
    (tmp_path / "train.jsonl").write_text(
        "\n".join([record(0), '{"messages": [{"role": "user", "content": "q"}]}', "", "{oops", record(4)])
        + "\n",
        encoding="utf-8",
    )
    (tmp_path / "eval.jsonl").write_text(record(9) + "\n", encoding="utf-8")
    spec = write_spec(tmp_path, family_dirs["llama3"])
    with pytest.raises(SpecError) as err:
        load_and_plan(spec, check_paths=True)
    train = tmp_path / "train.jsonl"
    assert err.value.problems == [
        f"{spec}:4:20: data.train_file: {train}:2: messages[0]: the conversation must end with an assistant "
        "turn (the response to learn)",
        f"{spec}:4:20: data.train_file: {train}:4: invalid JSON (Expecting property name enclosed in double "
        "quotes); expected one object per line",
    ]
    (tmp_path / "train.jsonl").write_text(record(0) + "\n" + record(1) + "\n", encoding="utf-8")
    first = load_and_plan(spec, check_paths=True).preflight  # the model and eval.jsonl passed before
    assert first is not None and first.records == 2 and first.cached == 2
    again = load_and_plan(spec, check_paths=True).preflight
    assert again is not None and again.records == 0 and again.cached == 3  # model, train, eval
    os.utime(tmp_path / "train.jsonl", ns=(1, 1))  # a changed file is read again
    changed = load_and_plan(spec, check_paths=True).preflight
    assert changed is not None and changed.records == 2 and changed.cached == 2


def test_a_chat_template_that_refuses_a_record(
    tmp_path: Path, family_dirs: dict[str, Path], cache: Path
) -> None:
    """A template that raises on a conversation it cannot lay out (Llama 2's and Gemma's do): caught here,
    not in the job."""
    system_last = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (tmp_path / "train.jsonl").write_text(json.dumps(system_last) + "\n", encoding="utf-8")
    (tmp_path / "eval.jsonl").write_text(json.dumps(system_last) + "\n", encoding="utf-8")
    model = _copy(family_dirs, tmp_path, "llama2")
    (model / "chat_template.jinja").write_text(
        "{{ raise_exception('System role required') }}", encoding="utf-8"
    )
    with pytest.raises(SpecError) as err:
        load_and_plan(write_spec(tmp_path, model), check_paths=True)
    assert f"{tmp_path / 'train.jsonl'}:1: the chat template refused this conversation" in str(err.value)
    assert "System role required" in str(err.value)


def _copy(family_dirs: dict[str, Path], tmp_path: Path, family: str = "qwen2") -> Path:
    model = tmp_path / family
    shutil.copytree(family_dirs[family], model)
    return model


def test_weights_are_checked_against_the_config(tmp_path: Path, family_dirs: dict[str, Path]) -> None:
    from safetensors.torch import load_file, save_file

    good = _copy(family_dirs, tmp_path)
    assert check_model(good) == []
    weights = good / "model.safetensors"
    tensors = load_file(weights)

    truncated = _copy(family_dirs, tmp_path / "t")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    (problem,) = check_model(truncated)
    assert problem.startswith(f"{truncated / 'model.safetensors'}: not a readable safetensors file")

    pointer = _copy(family_dirs, tmp_path / "p")
    (pointer / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n"
    )
    assert check_model(pointer) == [
        f"{pointer / 'model.safetensors'} is a Git LFS pointer, not the weights: run `git lfs pull` in "
        f"{pointer}"
    ]

    resized = _copy(family_dirs, tmp_path / "r")
    config = json.loads((resized / "config.json").read_text(encoding="utf-8"))
    (resized / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}), encoding="utf-8")
    problems = check_model(resized)
    assert len(problems) == 6  # gate, up and down projection of both layers
    assert problems[1] == (
        f"{resized / 'model.safetensors'}: model.layers.0.mlp.gate_proj.weight has shape [128, 64] but "
        "qwen2/config.json makes it [96, 64]: the weights and config.json are from different models"
    )

    missing = _copy(family_dirs, tmp_path / "m")
    save_file(
        {k: v for k, v in tensors.items() if "layers.1.self_attn.k_proj" not in k},
        missing / "model.safetensors",
    )
    (problem,) = check_model(missing)
    assert (
        "2 of the model's 26 weights are in no weight file (model.layers.1.self_attn.k_proj.weight, "
        in problem
    )
    assert "transformers would initialise them randomly" in problem

    as_bin = _copy(family_dirs, tmp_path / "b")
    import torch

    (as_bin / "model.safetensors").unlink()
    torch.save({k: v.clone() for k, v in tensors.items()}, as_bin / "pytorch_model.bin")
    assert check_model(as_bin) == []  # tied lm_head: absent from the file, and not missing

    broken = _copy(family_dirs, tmp_path / "c")
    (broken / "config.json").write_text("{not json", encoding="utf-8")
    (problem,) = check_model(broken)
    assert problem.startswith(f"{broken}/config.json does not load in transformers")


def test_tokenizer_problems_name_the_key(tmp_path: Path, family_dirs: dict[str, Path], cache: Path) -> None:
    from transformers import AutoTokenizer

    (tmp_path / "train.jsonl").write_text(record(0) + "\n", encoding="utf-8")
    (tmp_path / "eval.jsonl").write_text(record(0) + "\n", encoding="utf-8")
    with pytest.raises(SpecError) as err:  # GPT-2 has no chat template
        load_and_plan(write_spec(tmp_path, family_dirs["gpt2"], template="tokenizer"), check_paths=True)
    (problem,) = err.value.problems
    assert ": template: template: tokenizer, but the tokenizer has no chat template" in problem
    # a tokenizer with more ids than the model has embeddings
    bigger = tmp_path / "bigger-tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(family_dirs["qwen2"])
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(5)])
    tokenizer.save_pretrained(bigger)
    spec = write_spec(tmp_path, family_dirs["qwen2"], tokenizer=f"{{path: {bigger}}}")
    with pytest.raises(SpecError) as err:
        load_and_plan(spec, check_paths=True)
    (problem,) = err.value.problems
    assert "tokenizer.path: the tokenizer has 705 tokens but the model's embeddings have 700 rows" in problem
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bigger / name).unlink()
    with pytest.raises(SpecError, match=f"tokenizer.path: the tokenizer in {bigger} does not load"):
        load_and_plan(spec, check_paths=True)


def test_a_directory_given_as_a_data_file_is_called_a_directory(
    tmp_path: Path, family_dirs: dict[str, Path], cache: Path
) -> None:
    (tmp_path / "eval.jsonl").write_text(record(0) + "\n", encoding="utf-8")
    (tmp_path / "train").mkdir()
    for check_paths in (False, True):  # wrong on any machine: an error even at plan
        with pytest.raises(SpecError) as err:
            load_and_plan(write_spec(tmp_path, family_dirs["qwen2"], train="train"), check_paths=check_paths)
        assert f"data.train_file: {tmp_path / 'train'} is a directory, not a data file" in str(err.value)


def test_missing_inputs_stay_warnings_at_plan(tmp_path: Path, cache: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "experiment: away\nmodel: {path: /models/qwen2-7b}\n"
        "data: {train_file: no-train.jsonl, eval_file: no-eval.jsonl}\nmethods: [{method: lora}]\n",
        encoding="utf-8",
    )
    plan = load_and_plan(spec, preflight=True)  # planned on a laptop for the cluster: nothing to read
    assert plan.preflight is not None and plan.preflight.records == 0
    assert any("no-train.jsonl does not exist on this machine" in w for w in plan.warnings)


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_a_model_directory_without_a_tokenizer_names_tokenizer_path(
    tmp_path: Path, family_dirs: dict[str, Path], cache: Path, family: str
) -> None:
    """A model directory with no tokenizer files: transformers either fails without saying where to
    look (llama3) or builds an empty tokenizer (qwen2); either way the problem names tokenizer.path."""
    bare = tmp_path / "model-without-tokenizer"
    bare.mkdir()
    for source in family_dirs[family].iterdir():
        if source.name == "config.json" or source.suffix == ".safetensors":
            shutil.copy(source, bare / source.name)
    (tmp_path / "train.jsonl").write_text(record(0) + "\n" + record(1) + "\n", encoding="utf-8")
    (tmp_path / "eval.jsonl").write_text(record(2) + "\n", encoding="utf-8")
    with pytest.raises(SpecError) as err:
        load_and_plan(write_spec(tmp_path, bare), check_paths=True)
    problem = next(p for p in err.value.problems if "tokenizer" in p)
    assert "set tokenizer.path to the directory" in problem, problem
    # a rank says the same (a run dir whose model directory changed since it was planned)
    from backend_helpers import make_run

    from launcher.errors import UserError
    from launcher.spec.schema import ModelSpec
    from launcher.train.setup import load_tokenizer

    run = make_run("bare").model_copy(update={"model": ModelSpec(path=str(bare))})
    with pytest.raises(UserError, match=r"set tokenizer\.path to the directory"):
        load_tokenizer(run)


def test_validate_reads_the_inputs_unless_told_not_to(
    tmp_path: Path, family_dirs: dict[str, Path], cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --check-paths, validate still reads the files that are here (a broken line is found at
    validate, not first at plan); --no-read-inputs skips that and says so."""
    from launcher.cli import main

    (tmp_path / "train.jsonl").write_text(record(0) + "\n{oops\n", encoding="utf-8")
    (tmp_path / "eval.jsonl").write_text(record(2) + "\n", encoding="utf-8")
    spec = write_spec(tmp_path, family_dirs["qwen2"])
    assert main(["validate", str(spec)]) == 2
    assert f"{tmp_path / 'train.jsonl'}:2: invalid JSON" in capsys.readouterr().err
    assert main(["validate", str(spec), "--no-read-inputs"]) == 0
    assert "data files not read (--no-read-inputs)" in capsys.readouterr().out
