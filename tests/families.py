"""Tiny random-weight models of the architecture families people fine-tune, built from transformers' own
config classes (no download), each with a tokenizer trained here and a chat template in its family's
format. Built once per cache (``LAUNCHER_CACHE_DIR``) and shared by every test process.

| family  | class              | what it exercises                                                    |
|---------|--------------------|----------------------------------------------------------------------|
| qwen2   | Qwen2ForCausalLM   | Qwen2/2.5: GQA, q/k/v bias, tied embeddings, ChatML + default system  |
| llama3  | LlamaForCausalLM   | Llama 3: GQA (4 heads, 1 KV head), header tokens, <|eot_id|>, no pad  |
| llama2  | LlamaForCausalLM   | Llama 2 chat: MHA, Metaspace BPE, [INST] with <s>/</s> in the text    |
| glm4    | GlmForCausalLM     | GLM-4-9B-chat-hf: fused gate_up, head_dim != hidden/heads, no EOT     |
| glm4-0414 | Glm4ForCausalLM  | GLM-4-0414: extra post-norms, same chat format                        |
| phi3    | Phi3ForCausalLM    | Phi-3: fused qkv_proj and gate_up_proj, <|end|>, eos after the chat   |
| gpt2    | GPT2LMHeadModel    | Conv1D projections, tied embeddings, no chat template                 |

The chat templates are written here in each family's published format; they are not the vendors' files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUILDER_VERSION = 1
HIDDEN = 64
LAYERS = 2
HEADS = 4
FFN = 128

CHATML = (
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ (m['content'] | trim) + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{% set chat = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set chat = messages %}{% endif %}"
    "{% for m in chat %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if m['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + (system if loop.first else '') + (m['content'] | trim) + ' [/INST]' }}"
    "{% else %}{{ ' ' + (m['content'] | trim) + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
GLM4 = (
    "[gMASK]<sop>"
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PHI3 = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)


LLAMA3_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
GLM4_SPECIALS = (
    "<|endoftext|>",
    "[gMASK]",
    "<sop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
)


@dataclass(frozen=True)
class Family:
    name: str
    config_class: str
    config: dict[str, Any]
    specials: tuple[str, ...]
    eos: str
    bos: str | None = None
    pad: str | None = None
    add_bos: bool = False
    """The tokenizer puts bos in front of plain text (Llama's add_bos_token)."""
    chat_template: str | None = None
    generation_eos: tuple[str, ...] = ()
    """Extra stop tokens in generation_config.json (the vendors ship these)."""
    metaspace: bool = False
    """SentencePiece-style pre-tokenizer (Llama 2) instead of byte-level BPE."""
    lora_attention: tuple[str, ...] = field(default=())
    """The attention projections a user names for LoRA on this family."""


# GLM-4-9B-chat-hf and GLM-4-0414 share the tokenizer and the chat format
GLM4_CHAT: dict[str, Any] = {
    "specials": GLM4_SPECIALS,
    "eos": "<|endoftext|>",
    "pad": "<|endoftext|>",
    "chat_template": GLM4,
    "generation_eos": ("<|user|>", "<|observation|>"),
    "lora_attention": ("q_proj", "v_proj"),
}
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "qwen2",
            "Qwen2Config",
            {"num_key_value_heads": 2, "tie_word_embeddings": True},
            ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
            eos="<|im_end|>",
            pad="<|endoftext|>",
            chat_template=CHATML,
            generation_eos=("<|endoftext|>",),
            lora_attention=("q_proj", "v_proj"),
        ),
        Family(
            "llama3",
            "LlamaConfig",
            {"num_key_value_heads": 1, "tie_word_embeddings": False},
            LLAMA3_SPECIALS,
            eos="<|eot_id|>",
            bos="<|begin_of_text|>",
            add_bos=True,
            chat_template=LLAMA3,
            generation_eos=("<|end_of_text|>",),
            lora_attention=("q_proj", "v_proj"),
        ),
        Family(
            "llama2",
            "LlamaConfig",
            {"num_key_value_heads": HEADS},
            ("<unk>", "<s>", "</s>"),
            eos="</s>",
            bos="<s>",
            add_bos=True,
            chat_template=LLAMA2,
            metaspace=True,
            lora_attention=("q_proj", "v_proj"),
        ),
        Family(
            "glm4",
            "GlmConfig",
            {"num_key_value_heads": 2, "head_dim": 24, "attention_bias": True},
            **GLM4_CHAT,
        ),
        Family("glm4-0414", "Glm4Config", {"num_key_value_heads": 2, "head_dim": 16}, **GLM4_CHAT),
        Family(
            "phi3",
            "Phi3Config",
            {"num_key_value_heads": 2},
            ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
            eos="<|endoftext|>",
            pad="<|endoftext|>",
            chat_template=PHI3,
            generation_eos=("<|assistant|>", "<|end|>"),
            lora_attention=("qkv_proj",),
        ),
        Family(
            "gpt2",
            "GPT2Config",
            {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_positions": 512},
            ("<|endoftext|>",),
            eos="<|endoftext|>",
            bos="<|endoftext|>",
            lora_attention=("c_attn",),
        ),
    )
}


def _corpus() -> list[str]:
    from launcher.builtins import demo_data

    return demo_data.pretraining_corpus(600)


def build_tokenizer(family: Family) -> Any:
    """A BPE tokenizer trained on the bundled corpus (byte-level like Qwen/Llama 3/GLM-4/GPT-2, or
    SentencePiece-style like Llama 2), with the family's special tokens, bos/eos/pad and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if family.metaspace:
        core = Tokenizer(models.BPE(unk_token="<unk>"))
        core.pre_tokenizer = pre_tokenizers.Metaspace()
        core.decoder = decoders.Metaspace()
        alphabet: list[str] = []
    else:
        core = Tokenizer(models.BPE())
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=list(family.specials), initial_alphabet=alphabet, show_progress=False
    )
    core.train_from_iterator([*_corpus(), "[INST] <<SYS>> [/INST] system user assistant"], trainer=trainer)
    if family.add_bos and family.bos:
        bos = (family.bos, core.token_to_id(family.bos))
        core.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A $B", special_tokens=[bos]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=family.eos,
        bos_token=family.bos,
        pad_token=family.pad,
        unk_token="<unk>" if family.metaspace else None,
        model_max_length=512,
    )
    if family.chat_template:
        tokenizer.chat_template = family.chat_template
    return tokenizer


def _model_config(family: Family, tokenizer: Any) -> Any:
    import transformers

    ids = {
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.convert_tokens_to_ids(family.eos),
        "bos_token_id": tokenizer.convert_tokens_to_ids(family.bos) if family.bos else None,
        "pad_token_id": tokenizer.convert_tokens_to_ids(family.pad) if family.pad else None,
    }
    shape = {
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "max_position_embeddings": 512,
    }
    if family.config_class == "GPT2Config":
        shape = {}
    return getattr(transformers, family.config_class)(**shape, **ids, **family.config)


def build_hash(family: Family) -> str:
    settings = {"builder": BUILDER_VERSION, "family": family.__dict__, "shape": [HIDDEN, LAYERS, HEADS, FFN]}
    key = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def build_family_model(name: str, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    family = FAMILIES[name]
    tokenizer = build_tokenizer(family)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_model_config(family, tokenizer), dtype=torch.float32)
    stops = [family.eos, *family.generation_eos]
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(t) for t in stops]
    if family.pad:
        model.generation_config.pad_token_id = tokenizer.convert_tokens_to_ids(family.pad)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def ensure_family_model(name: str, cache_dir: Path | None = None) -> Path:
    """The family's model directory (config, safetensors weights, tokenizer), built once and cached."""
    from launcher.builtins.cache import build_once
    from launcher.builtins.cache import cache_dir as default_cache_dir

    root = cache_dir or default_cache_dir()
    target = root / f"test-family-{name}-{build_hash(FAMILIES[name])}"
    return build_once(target, lambda tmp: build_family_model(name, tmp))
