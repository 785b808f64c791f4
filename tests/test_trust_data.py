"""What the model sees is known before queueing, and the eval data can be trusted:

- ``template: auto`` on a tokenizer without a chat template gives a non-ChatGLM model (a Qwen2-family
  model built from a config) the neutral ``plain`` layout, never ChatGLM's, and says so in the plan, the
  rank log and result.json (``template_used``);
- a current query too long for ``max_source_length`` keeps its START (an alpaca instruction) by default,
  its end with ``data.query_truncation: keep_end``; plan and result.json give ``query_cut_frac``;
- ``data.eval_split`` holds out the same examples for every run; the training file as eval file is an
  error unless ``data.allow_eval_overlap``, and overlap is reported with counts;
- an eval record with several references is scored against all of them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from train_helpers import make_run_dir, rank_output, run_ranks

from launcher.errors import SpecError
from launcher.plan.planner import load_and_plan
from launcher.rundir.paths import RESULT_KEYS, read_json

INSTRUCTION = "Summarise the following contract clause in one plain sentence for a customer"
CLAUSE = " ".join(f"clause{i}" for i in range(60))


def _alpaca(n: int, long_every: int = 2) -> list[dict[str, Any]]:
    """Alpaca records; every ``long_every``-th has an input far longer than the source budget."""
    return [
        {
            "instruction": f"{INSTRUCTION} {i}",
            "input": CLAUSE if i % long_every == 0 else f"short text {i}",
            "output": f"answer {i}",
        }
        for i in range(n)
    ]


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def qwen2_without_chat_template(
    family_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The Qwen2-family test model with its chat template removed (a base model's tokenizer)."""
    target = tmp_path_factory.mktemp("qwen2-base") / "model"
    shutil.copytree(family_dirs["qwen2"], target)
    (target / "chat_template.jinja").unlink(missing_ok=True)
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config), encoding="utf-8")
    return target


# --- the template -------------------------------------------------------------------------------------


def test_auto_without_chat_template_gives_qwen2_the_plain_layout(qwen2_without_chat_template: Path) -> None:
    from transformers import AutoTokenizer

    from launcher.data.templates import model_type_of, resolve_template, template_used
    from launcher.train.data import Example, encode_for_training

    tokenizer = AutoTokenizer.from_pretrained(qwen2_without_chat_template)
    assert not tokenizer.chat_template
    resolved = resolve_template("auto", tokenizer, model_type_of(qwen2_without_chat_template))
    assert resolved == "plain"
    assert template_used("auto", resolved) == "plain (auto: the tokenizer has no chat template)"
    enc = encode_for_training(Example("e", [], "What is two plus two?", "four"), tokenizer, resolved, 64, 16)
    text = tokenizer.decode(enc.input_ids)
    assert "问" not in text and "[Round" not in text
    assert text.startswith("What is two plus two?\nfour")
    # the built-in GLM model keeps ChatGLM's layout, and its numbers
    assert resolve_template("auto", tokenizer, "glm") == "chatglm"


SPEC = """\
experiment: trust
output_dir: {out}
model: {{path: {model}}}
data: {{train_file: {train}, {eval_key}: {eval_value}{extra}}}
template: auto
training: {{precision: fp32, max_source_length: 32, max_target_length: 8}}
methods:
  - method: lora
    r: 4
sweep:
  seeds: [1, 2]
"""


def _spec(tmp_path: Path, model: Path, train: Path, eval_key: str, eval_value: Any, extra: str = "") -> Path:
    path = tmp_path / "trust.yaml"
    path.write_text(
        SPEC.format(
            out=tmp_path / "runs",
            model=model,
            train=train,
            eval_key=eval_key,
            eval_value=eval_value,
            extra=extra,
        )
    )
    return path


def test_plan_shows_template_truncation_and_the_eval_split(
    qwen2_without_chat_template: Path, tmp_path: Path
) -> None:
    train = _write_jsonl(tmp_path / "alpaca.jsonl", _alpaca(20))
    plan = load_and_plan(
        _spec(tmp_path, qwen2_without_chat_template, train, "eval_split", 0.25), preflight=True
    )
    rows = plan.rows()
    assert len(rows) == 2
    for row in rows:
        assert row["template_used"] == "plain (auto: the tokenizer has no chat template)"
        assert row["eval_examples"] == 5 and row["train_examples"] == 15
        assert 0 < row["query_cut_frac"] <= row["truncated_frac"] <= 1
    # both seeds get the same held-out examples: chosen by the file's content, not the run's seed
    assert rows[0]["eval_set_hash"] == rows[1]["eval_set_hash"]


def test_the_training_file_as_eval_file_is_an_error_unless_allowed(
    qwen2_without_chat_template: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from launcher.cli import main

    train = _write_jsonl(tmp_path / "alpaca.jsonl", _alpaca(12))
    spec = _spec(tmp_path, qwen2_without_chat_template, train, "eval_file", train)
    with pytest.raises(SpecError, match=r"the eval file is the training file .*eval_split"):
        load_and_plan(spec)
    assert main(["validate", str(spec)]) == 2
    # a copy with the same content is the same file too (found when the files are read)
    copy = tmp_path / "copy.jsonl"
    shutil.copy(train, copy)
    with pytest.raises(SpecError, match="is the training file"):
        load_and_plan(_spec(tmp_path, qwen2_without_chat_template, train, "eval_file", copy), preflight=True)
    # allowed: planned, with the overlap and its counts at validate and plan
    allowed = _spec(
        tmp_path, qwen2_without_chat_template, train, "eval_file", train, ", allow_eval_overlap: true"
    )
    capsys.readouterr()
    assert main(["validate", str(allowed), "--check-paths"]) == 0
    assert "12 of 12 eval examples (100%) are also in the training set" in capsys.readouterr().err
    plan = load_and_plan(allowed, preflight=True)
    assert all(row["eval_overlap"] == 12 for row in plan.rows())
    assert main(["submit", str(allowed), "--dry-run", "--backend", "local"]) == 0
    assert "12 of 12 eval examples (100%) are also in the training set" in capsys.readouterr().err


def test_partial_overlap_is_reported_with_counts(qwen2_without_chat_template: Path, tmp_path: Path) -> None:
    records = _alpaca(12)
    train = _write_jsonl(tmp_path / "train.jsonl", records)
    evaluation = _write_jsonl(tmp_path / "eval.jsonl", [*records[:3], *_alpaca(20)[12:17]])
    plan = load_and_plan(
        _spec(tmp_path, qwen2_without_chat_template, train, "eval_file", evaluation), preflight=True
    )
    assert any("3 of 8 eval examples (38%) are also in the training set" in w for w in plan.warnings)


def test_eval_split_that_leaves_nothing_to_train_is_an_error(
    qwen2_without_chat_template: Path, tmp_path: Path
) -> None:
    train = _write_jsonl(tmp_path / "alpaca.jsonl", _alpaca(4))
    with pytest.raises(SpecError, match=r"data\.eval_split: 4 holds out 4 of the training file's 4 examples"):
        load_and_plan(_spec(tmp_path, qwen2_without_chat_template, train, "eval_split", 4), preflight=True)


def test_eval_split_is_deterministic_and_seed_free(tmp_path: Path) -> None:
    from launcher.data.eval_set import eval_set_hash
    from launcher.spec.schema import DataSpec
    from launcher.train.data import load_datasets

    train = _write_jsonl(tmp_path / "alpaca.jsonl", _alpaca(40))
    first = load_datasets(DataSpec(train_file=str(train), eval_split=0.1))
    again = load_datasets(DataSpec(train_file=str(train), eval_split=4, max_train_examples=10))
    assert len(first.eval) == 4 and len(first.train) == 36 and first.overlapping == 0
    assert [ex.id for ex in first.eval] == [ex.id for ex in again.eval]
    assert eval_set_hash(first.eval) == eval_set_hash(again.eval)
    assert not {ex.id for ex in first.eval} & {ex.id for ex in first.train}
    assert [ex.id for ex in first.eval] != [f"alpaca-{i}" for i in range(4)]  # not simply the first ones


# --- truncation ---------------------------------------------------------------------------------------


def test_a_long_alpaca_query_keeps_its_instruction(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from launcher.data.formats import parse_record
    from launcher.train.data import encode_for_training, encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ex = parse_record(_alpaca(1)[0], "alpaca", 0, "a")
    enc = encode_for_training(ex, tokenizer, "chatglm", 64, 8)
    prompt = tokenizer.decode(enc.input_ids[: enc.source_len], skip_special_tokens=True)
    assert enc.truncated and enc.query_cut and enc.source_len <= 64
    assert prompt.startswith("[Round 0]\n问：" + INSTRUCTION[:20]) and prompt.endswith("\n答：")
    # generation sees the same prompt
    assert encode_prompt(ex, tokenizer, "chatglm", 64) == enc.input_ids[: enc.source_len]
    # keep_end: the old behaviour, the end of the query
    tail = encode_for_training(ex, tokenizer, "chatglm", 64, 8, query_truncation="keep_end")
    tail_prompt = tokenizer.decode(tail.input_ids[: tail.source_len], skip_special_tokens=True)
    assert INSTRUCTION[:10] not in tail_prompt and tail_prompt.endswith("clause59\n答：")


def test_dropping_history_does_not_count_as_a_query_cut(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from launcher.train.data import Example, encode_for_training, query_cut_fraction, truncated_fraction

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ex = Example("h", [("很长的问题" * 10, "很长的回答" * 10)], "短问题", "答")
    enc = encode_for_training(ex, tokenizer, "chatglm", 40, 8)
    assert enc.truncated and not enc.query_cut
    assert truncated_fraction([enc]) == 1.0 and query_cut_fraction([enc]) == 0.0


# --- multi-reference eval -----------------------------------------------------------------------------


def test_several_references_are_all_scored() -> None:
    from launcher.data.formats import RecordProblem, parse_record
    from launcher.train.evaluate import bleu_scores

    ex = parse_record(
        {"prompt": "q", "response": ["the cat sat on the mat", "a cat was on the mat"]}, "chatglm", 0, "e"
    )
    assert ex.response == "the cat sat on the mat" and ex.other_references == ("a cat was on the mat",)
    conv = parse_record(
        {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x y"}],
            "references": ["z w"],
        },
        "messages",
        0,
        "m",
    )
    assert conv.other_references == ("z w",)
    prediction = "a cat was on the mat"
    single = bleu_scores([{"prediction": prediction, "reference": ex.response}], "13a")
    multi = bleu_scores(
        [
            {
                "prediction": prediction,
                "reference": ex.response,
                "references": [ex.response, *ex.other_references],
            }
        ],
        "13a",
    )
    assert multi["bleu"] == pytest.approx(100.0) and single["bleu"] < 50
    assert multi["chrf"] == pytest.approx(100.0) and multi["bleu4_chatglm"] == pytest.approx(100.0)
    with pytest.raises(RecordProblem, match="non-empty list of strings"):
        parse_record({"prompt": "q", "response": []}, "chatglm", 0, "e")


# --- the run records it ------------------------------------------------------------------------------


def test_a_qwen2_run_without_chat_template_records_what_it_saw(
    qwen2_without_chat_template: Path, tmp_path: Path
) -> None:
    from launcher.data.eval_set import content_hash, eval_set_hash, split_eval
    from launcher.train.data import load_data

    records = _alpaca(24)
    records[1]["output"] = ["answer 1", "another answer 1"]  # two references
    train = _write_jsonl(tmp_path / "alpaca.jsonl", records)
    paths = make_run_dir(
        tmp_path / "runs",
        "lora",
        model_path=qwen2_without_chat_template,
        template="auto",
        data={"train_file": str(train), "eval_split": 6},
        max_steps=2,
        micro_batch=2,
        accumulation=2,
        save_steps=100,
        train_examples=None,
        eval_examples=None,
        max_source_length=32,
        max_target_length=8,
        eval_settings={"num_samples": None, "batch_size": 6},
    )
    assert run_ranks(paths, 1, timeout_s=300) == [0], rank_output(paths)
    result = read_json(paths.result_json)
    assert set(RESULT_KEYS) <= set(result)
    assert result["template_used"] == "plain (auto: the tokenizer has no chat template)"
    assert result["train_examples"] == 2 * 2 * 2  # 2 steps of 2 micro-batches of 2
    assert 0 < result["query_cut_frac"] <= result["truncated_frac"]
    examples, _ = load_data(train)
    _, held_out = split_eval(examples, 6, content_hash(train))
    assert result["eval_set_hash"] == eval_set_hash(held_out)
    assert "template: plain (auto: the tokenizer has no chat template)" in paths.rank_log(0).read_text()
    samples = [json.loads(line) for line in paths.samples_jsonl.read_text().splitlines()]
    assert len(samples) == 6 and not any("问：" in s["prompt"] for s in samples)
    assert {s["id"] for s in samples} == {ex.id for ex in held_out}
