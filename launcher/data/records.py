"""Data files as records: every record with where it was found, from any of the file kinds people keep
fine-tuning data in.

- ``.jsonl`` (one JSON object per line) and ``.json`` (a JSON list of objects, a single object or
  several, pretty-printed or not, or JSON Lines under a .json name): where = ``file:line``, the line
  the record starts on;
- ``.parquet``: where = ``file:row N``;
- a directory written by the ``datasets`` library's ``save_to_disk`` (it holds ``state.json``):
  where = ``dir:row N``. A ``DatasetDict`` directory (one sub-directory per split) names its splits.

A file that cannot be read at all is a UserError; a record that is not valid JSON is returned as a
``BadRecord`` so the caller can report every problem of a file at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.errors import UserError

DATASET_STATE = "state.json"
DATASET_DICT = "dataset_dict.json"
KINDS = ".json, .jsonl, .parquet or a directory written by datasets' save_to_disk"


@dataclass(frozen=True)
class BadRecord:
    """A record that could not be parsed (invalid JSON); ``message`` says why."""

    message: str


@dataclass(frozen=True)
class Located:
    where: str
    """``file:line`` (JSON) or ``file:row N`` (parquet, datasets)."""
    record: Any
    """The parsed record, or a ``BadRecord``."""


def data_file_problem(path: Path) -> str | None:
    """Why ``path`` is not a data file this module reads, in one sentence; None when it is one."""
    if not path.exists():
        return f"{path} does not exist"
    if path.is_dir():
        if (path / DATASET_DICT).is_file():
            splits = sorted(p.name for p in path.iterdir() if (p / DATASET_STATE).is_file())
            return (
                f"{path} is a directory holding a DatasetDict (splits: {', '.join(splits) or 'none'}), not "
                f"one data set: point at a split, e.g. {path / (splits[0] if splits else 'train')}"
            )
        if not (path / DATASET_STATE).is_file():
            return f"{path} is a directory, not a data file: give a {KINDS} (which holds {DATASET_STATE})"
        return None
    if path.suffix not in (".json", ".jsonl", ".parquet"):
        return f"{path}: unknown data file type {path.suffix or '(no suffix)'!r}; use {KINDS}"
    return None


def read_records(path: Path) -> Iterator[Located]:
    """Every record of a data file, in order (see the module docstring for the kinds)."""
    path = Path(path)
    problem = data_file_problem(path)
    if problem is not None:
        raise UserError(problem)
    if path.is_dir():
        yield from _dataset_rows(path)
    elif path.suffix == ".parquet":
        yield from _parquet_rows(path)
    else:
        yield from _json_records(path)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _json_records(path: Path) -> Iterator[Located]:
    text = _read_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from _json_list(path, text)
        return
    first = next((line for line in text.splitlines() if line.strip()), "")
    if first.strip().startswith("{") and not _parses(first):
        yield from _json_objects(path, text)  # pretty-printed objects (axolotl's fixtures), one or more
        return
    for line_no, raw_line in enumerate(text.splitlines(), start=1):
        if not raw_line.strip():
            continue
        try:
            record: Any = json.loads(raw_line)
        except json.JSONDecodeError as exc:
            record = BadRecord(f"invalid JSON ({exc.msg}); expected one object per line")
        yield Located(f"{path}:{line_no}", record)


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def _json_objects(path: Path, text: str) -> Iterator[Located]:
    """JSON values one after another (a single pretty-printed object, or several), each at the line it
    starts on. After a syntax error the rest cannot be located: that error is the last record."""
    decoder = json.JSONDecoder()
    pos = 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos >= len(text):
            return
        line = text.count("\n", 0, pos) + 1
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            yield Located(f"{path}:{exc.lineno}", BadRecord(f"invalid JSON: {exc.msg}"))
            return
        yield Located(f"{path}:{line}", obj)


def _json_list(path: Path, text: str) -> Iterator[Located]:
    """A JSON list, element by element, so each element keeps its line number. After a syntax error
    the rest of the list cannot be located: that error is the last record."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line = text.count("\n", 0, pos) + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            if text[pos] == "\n":
                line += 1
            pos += 1
        if pos >= len(text):
            yield Located(f"{path}:{line}", BadRecord("the JSON list is not closed with ']'"))
            return
        if text[pos] == "]":
            return
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            yield Located(f"{path}:{exc.lineno}", BadRecord(f"invalid JSON: {exc.msg}"))
            return
        yield Located(f"{path}:{line}", obj)
        line += text.count("\n", pos, end)
        pos = end


def _parquet_rows(path: Path) -> Iterator[Located]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{path}: not a readable parquet file ({exc})") from None
    for row, record in enumerate(table.to_pylist(), start=1):
        yield Located(f"{path}:row {row}", record)


def _dataset_rows(path: Path) -> Iterator[Located]:
    from datasets import Dataset

    try:
        dataset = Dataset.load_from_disk(str(path))
    except Exception as exc:  # datasets raises several kinds for a damaged directory
        raise UserError(f"{path}: not a readable datasets directory ({type(exc).__name__}: {exc})") from None
    for row, record in enumerate(dataset.to_list(), start=1):
        yield Located(f"{path}:row {row}", record)
