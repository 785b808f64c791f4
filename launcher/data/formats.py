"""Data formats: one record becomes one ``Example`` (system, earlier turns, the query, the response).

| format     | record                                                                                 |
|------------|----------------------------------------------------------------------------------------|
| chatglm    | ``prompt``, ``response``, optional ``history`` ([[q, a], ...]) and ``system``            |
| alpaca     | ``instruction``, optional ``input``, ``output``, optional ``history`` and ``system``      |
| sharegpt   | ``conversations``: [{``from``: human/gpt/system, ``value``}], optional ``system``        |
| messages   | ``messages``: [{``role``: system/user/assistant, ``content``}] (OpenAI chat format)      |

``auto`` takes the format from the first record's keys. A conversation (sharegpt, messages) is an
optional system message, then user and assistant turns in alternation, ending with an assistant turn:
the last one is the response, the earlier pairs the history. Every problem is a ``RecordProblem`` that
names the record (file:line), the key and the fix.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.data.records import BadRecord, read_records
from launcher.errors import UserError

FORMATS: tuple[str, ...] = ("auto", "chatglm", "alpaca", "sharegpt", "messages")
CONVERSATION_FORMATS = ("sharegpt", "messages")
# ShareGPT speaker names as they occur in the wild (LLaMA-Factory, FastChat, Vicuna exports)
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}
MESSAGE_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
TOOL_ROLES = ("tool", "function", "function_call", "observation", "ipython")
_NEEDED = {
    "chatglm": "prompt, response (optional history, system)",
    "alpaca": "instruction, output (optional input, history, system)",
    "sharegpt": "conversations: [{from, value}, ...] (optional system)",
    "messages": "messages: [{role, content}, ...]",
}


@dataclass(frozen=True)
class Example:
    id: str
    history: list[tuple[str, str]]
    query: str
    response: str
    system: str | None = field(default=None, kw_only=True)


class RecordProblem(ValueError):
    """A record that does not fit its format: ``key`` is where in the record, the message says the fix."""

    def __init__(self, key: str | None, message: str):
        super().__init__(message)
        self.key = key

    def describe(self, where: str) -> str:
        return f"{where}: {self.key + ': ' if self.key else ''}{self}"


def detect_format(record: Any) -> str:
    """The format a record's keys say it is in."""
    if not isinstance(record, dict):
        raise RecordProblem(None, f"each record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "prompt" in record or "response" in record:
        return "chatglm"
    if "instruction" in record or "output" in record:
        return "alpaca"
    raise RecordProblem(
        None,
        f"cannot tell the data format from keys {sorted(record)}: expected messages, conversations "
        "(sharegpt), prompt/response (chatglm) or instruction/output (alpaca); or set data.format",
    )


def parse_record(record: Any, fmt: str, index: int, default_id: str) -> Example:
    """One record in format ``fmt`` (not ``auto``) as an Example, or a RecordProblem."""
    if not isinstance(record, dict):
        raise RecordProblem(None, f"each record must be a JSON object, got {type(record).__name__}")
    ex_id = str(record["id"]) if record.get("id") is not None else f"{default_id}-{index}"
    system = _optional_text(record, "system")
    if fmt == "chatglm":
        history = _pairs(record)
        return Example(
            ex_id, history, _text(record, "prompt", fmt), _text(record, "response", fmt), system=system
        )
    if fmt == "alpaca":
        instruction = _text(record, "instruction", fmt)
        extra = _optional_text(record, "input")
        query = f"{instruction}\n{extra}" if extra else instruction
        return Example(ex_id, _pairs(record), query, _text(record, "output", fmt), system=system)
    key = "conversations" if fmt == "sharegpt" else "messages"
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise RecordProblem(key, f"must be a non-empty list ({fmt} format needs {_NEEDED[fmt]})")
    messages = list(_messages(turns, key, fmt))
    if messages[0][1] == "system":
        if system is not None:
            raise RecordProblem(f"{key}[0]", "a system message and a 'system' key: keep one")
        system = messages.pop(0)[2]
    return _conversation(ex_id, system, messages, key)


def _text(record: dict[str, Any], key: str, fmt: str) -> str:
    value = record.get(key)
    if value is None:
        raise RecordProblem(key, f"missing ({fmt} format needs {_NEEDED[fmt]})")
    if not isinstance(value, str):
        raise RecordProblem(key, f"must be a string, got {type(value).__name__}")
    return value


def _optional_text(record: dict[str, Any], key: str) -> str | None:
    value = record.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise RecordProblem(key, f"must be a string, got {type(value).__name__}")
    return value


def _pairs(record: dict[str, Any]) -> list[tuple[str, str]]:
    raw = record.get("history") or []
    if not isinstance(raw, list):
        raise RecordProblem("history", "must be a list of [question, answer] pairs")
    turns: list[tuple[str, str]] = []
    for i, turn in enumerate(raw):
        if not (isinstance(turn, list | tuple) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise RecordProblem(f"history[{i}]", "must be a [question, answer] pair of strings")
        turns.append((turn[0], turn[1]))
    return turns


def _content(value: Any, where: str) -> str:
    """A message's text: a string, or OpenAI's list of parts whose text parts are joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        kinds = {p.get("type") for p in value}
        if kinds <= {"text"} and all(isinstance(p.get("text"), str) for p in value):
            return "".join(p["text"] for p in value)
        raise RecordProblem(where, f"only text parts are supported, got part types {sorted(map(str, kinds))}")
    raise RecordProblem(where, f"must be a string, got {type(value).__name__}")


def _messages(turns: list[Any], key: str, fmt: str) -> Iterator[tuple[int, str, str]]:
    """(index in the record's list, role, text) of every turn."""
    role_key, text_key, roles = (
        ("from", "value", SHAREGPT_ROLES)
        if fmt == "sharegpt"
        else (
            "role",
            "content",
            MESSAGE_ROLES,
        )
    )
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise RecordProblem(where, f"must be an object with {role_key!r} and {text_key!r}")
        speaker = turn.get(role_key)
        if speaker in TOOL_ROLES or turn.get("tool_calls") or turn.get("function_call"):
            raise RecordProblem(
                where, "tool and function-call turns are not supported; drop these records or those turns"
            )
        if speaker not in roles:
            raise RecordProblem(
                f"{where}.{role_key}", f"{speaker!r} is not a speaker of {fmt}: use one of {', '.join(roles)}"
            )
        if turn.get(text_key) is None:
            raise RecordProblem(f"{where}.{text_key}", "missing")
        yield i, roles[speaker], _content(turn[text_key], f"{where}.{text_key}")


def _conversation(ex_id: str, system: str | None, messages: list[tuple[int, str, str]], key: str) -> Example:
    if not messages:
        raise RecordProblem(key, "has only a system message; it needs user and assistant turns")
    for position, (index, role, _) in enumerate(messages):
        expected = "user" if position % 2 == 0 else "assistant"
        if role == expected:
            continue
        if role == "system":
            raise RecordProblem(f"{key}[{index}]", "a system message must come first")
        raise RecordProblem(
            f"{key}[{index}]",
            f"is a {role} turn where {'an' if expected == 'assistant' else 'a'} {expected} turn belongs: "
            "turns alternate user, assistant, ... "
            "(merge consecutive turns of one speaker)",
        )
    if len(messages) % 2:
        raise RecordProblem(
            f"{key}[{messages[-1][0]}]",
            "the conversation must end with an assistant turn (the response to learn)",
        )
    texts = [text for _, _, text in messages]
    history = [(texts[i], texts[i + 1]) for i in range(0, len(texts) - 2, 2)]
    return Example(ex_id, history, texts[-2], texts[-1], system=system)


class ExampleReader:
    """Iterates (where, Example) over a data file's records, or (where, problem sentence) for a record
    that does not fit the format. ``format`` is ``auto`` until the first readable record decides it."""

    def __init__(self, path: Path, fmt: str = "auto"):
        if fmt not in FORMATS:
            raise UserError(f"unknown data format {fmt!r}: use one of {', '.join(FORMATS)}")
        self.path = Path(path)
        self.format = fmt

    def __iter__(self) -> Iterator[tuple[str, Example | str]]:
        for index, located in enumerate(read_records(self.path)):
            record = located.record
            if isinstance(record, BadRecord):
                yield located.where, f"{located.where}: {record.message}"
                continue
            try:
                if self.format == "auto":
                    self.format = detect_format(record)
                yield located.where, parse_record(record, self.format, index, self.path.stem)
            except RecordProblem as problem:
                yield located.where, problem.describe(located.where)
