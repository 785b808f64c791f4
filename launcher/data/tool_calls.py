"""Tool-calling conversations as the chat messages transformers' chat templates render.

Two ways people store them:
- sharegpt (LLaMA-Factory's glaive_toolcall): ``function_call`` turns whose value is a JSON call
  ``{"name": ..., "arguments": {...}}`` (or a list of calls), ``observation`` turns holding the tool's
  result, and ``tools``: the functions offered, as a list or a JSON string of one;
- OpenAI chat: an assistant message with ``tool_calls: [{type: function, function: {name, arguments}}]``
  (``arguments`` a JSON string), ``tool`` messages (legacy: ``function``) with the result, and ``tools``.

Both become ``{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function":
{"name", "arguments": {...}}}]}`` and ``{"role": "tool", "content": ...}``, with ``tools`` as
``[{"type": "function", "function": {...}}]``: the shapes ``apply_chat_template(..., tools=...)``
documents. The model learns its calls and its answers; tool results are context only.
"""

from __future__ import annotations

import json
from typing import Any

Message = dict[str, Any]
SHAREGPT_CALL = "function_call"
SHAREGPT_RESULT = ("observation", "tool")
OPENAI_RESULT = ("tool", "function")


class ToolProblem(ValueError):
    """A tool turn or tools list that cannot be read: ``key`` is where (inside the record)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def _arguments(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise ToolProblem(
                where, f"arguments must be a JSON object, got invalid JSON ({exc.msg})"
            ) from None
    if not isinstance(value, dict):
        raise ToolProblem(where, f"arguments must be a JSON object, got {type(value).__name__}")
    return value


def _call(raw: Any, where: str) -> dict[str, Any]:
    """One call as {"type": "function", "function": {"name", "arguments"}}."""
    function = raw.get("function", raw) if isinstance(raw, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ToolProblem(where, 'a tool call is {"name": ..., "arguments": {...}}')
    arguments = _arguments(function.get("arguments", {}), where)
    return {"type": "function", "function": {"name": function["name"], "arguments": arguments}}


def sharegpt_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """The calls of a sharegpt ``function_call`` turn (its value: a JSON call or a JSON list of them)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ToolProblem(
                where,
                f'a function_call turn holds a JSON call {{"name", "arguments"}}: invalid JSON ({exc.msg})',
            ) from None
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise ToolProblem(where, "a function_call turn with no call")
    return [
        _call(call, f"{where}[{i}]" if isinstance(value, list) else where) for i, call in enumerate(calls)
    ]


def openai_calls(turn: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """The calls of an OpenAI assistant message (``tool_calls``, or the legacy ``function_call``)."""
    if turn.get("tool_calls"):
        raw = turn["tool_calls"]
        if not isinstance(raw, list):
            raise ToolProblem(f"{where}.tool_calls", "must be a list of calls")
        return [_call(call, f"{where}.tool_calls[{i}]") for i, call in enumerate(raw)]
    return [_call(turn["function_call"], f"{where}.function_call")]


def call_message(calls: list[dict[str, Any]], content: str = "") -> Message:
    return {"role": "assistant", "content": content, "tool_calls": calls}


def read_tools(value: Any, key: str) -> list[dict[str, Any]]:
    """A record's ``tools`` (a list, one function, or a JSON string of either) as OpenAI tool entries."""
    if value is None or value == "" or value == []:
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ToolProblem(key, f"a JSON list of functions, got invalid JSON ({exc.msg})") from None
    items = value if isinstance(value, list) else [value]
    tools = []
    for i, item in enumerate(items):
        function = item.get("function", item) if isinstance(item, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ToolProblem(f"{key}[{i}]", 'a tool is a function {"name", "description", "parameters"}')
        tools.append({"type": "function", "function": function})
    return tools


def shown_calls(message: Message) -> str:
    """An assistant message as the reference answer of eval: its text, else its calls as JSON."""
    if message.get("content") or not message.get("tool_calls"):
        return str(message.get("content") or "")
    calls = [call["function"] for call in message["tool_calls"]]
    return json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)


def check_order(messages: list[tuple[int, Message]], key: str) -> None:
    """User, then assistant answers or calls; a call is followed by its results, then the assistant
    again; the conversation ends with the assistant (the last thing to learn)."""
    previous = None
    for index, message in messages:
        role = message["role"]
        kind = "call" if message.get("tool_calls") else role
        allowed = {
            None: ("user",),
            "user": ("assistant", "call"),
            "tool": ("tool", "assistant", "call"),
            "call": ("tool",),
            "assistant": ("user",),
        }[previous]
        if kind not in allowed:
            if kind == "system":
                raise ToolProblem(f"{key}[{index}]", "a system message must come first")
            names = {"call": "a tool call", "tool": "a tool result", "user": "a user turn"}
            names.update({"assistant": "an assistant turn", "": "the start"})
            raise ToolProblem(
                f"{key}[{index}]",
                f"{names.get(kind, kind)} cannot follow {names[previous or '']}: a tool call is followed by "
                "its results, results by the assistant, and the user and the assistant take turns",
            )
        previous = kind
    if previous not in ("assistant", "call"):
        last = messages[-1][0] if messages else 0
        raise ToolProblem(
            f"{key}[{last}]", "the conversation must end with an assistant turn (the response to learn)"
        )
