"""Data formats (chatglm, alpaca, sharegpt, messages, auto) from every file kind (.jsonl, .json, .parquet, a
datasets save_to_disk directory), each down to its EXACT label mask; every malformed record of a file
reported at once with file:line and the key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from chat_helpers import char_tokenizer, masked
from families import CHATML

from launcher.data.formats import Example
from launcher.errors import UserError
from launcher.train.data import encode_example, load_data, train_on_for

SYSTEM, HISTORY, QUERY, RESPONSE = "Be brief.", [("Hi", "Hello")], "Name?", "Bob"
RECORDS: dict[str, dict[str, Any]] = {
    "chatglm": {"system": SYSTEM, "history": [["Hi", "Hello"]], "prompt": QUERY, "response": RESPONSE},
    "alpaca": {
        "system": SYSTEM,
        "history": [["Hi", "Hello"]],
        "instruction": QUERY,
        "input": "",
        "output": RESPONSE,
    },
    "sharegpt": {
        "conversations": [
            {"from": "system", "value": SYSTEM},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
            {"from": "human", "value": QUERY},
            {"from": "gpt", "value": RESPONSE},
        ]
    },
    "messages": {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": QUERY},
            {"role": "assistant", "content": RESPONSE},
        ]
    },
}
PROMPT = (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    "{hello}\n<|im_start|>user\nName?<|im_end|>\n<|im_start|>assistant\n«Bob<|im_end|>»"
)
ONLY_LAST = PROMPT.format(hello="Hello<|im_end|>")
EVERY_TURN = PROMPT.format(hello="«Hello<|im_end|>»")


def write(kind: str, records: list[Any], directory: Path) -> Path:
    """``records`` as a file of ``kind``: jsonl, json (a list), parquet, or a save_to_disk directory."""
    if kind == "jsonl":
        path = directory / "data.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    elif kind == "json":
        path = directory / "data.json"
        path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = directory / "data.parquet"
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        from datasets import Dataset

        path = directory / "saved"
        Dataset.from_list(records).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def chatml() -> Any:
    return char_tokenizer(CHATML, ["<|im_start|>", "<|im_end|>"], eos="<|im_end|>")


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "datasets"])
@pytest.mark.parametrize("fmt", list(RECORDS))
def test_each_format_and_file_kind_gives_the_exact_label_mask(
    fmt: str, kind: str, tmp_path: Path, chatml: Any
) -> None:
    path = write(kind, [{**RECORDS[fmt], "id": None}, {**RECORDS[fmt], "id": "second"}], tmp_path)
    examples, detected = load_data(path, "auto")
    assert detected == fmt
    assert [e.id for e in examples] == [f"{path.stem}-0", "second"]
    assert examples[0] == Example(f"{path.stem}-0", HISTORY, QUERY, RESPONSE, system=SYSTEM)
    (enc,) = encode_example(examples[0], chatml, "auto", 512, 64, train_on=train_on_for(None, fmt))
    # conversations learn every assistant turn by default; chatglm/alpaca history is context
    assert masked(enc, chatml) == (EVERY_TURN if fmt in ("sharegpt", "messages") else ONLY_LAST)
    for train_on, expected in (("last", ONLY_LAST), ("all", EVERY_TURN)):
        (enc,) = encode_example(examples[0], chatml, "auto", 512, 64, train_on=train_on)
        assert masked(enc, chatml) == expected


def test_named_templates_exact_masks(chatml: Any) -> None:
    plain = char_tokenizer()
    ex = Example("x", HISTORY, QUERY, RESPONSE, system=SYSTEM)
    (last,) = encode_example(ex, plain, "auto", 512, 64, train_on="last")  # no chat template: chatglm
    assert (
        masked(last, plain)
        == "<bos>Be brief.\n[Round 0]\n问：Hi\n答：Hello\n[Round 1]\n问：Name?\n答：«Bob<eos>»"
    )
    (every,) = encode_example(ex, plain, "alpaca", 512, 64, train_on="all")
    assert masked(every, plain) == (
        "<bos>Be brief.\n### Instruction:\nHi\n\n### Response:\n«Hello»\n\n"
        "### Instruction:\nName?\n\n### Response:\n«Bob<eos>»"
    )
    # a named template wins over the tokenizer's chat template
    (named,) = encode_example(Example("y", [], "Hi", "Yo"), chatml, "plain", 512, 64)
    assert masked(named, chatml) == "<bos>Hi\n«Yo<|im_end|>»"


def test_sharegpt_and_messages_speakers(tmp_path: Path) -> None:
    sharegpt = {
        "system": "S",
        "conversations": [{"from": "user", "value": "q"}, {"from": "chatgpt", "value": "a"}],
    }
    (ex,), fmt = load_data(write("jsonl", [sharegpt], tmp_path), "sharegpt")
    assert (fmt, ex) == ("sharegpt", Example("data-0", [], "q", "a", system="S"))
    # OpenAI's newer name for the system role, and content as a list of text parts
    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    developer = {
        "messages": [
            {"role": "developer", "content": "S"},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": parts},
            *RECORDS["messages"]["messages"][3:],
        ]
    }
    (ex,), _ = load_data(write("jsonl", [developer], tmp_path), "messages")
    assert ex == Example("data-0", [("Hi", "Hello")], QUERY, RESPONSE, system="S")
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    with pytest.raises(
        UserError, match=r"messages\[0\].content: only text parts can be trained here .* \['image_url'\]"
    ):
        load_data(write("jsonl", [image], tmp_path), "messages")


U, A, S = ({"role": r, "content": c} for r, c in (("user", "q"), ("assistant", "a"), ("system", "s")))
BAD_MESSAGES = [
    json.dumps({"messages": [U, A]}),
    json.dumps({"messages": [U, {"role": "user", "content": "q2"}, A]}),
    json.dumps({"messages": [U]}),
    "",
    json.dumps({"messages": [U, A]})[:-3] + ",",
    json.dumps({"messages": [U, {"role": "tool", "content": "{}"}]}),
    json.dumps({"messages": [U, {"role": "bot", "content": "a"}]}),
    json.dumps({"messages": [{"role": "user", "content": 3}, A]}),
    json.dumps({"messages": [U, A, S, A]}),
    json.dumps({"messages": []}),
    json.dumps({"text": "plain"}),
    "[1, 2]",
]


def test_every_bad_record_of_a_file_at_once(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(BAD_MESSAGES) + "\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        load_data(path, "messages")
    lines = str(err.value).splitlines()
    assert lines[0] == f"{path}: 10 records with problems:"
    assert [line.strip() for line in lines[1:]] == [
        f"{path}:2: messages[1]: is a user turn where an assistant turn belongs: turns alternate user, "
        "assistant, ... (merge consecutive turns of one speaker)",
        f"{path}:3: messages[0]: the conversation must end with an assistant turn (the response to learn)",
        f"{path}:5: invalid JSON (Expecting property name enclosed in double quotes); expected one object "
        "per line",
        f"{path}:6: messages[1]: a tool result cannot follow a user turn: a tool call is followed by its "
        "results, results by the assistant, and the user and the assistant take turns",
        f"{path}:7: messages[1].role: 'bot' is not a speaker of messages: use one of system, developer, "
        "user, assistant, tool, function",
        f"{path}:8: messages[0].content: must be a string, got int",
        f"{path}:9: messages[2]: a system message must come first",
        f"{path}:10: messages: must be a non-empty list (messages format needs messages: [{{role, content}}, "
        "...] (optional tools))",
        f"{path}:11: messages: must be a non-empty list (messages format needs messages: [{{role, content}}, "
        "...] (optional tools))",
        f"{path}:12: each record must be a JSON object, got list",
    ]


def test_auto_needs_recognisable_keys(tmp_path: Path) -> None:
    path = write("jsonl", [{"text": "plain"}], tmp_path)
    with pytest.raises(UserError, match=r"data.jsonl:1: cannot tell the data format from keys \['text'\]"):
        load_data(path)


def test_a_directory_is_called_a_directory(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    from launcher.data.records import data_file_problem

    (tmp_path / "plain").mkdir()
    assert data_file_problem(tmp_path / "plain") == (
        f"{tmp_path / 'plain'} is a directory, not a data file: give a .json, .jsonl, .parquet or a "
        "directory written by datasets' save_to_disk (which holds state.json)"
    )
    splits = DatasetDict({"train": Dataset.from_list([RECORDS["chatglm"]]), "test": Dataset.from_list([])})
    splits.save_to_disk(str(tmp_path / "splits"))
    assert data_file_problem(tmp_path / "splits") == (
        f"{tmp_path / 'splits'} is a directory holding a DatasetDict (splits: test, train), not one data "
        f"set: point at a split, e.g. {tmp_path / 'splits' / 'test'}"
    )
    (tmp_path / "data.csv").write_text("a,b\n", encoding="utf-8")
    assert "unknown data file type '.csv'" in str(data_file_problem(tmp_path / "data.csv"))
    with pytest.raises(UserError, match="is a directory, not a data file"):
        load_data(tmp_path / "plain")
    (examples, fmt) = load_data(tmp_path / "splits" / "train")
    assert fmt == "chatglm" and examples[0].query == QUERY
