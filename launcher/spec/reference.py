"""The reference of every spec key, generated from the schema (``launcher.spec.schema``): each key's type,
default and the documentation written under it there, so the reference cannot drift from the code.

``python -m launcher.spec.reference > docs/spec_reference.md`` writes it; a test checks the file is
current.
"""

from __future__ import annotations

import json
import types
from collections.abc import Iterator
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from launcher.spec.schema import JobSpec

HEADER = """# Spec reference

Every key of a job spec, generated from `launcher/spec/schema.py` by
`python -m launcher.spec.reference > docs/spec_reference.md` (a test checks that this file is current).
Unknown keys are errors, values are taken as written (`"1e-4"` is not a number), and every key can also be
set on the command line (`training.learning_rate=1e-4`). A dash means the schema has no description yet.
"""


def _type_name(tp: Any) -> str:
    """A type as a spec writer reads it: ``1 | 2``, ``list of string``, ``a section``."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _type_name(get_args(tp)[0])
    if origin is Literal:
        return " \\| ".join(json.dumps(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        key, value = get_args(tp)
        return f"mapping {_type_name(key)} → {_type_name(value)}"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return f"[{_section_title(tp)}](#{_anchor(_section_title(tp))})"
    names = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}
    return names.get(tp, "any" if tp is Any else getattr(tp, "__name__", str(tp)))


def _default(info: Any) -> str:
    if info.default is PydanticUndefined and info.default_factory is None:
        return "required"
    value = info.default_factory() if info.default_factory is not None else info.default
    if isinstance(value, BaseModel):
        return "see section"
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _cell(text: str | None) -> str:
    return " ".join((text or "-").split()).replace("|", "\\|")


def _models_in(tp: Any) -> Iterator[type[BaseModel]]:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        yield tp
    for arg in get_args(tp):
        yield from _models_in(arg)


_TITLES: dict[type[BaseModel], str] = {}


def _section_title(model: type[BaseModel]) -> str:
    return _TITLES.get(model, model.__name__)


def _anchor(title: str) -> str:
    kept = "".join(ch for ch in title.lower() if ch.isalnum() or ch in " -_")
    return kept.replace(" ", "-")


def _sections(root: type[BaseModel]) -> list[tuple[str, type[BaseModel]]]:
    """(title, model) of ``root`` and every model under it, breadth first (a section shared by several
    keys, like resources, is titled by the shallowest one), each once."""
    _TITLES[root] = "top level"
    out, queue = [], [root]
    while queue:
        model = queue.pop(0)
        out.append((_TITLES[model], model))
        for name, info in model.model_fields.items():
            for sub in _models_in(info.annotation):
                if sub in _TITLES:
                    continue
                method = sub.model_fields.get("method")
                if method is not None:  # one section per method kind of the methods list
                    _TITLES[sub] = f"methods[] with method: {get_args(method.annotation)[0]}"
                elif model is root:
                    _TITLES[sub] = name
                else:
                    _TITLES[sub] = f"{_TITLES[model]}.{name}"
                queue.append(sub)
    return out


def render() -> str:
    """The whole reference as Markdown."""
    _TITLES.clear()
    sections = _sections(JobSpec)
    lines = [HEADER]
    for title, model in sections:
        lines += [f"## {title}", ""]
        if model.__doc__ and model is not JobSpec and "Usage docs" not in model.__doc__:
            lines += [_cell(model.__doc__), ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        for name, info in model.model_fields.items():
            key = info.alias or name
            lines.append(
                f"| `{key}` | {_type_name(info.annotation)} | {_default(info)} | {_cell(info.description)} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
