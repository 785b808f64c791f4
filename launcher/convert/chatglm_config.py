"""The original ChatGLM2/ChatGLM3/GLM-4 ``config.json``, read as JSON (never through its remote code),
checked for what the native GLM model can express, and mapped onto ``GlmConfig``.

Missing keys take the defaults of the original ``ChatGLMConfig``, so a config reads as the original
code would read it; the tensor shapes are then checked against it (``expected_shapes``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.convert.detect import not_convertible_reason
from launcher.errors import UserError

CONFIG = "config.json"

# The original ChatGLMConfig's defaults (configuration_chatglm.py of ChatGLM2/3 and GLM-4).
_DEFAULTS: dict[str, Any] = {
    "num_layers": 28,
    "padded_vocab_size": 65024,
    "hidden_size": 4096,
    "ffn_hidden_size": 13696,
    "kv_channels": 128,
    "num_attention_heads": 32,
    "seq_length": 2048,
    "hidden_dropout": 0.0,
    "layernorm_epsilon": 1e-5,
    "rmsnorm": True,
    "apply_residual_connection_post_layernorm": False,
    "post_layer_norm": True,
    "add_bias_linear": False,
    "add_qkv_bias": False,
    "multi_query_attention": False,
    "multi_query_group_num": 1,
    "rope_ratio": 1,
    "quantization_bit": 0,
    "pre_seq_len": None,
    "tie_word_embeddings": False,
}

# Settings the native GLM layer cannot express: (key, the value GLM needs, why it matters).
_REQUIRED: tuple[tuple[str, Any, str], ...] = (
    ("rmsnorm", True, "GLM normalises with RMSNorm, not LayerNorm"),
    ("post_layer_norm", True, "GLM always applies a final norm"),
    ("apply_residual_connection_post_layernorm", False, "GLM adds the residual before the norm"),
    ("add_bias_linear", False, "GLM's output projection and MLP have no bias"),
    ("quantization_bit", 0, "quantized weights cannot be converted; convert the full-precision model"),
    ("pre_seq_len", None, "this is a P-Tuning v2 checkpoint of the original code; convert its base model"),
)


@dataclass(frozen=True)
class ChatGLMConfig:
    """The original architecture's dimensions, as the original code derives them."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    kv_channels: int
    """Per-head width (the original's ``kv_channels``; hidden_size / heads when absent)."""
    multi_query_attention: bool
    num_kv_groups: int
    """``multi_query_group_num`` with multi-query attention, else one group per head."""
    ffn_hidden_size: int
    padded_vocab_size: int
    seq_length: int
    layernorm_epsilon: float
    rope_ratio: float
    qkv_bias: bool
    tie_word_embeddings: bool
    torch_dtype: str | None
    raw: dict[str, Any]

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.kv_channels

    @property
    def kv_dim(self) -> int:
        return self.num_kv_groups * self.kv_channels


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot be read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _positive(path: Path, key: str, value: Any, integer: bool = True) -> Any:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        raise UserError(
            f"{path}: {key} must be a positive {'integer' if integer else 'number'}, got {value!r}"
        )
    return value


def parse_config(path: Path, raw: dict[str, Any]) -> ChatGLMConfig:
    """The architecture a ChatGLM2/3 or GLM-4 config.json describes; a UserError naming the key when
    the native GLM model cannot reproduce it."""
    reason = not_convertible_reason(raw)
    if reason is not None:
        raise UserError(f"{path}: {reason}")
    for key, needed, why in _REQUIRED:
        value = raw.get(key, _DEFAULTS[key])
        if value != needed and not (needed == 0 and value is None):
            raise UserError(f"{path}: {key} is {value!r}; only {needed!r} converts ({why})")

    def get(key: str, integer: bool = True) -> Any:
        return _positive(path, key, raw.get(key, _DEFAULTS.get(key)), integer)

    hidden, heads = get("hidden_size"), get("num_attention_heads")
    kv_channels = raw.get("kv_channels")
    kv_channels = _positive(path, "kv_channels", hidden // heads if kv_channels is None else kv_channels)
    if kv_channels % 4:
        # Rotary covers half of each head in pairs of dims: the width must split into whole pairs.
        raise UserError(f"{path}: kv_channels {kv_channels} is not a multiple of 4")
    mqa = bool(raw.get("multi_query_attention", _DEFAULTS["multi_query_attention"]))
    groups = get("multi_query_group_num") if mqa else heads
    if heads % groups:
        raise UserError(
            f"{path}: num_attention_heads {heads} is not a multiple of multi_query_group_num {groups}"
        )
    layers = raw.get("num_layers", raw.get("num_hidden_layers", _DEFAULTS["num_layers"]))
    dtype = raw.get("torch_dtype") or raw.get("dtype")
    return ChatGLMConfig(
        num_layers=_positive(path, "num_layers", layers),
        hidden_size=hidden,
        num_attention_heads=heads,
        kv_channels=kv_channels,
        multi_query_attention=mqa,
        num_kv_groups=groups,
        ffn_hidden_size=get("ffn_hidden_size"),
        padded_vocab_size=get("padded_vocab_size"),
        seq_length=get("seq_length"),
        layernorm_epsilon=float(get("layernorm_epsilon", integer=False)),
        rope_ratio=float(get("rope_ratio", integer=False)),
        qkv_bias=bool(raw.get("add_qkv_bias", _DEFAULTS["add_qkv_bias"])),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        torch_dtype=str(dtype) if dtype else None,
        raw=raw,
    )


def dropped_settings(cfg: ChatGLMConfig) -> list[str]:
    """Training-only settings of the original that the native model does not have (said, not silent)."""
    notes = []
    dropout = cfg.raw.get("hidden_dropout", _DEFAULTS["hidden_dropout"])
    if dropout:
        notes.append(f"hidden_dropout {dropout} is not carried over (GLM has no residual dropout)")
    return notes


def read_config(src: Path) -> ChatGLMConfig:
    path = src / CONFIG
    return parse_config(path, read_json(path))


# --- the original tensors ------------------------------------------------------------------------

EMBEDDING = "transformer.embedding.word_embeddings.weight"
FINAL_NORM = "transformer.encoder.final_layernorm.weight"
OUTPUT_LAYER = "transformer.output_layer.weight"
LAYER_PREFIX = "transformer.encoder.layers"
ROTARY_BUFFER = "transformer.rotary_pos_emb.inv_freq"
"""A buffer the original recomputes from the config anyway; it carries no learned values."""


def layer_shapes(cfg: ChatGLMConfig) -> dict[str, tuple[int, ...]]:
    """One layer's tensors (names relative to the layer) and the shapes the config implies."""
    h = cfg.hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (h,),
        "self_attention.query_key_value.weight": (cfg.q_dim + 2 * cfg.kv_dim, h),
        "self_attention.dense.weight": (h, cfg.q_dim),
        "post_attention_layernorm.weight": (h,),
        "mlp.dense_h_to_4h.weight": (2 * cfg.ffn_hidden_size, h),
        "mlp.dense_4h_to_h.weight": (h, cfg.ffn_hidden_size),
    }
    if cfg.qkv_bias:
        shapes["self_attention.query_key_value.bias"] = (cfg.q_dim + 2 * cfg.kv_dim,)
    return shapes


def expected_shapes(cfg: ChatGLMConfig) -> dict[str, tuple[int, ...]]:
    """Every learned tensor of the original model and its shape, from the config alone."""
    shapes = {EMBEDDING: (cfg.padded_vocab_size, cfg.hidden_size), FINAL_NORM: (cfg.hidden_size,)}
    for i in range(cfg.num_layers):
        for name, shape in layer_shapes(cfg).items():
            shapes[f"{LAYER_PREFIX}.{i}.{name}"] = shape
    if not cfg.tie_word_embeddings:
        shapes[OUTPUT_LAYER] = (cfg.padded_vocab_size, cfg.hidden_size)
    return shapes


def shape_source(cfg: ChatGLMConfig) -> str:
    """The config values a shape mismatch is checked against, for the error message."""
    return (
        f"hidden_size {cfg.hidden_size}, num_attention_heads {cfg.num_attention_heads}, kv_channels "
        f"{cfg.kv_channels}, {cfg.num_kv_groups} key/value groups, ffn_hidden_size {cfg.ffn_hidden_size}, "
        f"padded_vocab_size {cfg.padded_vocab_size}"
    )


# --- the native config ---------------------------------------------------------------------------


def glm_config(cfg: ChatGLMConfig, *, eos_token_ids: list[int], pad_token_id: int) -> Any:
    """The ``GlmConfig`` of the same network: rotary on half of each head (adjacent pairs, as the
    original), base 10000 x rope_ratio, the padded vocabulary, and the original's stop tokens."""
    from transformers import GlmConfig

    kwargs: dict[str, Any] = {}
    if cfg.torch_dtype:
        kwargs["dtype"] = cfg.torch_dtype
    return GlmConfig(
        vocab_size=cfg.padded_vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_kv_groups,
        head_dim=cfg.kv_channels,
        hidden_act="silu",
        attention_dropout=0.0,  # the original's SDPA path applies no attention dropout
        max_position_embeddings=cfg.seq_length,
        rms_norm_eps=cfg.layernorm_epsilon,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0 * cfg.rope_ratio,
            "partial_rotary_factor": 0.5,
        },
        attention_bias=cfg.qkv_bias,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_ids if len(eos_token_ids) > 1 else eos_token_ids[0],
        bos_token_id=None,
        architectures=["GlmForCausalLM"],
        **kwargs,
    )
