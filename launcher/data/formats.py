"""Data formats: one record becomes one ``Example`` (system, earlier turns, the query, the response).

| format     | record                                                                                 |
|------------|----------------------------------------------------------------------------------------|
| chatglm    | ``prompt``, ``response``, optional ``history`` ([[q, a], ...]) and ``system``            |
| alpaca     | ``instruction``, optional ``input``, ``output``, optional ``history`` and ``system``      |
| sharegpt   | ``conversations``: [{``from``: human/gpt/system, ``value``}], optional ``system``        |
| messages   | ``messages``: [{``role``: system/user/assistant, ``content``}] (OpenAI chat format)      |

Tool-calling conversations (sharegpt ``function_call``/``observation`` turns, OpenAI ``tool_calls`` and
``tool`` messages, with ``tools``) become Examples carrying their chat ``messages`` and ``tools``
(launcher.data.tool_calls). ``data.columns`` names the file's key for any field (launcher.data.columns);
records that cannot be trained as meant are refused first (launcher.data.unsupported).

``auto`` takes the format from the first record's keys. A conversation (sharegpt, messages) is an
optional system message, then user and assistant turns in alternation, ending with an assistant turn:
the last one is the response, the earlier pairs the history. Every problem is a ``RecordProblem`` that
names the record (file:line), the key and the fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.data import tool_calls
from launcher.data.columns import Columns, columns_problems
from launcher.data.records import BadRecord, read_records
from launcher.data.unsupported import unsupported_key
from launcher.errors import UserError

Message = dict[str, Any]

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
_NEEDED = {
    "chatglm": "prompt, response (optional history, system)",
    "alpaca": "instruction, output (optional input, history, system)",
    "sharegpt": "conversations: [{from, value}, ...] (optional system, tools)",
    "messages": "messages: [{role, content}, ...] (optional tools)",
}
TEXT_PART_KEYS = ("text", "value")
"""Where a text part keeps its text: OpenAI's ``{"type": "text", "text"}``, LLaMA-Factory's ``value``."""


@dataclass(frozen=True)
class Example:
    id: str
    history: list[tuple[str, str]]
    query: str
    response: str
    system: str | None = field(default=None, kw_only=True)
    messages: tuple[Message, ...] | None = field(default=None, kw_only=True)
    """A tool-calling conversation as chat messages (launcher.data.tool_calls), system first when there
    is one; None for plain (history, query, response) examples. ``query``/``response`` are then its last
    user turn and its last assistant turn (as text), for eval."""
    tools: list[dict[str, Any]] | None = field(default=None, kw_only=True)
    """The functions offered to the model (rendered by the chat template's ``tools``)."""
    other_references: tuple[str, ...] = field(default=(), kw_only=True)
    """Further correct answers of an eval example (BLEU scores against all of them); training learns
    ``response``, the first one."""


class RecordProblem(ValueError):
    """A record that does not fit its format: ``key`` is where in the record, the message says the fix."""

    def __init__(self, key: str | None, message: str):
        super().__init__(message)
        self.key = key

    def describe(self, where: str) -> str:
        return f"{where}: {self.key + ': ' if self.key else ''}{self}"


def detect_format(record: Any, columns: Columns | None = None) -> str:
    """The format a record's keys say it is in (through ``data.columns`` when it maps them)."""
    cols = columns or Columns()
    if not isinstance(record, dict):
        raise RecordProblem(None, f"each record must be a JSON object, got {type(record).__name__}")
    for fmt, fields in (
        ("messages", ("messages",)),
        ("sharegpt", ("conversations",)),
        ("chatglm", ("prompt", "response")),
        ("alpaca", ("instruction", "output")),
    ):
        if any(cols.has(record, f) for f in fields):
            return fmt
    raise RecordProblem(None, _unknown_keys_message(record))


def _unknown_keys_message(record: dict[str, Any]) -> str:
    """Why the format is unknown, with a data.columns mapping built from the record's own keys."""
    texts = [k for k, v in record.items() if isinstance(v, str)]
    example = (
        f"format: chatglm, columns: {{prompt: {texts[0]}, response: {texts[1]}}}"
        if len(texts) >= 2
        else "format: chatglm, columns: {prompt: KEY, response: KEY}"
    )
    return (
        f"cannot tell the data format from keys {sorted(record)}: expected messages, conversations "
        "(sharegpt), prompt/response (chatglm) or instruction/output (alpaca); for other keys set "
        f"data.format and map them with data.columns, e.g. data: {{{example}}}"
    )


def parse_record(
    record: Any, fmt: str, index: int, default_id: str, columns: Columns | None = None
) -> Example:
    """One record in format ``fmt`` (not ``auto``) as an Example, or a RecordProblem."""
    cols = columns or Columns()
    if not isinstance(record, dict):
        raise RecordProblem(None, f"each record must be a JSON object, got {type(record).__name__}")
    refused = unsupported_key(record, set(cols.mapping.values()))
    if refused is not None:
        raise RecordProblem(*refused)
    ex_id = str(record["id"]) if record.get("id") is not None else f"{default_id}-{index}"
    system = _optional_text(record, cols, "system")
    if fmt == "chatglm":
        history = _pairs(record, cols)
        response, others = _answers(record, cols, "response", fmt)
        prompt = _text(record, cols, "prompt", fmt)
        return Example(ex_id, history, prompt, response, system=system, other_references=others)
    if fmt == "alpaca":
        instruction = _text(record, cols, "instruction", fmt)
        extra = _optional_text(record, cols, "input")
        query = f"{instruction}\n{extra}" if extra else instruction
        response, others = _answers(record, cols, "output", fmt)
        return Example(ex_id, _pairs(record, cols), query, response, system=system, other_references=others)
    list_field = "conversations" if fmt == "sharegpt" else "messages"
    key = cols.label(list_field)
    turns = record.get(cols.key(list_field))
    if not isinstance(turns, list) or not turns:
        raise RecordProblem(key, f"must be a non-empty list ({fmt} format needs {_NEEDED[fmt]})")
    try:
        tools = tool_calls.read_tools(record.get(cols.key("tools")), cols.label("tools"))
        messages = list(_messages(turns, key, fmt, cols))
    except tool_calls.ToolProblem as problem:
        raise RecordProblem(problem.key, str(problem)) from None
    if messages[0][1]["role"] == "system":
        if system is not None:
            raise RecordProblem(f"{key}[0]", f"a system message and a {cols.label('system')!r} key: keep one")
        system = messages.pop(0)[1]["content"]
    if tools or any(m["role"] == "tool" or m.get("tool_calls") for _, m in messages):
        example = _tool_conversation(ex_id, system, messages, key, tools)
    else:
        example = _conversation(ex_id, system, [(i, m["role"], m["content"]) for i, m in messages], key)
    listed = record.get("references")
    if listed is None:
        return example
    if not (isinstance(listed, list) and all(isinstance(r, str) for r in listed)):
        raise RecordProblem(
            "references", "must be a list of strings (answers besides the last assistant turn)"
        )
    return dataclasses.replace(example, other_references=tuple(listed))


def _answers(record: dict[str, Any], cols: Columns, field_name: str, fmt: str) -> tuple[str, tuple[str, ...]]:
    """(the answer learned, further references): the field holds a string, or a non-empty list of
    strings (several correct answers of an eval example; training learns the first)."""
    value = record.get(cols.key(field_name))
    if isinstance(value, list):
        if not value or not all(isinstance(v, str) for v in value):
            raise RecordProblem(
                cols.label(field_name), "a list of references must be a non-empty list of strings"
            )
        return value[0], tuple(value[1:])
    return _text(record, cols, field_name, fmt), ()


def _text(record: dict[str, Any], cols: Columns, field_name: str, fmt: str) -> str:
    value = record.get(cols.key(field_name))
    if value is None:
        raise RecordProblem(cols.label(field_name), f"missing ({fmt} format needs {_NEEDED[fmt]})")
    if not isinstance(value, str):
        raise RecordProblem(cols.label(field_name), f"must be a string, got {type(value).__name__}")
    return value


def _optional_text(record: dict[str, Any], cols: Columns, field_name: str) -> str | None:
    value = record.get(cols.key(field_name))
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise RecordProblem(cols.label(field_name), f"must be a string, got {type(value).__name__}")
    return value


def _pairs(record: dict[str, Any], cols: Columns) -> list[tuple[str, str]]:
    key = cols.label("history")
    raw = record.get(cols.key("history")) or []
    if not isinstance(raw, list):
        raise RecordProblem(key, "must be a list of [question, answer] pairs")
    turns: list[tuple[str, str]] = []
    for i, turn in enumerate(raw):
        if not (isinstance(turn, list | tuple) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise RecordProblem(f"{key}[{i}]", "must be a [question, answer] pair of strings")
        turns.append((turn[0], turn[1]))
    return turns


def _content(value: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts joined (OpenAI's ``{"type": "text", "text"}``,
    LLaMA-Factory's ``{"type": "text", "value"}``)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        kinds = sorted({str(p.get("type")) for p in value})
        if kinds != ["text"]:
            return _refuse_parts(kinds, where)
        texts = [next((p[k] for k in TEXT_PART_KEYS if isinstance(p.get(k), str)), None) for p in value]
        if any(t is None for t in texts):
            raise RecordProblem(where, "a text part keeps its text under 'text' (or 'value'), as a string")
        return "".join(t for t in texts if t is not None)
    raise RecordProblem(where, f"must be a string, got {type(value).__name__}")


def _refuse_parts(kinds: list[str], where: str) -> str:
    other = [k for k in kinds if k != "text"]
    raise RecordProblem(
        where,
        f"only text parts can be trained here (the models read text only), got part types {other}: drop "
        "these records or those parts",
    )


def _messages(turns: list[Any], key: str, fmt: str, cols: Columns) -> Iterator[tuple[int, Message]]:
    """(index in the record's list, the turn as a chat message) of every turn."""
    sharegpt = fmt == "sharegpt"
    role_field, text_field = ("from", "value") if sharegpt else ("role", "content")
    role_key, text_key = cols.key(role_field), cols.key(text_field)
    roles = SHAREGPT_ROLES if sharegpt else MESSAGE_ROLES
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise RecordProblem(where, f"must be an object with {role_key!r} and {text_key!r}")
        speaker = turn.get(role_key)
        role_where = f"{where}.{cols.label(role_field)}"
        text_where = f"{where}.{cols.label(text_field)}"
        if sharegpt and speaker == tool_calls.SHAREGPT_CALL:
            yield i, tool_calls.call_message(tool_calls.sharegpt_calls(turn.get(text_key), text_where))
            continue
        if (not sharegpt and speaker == "assistant") and (
            turn.get("tool_calls") or turn.get("function_call")
        ):
            calls = tool_calls.openai_calls(turn, where)
            text = turn.get(text_key)
            yield i, tool_calls.call_message(calls, _content(text, text_where) if text else "")
            continue
        results = tool_calls.SHAREGPT_RESULT if sharegpt else tool_calls.OPENAI_RESULT
        if speaker not in roles and speaker not in results:
            valid = [*roles, *(("function_call", *results) if sharegpt else results)]
            raise RecordProblem(
                role_where, f"{speaker!r} is not a speaker of {fmt}: use one of {', '.join(valid)}"
            )
        if turn.get(text_key) is None:
            raise RecordProblem(text_where, "missing")
        role = "tool" if speaker in results else roles[speaker]
        yield i, {"role": role, "content": _content(turn[text_key], text_where)}


def _tool_conversation(
    ex_id: str, system: str | None, messages: list[tuple[int, Message]], key: str, tools: list[dict[str, Any]]
) -> Example:
    if not messages:
        raise RecordProblem(key, "has only a system message; it needs user and assistant turns")
    try:
        tool_calls.check_order(messages, key)
    except tool_calls.ToolProblem as problem:
        raise RecordProblem(problem.key, str(problem)) from None
    chat = [m for _, m in messages]
    query = next(m["content"] for m in reversed(chat) if m["role"] == "user")
    response = tool_calls.shown_calls(chat[-1])
    head = [{"role": "system", "content": system}] if system is not None else []
    return Example(
        ex_id, [], query, response, system=system, messages=tuple(head + chat), tools=tools or None
    )


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
    that does not fit the format. ``format`` is ``auto`` until the first readable record decides it.
    ``columns`` is ``data.columns``: the file's key for each field of the format."""

    def __init__(self, path: Path, fmt: str = "auto", columns: dict[str, str] | None = None):
        if fmt not in FORMATS:
            raise UserError(f"unknown data format {fmt!r}: use one of {', '.join(FORMATS)}")
        self.path = Path(path)
        self.format = fmt
        self.columns = Columns(columns)
        self._check_columns()

    def _check_columns(self) -> None:
        problems = columns_problems(self.format, self.columns.mapping)
        if problems:
            field_name, problem = problems[0]
            raise UserError(f"data.columns.{field_name}: {problem}")

    def __iter__(self) -> Iterator[tuple[str, Example | str]]:
        for index, located in enumerate(read_records(self.path)):
            record = located.record
            if isinstance(record, BadRecord):
                yield located.where, f"{located.where}: {record.message}"
                continue
            try:
                if self.format == "auto":
                    refused = (
                        unsupported_key(record, set(self.columns.mapping.values()))
                        if isinstance(record, dict)
                        else None
                    )
                    if refused is not None:
                        raise RecordProblem(*refused)
                    self.format = detect_format(record, self.columns)
                    self._check_columns()
                yield located.where, parse_record(record, self.format, index, self.path.stem, self.columns)
            except RecordProblem as problem:
                yield located.where, problem.describe(located.where)
