"""Model architectures for planning: exact parameter names and sizes without any weights.

Two sources, both exact:
- a local model directory: ``config.json`` is instantiated on the meta device (no memory, no weights);
- otherwise a bundled description (``launcher/plan/arch_configs/<name>.json``) of a well-known model, expanded
  here into the same per-parameter listing by family (chatglm, llama, glm). ChatGLM2/3-6B are described as
  ``launcher convert chatglm`` lays them out (glm), the only form they run in here.

The memory model and the method checks (freeze patterns, LoRA targets) read only ``ArchInfo``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.builtins import tiny
from launcher.model.modules import (
    LAYER_RE,
    layer_list_prefix,
    linear_modules,
    param_numel,
    transposed_module_names,
)

ARCH_DIR = Path(__file__).parent / "arch_configs"


@dataclass(frozen=True)
class Linear:
    name: str
    """Module name relative to its transformer layer (``self_attn.q_proj``)."""
    in_features: int
    out_features: int
    transposed: bool = False
    """A Conv1D (GPT-2): weight stored (in, out), which peft wraps with ``fan_in_fan_out``."""


@dataclass(frozen=True)
class ArchInfo:
    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int
    layer_prefix: str
    """Parameter-name prefix of the layer list: layer i's parameters are ``{layer_prefix}.{i}.<name>``."""
    layer_params: tuple[tuple[str, int], ...]
    """(name relative to the layer, number of elements) for one transformer layer."""
    layer_linears: tuple[Linear, ...]
    other_params: tuple[tuple[str, int], ...]
    """Embeddings, final norm, output head (full names)."""
    output_module: str | None
    """The LM head's module name (never a LoRA target for 'all-linear'); None when tied."""
    source: str = ""
    leading_params: int = 1
    """How many of ``other_params`` come before the layers in the model's order (the embeddings):
    ZeRO-2 partitions the flat gradient buffer in this order."""
    attention: str = "sdpa"
    """"sdpa" (no attention scores kept) or "eager" (ChatGLM-6B's own code keeps seq x seq scores)."""

    @property
    def params_per_layer(self) -> int:
        return sum(n for _, n in self.layer_params)

    @property
    def total_params(self) -> int:
        return self.num_layers * self.params_per_layer + sum(n for _, n in self.other_params)

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def param_names(self) -> Iterator[tuple[str, int]]:
        """Every parameter in the model's own order: embeddings, layers, final norm, head."""
        yield from self.other_params[: self.leading_params]
        for i in range(self.num_layers):
            for name, numel in self.layer_params:
                yield f"{self.layer_prefix}.{i}.{name}", numel
        yield from self.other_params[self.leading_params :]

    def lora_linears(self, targets: list[str] | str) -> tuple[Linear, ...]:
        """The linear layers of one transformer layer LoRA wraps for ``target_modules``: peft's match
        (the module name or its dotted suffix), or every one for ``all-linear`` (the LM head is outside
        the layers)."""
        if targets == "all-linear":
            return self.layer_linears
        return tuple(
            lin
            for lin in self.layer_linears
            if any(lin.name == t or lin.name.endswith(f".{t}") for t in targets)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "total_params": self.total_params,
            "source": self.source,
        }


def short_module_names(names: Iterable[str]) -> list[str]:
    """Each name by its last component (``q_proj``), or by as many trailing components as it takes to
    tell it from the others (GPT-2: ``attn.c_proj`` and ``mlp.c_proj``)."""
    names = list(names)
    parts = [name.split(".") for name in names]
    shown = []
    for mine in parts:
        depth = 1
        while depth < len(mine) and any(other != mine and other[-depth:] == mine[-depth:] for other in parts):
            depth += 1
        shown.append(".".join(mine[-depth:]))
    return shown


# --- bundled descriptions -------------------------------------------------------------------------


def bundled_arch_names() -> list[str]:
    return sorted(p.stem for p in ARCH_DIR.glob("*.json"))


def _lin(name: str, fan_in: int, fan_out: int, bias: bool) -> tuple[Linear, list[tuple[str, int]]]:
    params = [(f"{name}.weight", fan_in * fan_out)]
    if bias:
        params.append((f"{name}.bias", fan_out))
    return Linear(name, fan_in, fan_out), params


def _build(
    desc: dict[str, Any], layer_spec: list[tuple[str, int, int, bool]], norms: list[tuple[str, int]]
) -> Any:
    linears: list[Linear] = []
    params: list[tuple[str, int]] = list(norms)
    for name, fan_in, fan_out, bias in layer_spec:
        lin, p = _lin(name, fan_in, fan_out, bias)
        linears.append(lin)
        params.extend(p)
    return tuple(linears), tuple(params)


def arch_from_description(desc: dict[str, Any]) -> ArchInfo:
    """Expand a compact description (hidden size, layers, heads, vocab, family) into every parameter."""
    family = desc["family"]
    h = int(desc["hidden_size"])
    layers = int(desc["num_layers"])
    heads = int(desc["num_attention_heads"])
    kv_heads = int(desc.get("num_key_value_heads", heads))
    head_dim = int(desc.get("head_dim", h // heads))
    ffn = int(desc["intermediate_size"])
    vocab = int(desc["vocab_size"])
    tied = bool(desc.get("tie_word_embeddings", False))
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    if family == "chatglm":  # ChatGLM-6B (v1): LayerNorm with bias, fused QKV, GeLU MLP, all with bias
        prefix, emb, final, head = (
            "transformer.layers",
            "transformer.word_embeddings",
            "transformer.final_layernorm",
            "lm_head",
        )
        spec = [
            ("attention.query_key_value", h, 3 * h, True),
            ("attention.dense", h, h, True),
            ("mlp.dense_h_to_4h", h, ffn, True),
            ("mlp.dense_4h_to_h", ffn, h, True),
        ]
        norms = [
            (f"{n}.{w}", h)
            for n in ("input_layernorm", "post_attention_layernorm")
            for w in ("weight", "bias")
        ]
        final_params = [(f"{final}.weight", h), (f"{final}.bias", h)]
    elif family in ("llama", "glm"):  # transformers' LlamaForCausalLM / Qwen2ForCausalLM / GlmForCausalLM
        prefix, emb, final, head = "model.layers", "model.embed_tokens", "model.norm", "lm_head"
        qkv_bias = bool(desc.get("attention_bias", family == "glm"))
        attn = [
            ("self_attn.q_proj", h, q_dim, qkv_bias),
            ("self_attn.k_proj", h, kv_dim, qkv_bias),
            ("self_attn.v_proj", h, kv_dim, qkv_bias),
            ("self_attn.o_proj", q_dim, h, bool(desc.get("o_bias", False))),
        ]
        if family == "glm":
            mlp = [("mlp.gate_up_proj", h, 2 * ffn, False), ("mlp.down_proj", ffn, h, False)]
        else:
            mlp = [
                ("mlp.gate_proj", h, ffn, False),
                ("mlp.up_proj", h, ffn, False),
                ("mlp.down_proj", ffn, h, False),
            ]
        spec = attn + mlp
        norms = [("input_layernorm.weight", h), ("post_attention_layernorm.weight", h)]
        final_params = [(f"{final}.weight", h)]
    else:
        raise ValueError(f"unknown architecture family {family!r}")
    linears, layer_params = _build(desc, spec, norms)
    other = [(f"{emb}.weight", vocab * h), *final_params]
    if not tied:
        other.append((f"{head}.weight", vocab * h))
    return ArchInfo(
        name=str(desc.get("name", family)),
        num_layers=layers,
        hidden_size=h,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        intermediate_size=ffn,
        layer_prefix=prefix,
        layer_params=layer_params,
        layer_linears=linears,
        other_params=tuple(other),
        output_module=None if tied else head,
        source=str(desc.get("source", "")),
        attention=str(desc.get("attention", "eager" if family == "chatglm" else "sdpa")),
    )


@functools.cache
def bundled_arch(name: str) -> ArchInfo:
    path = ARCH_DIR / f"{name}.json"
    if not path.is_file():
        raise KeyError(name)
    return arch_from_description(json.loads(path.read_text(encoding="utf-8")))


def guess_bundled_name(model_path: str) -> str | None:
    """``/models/chatglm-6b`` -> ``chatglm-6b`` when a bundled description has that name."""
    base = Path(model_path.rstrip("/")).name.lower()
    names = bundled_arch_names()
    if base in names:
        return base
    for name in sorted(names, key=len, reverse=True):
        if name in base:
            return name
    return None


# --- exact counts from a local config.json -------------------------------------------------------


def measured_kv(model: Any) -> tuple[int, int] | None:
    """(key/value heads, head dim) from the model itself: one token through its forward with a KV cache
    (on the meta device this costs no memory and no compute); None when the model cannot do that.

    The config's names for these differ by family (``num_key_value_heads``, ``multi_query_group_num``,
    ``n_head``...) and a config can omit them; the cache the attention layers fill cannot be wrong."""
    import torch

    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            out = model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=True)
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        layers = getattr(cache, "layers", None)
        keys = layers[0].keys if layers else cache[0][0]  # type: ignore[index]
        return int(keys.shape[1]), int(keys.shape[-1])
    except Exception:  # remote code or an unusual cache: the config's numbers are the fallback
        return None


def arch_from_model(model: Any, name: str, source: str = "") -> ArchInfo:
    """Read the architecture of an instantiated (meta-device) causal LM from the model itself: the layer
    list, its linear (and Conv1D) layers, the KV width; the config only for what the weights cannot say
    (the number of attention heads)."""
    params = [(pname, param_numel(p)) for pname, p in model.named_parameters()]
    prefix = layer_list_prefix(params)
    if prefix is None:
        raise ValueError(f"{name}: no numbered transformer layers found")
    layer_params: list[tuple[str, int]] = []
    other: list[tuple[str, int]] = []
    layer_ids: set[int] = set()
    leading = 0
    for pname, numel in params:
        m = LAYER_RE.match(pname)
        if m and m.group(1) == prefix:
            layer_ids.add(int(m.group(2)))
            if int(m.group(2)) == 0:
                layer_params.append((m.group(3), numel))
        else:
            other.append((pname, numel))
            if not layer_ids:
                leading += 1
    first_layer = f"{prefix}.0."
    transposed = set(transposed_module_names(model))
    linears = [
        Linear(mname[len(first_layer) :], fan_in, fan_out, mname in transposed)
        for mname, fan_in, fan_out in linear_modules(model)
        if mname.startswith(first_layer)
    ]
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output_module = None
    if out is not None:
        for mname, module in model.named_modules():
            if module is out:
                output_module = mname
    cfg = model.config
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    hidden = int(getattr(embeddings, "embedding_dim", 0) or getattr(cfg, "hidden_size", 0))
    vocab = int(getattr(embeddings, "num_embeddings", 0) or getattr(cfg, "vocab_size", 0))
    heads = int(getattr(cfg, "num_attention_heads", 1))
    kv = measured_kv(model)
    if kv is not None:
        kv_heads, head_dim = kv
    else:
        head_dim = int(getattr(cfg, "head_dim", None) or hidden // max(heads, 1))
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    # The MLP width: what the widest projection back to the hidden size takes in (down_proj, GPT-2's
    # mlp.c_proj); fused gate+up layers make the up projections' width twice that.
    down_inputs = [lin.in_features for lin in linears if lin.out_features == hidden]
    ffn = max(down_inputs, default=0) or int(
        getattr(cfg, "intermediate_size", 0) or getattr(cfg, "ffn_hidden_size", 0)
    )
    return ArchInfo(
        name=name,
        num_layers=len(layer_ids),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        intermediate_size=ffn,
        layer_prefix=prefix,
        layer_params=tuple(layer_params),
        layer_linears=tuple(linears),
        other_params=tuple(other),
        output_module=output_module,
        source=source,
        leading_params=leading,
        # ChatGLM-6B's remote code (v1; v2/3 add multi_query_attention) computes attention eagerly
        attention="eager"
        if getattr(cfg, "model_type", "") == "chatglm" and not hasattr(cfg, "multi_query_attention")
        else "sdpa",
    )


def arch_from_config(config: Any, name: str, source: str = "") -> ArchInfo:
    """Instantiate a transformers config on the meta device (exact counts, no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    return arch_from_model(model, name, source)


@functools.lru_cache(maxsize=32)
def arch_from_model_dir(model_dir: str, trust_remote_code: bool = False) -> ArchInfo:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    return arch_from_config(config, Path(model_dir).name, source=f"{model_dir}/config.json")


@functools.lru_cache(maxsize=1)
def tiny_glm_arch() -> ArchInfo:
    """The built-in tiny model's architecture, from its build settings (no need to build it)."""
    cfg = tiny.DEFAULT_CONFIG
    try:
        vocab = tiny.vocab_size()
    except Exception:  # planning must not depend on the data generator; the count only sizes a tiny model
        vocab = 4096
    return arch_from_description(
        {
            "name": "tiny-glm",
            "family": "glm",
            "hidden_size": cfg.hidden_size,
            "num_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim,
            "intermediate_size": cfg.intermediate_size,
            "vocab_size": vocab,
            "source": "launcher.builtins.tiny.DEFAULT_CONFIG",
        }
    )
