"""Prompt templates: how a conversation (system, earlier turns, the query, the answer) becomes text and ids.

A spec's ``template`` is one of:
- ``auto`` (the default): the tokenizer's own chat template when it has one; without one, ``chatglm``
  for a ChatGLM/GLM model (``model_type`` glm or chatglm: the built-in model) and the neutral ``plain``
  layout for every other model (a Qwen2 or Llama base must not learn ChatGLM's Chinese layout);
- ``tokenizer``: the tokenizer's chat template, rendered by ``tokenizer.apply_chat_template`` (an error
  when the tokenizer has none);
- a named template below, or a custom string containing ``{query}`` (and optionally ``{history}``,
  rendered as ``问：..\\n答：..\\n`` turns). Substitution is single-pass, so braces inside user data are
  never interpreted. A system message is put first, followed by a line break.

Tools: only the tokenizer's chat template renders tool-calling conversations (``tools=``, assistant
``tool_calls``, ``tool`` results; launcher.data.tool_calls). The named templates render text turns only:
data with tools or tool turns is refused with them (exit 2 at submit, naming the template), since
writing the calls in a layout the model never saw would teach it a format nobody parses. A chat template
that drops the tools, the calls or the results (checked on a probe conversation) is refused the same way.

``ChatFormat`` is the one object the data pipeline, generation and the export use for a (template,
tokenizer) pair; ``Template.to_jinja`` turns a named or custom template into a chat template, so an
export's ``apply_chat_template`` renders exactly what training saw.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.errors import UserError

QUERY = "{query}"
HISTORY = "{history}"
AUTO = "auto"
TOKENIZER = "tokenizer"
FALLBACK = "chatglm"
"""What ``auto`` means for a ChatGLM/GLM model whose tokenizer has no chat template (the built-in model)."""
NEUTRAL = "plain"
"""What ``auto`` means for any other model whose tokenizer has no chat template."""
CHATGLM_MODEL_TYPES = ("chatglm", "glm")
"""config.json ``model_type`` values of the ChatGLM family, whose own scripts use ChatGLM's layout."""
_PLACEHOLDER = re.compile(r"\{(i|q|a|query|history)\}")

Message = dict[str, Any]
PROBE_TOOL, PROBE_CALL, PROBE_RESULT = "probe_tool_offered", "probe_tool_called", "probe_tool_result"


def has_tools(messages: Sequence[Message], tools: Sequence[Any] | None) -> bool:
    return bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)


def named_tools_refusal(name: str) -> str:
    return (
        f"template: {name} renders text turns only, not tools, tool calls or tool results, and this data has "
        "them: use template: tokenizer (or auto) with a tokenizer whose chat template renders tools "
        "(apply_chat_template(..., tools=...)), or drop the tool records"
    )


def _fill(text: str, values: dict[str, str]) -> str:
    """Replace ``{i}``/``{q}``/``{a}``/``{query}``/``{history}`` in one pass (data is never re-scanned)."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)


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
            _fill(self.turn, {"i": str(self.first_round + i), "q": q, "a": a})
            for i, (q, a) in enumerate(history)
        )

    def render(self, history: Sequence[tuple[str, str]], query: str, system: str | None = None) -> str:
        head = f"{system}\n" if system is not None else ""
        if self.custom is not None:
            return head + _fill(self.custom, {"history": self.render_history(history), "query": query})
        last = _fill(self.last, {"i": str(self.first_round + len(history)), "query": query})
        return head + self.render_history(history) + last

    def to_jinja(self, prefix: str = "", suffix: str = "") -> str:
        """This template as a Jinja chat template: the same text as ``render`` for a conversation ending
        with a user message, plus the answer when it ends with an assistant message. ``prefix`` and
        ``suffix`` go around the prompt (the special tokens a tokenizer adds to plain text: bos, or
        ChatGLM-6B's [gMASK]<sop> after it)."""

        def expr(text: str, names: dict[str, str]) -> str:
            parts = []
            pos = 0
            for m in _PLACEHOLDER.finditer(text):
                if m.start() > pos:
                    parts.append(json.dumps(text[pos : m.start()], ensure_ascii=False))
                parts.append(names.get(m.group(1), json.dumps(m.group(0))))
                pos = m.end()
            if pos < len(text):
                parts.append(json.dumps(text[pos:], ensure_ascii=False))
            return " ~ ".join(parts) or '""'

        turn = expr(self.turn, {"i": f"({self.first_round} + ns.n)", "q": "m['content']", "a": "answer"})
        if self.custom is not None:
            last = expr(self.custom, {"history": "ns.history", "query": "m['content']"})
        else:
            last = expr(self.last, {"i": f"({self.first_round} + ns.n)", "query": "m['content']"})
        return (
            "{{ " + json.dumps(prefix, ensure_ascii=False) + " }}"
            "{%- set ns = namespace(last=-1, n=0, history='') -%}"
            "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last = loop.index0 -%}"
            "{%- endif -%}{%- endfor -%}"
            "{%- for m in messages -%}"
            "{%- if m['role'] == 'system' -%}{{ m['content'] ~ '\\n' }}"
            "{%- elif m['role'] == 'user' and loop.index0 < ns.last -%}"
            "{%- set answer = loop.nextitem['content'] if loop.nextitem is defined "
            "and loop.nextitem['role'] == 'assistant' else '' -%}"
            + (
                "{%- set ns.history = ns.history ~ " + turn + " -%}"
                if self.custom is not None
                else "{{ " + turn + " }}"
            )
            + "{%- set ns.n = ns.n + 1 -%}"
            "{%- elif m['role'] == 'user' -%}{{ "
            + last
            + " ~ "
            + json.dumps(suffix, ensure_ascii=False)
            + " }}"
            "{%- elif m['role'] == 'assistant' and loop.index0 > ns.last -%}{{ m['content'] }}"
            "{%- endif -%}"
            "{%- endfor -%}"
        )


TEMPLATES: dict[str, Template] = {
    # Named templates render text turns only: records with tools or tool turns are refused with them.
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
SPEC_CHOICES = f"{AUTO}, {TOKENIZER}, {', '.join(TEMPLATE_NAMES)}"


def get_template(spec: str) -> Template:
    """A named template, or a custom one when ``spec`` contains ``{query}``; otherwise a UserError."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    if QUERY in spec:
        return Template("custom", "问：{q}\n答：{a}\n", QUERY, custom=spec)
    raise UserError(
        f"unknown template {spec!r}: use one of {SPEC_CHOICES}, "
        "or a custom string containing {query} (and optionally {history})"
    )


def check_template(spec: str) -> None:
    """A spec's ``template`` value is valid (without the tokenizer: ``auto``/``tokenizer`` are checked
    against it when it is loaded)."""
    if spec not in (AUTO, TOKENIZER):
        get_template(spec)


def render_prompt(template: str, history: Sequence[tuple[str, str]], query: str) -> str:
    return get_template(template).render(history, query)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def auto_fallback(model_type: str | None) -> str:
    """The named template ``auto`` takes for a tokenizer without a chat template: ChatGLM's layout
    only for a ChatGLM/GLM model (None: not known, the built-in model's callers), else ``plain``."""
    if model_type is None or model_type in CHATGLM_MODEL_TYPES:
        return FALLBACK
    return NEUTRAL


def model_type_of(model_dir: Path | None) -> str | None:
    """``model_type`` from a model directory's config.json (None when it cannot be read)."""
    if model_dir is None:
        return None
    try:
        value = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return str(value) if value else None


def resolve_template(spec: str, tokenizer: Any, model_type: str | None = None) -> str:
    """``auto`` -> ``tokenizer`` when the tokenizer has a chat template, else ``auto_fallback``; the
    others stay as they are (``tokenizer`` without a chat template is a UserError)."""
    if spec == AUTO:
        return TOKENIZER if has_chat_template(tokenizer) else auto_fallback(model_type)
    if spec == TOKENIZER and not has_chat_template(tokenizer):
        raise UserError(
            "template: tokenizer, but the tokenizer has no chat template (no chat_template in its "
            "tokenizer_config.json or chat_template.jinja); choose a named template: "
            + ", ".join(TEMPLATE_NAMES)
        )
    if spec != TOKENIZER:
        get_template(spec)
    return spec


def template_used(spec: str, resolved: str) -> str:
    """What result.json, the plan and the rank log record as ``template_used``: ``tokenizer`` (its
    chat template), a named template, or ``custom:<hash>``; ``auto`` says what it chose and why."""
    name = resolved
    if resolved not in (TOKENIZER, *TEMPLATE_NAMES):
        name = "custom:" + hashlib.sha256(resolved.encode("utf-8")).hexdigest()[:8]
    if spec == AUTO and resolved != TOKENIZER:
        return f"{name} (auto: the tokenizer has no chat template)"
    return name


def conversation(
    system: str | None, history: Sequence[tuple[str, str]], query: str, answer: str | None = None
) -> list[Message]:
    out = [{"role": "system", "content": system}] if system is not None else []
    for question, reply in history:
        out += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    out.append({"role": "user", "content": query})
    if answer is not None:
        out.append({"role": "assistant", "content": answer})
    return out


class ChatFormat:
    """How conversations become text and token ids for one (template, tokenizer) pair.

    With the tokenizer's chat template the text is ``apply_chat_template``'s and is tokenized without
    adding special tokens (the template writes them). A named or custom template renders the prompt as
    ``Template.render`` does, tokenized WITH the tokenizer's special tokens (bos, ChatGLM's
    [gMASK]<sop>); its answer is the response text followed by eos.
    """

    def __init__(self, template: str, tokenizer: Any):
        self.spec = template
        self.tokenizer = tokenizer
        self.name = resolve_template(template, tokenizer)
        self.uses_chat_template = self.name == TOKENIZER
        self.named = None if self.uses_chat_template else get_template(self.name)
        if tokenizer.eos_token_id is None:
            raise UserError("the tokenizer has no eos token: set one in its tokenizer_config.json")
        self.eos_id = int(tokenizer.eos_token_id)
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.special_ids = frozenset(
            [*tokenizer.all_special_ids, *(i for i, tok in added.items() if getattr(tok, "special", False))]
        )

    def render(
        self, messages: Sequence[Message], *, add_generation_prompt: bool, tools: Sequence[Any] | None = None
    ) -> str:
        if self.uses_chat_template:
            extra = {"tools": list(tools)} if tools else {}
            return str(
                self.tokenizer.apply_chat_template(
                    list(messages), tokenize=False, add_generation_prompt=add_generation_prompt, **extra
                )
            )
        assert self.named is not None
        if has_tools(messages, tools):
            raise UserError(named_tools_refusal(self.name))
        system, pairs, query, answer = _split(messages)
        return self.named.render(pairs, query, system) + (answer or "")

    def ids(
        self, messages: Sequence[Message], *, add_generation_prompt: bool, tools: Sequence[Any] | None = None
    ) -> list[int]:
        text = self.render(messages, add_generation_prompt=add_generation_prompt, tools=tools)
        return list(self.tokenizer(text, add_special_tokens=not self.uses_chat_template)["input_ids"])

    def continuation_ids(self, text: str) -> list[int]:
        """Ids of text that follows a prompt (no special tokens added)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def split_answer(self, tail: Sequence[int]) -> tuple[list[int], int, bool]:
        """(answer ids, end-of-turn id, whether the eot is in ``tail``) for the ids after a prompt: the
        eot is the first special token (``<|im_end|>``, ``<|eot_id|>``, ``</s>``); for a template that
        writes none after the answer it is ``end_of_turn_id``."""
        for index, token in enumerate(tail):
            if token in self.special_ids:
                return list(tail[:index]), int(token), True
        return list(tail), self.end_of_turn_id, False

    @functools.cached_property
    def end_of_turn_id(self) -> int:
        """What ends an answer when the template writes no end-of-turn token after it: the special token
        the template puts right after an answer when a user turn follows (GLM-4's ``<|user|>``, as its
        own fine-tuning code appends), else eos."""
        if self.uses_chat_template:
            try:
                answered = self.ids(conversation(None, [], "1", "2"), add_generation_prompt=False)
                followed = self.ids(conversation(None, [("1", "2")], "3"), add_generation_prompt=False)
            except Exception:  # a template that refuses the probe: eos
                return self.eos_id
            nxt = len(answered)
            if followed[:nxt] == answered and nxt < len(followed) and followed[nxt] in self.special_ids:
                return int(followed[nxt])
        return self.eos_id

    @functools.cached_property
    def stop_ids(self) -> list[int]:
        """The tokens that end an answer in this format (eos and the template's end-of-turn token):
        generation must stop at every one of them."""
        stops = [self.eos_id]
        if self.uses_chat_template:
            try:
                prompt_ids = self.ids(conversation(None, [], "1"), add_generation_prompt=True)
                full = self.ids(conversation(None, [], "1", "2"), add_generation_prompt=False)
            except Exception:  # a template that refuses the probe: eos alone
                return stops
            _, eot, _ = self.split_answer(full[len(prompt_ids) :])
            stops += [eot] if eot not in stops else []
        return stops

    @functools.cached_property
    def tools_problem(self) -> str | None:
        """None when this format renders the tools, an assistant's calls and the tools' results (tried on
        a probe conversation); else why not, naming the template."""
        if not self.uses_chat_template:
            return named_tools_refusal(str(self.name))
        source = getattr(self.tokenizer, "name_or_path", "") or "the tokenizer"
        tool = {
            "type": "function",
            "function": {"name": PROBE_TOOL, "description": "probe", "parameters": {}},
        }
        call = {"type": "function", "function": {"name": PROBE_CALL, "arguments": {"x": 1}}}
        probe: list[Message] = [
            {"role": "user", "content": "1"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": PROBE_RESULT},
            {"role": "assistant", "content": "2"},
        ]
        try:
            text = self.render(probe, add_generation_prompt=False, tools=[tool])
        except Exception as exc:  # jinja's TemplateError, or raise_exception() in the template
            return f"template: the chat template of {source} refuses tool-calling conversations ({exc})"
        dropped = [
            what
            for what, mark in (
                ("the tools", PROBE_TOOL),
                ("tool calls", PROBE_CALL),
                ("tool results", PROBE_RESULT),
            )
            if mark not in text
        ]
        if dropped:
            return (
                f"template: the chat template of {source} does not render {' or '.join(dropped)}, and "
                "this data has them: the model would learn calls it cannot see; use a tokenizer whose "
                "chat template renders tools (apply_chat_template(..., tools=...)), or drop the tool records"
            )
        return None

    def assistant_sequences(
        self, messages: Sequence[Message], tools: Sequence[Any] | None, learn: Sequence[int]
    ) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """(ids, [start, end) spans to learn) for a conversation whose assistant messages ``learn`` (indices)
        are learned, calls included, results never: one sequence when each learned turn renders inside the
        whole conversation as it does when it is generated; else one sequence per learned turn, ending with
        it (a template that rewrites earlier turns)."""
        whole = self.ids(messages, add_generation_prompt=False, tools=tools)
        spans: list[tuple[int, int]] = []
        for i in learn:
            prompt = self.ids(messages[:i], add_generation_prompt=True, tools=tools)
            upto = self.ids(messages[: i + 1], add_generation_prompt=False, tools=tools)
            start = len(prompt)
            if upto[:start] != prompt or whole[:start] != prompt:
                break
            answer, _, written = self.split_answer(upto[start:])
            end = start + len(answer) + 1 if written else len(upto)
            if whole[:end] != upto[:end]:
                break
            if not written and end == len(whole):  # the last turn, no end-of-turn token: add it
                whole, end = [*whole, self.end_of_turn_id], end + 1
            elif not written and whole[end] in self.special_ids:  # the next turn's role token ends it
                end += 1
            spans.append((start, end))
        else:  # what follows the last learned turn is not trained on (as a plain example's sequence)
            return [(whole[: spans[-1][1]] if spans else whole, spans)]
        return [self._turn_alone(messages, tools, i) for i in learn]

    def _turn_alone(
        self, messages: Sequence[Message], tools: Sequence[Any] | None, i: int
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """The conversation up to assistant message ``i``, which is learned (its answer and end-of-turn)."""
        prompt = self.ids(messages[:i], add_generation_prompt=True, tools=tools)
        upto = self.ids(messages[: i + 1], add_generation_prompt=False, tools=tools)
        if upto[: len(prompt)] == prompt:
            tail = upto[len(prompt) :]
        else:  # the answer's first token merged with the prompt's last: tokenize what the answer adds
            head = self.render(messages[:i], add_generation_prompt=True, tools=tools)
            text = self.render(messages[: i + 1], add_generation_prompt=False, tools=tools)
            if not text.startswith(head):
                raise UserError(
                    "the chat template renders a conversation with an assistant turn differently from the "
                    "prompt it renders for generation, so the turn cannot be located"
                )
            tail = self.continuation_ids(text[len(head) :])
        answer, eot, _ = self.split_answer(tail)
        return [*prompt, *answer, eot], [(len(prompt), len(prompt) + len(answer) + 1)]

    def chat_template(self) -> str:
        """The chat template an export carries: the tokenizer's, or this named template as Jinja that
        also writes the special tokens the tokenizer adds to the prompt, so ``apply_chat_template`` on
        the export gives the ids training saw."""
        if self.uses_chat_template:
            return str(self.tokenizer.chat_template)
        assert self.named is not None
        probe = "1"
        plain = self.continuation_ids(probe)
        marked = list(self.tokenizer(probe, add_special_tokens=True)["input_ids"])
        at = next((i for i in range(len(marked)) if marked[i : i + len(plain)] == plain), 0)
        decode = self.tokenizer.decode
        return self.named.to_jinja(decode(marked[:at]), decode(marked[at + len(plain) :]))


def _split(messages: Sequence[Message]) -> tuple[str | None, list[tuple[str, str]], str, str | None]:
    """(system, pairs before the last user message, the last user message, the answer after it)."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    rest = list(messages[1:] if system is not None else messages)
    answer = rest.pop()["content"] if rest and rest[-1]["role"] == "assistant" else None
    query = rest.pop()["content"] if rest else ""
    pairs = [(rest[i]["content"], rest[i + 1]["content"]) for i in range(0, len(rest) - 1, 2)]
    return system, pairs, query, answer


@functools.lru_cache(maxsize=8)
def chat_format(template: str, tokenizer: Any) -> ChatFormat:
    """The ChatFormat of a (template, tokenizer) pair, built once (the probes render the template)."""
    return ChatFormat(template, tokenizer)
