"""ChatGLM's published BLEU-4, so our numbers compare with the ChatGLM P-Tuning README and papers.

ChatGLM-6B's ``ptuning/main.py`` scores each example with nltk's ``sentence_bleu`` over *characters*
(``list(label)``, ``list(pred)``), smoothing method 3, rounds each score x100 to 4 decimals and
averages. That is a different number from sacrebleu's corpus BLEU (word-segmented, corpus-level),
hence its own name, ``bleu4_chatglm``. We call nltk itself rather than re-deriving its smoothing.
"""

from __future__ import annotations

from collections.abc import Sequence


def sentence_bleu4_chatglm(prediction: str, reference: str | Sequence[str]) -> float:
    """One example's character BLEU-4 x100, rounded like ChatGLM's script (several references: nltk's
    multi-reference sentence BLEU)."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    refs = [reference] if isinstance(reference, str) else list(reference)
    smoothing = SmoothingFunction().method3
    score = sentence_bleu([list(r) for r in refs], list(prediction), smoothing_function=smoothing)
    return round(float(score) * 100, 4)


def bleu4_chatglm(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean of the per-example scores (0.0 for no examples)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return 0.0
    scores = [sentence_bleu4_chatglm(p, r) for p, r in zip(predictions, references, strict=True)]
    return sum(scores) / len(scores)
