"""The data pipeline: loading, the history-truncation rule, label masking, dynamic padding, batch order."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from launcher.builtins.demo_data import ensure_builtin_data, generate
from launcher.data.templates import TEMPLATE_NAMES, get_template, render_prompt
from launcher.errors import UserError
from launcher.spec.schema import DataSpec, ModelSpec
from launcher.train.data import (
    IGNORE_INDEX,
    BatchOrder,
    Encoded,
    Example,
    collate,
    encode_for_training,
    encode_prompt,
    load_examples,
    resolve_data_files,
    resolve_model_dir,
    truncated_fraction,
)

HISTORY = [
    ("我叫李明，我养了一只猫，它叫咪咪。", "好的，我记住了。"),
    ("3加5等于多少？", "3加5等于8。"),
    ("法国的首都是哪里？", "法国的首都是巴黎。"),
    ("请重复这句话：小猫在河边睡觉。", "小猫在河边睡觉。"),
]
DIALOGUE = Example("d0", HISTORY, "我的宠物叫什么名字？", "你的猫叫咪咪。")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _source_text(tokenizer: Any, enc: Encoded) -> str:
    return str(tokenizer.decode(enc.input_ids[: enc.source_len], skip_special_tokens=True))


def _n_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


# --- templates -----------------------------------------------------------------------------------


def test_chatglm_template_matches_chatglm6b_format() -> None:
    text = render_prompt("chatglm", HISTORY[:1], "你好")
    first = "[Round 0]\n问：我叫李明，我养了一只猫，它叫咪咪。\n答：好的，我记住了。\n"
    assert text == first + "[Round 1]\n问：你好\n答："
    assert render_prompt("chatglm2", [], "你好") == "[Round 1]\n\n问：你好\n\n答："
    assert render_prompt("问题：{query} 回答：", [], "{x}") == "问题：{x} 回答："  # braces in data are kept


def test_unknown_template_lists_the_valid_ones() -> None:
    with pytest.raises(UserError) as err:
        get_template("chatglm9")
    for name in TEMPLATE_NAMES:
        assert name in str(err.value)


# --- truncation ----------------------------------------------------------------------------------


def test_fitting_source_is_untouched(tokenizer: Any) -> None:
    enc = encode_for_training(DIALOGUE, tokenizer, "chatglm", 1024, 64)
    assert not enc.truncated
    assert _source_text(tokenizer, enc) == render_prompt("chatglm", HISTORY, DIALOGUE.query)


@pytest.mark.parametrize("kept", [3, 2, 1, 0])
def test_oldest_whole_turns_are_dropped_first(tokenizer: Any, kept: int) -> None:
    budget = _n_tokens(tokenizer, render_prompt("chatglm", HISTORY[-kept:] if kept else [], DIALOGUE.query))
    enc = encode_for_training(DIALOGUE, tokenizer, "chatglm", budget, 64)
    source = _source_text(tokenizer, enc)
    assert enc.truncated
    assert enc.source_len == budget
    # exactly the newest `kept` turns survive, renumbered from round 0, and the query is whole
    assert source == render_prompt("chatglm", HISTORY[len(HISTORY) - kept :], DIALOGUE.query)
    for question, _ in HISTORY[: len(HISTORY) - kept]:
        assert question not in source
    assert source.endswith("问：我的宠物叫什么名字？\n答：")
    # one token less drops one more turn (never a partial turn, never the query)
    smaller = encode_for_training(DIALOGUE, tokenizer, "chatglm", budget - 1, 64)
    if kept:
        assert _source_text(tokenizer, smaller) == render_prompt(
            "chatglm", HISTORY[len(HISTORY) - kept + 1 :], DIALOGUE.query
        )


def test_query_alone_too_long_keeps_its_start_by_default(tokenizer: Any) -> None:
    query = "请重复这句话：小猫在河边睡觉。" * 5 + "我的宠物叫什么名字？"
    ex = Example("long", HISTORY, query, "好的。")
    enc = encode_for_training(ex, tokenizer, "chatglm", 40, 16)
    source = _source_text(tokenizer, enc)
    assert enc.truncated and enc.query_cut and enc.source_len <= 40
    assert source.startswith("[Round 0]\n问：请重复这句话：")  # template and the start of the query kept
    assert source.endswith("\n答：") and "我的宠物" not in source  # the generation prompt stays
    assert source.count("[Round") == 1  # history gone


def test_query_alone_too_long_keeps_its_end_when_asked(tokenizer: Any) -> None:
    query = "请重复这句话：小猫在河边睡觉。" * 5 + "我的宠物叫什么名字？"
    ex = Example("long", HISTORY, query, "好的。")
    enc = encode_for_training(ex, tokenizer, "chatglm", 40, 16, query_truncation="keep_end")
    source = _source_text(tokenizer, enc)
    assert enc.truncated and enc.query_cut and enc.source_len <= 40
    assert source.startswith("[Round 0]\n问：")  # template kept, history gone
    assert source.endswith("。我的宠物叫什么名字？\n答：")  # the end of the question survives
    assert HISTORY[-1][0] not in source


def test_labels_mask_the_prompt_and_target_is_cut_plus_eos(tokenizer: Any) -> None:
    ex = Example("t", [], "“大”的反义词是什么？", "“大”的反义词是“小”。")
    enc = encode_for_training(ex, tokenizer, "chatglm", 256, 5)
    src = enc.source_len
    assert enc.labels[:src] == [IGNORE_INDEX] * src
    assert enc.labels[src:] == enc.input_ids[src:]
    assert len(enc.input_ids) == src + 5 + 1
    assert enc.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(enc.input_ids[src:-1]) == "“大”的反"
    assert enc.input_ids[:src] == encode_prompt(ex, tokenizer, "chatglm", 256)


def test_max_length_shrinks_the_source_before_the_target(tokenizer: Any) -> None:
    full = encode_for_training(DIALOGUE, tokenizer, "chatglm", 1024, 64)
    target_len = len(full) - full.source_len
    capped = encode_for_training(DIALOGUE, tokenizer, "chatglm", 1024, 64, max_length=full.source_len)
    assert len(capped) <= full.source_len
    assert len(capped) - capped.source_len == target_len  # response intact
    assert capped.truncated


def test_truncated_fraction() -> None:
    encs = [Encoded([1], [1], t) for t in (True, False, False, True)]
    assert truncated_fraction(encs) == 0.5
    assert truncated_fraction([]) == 0.0


# --- padding and batch order ---------------------------------------------------------------------


def test_collate_pads_to_the_longest_in_the_batch_only() -> None:
    feats = [Encoded([5] * n, [IGNORE_INDEX] * (n - 2) + [7, 8], False) for n in (3, 9, 6)]
    batch = collate(feats, pad_token_id=0)
    assert batch["input_ids"].shape == (3, 9)
    assert batch["attention_mask"].sum(dim=1).tolist() == [3, 9, 6]
    assert batch["input_ids"][0].tolist() == [5, 5, 5, 0, 0, 0, 0, 0, 0]  # right padding
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, 7, 8] + [IGNORE_INDEX] * 6


def test_batch_order_is_deterministic_per_seed_and_epoch() -> None:
    lengths = list(range(1, 101))
    order = BatchOrder(lengths, batch_size=4, seed=7)
    assert order.batches(0) == BatchOrder(lengths, batch_size=4, seed=7).batches(0)
    assert order.batches(0) != order.batches(1)
    assert order.batches(0) != BatchOrder(lengths, batch_size=4, seed=8).batches(0)
    assert sorted(i for b in order.batches(3) for i in b) == list(range(100))


@pytest.mark.parametrize(
    ("n", "world", "drop_last"), [(96, 3, False), (100, 3, False), (100, 3, True), (5, 4, False)]
)
@pytest.mark.parametrize("group", [False, True])
def test_ranks_partition_each_epoch(n: int, world: int, drop_last: bool, group: bool) -> None:
    lengths = [(i * 37) % 53 + 1 for i in range(n)]
    orders = [BatchOrder(lengths, 2, rank, world, 1, group, drop_last) for rank in range(world)]
    per_rank = [o.batches(0) for o in orders]
    counts = {len(b) for b in per_rank} | {o.num_batches for o in orders}
    assert len(counts) == 1  # every rank steps the same number of times
    assert all(len(batch) == 2 for batches in per_rank for batch in batches)
    seen = [i for batches in per_rank for batch in batches for i in batch]
    if drop_last:
        assert len(seen) == len(set(seen)) == (n // (2 * world)) * 2 * world
    else:
        assert set(seen) == set(range(n))  # everything seen; only the wrap-around repeats
        assert len(seen) - n < 2 * world


def test_group_by_length_makes_batches_homogeneous() -> None:
    lengths = [(i * 7919) % 500 + 10 for i in range(800)]

    def waste(order: BatchOrder) -> int:  # pad tokens dynamic padding would add
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in order.batches(0))

    grouped, plain = BatchOrder(lengths, 8, group_by_length=True), BatchOrder(lengths, 8)
    assert waste(grouped) < waste(plain) / 5
    assert sorted(i for b in grouped.batches(0) for i in b) == list(range(800))


# --- loading -------------------------------------------------------------------------------------


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_chatglm_jsonl_and_json_list(tmp_path: Path) -> None:
    rec = {"prompt": "问", "response": "答", "history": [["a", "b"]]}
    jsonl = _write(tmp_path / "d.jsonl", [json.dumps(rec, ensure_ascii=False)] * 2)
    listed = tmp_path / "d.json"
    listed.write_text(json.dumps([rec, rec], ensure_ascii=False, indent=2), encoding="utf-8")
    for path in (jsonl, listed):
        examples = load_examples(path)
        assert [e.query for e in examples] == ["问", "问"]
        assert examples[0].history == [("a", "b")]
        assert examples[1].id == f"{path.stem}-1"


def test_load_alpaca(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "a.jsonl", [json.dumps({"instruction": "抽取", "input": "句子", "output": "s_p_o"})]
    )
    (ex,) = load_examples(path, "alpaca")
    assert (ex.query, ex.response, ex.history) == ("抽取\n句子", "s_p_o", [])


@pytest.mark.parametrize(
    ("lines", "fmt", "expected"),
    [
        (['{"prompt": "q", "response": "a"}', '{"prompt": "q"}'], "auto", ":2: response: missing"),
        (['{"prompt": "q", "response": "a"}', "{not json"], "auto", ":2: invalid JSON"),
        (['{"prompt": "q", "response": 3}'], "chatglm", ":1: response: must be a string, got int"),
        (['{"prompt": "q", "response": "a", "history": [["x"]]}'], "auto", ":1: history[0]: must be"),
        (['{"text": "q"}'], "auto", ":1: cannot tell the data format"),
        (['{"instruction": "q"}'], "alpaca", ":1: output: missing"),
        (["[1, 2]"], "auto", ":1: each record must be a JSON object"),
    ],
)
def test_malformed_records_name_file_line_and_key(
    tmp_path: Path, lines: list[str], fmt: str, expected: str
) -> None:
    path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(UserError, match="bad.jsonl" + expected.replace("[", r"\[").replace("(", r"\(")):
        load_examples(path, fmt)


def test_json_list_error_reports_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"prompt": "q", "response": "a"},\n  {"prompt": "q"}\n]\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.json:3: response: missing"):
        load_examples(path)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nope\.jsonl does not exist"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="no records"):
        load_examples(_write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(UserError, match="unknown data format"):
        load_examples(tmp_path / "nope.jsonl", "openai")


def test_resolve_paths(tmp_path: Path, tiny_model_dir: Path) -> None:
    assert resolve_model_dir(ModelSpec(builtin="tiny-glm")) == tiny_model_dir
    with pytest.raises(UserError, match="does not exist"):
        resolve_model_dir(ModelSpec(path=str(tmp_path / "missing")))
    with pytest.raises(UserError, match=r"no config\.json"):
        resolve_model_dir(ModelSpec(path=str(tmp_path)))
    with pytest.raises(UserError, match=r"data\.train_file: .*t\.jsonl does not exist"):
        resolve_data_files(
            DataSpec(train_file=str(tmp_path / "t.jsonl"), eval_file=str(tmp_path / "e.jsonl"))
        )
    with pytest.raises(UserError, match="train_file with eval_file or eval_split"):
        resolve_data_files(DataSpec(train_file=str(tmp_path / "t.jsonl")))
    train, evals = resolve_data_files(DataSpec(builtin="spo"))
    assert train.name == "train.jsonl" and evals.is_file()


# --- bundled data --------------------------------------------------------------------------------


def test_builtin_dialogues_need_early_facts(dialogue_files: tuple[Path, Path]) -> None:
    train = load_examples(dialogue_files[0])
    evals = load_examples(dialogue_files[1])
    assert (len(train), len(evals)) == (3000, 300)
    assert [e.query for e in evals[:20]] == [r["prompt"] for r in generate("dialogue", "eval")[:20]]
    fact = re.compile(r"^你(?:叫|住在|的.{1,3}叫|是一名|最喜欢吃|今年|平时喜欢)(.+?)岁?。$")
    memory = [(e, m.group(1)) for e in train if (m := fact.match(e.response))]
    assert 0.35 < len(memory) / len(train) < 0.65
    # the fact the answer needs is stated in the FIRST turn, with at least one other turn in between
    for ex, value in memory:
        assert value in ex.history[0][0], ex
        assert len(ex.history) >= 2


def test_builtin_data_is_written_once_and_validates(tmp_path: Path) -> None:
    train, evals = ensure_builtin_data("spo", cache_dir=tmp_path)
    stamp = train.stat().st_mtime_ns
    assert ensure_builtin_data("spo", cache_dir=tmp_path) == (train, evals)
    assert train.stat().st_mtime_ns == stamp
    ex = load_examples(evals)[0]
    assert "_" in ex.response and ex.query.startswith("你现在是一个信息抽取模型")
    with pytest.raises(UserError, match="dialogue, spo"):
        ensure_builtin_data("wiki", cache_dir=tmp_path)
