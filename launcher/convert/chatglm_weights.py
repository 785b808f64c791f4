"""The original ChatGLM tensors as native GLM tensors, checked against the config and streamed.

Renaming (values unchanged except the split):
- ``transformer.embedding.word_embeddings`` -> ``model.embed_tokens``; ``transformer.output_layer`` ->
  ``lm_head`` (untied, over the padded vocabulary); ``transformer.encoder.final_layernorm`` -> ``model.norm``.
- per layer: ``self_attention.query_key_value`` -> ``self_attn.{q,k,v}_proj`` (weight and bias), split
  as the original splits its output: ``[q | k | v]`` with multi-query attention, per head
  ``[q_h k_h v_h]`` without; ``self_attention.dense`` -> ``self_attn.o_proj``; ``mlp.dense_h_to_4h`` ->
  ``mlp.gate_up_proj`` (both put the gate half first); ``mlp.dense_4h_to_h`` -> ``mlp.down_proj``; the two
  norms keep their names.
- ``transformer.rotary_pos_emb.inv_freq`` is dropped: the original recomputes it from the config too.

Streaming: tensors are read one at a time through a memory mapping that is renewed after
``max_shard_bytes`` (checkpoint_files.TensorReader), and output shards are written as soon as they
reach ``max_shard_bytes``: peak memory is about three output shards (the one being filled, its
serialized copy while it is written, the source pages mapped for it), whatever the model's size.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.convert.chatglm_config import (
    EMBEDDING,
    FINAL_NORM,
    LAYER_PREFIX,
    OUTPUT_LAYER,
    ROTARY_BUFFER,
    ChatGLMConfig,
    expected_shapes,
    shape_source,
)
from launcher.convert.checkpoint_files import TensorInfo, TensorReader
from launcher.errors import UserError

SAFETENSORS_INDEX = "model.safetensors.index.json"
_TOP_LEVEL = {
    EMBEDDING: "model.embed_tokens.weight",
    FINAL_NORM: "model.norm.weight",
    OUTPUT_LAYER: "lm_head.weight",
}
_IN_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_QKV = "self_attention.query_key_value."
_FLOATS = ("float16", "bfloat16", "float32", "float64")


def _split_qkv(tensor: Any, cfg: ChatGLMConfig) -> tuple[Any, Any, Any]:
    if cfg.multi_query_attention:
        q, k, v = tensor.split([cfg.q_dim, cfg.kv_dim, cfg.kv_dim], dim=0)
    else:  # the original views its output as [heads, 3 * head_dim] and splits each head in three
        rest = tuple(tensor.shape[1:])
        per_head = tensor.reshape(cfg.num_attention_heads, 3, cfg.kv_channels, *rest)
        q, k, v = (per_head[:, part].reshape(cfg.q_dim, *rest) for part in range(3))
    return q, k, v


def converted(name: str, tensor: Any, cfg: ChatGLMConfig) -> list[tuple[str, Any]]:
    """The native (name, tensor) pairs of one original tensor; [] for the rotary buffer."""
    if name == ROTARY_BUFFER:
        return []
    if name in _TOP_LEVEL:
        return [(_TOP_LEVEL[name], tensor)]
    layer, _, rest = name.removeprefix(f"{LAYER_PREFIX}.").partition(".")
    prefix = f"model.layers.{layer}."
    if rest.startswith(_QKV):
        kind = rest.removeprefix(_QKV)  # weight or bias
        q, k, v = _split_qkv(tensor, cfg)
        return [(f"{prefix}self_attn.{p}_proj.{kind}", t) for p, t in zip("qkv", (q, k, v), strict=True)]
    return [(prefix + _IN_LAYER[rest], tensor)]


def _unexpected_hint(name: str) -> str:
    if name.startswith("transformer.prefix_encoder"):
        return " (a P-Tuning v2 prefix encoder: convert the base model, without the prefix)"
    if name.endswith("weight_scale"):
        return " (a quantized checkpoint: convert the full-precision model)"
    if name.startswith(("model.layers.", "model.embed_tokens")):
        return " (already the native layout: nothing to convert)"
    if name.startswith(("transformer.layers.", "transformer.word_embeddings")):
        return " (ChatGLM-6B v1's layout, a different architecture that does not convert)"
    return ""


def check_tensors(found: dict[str, TensorInfo], cfg: ChatGLMConfig, where: Path) -> None:
    """Every tensor the config implies is present with its shape, and nothing else; ``where`` (the index
    or the single weight file) is named for missing tensors."""
    expected = expected_shapes(cfg)
    for name, info in found.items():
        if name == ROTARY_BUFFER:
            continue
        if name not in expected:
            raise UserError(f"{info.file}: unexpected tensor {name}{_unexpected_hint(name)}")
        if info.shape != expected[name]:
            raise UserError(
                f"{info.file}: {name} has shape {list(info.shape)}, but config.json ({shape_source(cfg)}) "
                f"implies {list(expected[name])}"
            )
        if info.dtype not in _FLOATS:
            raise UserError(f"{info.file}: {name} is {info.dtype}; only floating-point weights convert")
    missing = [name for name in expected if name not in found]
    if missing:
        listed = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UserError(f"{where}: missing {listed}, which config.json ({cfg.num_layers} layers) implies")


def _plan(found: dict[str, TensorInfo], max_shard_bytes: int) -> list[list[TensorInfo]]:
    """Output shards: consecutive source tensors (in file order, so the source files are read in turn),
    each shard at most ``max_shard_bytes`` unless a single tensor is larger. Renaming and splitting
    keep the bytes, so a shard's size is its sources' size."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in found.values():
        if info.name == ROTARY_BUFFER:
            continue
        if shards[-1] and size + info.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards


def _shard_name(index: int, count: int) -> str:
    return "model.safetensors" if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


@dataclass(frozen=True)
class WeightsWritten:
    files: int
    tensors: int
    total_bytes: int


def write_weights(
    found: dict[str, TensorInfo],
    cfg: ChatGLMConfig,
    out_dir: Path,
    max_shard_bytes: int,
    progress: Callable[[str], None] = lambda _: None,
) -> WeightsWritten:
    """Write the native safetensors shards (and their index) into ``out_dir``."""
    import torch
    from safetensors.torch import save_file

    shards = _plan(found, max_shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    with TensorReader(remap_bytes=max_shard_bytes) as reader:
        for index, shard in enumerate(shards):
            buffer: dict[str, Any] = {}
            for info in shard:
                source = reader.read(info)
                for name, tensor in converted(info.name, source, cfg):
                    # q/k/v are views of one tensor: each gets storage of its own (safetensors wants that)
                    buffer[name] = (
                        tensor if tensor is source else tensor.clone(memory_format=torch.contiguous_format)
                    )
                del source
            name = _shard_name(index, len(shards))
            save_file(buffer, str(out_dir / name), metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in buffer.values())
            weight_map.update(dict.fromkeys(buffer, name))
            progress(f"wrote {name} ({len(buffer)} tensors)")
            buffer.clear()
    if len(shards) > 1:
        index_data = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index_data, indent=2) + "\n", encoding="utf-8")
    return WeightsWritten(len(shards), len(weight_map), total)
