"""Why a tokenizer cannot serve, in the spec's terms: said the same way by the pre-flight (before
anything is queued) and by a rank (a run dir written by hand, or the files changed since).

transformers' own message for a model directory without tokenizer files says neither where it
looked nor what to set ("Couldn't instantiate the backend tokenizer from one of: ..."), and for some
families it silently builds a tokenizer with almost no vocabulary from the config alone.
"""

from __future__ import annotations

from pathlib import Path

MIN_TOKENIZER_TOKENS = 32
"""Fewer tokens than this is no real vocabulary (byte-level vocabularies alone have 256)."""

_WHERE = "(tokenizer.json, tokenizer.model or vocab files)"


def tokenizer_load_problem(directory: Path, exc: BaseException, tokenizer_path: str | None) -> str:
    text = str(exc).strip()
    cause = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
    what = f"the tokenizer in {directory} does not load ({cause})"
    if tokenizer_path:
        return f"{what}; tokenizer.path must name a directory with the tokenizer's files {_WHERE}"
    return (
        f"{what}; the model directory has no usable tokenizer: set tokenizer.path to the directory that "
        f"holds it {_WHERE}"
    )


def empty_tokenizer_problem(tokens: int) -> str:
    return (
        f"the tokenizer has only {tokens} tokens: its directory holds no vocabulary {_WHERE}; "
        "set tokenizer.path to the directory that holds the model's tokenizer"
    )
