"""Prompt templates: how a ChatGLM-style (history, query) pair becomes the source text.

A spec's ``template`` is either a name below or a custom string containing ``{query}`` (and optionally
``{history}``, rendered as ``问：..\\n答：..\\n`` turns). Substitution is plain string replacement, so
braces inside user data are never interpreted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from launcher.errors import UserError

QUERY = "{query}"
HISTORY = "{history}"


@dataclass(frozen=True)
class Template:
    """``turn`` renders one past (q, a) pair; ``last`` renders the current query. ``{i}`` is the round."""

    name: str
    turn: str
    last: str
    first_round: int = 0
    custom: str | None = None

    def render_history(self, history: Sequence[tuple[str, str]]) -> str:
        return "".join(
            self.turn.replace("{i}", str(self.first_round + i)).replace("{q}", q).replace("{a}", a)
            for i, (q, a) in enumerate(history)
        )

    def split(self, history: Sequence[tuple[str, str]], query: str) -> tuple[str, str, str]:
        """(text before the query, the query, text after it): lets truncation cut the query alone."""
        if self.custom is not None:
            head, _, tail = self.custom.partition(QUERY)
            hist = self.render_history(history)
            return head.replace(HISTORY, hist), query, tail.replace(HISTORY, hist)
        last = self.last.replace("{i}", str(self.first_round + len(history)))
        head, _, tail = last.partition(QUERY)
        return self.render_history(history) + head, query, tail

    def render(self, history: Sequence[tuple[str, str]], query: str) -> str:
        return "".join(self.split(history, query))


TEMPLATES: dict[str, Template] = {
    # ChatGLM-6B's own multi-turn format (ptuning/main.py in THUDM/ChatGLM-6B).
    "chatglm": Template("chatglm", "[Round {i}]\n问：{q}\n答：{a}\n", "[Round {i}]\n问：{query}\n答："),
    # ChatGLM2-6B: rounds count from 1 and turns are separated by blank lines.
    "chatglm2": Template(
        "chatglm2",
        "[Round {i}]\n\n问：{q}\n\n答：{a}\n\n",
        "[Round {i}]\n\n问：{query}\n\n答：",
        first_round=1,
    ),
    # ChatGLM3-6B / GLM-4 converted by `launcher convert chatglm`: the original chat layout, role tokens
    # included. ChatGLM3's sentencepiece pieces start each separately encoded part with a word boundary,
    # hence " " after each role's line break (the converted tokenizer's chat template does the same).
    "chatglm3": Template(
        "chatglm3", "<|user|>\n {q}<|assistant|>\n {a}", "<|user|>\n {query}<|assistant|>\n"
    ),
    "glm4": Template("glm4", "<|user|>\n{q}<|assistant|>\n{a}", "<|user|>\n{query}<|assistant|>\n"),
    "alpaca": Template(
        "alpaca",
        "### Instruction:\n{q}\n\n### Response:\n{a}\n\n",
        "### Instruction:\n{query}\n\n### Response:\n",
    ),
    "plain": Template("plain", "{q}\n{a}\n", "{query}\n"),
}
TEMPLATE_NAMES: tuple[str, ...] = tuple(TEMPLATES)


def get_template(spec: str) -> Template:
    """A named template, or a custom one when ``spec`` contains ``{query}``; otherwise a UserError."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    if QUERY in spec:
        return Template("custom", "问：{q}\n答：{a}\n", QUERY, custom=spec)
    raise UserError(
        f"unknown template {spec!r}: use one of {', '.join(TEMPLATE_NAMES)}, "
        "or a custom string containing {query} (and optionally {history})"
    )


def render_prompt(template: str, history: Sequence[tuple[str, str]], query: str) -> str:
    return get_template(template).render(history, query)
