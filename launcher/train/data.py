"""Training data: load ChatGLM / Alpaca records, render them with a template, tokenize with the
history-truncation rule, pad per batch, and order batches deterministically across ranks.

Truncation rule (the issue's "known pain"): when the rendered source is longer than
``max_source_length``, whole history turns are dropped, OLDEST first; the current query is never cut
unless it alone does not fit, in which case its BEGINNING is cut (the end of a question usually holds
the actual ask). Either case marks the example ``truncated``.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.errors import UserError
from launcher.templates import Template, get_template

if TYPE_CHECKING:
    import torch

    from launcher.spec import DataSpec, ModelSpec

IGNORE_INDEX = -100
FORMATS: tuple[str, ...] = ("auto", "chatglm", "alpaca")
_CHATGLM_KEYS = ("prompt", "response")
_ALPACA_KEYS = ("instruction", "output")


@dataclass(frozen=True)
class Example:
    id: str
    history: list[tuple[str, str]]
    query: str
    response: str


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    """``IGNORE_INDEX`` on prompt tokens: only the response (and its eos) is learned."""
    truncated: bool
    """True when history turns were dropped or the query was cut to fit ``max_source_length``."""
    source_len: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


# --- loading ------------------------------------------------------------------------------------


def _records(path: Path) -> list[tuple[int, Any]]:
    """(line number, record) for a JSON list or a JSONL file; invalid JSON is a UserError with file:line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: data file not found") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    decoder = json.JSONDecoder()
    stripped = text.lstrip()
    records: list[tuple[int, Any]] = []
    if stripped.startswith("["):  # a JSON list: walk its elements to keep each one's line number
        pos = text.index("[") + 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text):
                raise UserError(f"{path}:{text.count(chr(10)) + 1}: JSON list is not closed with ']'")
            if text[pos] == "]":
                break
            line = text.count("\n", 0, pos) + 1
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
            records.append((line, obj))
        return records
    for line_no, raw_line in enumerate(text.splitlines(), start=1):
        if not raw_line.strip():
            continue
        try:
            records.append((line_no, json.loads(raw_line)))
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{path}:{line_no}: invalid JSON ({exc.msg}); expected one object per line"
            ) from None
    return records


def _detect_format(path: Path, line: int, record: dict[str, Any]) -> str:
    if any(k in record for k in _CHATGLM_KEYS):
        return "chatglm"
    if any(k in record for k in _ALPACA_KEYS):
        return "alpaca"
    raise UserError(
        f"{path}:{line}: cannot tell the data format from keys {sorted(record)}: expected chatglm "
        "(prompt, response, optional history) or alpaca (instruction, input, output); set data.format"
    )


def _text(path: Path, line: int, record: dict[str, Any], key: str, fmt: str, required: bool = True) -> str:
    if key not in record or record[key] is None:
        if not required:
            return ""
        needed = "prompt, response" if fmt == "chatglm" else "instruction, output"
        raise UserError(f"{path}:{line}: record has no {key!r} key ({fmt} format needs {needed})")
    value = record[key]
    if not isinstance(value, str):
        raise UserError(f"{path}:{line}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _history(path: Path, line: int, record: dict[str, Any]) -> list[tuple[str, str]]:
    raw = record.get("history") or []
    if not isinstance(raw, list):
        raise UserError(f"{path}:{line}: 'history' must be a list of [question, answer] pairs")
    turns: list[tuple[str, str]] = []
    for i, turn in enumerate(raw):
        if not (isinstance(turn, list | tuple) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise UserError(f"{path}:{line}: 'history'[{i}] must be a [question, answer] pair of strings")
        turns.append((turn[0], turn[1]))
    return turns


def load_examples(path: Path, fmt: str = "auto") -> list[Example]:
    """Examples from a JSON list or JSONL file in ChatGLM (prompt/response/history) or Alpaca
    (instruction/input/output[/history]) format. Any malformed record is a UserError with file:line."""
    if fmt not in FORMATS:
        raise UserError(f"unknown data format {fmt!r}: use one of {', '.join(FORMATS)}")
    path = Path(path)
    records = _records(path)
    if not records:
        raise UserError(f"{path}: no records (empty data file)")
    examples: list[Example] = []
    file_fmt = fmt
    for index, (line, record) in enumerate(records):
        if not isinstance(record, dict):
            raise UserError(f"{path}:{line}: each record must be a JSON object, got {type(record).__name__}")
        if file_fmt == "auto":
            file_fmt = _detect_format(path, line, record)
        if file_fmt == "chatglm":
            query = _text(path, line, record, "prompt", file_fmt)
            response = _text(path, line, record, "response", file_fmt)
        else:
            instruction = _text(path, line, record, "instruction", file_fmt)
            extra = _text(path, line, record, "input", file_fmt, required=False)
            query = f"{instruction}\n{extra}" if extra else instruction
            response = _text(path, line, record, "output", file_fmt)
        ex_id = str(record.get("id", f"{path.stem}-{index}"))
        examples.append(Example(ex_id, _history(path, line, record), query, response))
    return examples


def resolve_data_files(data: DataSpec) -> tuple[Path, Path]:
    """(train, eval) files: the built-in set (generated once into the cache) or the spec's files."""
    if data.builtin is not None:
        from launcher.demo_data import ensure_builtin_data

        return ensure_builtin_data(data.builtin)
    if data.train_file is None or data.eval_file is None:
        raise UserError("data: set either builtin (dialogue, spo) or both train_file and eval_file")
    files = (Path(data.train_file), Path(data.eval_file))
    for key, path in zip(("data.train_file", "data.eval_file"), files, strict=True):
        if not path.is_file():
            raise UserError(f"{key}: {path} does not exist (paths are relative to the spec file)")
    return files


def resolve_model_dir(model: ModelSpec) -> Path:
    """The model directory: the built-in tiny model (built once, cached) or the spec's local HF dir."""
    if model.builtin is not None:
        from launcher.tiny import ensure_tiny_model

        return ensure_tiny_model()
    if model.path is None:
        raise UserError("model: set either builtin: tiny-glm or path: <local Hugging Face model dir>")
    path = Path(model.path)
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json (not a Hugging Face model dir)"
        raise UserError(f"model.path: {path} {what}")
    return path


# --- encoding -----------------------------------------------------------------------------------


def _ids(tokenizer: Any, text: str) -> list[int]:
    """Source ids WITH the tokenizer's own special tokens (bos, ChatGLM's [gMASK]<sop>...)."""
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def _encode_source(ex: Example, tokenizer: Any, tpl: Template, budget: int) -> tuple[list[int], bool]:
    history = list(ex.history)

    def keep_from(dropped: int) -> list[int]:  # the oldest `dropped` whole turns removed
        return _ids(tokenizer, tpl.render(history[dropped:], ex.query))

    ids = keep_from(0)
    if len(ids) <= budget:
        return ids, False
    if len(keep_from(len(history))) <= budget:
        # Dropping more turns never makes the source longer: binary search for the fewest to drop.
        lo, hi = 1, len(history)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(keep_from(mid)) <= budget:
                hi = mid
            else:
                lo = mid + 1
        return keep_from(lo), True
    # Even the query alone is too long: cut its beginning (binary search on characters to drop).
    head, query, tail = tpl.split([], ex.query)
    lo, hi = 1, len(query)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(_ids(tokenizer, head + query[mid:] + tail)) <= budget:
            hi = mid
        else:
            lo = mid + 1
    ids = _ids(tokenizer, head + query[lo:] + tail)
    if len(ids) > budget:  # the template itself does not fit: keep the end, where the answer starts
        ids = ids[len(ids) - budget :]
    return ids, True


def encode_prompt(ex: Example, tokenizer: Any, template: str, max_source_length: int) -> list[int]:
    """Source token ids for generation (same rendering and truncation as training)."""
    return _encode_source(ex, tokenizer, get_template(template), max_source_length)[0]


def encode_for_training(
    ex: Example,
    tokenizer: Any,
    template: str,
    max_source_length: int,
    max_target_length: int,
    *,
    max_length: int | None = None,
) -> Encoded:
    """Source (truncated by the history rule) + response (cut to ``max_target_length``) + eos.

    ``max_length`` caps source + target: the source budget shrinks first, so more history is dropped
    rather than the response being cut.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no eos token: set one in its tokenizer_config.json")
    response_ids = list(tokenizer(ex.response, add_special_tokens=False)["input_ids"])
    target = [*response_ids[:max_target_length], eos]
    budget = max_source_length
    if max_length is not None:
        if len(target) >= max_length:  # leave room for one source token; keep the eos
            target = [*target[: max_length - 2], eos]
        budget = max(1, min(budget, max_length - len(target)))
    source, truncated = _encode_source(ex, tokenizer, get_template(template), budget)
    return Encoded(source + target, [IGNORE_INDEX] * len(source) + target, truncated, len(source))


def truncated_fraction(encoded: Sequence[Encoded]) -> float:
    """Share of examples whose source was cut (history dropped or query shortened)."""
    return sum(e.truncated for e in encoded) / len(encoded) if encoded else 0.0


def collate(features: Sequence[Encoded | dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence IN THIS BATCH (never to max length): input_ids,
    attention_mask, labels (padding is ``IGNORE_INDEX`` in labels)."""
    import torch

    rows = [
        (f.input_ids, f.labels) if isinstance(f, Encoded) else (f["input_ids"], f["labels"]) for f in features
    ]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[i, : len(labs)] = torch.tensor(labs, dtype=torch.long)
        attention[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


# --- batch order --------------------------------------------------------------------------------


@dataclass
class BatchOrder:
    """Which examples each rank sees in which batch: deterministic per (seed, epoch), the same number
    of batches on every rank, so a resumed run can skip exactly the batches already consumed.

    Each step takes one global batch of ``batch_size * world_size`` examples; rank r gets its r-th
    slice. Without ``drop_last`` the last global batch is filled by wrapping around to the start of
    the epoch's permutation (as torch's DistributedSampler pads). With ``group_by_length``, indices are
    sorted by length (longest first) inside mega-batches of ``MEGA_BATCHES`` global batches, so a batch
    holds similar lengths and dynamic padding wastes little; the batch order is then shuffled.
    """

    lengths: Sequence[int]
    batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 42
    group_by_length: bool = False
    drop_last: bool = False
    shuffle: bool = True
    MEGA_BATCHES: int = field(default=50, repr=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"invalid batch_size/rank/world_size: {self.batch_size}/{self.rank}/{self.world_size}"
            )
        if not self.lengths:
            raise UserError("no training examples to batch")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def num_batches(self) -> int:
        """Batches per rank per epoch (the same on every rank)."""
        n = len(self.lengths)
        count = n // self.global_batch if self.drop_last else math.ceil(n / self.global_batch)
        if count == 0:
            raise UserError(
                f"{n} examples are fewer than one global batch ({self.global_batch}) with drop_last"
            )
        return count

    def batches(self, epoch: int) -> list[list[int]]:
        n, total = len(self.lengths), self.num_batches * self.global_batch
        order = list(range(n))
        rng = random.Random(f"batch-order-{self.seed}-{epoch}")
        if self.shuffle:
            rng.shuffle(order)
        while len(order) < total:  # wrap around so every rank gets full batches
            order += order[: total - len(order)]
        order = order[:total]
        if self.group_by_length:
            mega = self.global_batch * self.MEGA_BATCHES
            order = [
                i
                for start in range(0, total, mega)
                for i in sorted(order[start : start + mega], key=lambda k: -self.lengths[k])
            ]
        global_batches = [order[s : s + self.global_batch] for s in range(0, total, self.global_batch)]
        if self.group_by_length and self.shuffle:
            rng.shuffle(global_batches)
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return [gb[lo:hi] for gb in global_batches]
