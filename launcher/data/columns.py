"""``data.columns``: which key of the file holds each field of the format.

ChatGLM's P-Tuning scripts say ``--prompt_column content --response_column summary`` for AdvertiseGen;
LLaMA-Factory's dataset_info says ``columns: {prompt: ..., response: ...}`` and ``tags: {role_tag: ...,
content_tag: ...}``. Here one mapping says both: ``data: {format: chatglm, columns: {prompt: content,
response: summary}}``, or for chat records ``columns: {messages: conversations, role: from, content:
value}``. A field that is not mapped is read from the key of its own name. Errors name the file's key and
the mapping that led to it (``content (data.columns.prompt): missing``).
"""

from __future__ import annotations

from collections.abc import Mapping

FIELDS: dict[str, tuple[str, ...]] = {
    "chatglm": ("prompt", "response", "history", "system"),
    "alpaca": ("instruction", "input", "output", "history", "system"),
    "sharegpt": ("conversations", "from", "value", "system", "tools"),
    "messages": ("messages", "role", "content", "system", "tools"),
}
"""The fields each format reads (record keys, and for chat formats the keys of each turn)."""
ALL_FIELDS: tuple[str, ...] = tuple(dict.fromkeys(f for fields in FIELDS.values() for f in fields))


def columns_problems(fmt: str, mapping: Mapping[str, object]) -> list[tuple[str, str]]:
    """(field, problem) for every entry of ``data.columns`` that does not fit ``fmt`` (``auto``: any
    format's field) or does not name a key."""
    from difflib import get_close_matches

    valid = FIELDS.get(fmt, ALL_FIELDS)
    out = []
    for field, key in mapping.items():
        if field not in valid:
            close = get_close_matches(str(field), list(valid), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            where = f"the {fmt} format" if fmt in FIELDS else "any format"
            out.append((str(field), f"not a field of {where}; {hint}valid: {', '.join(valid)}"))
        elif not isinstance(key, str) or not key:
            out.append((str(field), "must be the name of a key in the data file (a string)"))
    return out


class Columns:
    """The file's key for each field of a format (the field's own name unless ``data.columns`` maps it)."""

    def __init__(self, mapping: Mapping[str, str] | None = None):
        self.mapping = dict(mapping or {})

    def __bool__(self) -> bool:
        return bool(self.mapping)

    def key(self, field: str) -> str:
        return self.mapping.get(field, field)

    def label(self, field: str) -> str:
        """The file's key as errors name it: with the mapping when one led there."""
        key = self.key(field)
        return f"{key} (data.columns.{field})" if field in self.mapping else key

    def has(self, record: Mapping[str, object], field: str) -> bool:
        return self.key(field) in record
