"""Tool-calling conversations (LLaMA-Factory's glaive_toolcall in sharegpt, OpenAI's tool_calls / tool
role) rendered through a tools-capable chat template with ``tools=``: the model learns its calls and its
answers, never the tool results; a template that cannot render tools is refused, naming it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from chat_helpers import char_tokenizer, masked
from families import CHATML
from tool_templates import QWEN_TOOLS

from launcher.errors import UserError
from launcher.train.data import encode_example, encode_prompt, load_data

TOOL = {
    "name": "convert",
    "description": "d",
    "parameters": {"type": "object", "properties": {"amount": {"type": "number"}}},
}
GLAIVE = {  # LLaMA-Factory data/glaive_toolcall_en_demo.json, shortened
    "conversations": [
        {"from": "human", "value": "5 USD?"},
        {"from": "function_call", "value": json.dumps({"name": "convert", "arguments": {"amount": 5}})},
        {"from": "observation", "value": json.dumps({"eur": 4})},
        {"from": "gpt", "value": "4 EUR."},
        {"from": "human", "value": "Thanks"},
        {"from": "gpt", "value": "Bye"},
    ],
    "tools": json.dumps([TOOL]),
}
OPENAI = {  # OpenAI chat fine-tuning format with tools
    "messages": [
        {"role": "user", "content": "5 USD?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "convert", "arguments": '{"amount": 5}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": json.dumps({"eur": 4})},
        {"role": "assistant", "content": "4 EUR."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "Bye"},
    ],
    "tools": [{"type": "function", "function": TOOL}],
}
TOOLS_LINE = json.dumps({"type": "function", "function": TOOL})
HEAD = (
    "<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n<tools>\n"
    f"{TOOLS_LINE}\n</tools><|im_end|>\n"
)
CALL = '<tool_call>\n{"name": "convert", "arguments": {"amount": 5}}\n</tool_call>'
RESULT = '<|im_start|>user\n<tool_response>\n{"eur": 4}\n</tool_response><|im_end|>\n'
EVERY_TURN = (
    f"{HEAD}<|im_start|>user\n5 USD?<|im_end|>\n<|im_start|>assistant\n«{CALL}<|im_end|>»\n{RESULT}"
    "<|im_start|>assistant\n«4 EUR.<|im_end|>»\n<|im_start|>user\nThanks<|im_end|>\n"
    "<|im_start|>assistant\n«Bye<|im_end|>»"
)


@pytest.fixture(scope="module")
def qwen_tools() -> Any:
    return char_tokenizer(QWEN_TOOLS, ["<|im_start|>", "<|im_end|>"], eos="<|im_end|>")


def write(tmp_path: Path, records: list[Any]) -> Path:
    path = tmp_path / "tools.json"
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")  # LLaMA-Factory's files: a JSON array
    return path


@pytest.mark.parametrize("record", [GLAIVE, OPENAI], ids=["sharegpt", "openai"])
def test_calls_and_answers_are_learned_results_never(record: Any, tmp_path: Path, qwen_tools: Any) -> None:
    (ex,), _ = load_data(write(tmp_path, [record]))
    assert ex.tools == [{"type": "function", "function": TOOL}]  # kept, not dropped
    assert (ex.query, ex.response) == ("Thanks", "Bye")
    (enc,) = encode_example(ex, qwen_tools, "auto", 512, 64, train_on="all")
    assert masked(enc, qwen_tools) == EVERY_TURN
    # train_on last: the turns after the last user message only
    (last,) = encode_example(ex, qwen_tools, "auto", 512, 64, train_on="last")
    assert masked(last, qwen_tools) == EVERY_TURN.replace("«", "").replace("»", "").replace(
        "\nBye<|im_end|>", "\n«Bye<|im_end|>»"
    )
    # generation is prompted with everything before the last assistant turn, tools included
    prompt = qwen_tools.decode(encode_prompt(ex, qwen_tools, "auto", 512))
    assert prompt == EVERY_TURN.replace("«", "").replace("»", "")[: -len("Bye<|im_end|>")]


def test_truncation_drops_the_oldest_rounds(tmp_path: Path, qwen_tools: Any) -> None:
    (ex,), _ = load_data(write(tmp_path, [GLAIVE]))
    (full,) = encode_example(ex, qwen_tools, "auto", 512, 64, train_on="all")
    (short,) = encode_example(ex, qwen_tools, "auto", 250, 50, train_on="all")
    assert len(full.input_ids) > 300 and not full.truncated
    assert short.truncated and len(short.input_ids) <= 300
    assert (
        masked(short, qwen_tools)
        == f"{HEAD}<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n«Bye<|im_end|>»"
    )


def test_a_template_that_cannot_render_tools_is_named(tmp_path: Path) -> None:
    (ex,), _ = load_data(write(tmp_path, [GLAIVE]))
    plain_chatml = char_tokenizer(CHATML, ["<|im_start|>", "<|im_end|>"], eos="<|im_end|>")
    with pytest.raises(UserError, match=r"does not render the tools or tool calls, and this data has them"):
        encode_example(ex, plain_chatml, "auto", 512, 64)
    with pytest.raises(UserError, match=r"template: chatglm renders text turns only, not tools"):
        encode_example(ex, plain_chatml, "chatglm", 512, 64)


BAD = [
    {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{oops"}]},
    {"conversations": [{"from": "human", "value": "q"}, {"from": "observation", "value": "{}"}]},
    {
        "conversations": [
            {"from": "human", "value": "q"},
            {"from": "function_call", "value": '{"name": "f", "arguments": {}}'},
            {"from": "gpt", "value": "a"},
        ]
    },
    {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": "[{"},
]


ORDER = (
    "a tool call is followed by its results, results by the assistant, and the user and the assistant take "
    "turns"
)


def test_broken_tool_records_name_the_turn(tmp_path: Path) -> None:
    path = write(tmp_path, BAD)
    with pytest.raises(UserError) as err:
        load_data(path)
    assert [line.strip() for line in str(err.value).splitlines()[1:]] == [
        f'{path}:2: conversations[1].value: a function_call turn holds a JSON call {{"name", "arguments"}}: '
        "invalid JSON (Expecting property name enclosed in double quotes)",
        f"{path}:14: conversations[1]: a tool result cannot follow a user turn: {ORDER}",
        f"{path}:26: conversations[2]: an assistant turn cannot follow a tool call: {ORDER}",
        f"{path}:42: tools: a JSON list of functions, got invalid JSON (Expecting property name enclosed in "
        "double quotes)",
    ]
