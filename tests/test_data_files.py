"""Data as people have it: their column names (data.columns: AdvertiseGen, ChatGLM P-Tuning's
--prompt_column/--response_column/--history_column, chat records with other keys), files holding one
pretty-printed object, LLaMA-Factory's text parts, and records that cannot be trained as meant (KTO labels,
preference pairs, images, videos, audio) refused with the key and file:line. Fixtures are shaped like the
projects' own files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from launcher.data.formats import Example
from launcher.errors import UserError
from launcher.train.data import load_data

ADVERTISEGEN = [  # THUDM/ChatGLM-6B ptuning: AdvertiseGen/train.json, one object per line
    {"content": "类型#上衣*材质#牛仔布*颜色#白色", "summary": "简约而不简单的牛仔外套"},
    {"content": "类型#裙*风格#简约", "summary": "简约的裙子"},
]


def jsonl(tmp_path: Path, records: list[Any], name: str = "train.json") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def problems_of(path: Path, fmt: str = "auto", columns: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(UserError) as err:
        load_data(path, fmt, columns)
    return [line.strip() for line in str(err.value).splitlines()[1:]]


def test_advertisegen_with_the_ptuning_column_mapping(tmp_path: Path) -> None:
    path = jsonl(tmp_path, ADVERTISEGEN)
    err = problems_of(path)[0]
    # the advice names data.columns with the file's own keys, not a data.format that does not exist
    assert err == (
        f"{path}:1: cannot tell the data format from keys ['content', 'summary']: expected messages, "
        "conversations (sharegpt), prompt/response (chatglm) or instruction/output (alpaca); for other keys "
        "set data.format and map them with data.columns, e.g. data: {format: chatglm, columns: {prompt: "
        "content, response: summary}}"
    )
    columns = {"prompt": "content", "response": "summary"}
    for fmt in ("chatglm", "auto"):
        examples, detected = load_data(path, fmt, columns)
        assert detected == "chatglm"
        assert examples[0] == Example("train-0", [], ADVERTISEGEN[0]["content"], ADVERTISEGEN[0]["summary"])


def test_history_column_and_errors_name_the_mapping(tmp_path: Path) -> None:
    """ChatGLM2-6B ptuning's --history_column: [[question, answer], ...] under the file's own key."""
    columns = {"prompt": "q", "response": "a", "history": "turns"}
    good = {"q": "3加5？", "a": "8", "turns": [["你好", "你好！"]]}
    (ex,), _ = load_data(jsonl(tmp_path, [good]), "chatglm", columns)
    assert ex == Example("train-0", [("你好", "你好！")], "3加5？", "8")
    bad = [{"q": "x"}, {"q": "x", "a": "y", "turns": [["only one"]]}, {"q": 1, "a": "y"}]
    path = jsonl(tmp_path, bad)
    assert problems_of(path, "chatglm", columns) == [
        f"{path}:1: a (data.columns.response): missing (chatglm format needs prompt, response (optional "
        "history, system))",
        f"{path}:2: turns (data.columns.history)[0]: must be a [question, answer] pair of strings",
        f"{path}:3: q (data.columns.prompt): must be a string, got int",
    ]


def test_chat_records_with_other_keys(tmp_path: Path) -> None:
    """LLaMA-Factory's sharegpt with tags role/content under "conversations", and a sharegpt export that
    calls its turns "dialog" with "speaker"/"text"."""
    openai_tags = {
        "conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    }
    (ex,), fmt = load_data(jsonl(tmp_path, [openai_tags]), "messages", {"messages": "conversations"})
    assert (fmt, ex.query, ex.response) == ("messages", "Hi", "Hello")
    renamed = {"dialog": [{"speaker": "human", "text": "Hi"}, {"speaker": "gpt", "text": "Hello"}]}
    columns = {"conversations": "dialog", "from": "speaker", "value": "text"}
    (ex,), fmt = load_data(jsonl(tmp_path, [renamed]), "auto", columns)
    assert (fmt, ex.query, ex.response) == ("sharegpt", "Hi", "Hello")
    broken = {"dialog": [{"speaker": "human", "text": "Hi"}, {"speaker": "bot", "text": "Hello"}]}
    path = jsonl(tmp_path, [broken])
    (err,) = problems_of(path, "sharegpt", columns)
    assert err.startswith(
        f"{path}:1: dialog (data.columns.conversations)[1].speaker (data.columns.from): 'bot'"
    )


def test_columns_that_do_not_fit_the_format(tmp_path: Path) -> None:
    path = jsonl(tmp_path, ADVERTISEGEN)
    with pytest.raises(
        UserError, match=r"data.columns.promt: not a field of the chatglm format; did you mean prompt\?"
    ):
        load_data(path, "chatglm", {"promt": "content"})
    with pytest.raises(UserError, match=r"data.columns.role: not a field of the chatglm format"):
        load_data(path, "chatglm", {"role": "from"})


REFUSED = [
    # LLaMA-Factory kto_en_demo.json
    (
        {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "label": False,
        },
        "label",
    ),
    # LLaMA-Factory dpo_en_demo.json (sharegpt ranking)
    (
        {
            "conversations": [{"from": "human", "value": "q"}],
            "chosen": {"from": "gpt", "value": "good"},
            "rejected": {"from": "gpt", "value": "bad"},
        },
        "chosen",
    ),
    # TRL's preference format (no key a format knows but prompt)
    ({"prompt": "q", "chosen": "good", "rejected": "bad"}, "chosen"),
    # LLaMA-Factory mllm_demo.json / mllm_video_demo.json / mllm_audio_demo.json
    (
        {
            "messages": [{"role": "user", "content": "<image>Who?"}, {"role": "assistant", "content": "A"}],
            "images": ["1.jpg"],
        },
        "images",
    ),
    (
        {
            "messages": [{"role": "user", "content": "<video>What?"}, {"role": "assistant", "content": "B"}],
            "videos": ["1.mp4"],
        },
        "videos",
    ),
    (
        {
            "messages": [{"role": "user", "content": "<audio>Said?"}, {"role": "assistant", "content": "C"}],
            "audios": ["1.wav"],
        },
        "audios",
    ),
]


def test_what_cannot_be_trained_as_meant_is_refused_with_key_and_line(tmp_path: Path) -> None:
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = jsonl(tmp_path, [good] + [record for record, _ in REFUSED])
    found = problems_of(path)
    assert [line.split(": ")[0:2] for line in found] == [
        [f"{path}:{i + 2}", key] for i, (_, key) in enumerate(REFUSED)
    ]
    assert "false: a KTO label" in found[0] and "learn every answer as a good one" in found[0]
    assert "a preference pair (chosen/rejected" in found[1]
    assert "image inputs cannot be trained here" in found[3] and "<image>" in found[3]
    assert "video inputs" in found[4] and "audio inputs" in found[5]
    # an explicit mapping makes "chosen" the data: the chosen answers are learned, nothing else
    trl = [{"prompt": "q", "chosen": "good", "rejected": "bad"}]
    (ex,), _ = load_data(jsonl(tmp_path, trl, "trl.jsonl"), "chatglm", {"response": "chosen"})
    assert (ex.query, ex.response) == ("q", "good")
    # empty media lists are no media
    (ex,), _ = load_data(jsonl(tmp_path, [{**good, "images": []}], "empty.jsonl"))
    assert ex.response == "a"


def test_one_pretty_printed_object_and_several(tmp_path: Path) -> None:
    """axolotl's fixtures hold one indented object; some exports write indented objects one after another."""
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    one = tmp_path / "one.json"
    one.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    (ex,), fmt = load_data(one)
    assert (fmt, ex.query, ex.response) == ("messages", "q", "a")
    several = tmp_path / "several.json"
    several.write_text(
        json.dumps(record, indent=2) + "\n" + json.dumps({"messages": []}, indent=2), encoding="utf-8"
    )
    assert problems_of(several) == [
        f"{several}:13: messages: must be a non-empty list (messages format needs messages: "
        "[{role, content}, ...] (optional tools))"
    ]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(record, indent=2)[:-2], encoding="utf-8")
    (err,) = problems_of(broken)
    assert err.startswith(f"{broken}:") and "invalid JSON" in err  # one error, not one per line


def test_text_parts_with_value(tmp_path: Path) -> None:
    """LLaMA-Factory's newer message parts: {"type": "text", "value": ...}."""
    parts = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "value": "Hel"}, {"type": "text", "value": "lo"}]},
            {"role": "assistant", "content": [{"type": "text", "value": "Hi"}]},
        ]
    }
    (ex,), _ = load_data(jsonl(tmp_path, [parts]))
    assert (ex.query, ex.response) == ("Hello", "Hi")
