"""GLM-4's original tokenizer: a tiktoken-style byte-level BPE file (``<base64 token> <rank>`` per line,
the rank being the token id) split by GLM-4's regular expression, as a ``tokenizer.json``.

transformers' ``TikTokenConverter`` builds the byte-level BPE; it only needs the file's ranks, read here
(the ``tiktoken`` package is not needed). Special tokens follow the ranks, as the original numbers them.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from launcher.convert.chatglm_tokenizer import ConvertedTokenizer, finish, special_names
from launcher.convert.families import Family
from launcher.errors import UserError

# GLM-4's split pattern (tokenization_chatglm.py of glm-4-9b), the same as cl100k's.
GLM4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def read_ranks(path: Path) -> dict[bytes, int]:
    """The mergeable ranks; every id from 0 to n-1 exactly once, as the model's embedding rows need."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError("expected '<base64 token> <rank>'")
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (ValueError, binascii.Error) as exc:
                raise UserError(f"{path}:{line_no}: not a tiktoken BPE line ({exc})") from None
            if token in ranks:
                raise UserError(f"{path}:{line_no}: token {token!r} appears twice")
            ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{path}: ranks are not 0..{len(ranks) - 1}, each once")
    return ranks


def convert_tiktoken(path: Path, family: Family, model_max_length: int) -> ConvertedTokenizer:
    from transformers.convert_slow_tokenizer import TikTokenConverter, bytes_to_unicode

    ranks = read_ranks(path)

    class _FromRanks(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return ranks

    core = _FromRanks(vocab_file=str(path), pattern=GLM4_PATTERN).converted()
    byte_chars = bytes_to_unicode()
    ordinary = {"".join(byte_chars[b] for b in token) for token in ranks}
    names = special_names(family, ordinary, path)
    return finish(
        core,
        family,
        base_vocab_size=len(ranks),
        names=names,
        plain_ids={},
        model_max_length=model_max_length,
        path=path,
    )
