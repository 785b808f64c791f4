"""Jinja chat templates that reproduce the original ChatGLM chat formats token for token.

The originals build a chat input by encoding each piece separately and joining the ids:
``[gMASK] sop`` then, per message, ``<|role|>`` + encode(metadata + "\\n") + encode(content). A
template renders ONE string, which the converted tokenizer splits only at special tokens, so the
rendering must tokenize to the same ids as those separate encodings:

- ChatGLM3 (sentencepiece, which starts every separately encoded piece with a word boundary "▁"):
  the content follows the line break after ONE space, so it starts a new word exactly as its own
  encoding does; an empty content adds nothing (its own encoding is empty).
- ChatGLM2 has no roles: its prompt is ``[Round n]\\n\\n问：...\\n\\n答：...`` encoded in one piece.
- GLM-4 (byte-level BPE, which splits at line breaks before letters): the content follows the line
  break directly. Content that itself starts with a line break merges with it (``\\n\\n`` is one
  token), which the original's separate encoding would not do.

``prefix`` is the rendered ``[gMASK]`` + ``sop`` pair (its names may differ, see chatglm_tokenizer).
"""

from __future__ import annotations

_ROLES = "['system', 'user', 'assistant', 'observation']"


def _role_check(model: str) -> str:
    return (
        "{%- if message['role'] not in " + _ROLES + " -%}"
        "{{ raise_exception('" + model + " roles are system, user, assistant and observation, not ' "
        "+ message['role']) }}"
        "{%- endif -%}"
    )


def chatglm3(prefix: str) -> str:
    """ChatGLM3's ``build_chat_input`` (tools in a system message are appended as indented JSON)."""
    return (
        prefix
        + "{%- for message in messages -%}"
        + _role_check("ChatGLM3")
        + "{%- set content = message['content'] -%}"
        "{%- if message['role'] == 'system' and 'tools' in message -%}"
        "{%- set content = content + '\\n' + (message['tools'] | tojson(indent=4)) -%}"
        "{%- endif -%}"
        "<|{{ message['role'] }}|>{{ message.get('metadata', '') }}{{ '\\n' }}"
        "{%- if content -%}{{ ' ' + content }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
    )


def chatglm2(prefix: str) -> str:
    """ChatGLM2's ``build_prompt``: user and assistant alternate, rounds count from 1, no system role."""
    return (
        prefix + "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' and loop.index0 % 2 == 0 -%}"
        "{{ '[Round ' ~ (loop.index0 // 2 + 1) ~ ']\\n\\n问：' + message['content'] + '\\n\\n答：' }}"
        "{%- elif message['role'] == 'assistant' and loop.index0 % 2 == 1 -%}"
        "{{ message['content'] + '\\n\\n' }}"
        "{%- else -%}"
        "{{ raise_exception('ChatGLM2 takes alternating user and assistant messages (no system role); '"
        " ~ 'message ' ~ loop.index0 ~ ' is ' + message['role']) }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


def glm4(prefix: str) -> str:
    """GLM-4's ``build_chat_input`` (tools in a system message are listed as the original lists them)."""
    return (
        prefix
        + "{%- for message in messages -%}"
        + _role_check("GLM-4")
        + "{%- set ns = namespace(content=message['content']) -%}"
        "{%- if message['role'] == 'system' and 'tools' in message -%}"
        "{%- for tool in message['tools'] -%}"
        "{%- set ns.content = ns.content + '\\n\\n## ' + tool['name'] + '\\n\\n' + (tool | tojson(indent=4))"
        " + '\\n在调用上述函数时，请使用 Json 格式表示调用的参数。' -%}"
        "{%- endfor -%}"
        "{%- endif -%}"
        "<|{{ message['role'] }}|>{{ message.get('metadata', '') }}{{ '\\n' + ns.content }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
    )
