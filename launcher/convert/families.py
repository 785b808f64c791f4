"""What differs between ChatGLM2-6B, ChatGLM3-6B and GLM-4 once the network is the same: the special
tokens the original tokenizers append after their base vocabulary, the prompt prefix, the stop tokens
of the original ``chat()``, the chat format, and launcher's named template for training data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from launcher.convert import chat_templates

_GLM_MASKS = ("[MASK]", "[gMASK]", "[sMASK]")
_ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    special_tokens: tuple[str, ...]
    """In id order, from the first id after the base vocabulary (as the original tokenizer numbers them)."""
    prefix: tuple[str, str]
    """Prepended to every encoded input: ``[gMASK]`` and the start-of-piece token."""
    eos: str
    """The tokenizer's end-of-sequence token (the original ``eos_token``), appended after a response."""
    stop_tokens: tuple[str, ...]
    """The original ``chat()``'s ``eos_token_id`` list, in its order."""
    pad: str
    unk: str | None
    template: Callable[[str], str]
    """The jinja chat template, given the rendered prefix."""
    launcher_template: str
    """launcher's named template (launcher.data.templates) that lays out training data like the original."""


CHATGLM2 = Family(
    name="chatglm2",
    title="ChatGLM2-6B",
    special_tokens=(*_GLM_MASKS, "sop", "eop"),
    prefix=("[gMASK]", "sop"),
    eos="</s>",
    stop_tokens=("</s>",),
    pad="<unk>",
    unk="<unk>",
    template=chat_templates.chatglm2,
    launcher_template="chatglm2",
)
CHATGLM3 = Family(
    name="chatglm3",
    title="ChatGLM3-6B",
    special_tokens=(*_GLM_MASKS, "sop", "eop", *_ROLES),
    prefix=("[gMASK]", "sop"),
    eos="</s>",
    stop_tokens=("</s>", "<|user|>", "<|observation|>"),
    pad="<unk>",
    unk="<unk>",
    template=chat_templates.chatglm3,
    launcher_template="chatglm3",
)
GLM4 = Family(
    name="glm4",
    title="GLM-4",
    special_tokens=(
        "<|endoftext|>",
        *_GLM_MASKS,
        "<sop>",
        "<eop>",
        *_ROLES,
        "<|begin_of_image|>",
        "<|end_of_image|>",
        "<|begin_of_video|>",
        "<|end_of_video|>",
    ),
    prefix=("[gMASK]", "<sop>"),
    eos="<|endoftext|>",
    stop_tokens=("<|endoftext|>", "<|user|>", "<|observation|>"),
    pad="<|endoftext|>",
    unk=None,
    template=chat_templates.glm4,
    launcher_template="glm4",
)
FAMILIES: dict[str, Family] = {f.name: f for f in (CHATGLM2, CHATGLM3, GLM4)}
