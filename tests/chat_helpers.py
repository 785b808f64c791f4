"""Character-level tokenizers with chat templates, and a readable view of a label mask.

One token per character (plus the special tokens as single tokens) makes every expected label mask
exact and readable: ``masked(enc, tokenizer)`` writes the sequence with the learned tokens in «».
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

from launcher.train.data import IGNORE_INDEX, Encoded

EXTRA_CHARS = "问答：，。？！你好我叫李明什么是助手"


def char_tokenizer(chat_template: str | None = None, specials: Sequence[str] = (), eos: str = "<eos>") -> Any:
    """The built-in model's kind of tokenizer (one token per character, ``<bos>`` in front of plain
    text) with ``specials`` as special tokens, ``eos`` and a chat template."""
    from tokenizers import AddedToken

    from launcher.builtins.tiny import SPECIAL_TOKENS, build_tokenizer

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(set(string.printable) - {"\r", "\x0b", "\x0c"} | set(EXTRA_CHARS)):
        vocab[ch] = len(vocab)
    tokenizer = build_tokenizer(vocab)
    if specials:
        tokenizer.add_tokens(
            [AddedToken(s, special=True, normalized=False) for s in specials], special_tokens=True
        )
    tokenizer.eos_token = eos
    tokenizer.chat_template = chat_template
    return tokenizer


def masked(enc: Encoded, tokenizer: Any) -> str:
    """The sequence as text, each run of learned tokens in «»; checks that labels copy the inputs."""
    out = []
    inside = False
    for token, label in zip(enc.input_ids, enc.labels, strict=True):
        learned = label != IGNORE_INDEX
        assert not learned or label == token, (label, token)
        if learned != inside:
            out.append("«" if learned else "»")
            inside = learned
        out.append(tokenizer.convert_ids_to_tokens(token))
    return "".join(out) + ("»" if inside else "")
