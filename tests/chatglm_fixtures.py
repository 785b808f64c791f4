"""Tiny checkpoints in the ORIGINAL ChatGLM layout (built with tests/chatglm_reference.py) and their
conversions by `launcher convert chatglm`, built once per test session and shared by the test modules.

Cases (each a different way the original can be laid out or configured):
- chatglm3: multi-query attention (2 groups), qkv bias, one model.safetensors, a sentencepiece tokenizer
  (trained here on the bundled dialogue corpus), named THUDM/chatglm3-6b like the real config.json;
- chatglm2_bin: the same network as three pytorch_model-*.bin shards with their index, named chatglm2;
- mha_rope: no multi-query attention (q/k/v interleaved per head), no qkv bias, rope_ratio 50, heads
  wider than hidden_size / heads, two safetensors shards, converted into many small output shards;
- glm4: a tiktoken-style byte-level BPE tokenizer (GLM-4's), rope_ratio 500.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import chatglm_reference as ref
import torch

from launcher.cli import main

ENGLISH = [
    "Hello world, this is a sophisticated tokenizer test.",
    "The quick brown fox jumps over the lazy dog 12345 times.",
    "Please answer in one line: what is 2 + 2?",
]


@dataclass(frozen=True)
class Case:
    name: str
    src: Path
    dst: Path
    cfg: ref.OriginalConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Any
    """The reference tokenizer (SentencePieceReference or TiktokenReference)."""
    family: str

    @property
    def vocab(self) -> int:
        """Ids the tokenizer can produce (the rest of the padded vocabulary is never used)."""
        return len(self.tokenizer.special) + (
            self.tokenizer.sp.get_piece_size() if hasattr(self.tokenizer, "sp") else len(self.tokenizer.ranks)
        )


def corpus() -> list[str]:
    from launcher.builtins.demo_data import pretraining_corpus

    return pretraining_corpus(400) + ENGLISH * 30


def _checkpoint(
    root: Path,
    name: str,
    cfg: ref.OriginalConfig,
    seed: int,
    tokenizer_file: Path,
    *,
    fmt: str = "safetensors",
    shards: int = 1,
) -> tuple[Path, dict[str, torch.Tensor]]:
    src = root / name
    weights = ref.random_weights(cfg, seed)
    ref.save_checkpoint(src, cfg, weights, fmt=fmt, shards=shards)
    (src / "tokenizer.model").write_bytes(tokenizer_file.read_bytes())
    return src, weights


_BUILT: dict[Path, dict[str, Case]] = {}


def chatglm_cases(root: Path) -> dict[str, Case]:
    """Every case's original checkpoint and its conversion (built on the first call for ``root``)."""
    if root in _BUILT:
        return _BUILT[root]
    root.mkdir(parents=True, exist_ok=True)
    texts = corpus()
    sp_file = root / "sentencepiece.model"
    ref.train_sentencepiece(texts, sp_file, vocab_size=1200)
    tiktoken_file = root / "tiktoken.model"
    ranks = ref.train_byte_bpe(texts[:150] + ENGLISH * 20, merges=200)
    ref.write_tiktoken(ranks, tiktoken_file)
    sp3 = ref.SentencePieceReference(sp_file, ref.CHATGLM3_SPECIALS)
    sp2 = ref.SentencePieceReference(sp_file, ref.CHATGLM2_SPECIALS)
    tiktoken = ref.TiktokenReference(ranks)
    named = {"eos_token_id": 2, "pad_token_id": 0}
    specs: list[tuple[str, ref.OriginalConfig, dict[str, Any], Any, str, list[str]]] = [
        (
            "chatglm3",
            ref.OriginalConfig(extra={"_name_or_path": "THUDM/chatglm3-6b", **named}),
            {},
            sp3,
            "chatglm3",
            [],
        ),
        (
            "chatglm2_bin",
            ref.OriginalConfig(extra={"_name_or_path": "THUDM/chatglm2-6b", **named}),
            {"fmt": "bin", "shards": 3},
            sp2,
            "chatglm2",
            [],
        ),
        (
            "mha_rope",
            ref.OriginalConfig(
                multi_query_attention=False, kv_channels=24, add_qkv_bias=False, rope_ratio=50.0, extra=named
            ),
            {"shards": 2},
            sp3,
            "chatglm3",
            ["--family", "chatglm3", "--max-shard-gib", "0.0001"],
        ),
        (
            "glm4",
            ref.OriginalConfig(
                padded_vocab_size=512,
                rope_ratio=500.0,
                extra={"eos_token_id": [len(tiktoken.ranks)], "pad_token_id": len(tiktoken.ranks)},
            ),
            {},
            tiktoken,
            "glm4",
            [],
        ),
    ]
    cases = {}
    for seed, (name, cfg, layout, tokenizer, family, options) in enumerate(specs):
        tokenizer_file = tiktoken_file if family == "glm4" else sp_file
        src, weights = _checkpoint(root / "original", name, cfg, seed, tokenizer_file, **layout)
        dst = root / "converted" / name
        assert main(["convert", "chatglm", str(src), str(dst), *options]) == 0
        cases[name] = Case(name, src, dst, cfg, weights, tokenizer, family)
    _BUILT[root] = cases
    return cases
