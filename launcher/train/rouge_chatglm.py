"""ROUGE-1/2/L as ChatGLM's P-Tuning evaluation reports them, next to its BLEU-4.

ChatGLM-6B's ``ptuning/main.py`` (``compute_metrics``) segments each prediction and reference into
words with jieba, joins them with spaces, scores the pair with ``rouge_chinese.Rouge().get_scores``,
keeps the F of rouge-1, rouge-2 and rouge-l, rounds each x100 to 4 decimals and averages over the
examples. ChatGLM2-6B's version gives an example 0 when either side has no words (the library raises
on an empty text); we do the same. jieba and rouge_chinese are called, not re-derived. An example with
several references (ChatGLM's script has one) scores its best reference per metric.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
_LIBRARY_KEYS = {"rouge1": "rouge-1", "rouge2": "rouge-2", "rougeL": "rouge-l"}

_tokenizer: Any = None


def _words(text: str) -> str:
    """jieba's words joined by spaces, as ChatGLM's script builds the library's input."""
    global _tokenizer
    if _tokenizer is None:
        import jieba

        jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict..." lines in every rank log
        _tokenizer = jieba.dt
    return " ".join(_tokenizer.cut(text))


def sentence_rouge_chatglm(prediction: str, reference: str) -> dict[str, float]:
    """One example's ROUGE-1/2/L F x100, rounded like ChatGLM's script."""
    from rouge_chinese import Rouge

    hypothesis, target = _words(prediction), _words(reference)
    if not hypothesis.split() or not target.split():
        return dict.fromkeys(ROUGE_KEYS, 0.0)
    scores = Rouge().get_scores(hypothesis, target)[0]
    return {key: round(float(scores[name]["f"]) * 100, 4) for key, name in _LIBRARY_KEYS.items()}


def _best_of(prediction: str, references: str | Sequence[str]) -> dict[str, float]:
    if isinstance(references, str):
        return sentence_rouge_chatglm(prediction, references)
    scores = [sentence_rouge_chatglm(prediction, r) for r in references] or [dict.fromkeys(ROUGE_KEYS, 0.0)]
    return {key: max(s[key] for s in scores) for key in ROUGE_KEYS}


def rouge_chatglm(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]]
) -> dict[str, float | None]:
    """Mean of the per-example scores (an example's references: one string or several); None for no
    examples."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return dict.fromkeys(ROUGE_KEYS, None)
    per_example = [_best_of(p, r) for p, r in zip(predictions, references, strict=True)]
    return {key: sum(s[key] for s in per_example) / len(per_example) for key in ROUGE_KEYS}
