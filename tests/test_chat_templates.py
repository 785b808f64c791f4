"""Chat templates: the loss covers exactly the assistant's tokens (the answer and its end-of-turn token),
found by rendering prefixes and comparing token sequences, for the families' formats; templates that
re-render earlier turns; tokenizers that merge across the prompt/answer boundary; truncation by whole
turns; and named templates as Jinja, so an export's apply_chat_template renders what training saw."""

from __future__ import annotations

from typing import Any

import pytest
from chat_helpers import char_tokenizer, masked
from families import CHATML, GLM4, LLAMA2, LLAMA3, PHI3

from launcher.data.formats import Example
from launcher.data.templates import TEMPLATES, ChatFormat, Template, conversation, get_template
from launcher.errors import UserError
from launcher.train.data import encode_example, encode_for_training, encode_prompt

EX = Example("x", [("Hi", "Hello")], "Name?", "Bob", system="Be brief.")
GLM_SPECIALS = ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|endoftext|>"]
FAMILY_TEMPLATES: dict[str, tuple[str, list[str], str, str | None]] = {
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], "<|im_end|>", None),
    "llama3": (
        LLAMA3,
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|eot_id|>",
        "<|begin_of_text|>",
    ),
    "llama2": (LLAMA2, ["<s>", "</s>"], "</s>", "<s>"),
    "glm4": (GLM4, GLM_SPECIALS, "<|endoftext|>", None),
    "phi3": (
        PHI3,
        ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"],
        "<|endoftext|>",
        None,
    ),
}
# the learned tokens in «»: every assistant turn (train_on: all); with train_on: last only the final one
EXPECTED_ALL = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\n«Hello<|im_end|>»\n<|im_start|>user\nName?<|im_end|>\n<|im_start|>assistant\n«Bob<|im_end|>»",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    "«Hello<|eot_id|>»<|start_header_id|>user<|end_header_id|>\n\nName?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n«Bob<|eot_id|>»",
    # bos and eos are written by the template itself, one pair per turn
    "llama2": "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]« Hello </s>»"
    "<s>[INST] Name? [/INST]« Bob </s>»",
    # no end-of-turn token of its own: the next role token ends a turn (as GLM-4's fine-tuning code does)
    "glm4": "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>«\nHello<|user|>»\nName?<|assistant|>"
    "«\nBob<|user|>»",
    # the template writes eos after the whole chat: the answer ends at <|end|>, what follows is dropped
    "phi3": "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n«Hello<|end|>»\n"
    "<|user|>\nName?<|end|>\n<|assistant|>\n«Bob<|end|>»",
}


def family_tokenizer(name: str) -> Any:
    template, specials, eos, bos = FAMILY_TEMPLATES[name]
    tokenizer = char_tokenizer(template, specials, eos=eos)
    if bos:
        tokenizer.bos_token = bos
    return tokenizer


@pytest.mark.parametrize("name", list(FAMILY_TEMPLATES))
def test_exact_masks_of_the_families_formats(name: str) -> None:
    tokenizer = family_tokenizer(name)
    (every,) = encode_example(EX, tokenizer, "auto", 512, 64, train_on="all")
    assert masked(every, tokenizer) == EXPECTED_ALL[name]
    (last,) = encode_example(EX, tokenizer, "auto", 512, 64, train_on="last")
    first_turn_learned = EXPECTED_ALL[name].split("»", 1)[0]
    assert (
        masked(last, tokenizer) == first_turn_learned.replace("«", "") + EXPECTED_ALL[name].split("»", 1)[1]
    )
    # the prompt for generation is exactly what training saw before the answer
    assert last.input_ids[: last.source_len] == encode_prompt(EX, tokenizer, "auto", 512)
    assert last.input_ids[: last.source_len] == tokenizer.apply_chat_template(
        conversation(EX.system, EX.history, EX.query), add_generation_prompt=True, return_dict=False
    )


def test_stop_tokens_include_the_end_of_turn() -> None:
    assert ChatFormat("auto", family_tokenizer("chatml")).stop_ids == [
        family_tokenizer("chatml").eos_token_id
    ]
    glm = family_tokenizer("glm4")
    assert ChatFormat("auto", glm).stop_ids == glm.convert_tokens_to_ids(["<|endoftext|>", "<|user|>"])
    chatml_base = char_tokenizer(CHATML, ["<|im_start|>", "<|im_end|>", "<|endoftext|>"], eos="<|endoftext|>")
    assert ChatFormat("auto", chatml_base).stop_ids == chatml_base.convert_tokens_to_ids(
        ["<|endoftext|>", "<|im_end|>"]
    )  # a base model's tokenizer (eos <|endoftext|>) trained on ChatML must stop at <|im_end|>


# Like Qwen3's template: reasoning is kept in the last assistant turn and dropped from earlier ones, so
# a turn renders differently once a later turn follows.
DROPS_PAST_REASONING = (
    "{%- for m in messages -%}"
    "{%- set content = m['content'] -%}"
    "{%- if m['role'] == 'assistant' and not loop.last and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1] -%}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def test_a_template_that_rewrites_earlier_turns_learns_each_turn_in_its_own_context() -> None:
    tokenizer = char_tokenizer(DROPS_PAST_REASONING, ["<|im_start|>", "<|im_end|>"], eos="<|im_end|>")
    ex = Example("r", [("Hi", "<think>hm</think>Hello")], "Name?", "<think>ok</think>Bob")
    encoded = encode_example(ex, tokenizer, "auto", 512, 64, train_on="all")
    assert [masked(e, tokenizer) for e in encoded] == [
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n«<think>hm</think>Hello<|im_end|>»",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nName?<|im_end|>\n"
        "<|im_start|>assistant\n«<think>ok</think>Bob<|im_end|>»",
    ]


def test_a_merge_across_the_prompt_answer_boundary_keeps_the_generation_prompt() -> None:
    """A BPE that merges the prompt's last character with the answer's first: the prompt stays exactly
    what generation is given, the answer is what follows it, tokenized on its own."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<|im_end|>": 1, ":": 2, "a": 3, "b": 4, "q": 5, "\n": 6, ":a": 7}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[(":", "a")]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    tokenizer.chat_template = (
        "{%- for m in messages -%}{{ m['content'] }}"
        "{%- if m['role'] == 'assistant' -%}<|im_end|>{%- else -%}:{%- endif -%}{%- endfor -%}"
    )
    enc = encode_for_training(Example("m", [], "q", "ab"), tokenizer, "auto", 64, 64)
    assert tokenizer.apply_chat_template(conversation(None, [], "q", "ab"), return_dict=False) == [5, 7, 4, 1]
    assert enc.input_ids == [5, 2, 3, 4, 1] and enc.source_len == 2
    assert enc.labels == [-100, -100, 3, 4, 1]


def test_truncation_drops_the_oldest_whole_turns_and_keeps_system_and_query() -> None:
    tokenizer = family_tokenizer("chatml")
    ex = Example("t", [("one", "1"), ("two", "2"), ("three", "3")], "Name?", "Bob", system="S")
    full = encode_example(ex, tokenizer, "auto", 512, 64, train_on="all")[0]
    assert not full.truncated
    keep_two = len(
        tokenizer.apply_chat_template(
            conversation("S", ex.history[1:], "Name?"), add_generation_prompt=True, return_dict=False
        )
    )
    (enc,) = encode_example(ex, tokenizer, "auto", keep_two, 64, train_on="all")
    assert enc.truncated and enc.source_len == keep_two
    assert masked(enc, tokenizer) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\ntwo<|im_end|>\n<|im_start|>assistant\n«2<|im_end|>»\n"
        "<|im_start|>user\nthree<|im_end|>\n<|im_start|>assistant\n«3<|im_end|>»\n"
        "<|im_start|>user\nName?<|im_end|>\n<|im_start|>assistant\n«Bob<|im_end|>»"
    )
    # one token less: one more whole turn goes, never the query
    (fewer,) = encode_example(ex, tokenizer, "auto", keep_two - 1, 64, train_on="all")
    assert "two" not in masked(fewer, tokenizer) and "three" in masked(fewer, tokenizer)
    assert masked(fewer, tokenizer).endswith("user\nName?<|im_end|>\n<|im_start|>assistant\n«Bob<|im_end|>»")
    # the answer is cut to max_target_length, its end-of-turn token kept
    (short,) = encode_example(ex, tokenizer, "auto", 512, 2)
    assert masked(short, tokenizer).endswith("«Bo<|im_end|>»")


def test_template_tokenizer_needs_a_chat_template() -> None:
    with pytest.raises(UserError, match="template: tokenizer, but the tokenizer has no chat template"):
        ChatFormat("tokenizer", char_tokenizer())
    assert ChatFormat("auto", char_tokenizer()).name == "chatglm"
    assert ChatFormat("auto", family_tokenizer("chatml")).name == "tokenizer"


CONVERSATIONS = [
    conversation(None, [], "你好"),
    conversation("Be brief.", [("Hi", "Hello"), ("{a} and {q}", "{query}")], "Name?"),
    conversation(None, [("Hi", "Hello")], "Name?", "Bob"),
]


@pytest.mark.parametrize("name", [*TEMPLATES, "custom"])
def test_named_templates_as_jinja_render_what_training_renders(name: str) -> None:
    spec = "Context:\n{history}Q: {query}\nA:" if name == "custom" else name
    template: Template = get_template(spec)
    tokenizer = char_tokenizer(template.to_jinja())
    fmt = ChatFormat(spec, tokenizer)
    for messages in CONVERSATIONS:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rendered == fmt.render(messages, add_generation_prompt=True)
    assert fmt.render(CONVERSATIONS[1], add_generation_prompt=True).startswith("Be brief.\n")
    if name == "chatglm":
        assert fmt.render(CONVERSATIONS[2], add_generation_prompt=False) == (
            "[Round 0]\n问：Hi\n答：Hello\n[Round 1]\n问：Name?\n答：Bob"
        )


def test_an_exported_named_template_gives_the_ids_training_saw() -> None:
    tokenizer = char_tokenizer()  # adds <bos> in front of plain text, as the built-in model's does
    exported = char_tokenizer(ChatFormat("chatglm", tokenizer).chat_template())
    for ex in (EX, Example("q", [], "你好", "好")):
        prompt = conversation(ex.system, ex.history, ex.query)
        ids = exported.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
        assert ids == encode_prompt(ex, tokenizer, "chatglm", 512)
        assert exported.convert_ids_to_tokens(ids[0]) == "<bos>"
