"""The eval set: taken from the training file (``data.eval_split``) or read from ``data.eval_file``, and
checked against the training set.

- ``eval_split: FRACTION`` (0 < f < 1) or ``COUNT`` (an integer >= 1) holds that many training examples
  out as the eval set. Which ones is decided by the training file's CONTENT (its SHA-256), never by a
  run's seed: every run of an experiment, and every experiment on the same file, gets the same eval set.
- An example overlaps when the training set holds one with the same prompt (system, history, query)
  and response. The same file for training and eval is an error unless ``data.allow_eval_overlap``.
- ``eval_set_hash`` is a short hash of the eval examples actually used (prompts and references, in
  order): runs with equal hashes were scored on the same examples.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path

from launcher.data.formats import Example
from launcher.errors import UserError

HASH_CHARS = 12


def content_hash(path: Path) -> str:
    """SHA-256 of a data file's bytes (a ``save_to_disk`` directory: of its files, by name)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else "").encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def eval_count(eval_split: float | int, total: int, where: str = "data.eval_split") -> int:
    """How many of ``total`` training examples ``eval_split`` holds out (at least 1, and at least one
    example must stay for training)."""
    count = max(1, round(total * eval_split)) if isinstance(eval_split, float) else int(eval_split)
    if count >= total:
        raise UserError(
            f"{where}: {eval_split} holds out {count} of the training file's {total} examples, leaving "
            "none to train on; use a smaller fraction or count"
        )
    return count


def split_eval(
    examples: Sequence[Example], eval_split: float | int, file_hash: str
) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples: ``eval_split`` of them chosen by the file's content hash, each part in
    file order."""
    count = eval_count(eval_split, len(examples))
    chosen = set(random.Random(f"eval-split-{file_hash}").sample(range(len(examples)), count))
    train = [ex for i, ex in enumerate(examples) if i not in chosen]
    held_out = [ex for i, ex in enumerate(examples) if i in chosen]
    return train, held_out


def references_of(ex: Example) -> list[str]:
    """Every reference answer of an example: its response, then any other ones it lists."""
    return [ex.response, *getattr(ex, "other_references", ())]


def example_key(ex: Example) -> str:
    """What makes two examples the same: prompt (system, history, query) and response."""
    return json.dumps([ex.system, [list(t) for t in ex.history], ex.query, ex.response], ensure_ascii=False)


def overlap_count(train: Sequence[Example], eval_examples: Sequence[Example]) -> int:
    """Eval examples whose prompt and response also occur in the training set."""
    seen = {example_key(ex) for ex in train}
    return sum(example_key(ex) in seen for ex in eval_examples)


def eval_set_hash(examples: Sequence[Example]) -> str:
    """Short hash of the eval examples used (prompts and all references, in order)."""
    digest = hashlib.sha256()
    for ex in examples:
        key = [ex.system, [list(t) for t in ex.history], ex.query, references_of(ex)]
        digest.update(json.dumps(key, ensure_ascii=False).encode("utf-8") + b"\n")
    return digest.hexdigest()[:HASH_CHARS]


def same_file(train: Path, eval_path: Path) -> bool:
    """The same path (after resolving links) or the same content."""
    try:
        if train.resolve() == eval_path.resolve():
            return True
        if train.is_file() and eval_path.is_file() and train.stat().st_size != eval_path.stat().st_size:
            return False
        return content_hash(train) == content_hash(eval_path)
    except OSError:
        return False


SAME_FILE_FIX = (
    "hold part of it out with data.eval_split: 0.1 (a fraction or a count) instead of data.eval_file, "
    "or set data.allow_eval_overlap: true if this is intended"
)
