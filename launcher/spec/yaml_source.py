"""YAML loading that remembers where every key and value came from (line:column).

``yaml.safe_load`` semantics (the SafeLoader's constructors, nothing else), but the document is first
composed into a node tree so each key path maps to its position. Spec errors can then point at the
exact line a user has to edit.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from launcher.errors import SpecError

KeyPath = tuple[str | int, ...]


@dataclass(frozen=True)
class Mark:
    """1-based line and column of a node in the source file."""

    line: int
    col: int
    origin: str | None = None
    """Set when the value came from elsewhere (a command-line override, launcher.spec.overrides): errors name
    it instead of a file position."""


@dataclass
class SourceMap:
    """Positions of every mapping key, value and list item, by key path."""

    file: str
    keys: dict[KeyPath, Mark] = field(default_factory=dict)
    """Where the key of a mapping entry starts (the best place to point at for 'unknown key')."""
    values: dict[KeyPath, Mark] = field(default_factory=dict)
    """Where the value (or list item) starts."""

    def mark(self, path: Sequence[str | int], *, prefer_value: bool = False) -> Mark:
        """Position of ``path``, or of its closest existing ancestor (a missing key points at its parent)."""
        key = tuple(path)
        while True:
            first, second = (self.values, self.keys) if prefer_value else (self.keys, self.values)
            if key in first:
                return first[key]
            if key in second:
                return second[key]
            if not key:
                return Mark(1, 1)
            key = key[:-1]

    def where(self, path: Sequence[str | int], *, prefer_value: bool = False) -> str:
        m = self.mark(path, prefer_value=prefer_value)
        return m.origin or f"{self.file}:{m.line}:{m.col}"


def format_path(path: Sequence[str | int]) -> str:
    """``('methods', 2, 'lora_alpha')`` -> ``methods[2].lora_alpha``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<top level>"


def _mark(node: yaml.Node) -> Mark:
    return Mark(node.start_mark.line + 1, node.start_mark.column + 1)


def _walk(node: yaml.Node, path: KeyPath, smap: SourceMap) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            # Only scalar keys get a path; complex keys are rejected later as non-string keys.
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            child = (*path, str(key_node.value))
            smap.keys.setdefault(child, _mark(key_node))
            smap.values.setdefault(child, _mark(value_node))
            _walk(value_node, child, smap)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*path, index)
            smap.values.setdefault(child, _mark(item))
            _walk(item, child, smap)


def _duplicate_keys(node: yaml.Node, path: KeyPath, file: str, problems: list[str]) -> None:
    """safe_load silently keeps the last of two equal keys; in a spec that is almost always a mistake."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, Mark] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                name = str(key_node.value)
                if name in seen:
                    first = seen[name]
                    here = _mark(key_node)
                    problems.append(
                        f"{file}:{here.line}:{here.col}: {format_path((*path, name))}: duplicate key "
                        f"(first given at line {first.line}); keep one"
                    )
                else:
                    seen[name] = _mark(key_node)
                _duplicate_keys(value_node, (*path, name), file, problems)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _duplicate_keys(item, (*path, index), file, problems)


class SpecLoader(yaml.SafeLoader):
    """``yaml.safe_load`` plus YAML 1.2's floats: PyYAML follows YAML 1.1, where a float needs a dot,
    so ``1e-4`` (as everyone writes a learning rate) would be the string "1e-4"."""


SpecLoader.add_implicit_resolver(  # copies SafeLoader's resolvers first: safe_load is unchanged
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml_with_positions(text: str, file: str) -> tuple[Any, SourceMap]:
    """Parse one YAML document with SpecLoader; returns (data, positions). Syntax errors -> SpecError."""
    loader = SpecLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise SpecError([f"{file}:1:1: <top level>: the file is empty; a job spec is a YAML mapping"])
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        what = exc.problem or "invalid YAML"
        context = f" ({exc.context})" if exc.context else ""
        raise SpecError([f"{file}:{line}:{col}: <yaml>: {what}{context}"]) from None
    except yaml.YAMLError as exc:
        raise SpecError([f"{file}:1:1: <yaml>: {exc}"]) from None
    finally:
        loader.dispose()
    smap = SourceMap(file=file)
    _walk(node, (), smap)
    problems: list[str] = []
    _duplicate_keys(node, (), file, problems)
    if problems:
        raise SpecError(problems)
    return data, smap


def load_yaml_file(path: Path) -> tuple[Any, SourceMap]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([f"{path}:1:1: <file>: no such file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([f"{path}:1:1: <file>: cannot read the spec: {exc}"]) from None
    return load_yaml_with_positions(text, str(path))


@dataclass
class Problems:
    """Collects errors and warnings as ``file:line:col: key.path: message`` (raise them all at once)."""

    source: SourceMap | None
    file: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def _format(self, path: Sequence[str | int], message: str, prefer_value: bool) -> str:
        where = self.source.where(path, prefer_value=prefer_value) if self.source else f"{self.file}:1:1"
        return f"{where}: {format_path(path)}: {message}"

    def error(self, path: Sequence[str | int], message: str, *, prefer_value: bool = False) -> None:
        line = self._format(path, message, prefer_value)
        if line not in self.errors:
            self.errors.append(line)

    def warn(self, path: Sequence[str | int], message: str, *, prefer_value: bool = False) -> None:
        line = self._format(path, message, prefer_value)
        if line not in self.warnings:
            self.warnings.append(line)

    def has(self, path: Sequence[str | int]) -> bool:
        return self.source is not None and tuple(path) in self.source.keys

    def first_present(self, *paths: Sequence[str | int]) -> Sequence[str | int]:
        """The first of ``paths`` the user actually wrote (for pointing at where a value came from)."""
        for p in paths:
            if self.has(p):
                return p
        return paths[-1]

    def raise_if_errors(self) -> None:
        if self.errors:
            raise SpecError(self.errors)
