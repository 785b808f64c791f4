"""Which ChatGLM a model directory holds, read from its files as data (config.json, tokenizer files),
never by running its remote code; and the one sentence validate says about a ChatGLM that cannot run.

ChatGLM-6B (v1) has its own architecture (2D position ids, bidirectional attention over the prompt,
GeLU MLP with biases) and no native transformers equivalent: it does not convert. ChatGLM2-6B,
ChatGLM3-6B and GLM-4 are, in their published code, the network transformers ships as GLM; their
remote code targets transformers 4.x and fails under transformers 5, so launcher trains them converted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from launcher.convert.chatglm_tokenizer import TOKENIZER_MODEL, is_sentencepiece
from launcher.convert.families import CHATGLM2, CHATGLM3, FAMILIES, GLM4, Family
from launcher.errors import UserError

V1_WAY_OUT = (
    "it does not convert (2D position ids and prefix attention have no native equivalent): train "
    "ChatGLM2-6B or ChatGLM3-6B converted with `launcher convert chatglm SRC DST`, or a native GLM-4 "
    "(glm-4-9b-chat-hf); its own code needs transformers 4.27 (its README's pin), outside launcher"
)


def is_chatglm(raw: dict[str, Any]) -> bool:
    """The original THUDM remote-code family: model_type chatglm, or an auto_map into chatglm code."""
    auto_map = raw.get("auto_map")
    mapped = auto_map.values() if isinstance(auto_map, dict) else []
    return raw.get("model_type") == "chatglm" or any("chatglm" in str(target).lower() for target in mapped)


def is_v1(raw: dict[str, Any]) -> bool:
    """ChatGLM-6B's config has 2D positions / inner_hidden_size and no multi-query or padded-vocab keys."""
    if "position_encoding_2d" in raw or "inner_hidden_size" in raw:
        return True
    return "padded_vocab_size" not in raw and "ffn_hidden_size" not in raw and "vocab_size" in raw


def not_convertible_reason(raw: dict[str, Any]) -> str | None:
    """Why a config.json is not a ChatGLM2/3 or GLM-4 text model in the original layout; None when it is."""
    model_type = raw.get("model_type")
    if model_type == "glm":
        return "already a native GLM model (model_type glm): nothing to convert, train it as it is"
    if not is_chatglm(raw):
        return f"model_type is {model_type!r}, not chatglm: not an original ChatGLM2/3 or GLM-4 checkpoint"
    if is_v1(raw):
        return f"this is ChatGLM-6B (v1): {V1_WAY_OUT}"
    if "vision_config" in raw:
        return "this is GLM-4V, a vision-language model: only the text models (ChatGLM2/3, GLM-4) convert"
    return None


# --- which family ---------------------------------------------------------------------------------


def _name_hint(*names: Any) -> Family | None:
    for name in names:
        text = str(name or "").lower()
        if "chatglm3" in text:
            return CHATGLM3
        if "chatglm2" in text or "codegeex2" in text:
            return CHATGLM2
    return None


def detect_family(src: Path, raw: dict[str, Any], requested: str | None = None) -> tuple[Family, str]:
    """(family, how it was decided). ChatGLM2 and ChatGLM3 share the network and the sentencepiece
    vocabulary and differ only in the special tokens their tokenizer code adds, so the tokenizer files
    and names decide; GLM-4 is the one with a tiktoken-style tokenizer.model."""
    model = src / TOKENIZER_MODEL
    if not model.is_file():
        raise UserError(f"{model}: not found (the original tokenizer is converted too)")
    sentencepiece = is_sentencepiece(model)
    if requested is not None:
        family = FAMILIES[requested]
        if sentencepiece == (family is GLM4):
            kind = "a sentencepiece model" if sentencepiece else "a tiktoken-style BPE file"
            raise UserError(f"{model}: is {kind}, which --family {requested} does not use")
        return family, "--family"
    if not sentencepiece:
        return GLM4, f"{TOKENIZER_MODEL} is a tiktoken-style BPE file"
    tokenizer_config = _read_json(src / "tokenizer_config.json")
    added = tokenizer_config.get("added_tokens_decoder")
    contents = (
        [str(t.get("content")) for t in added.values() if isinstance(t, dict)]
        if isinstance(added, dict)
        else []
    )
    if "<|user|>" in str(tokenizer_config.get("chat_template", "")) or "<|user|>" in contents:
        return CHATGLM3, "tokenizer_config.json has the <|user|> token"
    code = src / "tokenization_chatglm.py"
    if code.is_file():  # read as text, never imported
        if "<|observation|>" in code.read_text(encoding="utf-8", errors="replace"):
            return CHATGLM3, "tokenization_chatglm.py defines the role tokens"
        return CHATGLM2, "tokenization_chatglm.py defines no role tokens"
    named = _name_hint(raw.get("_name_or_path"), tokenizer_config.get("name_or_path"), src.resolve().name)
    if named is not None:
        return named, "the model's name"
    raise UserError(
        f"{src}: cannot tell ChatGLM2-6B from ChatGLM3-6B (same network and vocabulary, different chat "
        "formats; no tokenization_chatglm.py or name to go by): pass --family chatglm2 or --family chatglm3"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# --- validate's sentence -----------------------------------------------------------------------

V1_ARCHS = ("chatglm-6b",)
"""Bundled descriptions (launcher/plan/arch_configs) of models that cannot run here: memory comparisons
only."""


def _cause() -> str:
    import transformers

    return (
        f"its remote code targets transformers 4.x and fails under the installed "
        f"{transformers.__version__} (its config, weight init and tuple KV cache predate transformers 5)"
    )


def unrunnable_reason(model_dir: Path, trust_remote_code: bool = False) -> str | None:
    """One sentence (the model, the cause, the way out) when the model in ``model_dir`` cannot run under
    the installed transformers, read from its config.json without running its code; None otherwise."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    raw = _read_json(model_dir / "config.json")
    if is_chatglm(raw):
        if is_v1(raw):
            return f"{model_dir} is ChatGLM-6B (v1), and {_cause()}; {V1_WAY_OUT}"
        if "vision_config" in raw:
            return f"{model_dir} is GLM-4V, and {_cause()}; launcher trains text models: use glm-4-9b-chat-hf"
        try:
            title = detect_family(model_dir, raw)[0].title
        except UserError:
            title = "ChatGLM2/3-6B"
        return (
            f"{model_dir} is {title} in its original layout, and {_cause()}; convert it once with "
            f"`launcher convert chatglm {model_dir} {model_dir}-glm` and set model.path to the result"
        )
    model_type = raw.get("model_type")
    if raw.get("auto_map") and model_type not in CONFIG_MAPPING_NAMES and not trust_remote_code:
        return (
            f"{model_dir} ({model_type}) is defined by its own code (auto_map in config.json), which loads "
            "only with model.trust_remote_code: true; set it if you trust that code, or use a release of the "
            "model that transformers supports natively"
        )
    return None


def arch_unrunnable_reason(arch: str) -> str | None:
    """One sentence when ``model.arch`` names a bundled model that cannot run here (ChatGLM-6B v1)."""
    if arch in V1_ARCHS:
        return f"model.arch {arch} is ChatGLM-6B (v1), and {_cause()}; {V1_WAY_OUT}"
    return None


def model_problem(model_path: str | None, arch: str | None, trust_remote_code: bool) -> str | None:
    """validate's one sentence when the spec's model cannot run here: read from the model directory's
    config.json when it is on this machine, else from ``model.arch``; None when nothing is known wrong."""
    if model_path is not None and (Path(model_path) / "config.json").is_file():
        return unrunnable_reason(Path(model_path), trust_remote_code)
    return arch_unrunnable_reason(arch) if arch is not None else None
