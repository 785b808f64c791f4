"""``launcher convert chatglm SRC DST``: an original ChatGLM2/3 or GLM-4 checkpoint as a native GLM model.

Everything is checked before anything is written (config, every tensor's name and shape from the file
headers, the tokenizer). DST is then built in a temporary directory beside it and renamed into place,
so it never looks complete while half-written; SRC is only read.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launcher.builtins.cache import build_once
from launcher.convert.chatglm_config import ChatGLMConfig, dropped_settings, glm_config, read_config
from launcher.convert.chatglm_tokenizer import TOKENIZER_MODEL, ConvertedTokenizer, convert_sentencepiece
from launcher.convert.chatglm_weights import check_tensors, write_weights
from launcher.convert.checkpoint_files import index_file, scan, weight_files
from launcher.convert.detect import detect_family
from launcher.convert.families import GLM4, Family
from launcher.convert.glm4_tokenizer import convert_tiktoken
from launcher.errors import UserError

RECORD = "conversion.json"
GIB = 1024**3


def _check_paths(src: Path, dst: Path) -> None:
    if not src.is_dir():
        raise UserError(f"{src}: not a directory" if src.exists() else f"{src}: does not exist")
    if dst.exists():
        raise UserError(f"{dst}: already exists; convert into a new directory (nothing was written)")
    if dst == src or src in dst.parents:
        raise UserError(
            f"{dst}: inside the source {src}, which is never written to; choose a directory outside it"
        )


def _tokenizer(src: Path, family: Family, cfg: ChatGLMConfig) -> ConvertedTokenizer:
    path = src / TOKENIZER_MODEL
    if family is GLM4:
        converted = convert_tiktoken(path, family, cfg.seq_length)
    else:
        converted = convert_sentencepiece(path, family, cfg.seq_length)
    if converted.size > cfg.padded_vocab_size:
        raise UserError(
            f"{path}: {converted.size} tokens (with the special tokens) do not fit the model's "
            f"padded_vocab_size {cfg.padded_vocab_size}"
        )
    return converted


def convert_chatglm(
    src: Path,
    dst: Path,
    *,
    family: str | None = None,
    max_shard_gib: float = 1.0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Convert and publish; returns the conversion record (also written as DST/conversion.json)."""
    from transformers import GenerationConfig

    started = time.monotonic()
    src, dst = src.expanduser().resolve(), dst.expanduser().absolute()
    _check_paths(src, dst)
    if not max_shard_gib > 0:
        raise UserError(f"--max-shard-gib must be a positive number of GiB, got {max_shard_gib}")
    cfg = read_config(src)
    chosen, decided_by = detect_family(src, cfg.raw, family)
    found = scan(src)
    check_tensors(found, cfg, index_file(src) or weight_files(src)[0])
    converted = _tokenizer(src, chosen, cfg)
    stop_ids = [converted.ids[name] for name in chosen.stop_tokens]
    pad_id = converted.ids[chosen.pad]
    native = glm_config(cfg, eos_token_ids=stop_ids, pad_token_id=pad_id)
    notes = [*dropped_settings(cfg), *converted.notes]
    files = len(weight_files(src))
    log(f"{src}: {chosen.title} ({decided_by}), {cfg.num_layers} layers, {len(found)} tensors, {files} files")
    record: dict[str, Any] = {
        "source": str(src),
        "family": chosen.name,
        "decided_by": decided_by,
        "template": chosen.launcher_template,
        "stop_token_ids": stop_ids,
        "special_token_ids": converted.ids,
        "notes": notes,
    }

    def build(tmp: Path) -> None:
        native.save_pretrained(tmp)
        GenerationConfig(eos_token_id=stop_ids, pad_token_id=pad_id).save_pretrained(tmp)
        converted.tokenizer.save_pretrained(tmp)
        written = write_weights(found, cfg, tmp, max(1, int(max_shard_gib * GIB)), progress=log)
        record.update(
            weight_files=written.files,
            tensors=written.tensors,
            weight_bytes=written.total_bytes,
            time_s=round(time.monotonic() - started, 2),
        )
        (tmp / RECORD).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    try:
        build_once(dst, build)
    except OSError as exc:  # a full disk or an unwritable parent: the temporary build is already removed
        raise UserError(f"{dst}: cannot be written ({exc}); nothing was published") from None
    for note in notes:
        log(f"note: {note}")
    size_gib = record["weight_bytes"] / GIB
    log(f"{dst}: native GLM, {record['tensors']} tensors, {size_gib:.2f} GiB")
    log(f"train it with `template: {chosen.launcher_template}` (or its tokenizer's chat template)")
    return record
