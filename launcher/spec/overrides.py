"""Command-line overrides: ``launcher validate|plan|submit SPEC KEY=VALUE ...``.

Each override sets one dotted key of the loaded spec before it is validated, so an override is checked
exactly like the file (the same schema, the same semantic checks, the same plan), and its errors point
at it: ``<override 2>: training.learnin_rate: unknown key 'learnin_rate'; did you mean learning_rate?``.

- Keys follow the spec's own structure: ``training.learning_rate=1e-4``, ``cluster.partition=gpu``.
- A method is addressed by its run name (``name:``, else its method): ``methods.lora.r=16``.
- Where the spec holds a mapping with free keys, the rest of the key is one key of it:
  ``sweep.grid.training.learning_rate=[1e-4,2e-4]``, ``methods.full.overrides.training.learning_rate=5e-4``,
  ``cluster.extra_sbatch.reservation=llm``.
- A value is YAML, read like the file (``1e-4`` is a number, ``[a, b]`` a list, ``null`` clears: a
  key that cannot be null is removed so its default applies, e.g. ``methods.full.overrides=null``; an
  empty value is null); a whole section can be replaced (``resources=auto``).
"""

from __future__ import annotations

import difflib
import itertools
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from launcher.errors import SpecError
from launcher.spec.check import ALIASES, _members, _step, did_you_mean
from launcher.spec.schema import JobSpec
from launcher.spec.yaml_source import KeyPath, Mark, Problems, SourceMap, load_yaml_with_positions

# Top-level sections whose fields a bare key may mean (`lr=3` -> training.learning_rate).
_SECTIONS: dict[str, type[BaseModel]] = {
    name: models[0]
    for name, info in JobSpec.model_fields.items()
    if (models := [m for m in _members(info.annotation) if isinstance(m, type) and issubclass(m, BaseModel)])
}


class OverrideError(Exception):
    """An override that names no key of the spec; the message says which part and the closest key."""


def origin(number: int) -> str:
    """How errors name an override: its place on the command line."""
    return f"<override {number}>"


def _method_names(methods: Any) -> list[str]:
    if not isinstance(methods, list):
        return []
    return [str(m.get("name") or m.get("method")) if isinstance(m, dict) else "?" for m in methods]


def _models(tp: Any) -> list[type[BaseModel]]:
    return [m for m in _members(tp) if isinstance(m, type) and issubclass(m, BaseModel)]


def _is(tp: Any, container: type) -> bool:
    return any(typing.get_origin(m) is container for m in _members(tp))


def resolve_key(data: dict[str, Any], key: str) -> tuple[KeyPath, Any]:
    """The data path a dotted override key names (methods by name; free-key mappings take the rest),
    and the type the schema gives the value there (None where the schema cannot tell)."""
    parts = key.split(".")
    if not all(parts):
        raise OverrideError(f"{key!r} is not a dotted key (an empty part)")
    tp: Any = JobSpec
    node: Any = data
    path: list[str | int] = []
    i = 0
    while i < len(parts):
        part = parts[i]
        done = ".".join(parts[:i])
        if _is(tp, list) and _models(typing.get_args(tp)[0]):  # the methods, addressed by name
            names = _method_names(node)
            if part not in names:
                raise OverrideError(
                    f"no method named {part!r}{did_you_mean(part, names)} (methods: {', '.join(names)}; "
                    "a method is addressed by its `name:`, else its method)"
                )
            index = names.index(part)
            node = node[index]
            tag = node.get("method") if isinstance(node, dict) else None
            tp = _step(typing.get_args(tp)[0], str(tag)) or typing.get_args(tp)[0]
            path.append(index)
        elif _models(tp):
            fields = list(dict.fromkeys(name for model in _models(tp) for name in model.model_fields))
            if part not in fields:
                where = f"under {done}" if done else "at the top level"
                alias = ALIASES.get(part, part)
                close = [alias] if alias in fields else []
                if not close and not path:  # `lr=3`: a field of a section, named without its section
                    close = [f"{s}.{alias}" for s, model in _SECTIONS.items() if alias in model.model_fields]
                close = close[:1] or difflib.get_close_matches(part, fields, n=1)
                # the whole key as it should read: the parts before, the closest field, the rest as given
                hint = f"; did you mean {'.'.join([*parts[:i], close[0], *parts[i + 1 :]])}?" if close else ""
                raise OverrideError(f"unknown key {part!r} {where}{hint} (valid keys: {', '.join(fields)})")
            tp = _step(tp, part)
            node = node.get(part) if isinstance(node, dict) else None
            path.append(part)
        elif _is(tp, dict):
            path.append(".".join(parts[i:]))  # free keys (sweep axes, extra_sbatch...): the rest is one key
            return tuple(path), None
        else:
            raise OverrideError(
                f"{done} is a single value (or a list), not a section: set it whole, e.g. {done}=[a, b]"
            )
        i += 1
    return tuple(path), tp


def _set(data: dict[str, Any], path: KeyPath, value: Any) -> None:
    node: Any = data
    for part, following in itertools.pairwise(path):
        child = node[part] if isinstance(part, int) else node.get(part)
        if not isinstance(child, dict | list):  # e.g. `resources: auto` or an unset section
            child = [] if isinstance(following, int) else {}
            node[part] = child
        node = child
    node[path[-1]] = value


def _accepts_null(tp: Any) -> bool:
    return tp is None or any(member is type(None) or member is Any for member in _members(tp))


def _clear(data: dict[str, Any], path: KeyPath) -> None:
    """Remove ``path`` from the data (absent parents: nothing to remove)."""
    node: Any = data
    for part in path[:-1]:
        node = node[part] if isinstance(part, int) and isinstance(node, list) else (node or {}).get(part)
        if not isinstance(node, dict | list):
            return
    if isinstance(node, dict):
        node.pop(path[-1], None)


def _forget(source: SourceMap, path: KeyPath, where: Mark) -> None:
    """The override now owns ``path`` and everything below it: errors there point at the override."""
    for table in (source.keys, source.values):
        for key in [k for k in table if k[: len(path)] == path]:
            del table[key]
        table[path] = where


def parse_value(text: str, number: int) -> Any:
    """An override's value, read like the spec file (an empty value is null)."""
    if not text.strip():
        return None
    data, _ = load_yaml_with_positions(text, origin(number))
    return data


def apply_overrides(
    data: dict[str, Any], source: SourceMap, overrides: Sequence[str], problems: Problems
) -> dict[str, Any]:
    """The spec data with every override applied; problems (bad syntax, unknown keys, a key given twice)
    are added to ``problems`` and that override is left out."""
    seen: dict[KeyPath, int] = {}
    for number, text in enumerate(overrides, start=1):
        here = origin(number)
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.errors.append(
                f"{here}: {text}: not KEY=VALUE (e.g. training.learning_rate=1e-4, methods.lora.r=16)"
            )
            continue
        try:
            path, value_type = resolve_key(data, key)
            value = parse_value(raw, number)
        except OverrideError as exc:
            problems.errors.append(f"{here}: {key}: {exc}")
            continue
        except SpecError as exc:
            problems.errors.extend(exc.problems)
            continue
        if path in seen:
            problems.errors.append(f"{here}: {key}: given twice (also {origin(seen[path])}); keep one")
            continue
        seen[path] = number
        if value is None and not _accepts_null(value_type):
            _clear(data, path)  # null clears: the key goes and the schema's default applies
        else:
            _set(data, path, value)
        _forget(source, path, Mark(1, 1, origin=here))
    return data
