"""A reference of the ORIGINAL ChatGLM2 / ChatGLM3 / GLM-4 model and tokenizers, written for the
conversion tests from THUDM's published description and code (modeling_chatglm.py,
tokenization_chatglm.py); nothing of theirs is imported or copied. The tests build tiny checkpoints in
the original layout with it and check the converted native GLM model against it.

The network, as the original computes it (batch first here; the original runs sequence first):
- word embeddings over ``padded_vocab_size`` rows; an untied ``output_layer`` back to them;
- per layer, pre-norm RMSNorm (statistics in fp32) -> attention -> residual -> RMSNorm -> SwiGLU MLP
  (``dense_h_to_4h`` makes [gate | up], ``silu(gate) * up``) -> residual; a final RMSNorm;
- attention: one fused ``query_key_value`` (with bias) whose output is ``[q | k | v]`` with
  multi-query attention (``multi_query_group_num`` key/value groups, group g serving the
  ``heads / groups`` consecutive query heads from g * heads / groups), or ``[q_h k_h v_h]`` per head
  without; scores scaled by 1/sqrt(head dim);
- rotary position embedding on the FIRST HALF of each head only, rotating ADJACENT pairs (2i, 2i+1) by
  position * base^(-2i / (head_dim / 2)), base = 10000 * rope_ratio; angles are looked up by position id;
- masks: causal, and padded keys hidden; a padded query row sees every position (the original adds
  one to those rows so they never softmax over nothing); positions come from the tokenizer, which gives
  pads 0 and counts real tokens from 0 after left padding; generation continues at last + 1.

The tokenizers: ChatGLM2/3 encode with sentencepiece and number their special tokens right after its
pieces; GLM-4 uses a tiktoken-style byte-level BPE with its own specials. An input is
``[gMASK] sop`` + ids; a chat is built by encoding each piece separately (role token, then
encode(metadata + "\\n"), then encode(content)) and ending with ``<|assistant|>``.
"""

from __future__ import annotations

import base64
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# --- the network ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class OriginalConfig:
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    kv_channels: int = 16
    multi_query_attention: bool = True
    multi_query_group_num: int = 2
    ffn_hidden_size: int = 96
    padded_vocab_size: int = 1280
    seq_length: int = 512
    layernorm_epsilon: float = 1e-5
    rope_ratio: float = 1.0
    add_qkv_bias: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    """More config.json keys (names, token ids) written as they are."""

    @property
    def groups(self) -> int:
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def qkv_size(self) -> int:
        return (self.num_attention_heads + 2 * self.groups) * self.kv_channels

    def config_json(self) -> dict[str, Any]:
        """config.json as the original repositories ship it (model_type chatglm, auto_map to remote code)."""
        return {
            "model_type": "chatglm",
            "architectures": ["ChatGLMModel"],
            "auto_map": {
                "AutoConfig": "configuration_chatglm.ChatGLMConfig",
                "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            },
            "add_bias_linear": False,
            "add_qkv_bias": self.add_qkv_bias,
            "apply_query_key_layer_scaling": True,
            "apply_residual_connection_post_layernorm": False,
            "attention_dropout": 0.0,
            "attention_softmax_in_fp32": True,
            "bias_dropout_fusion": True,
            "ffn_hidden_size": self.ffn_hidden_size,
            "fp32_residual_connection": False,
            "hidden_dropout": 0.0,
            "hidden_size": self.hidden_size,
            "kv_channels": self.kv_channels,
            "layernorm_epsilon": self.layernorm_epsilon,
            "multi_query_attention": self.multi_query_attention,
            "multi_query_group_num": self.multi_query_group_num,
            "num_attention_heads": self.num_attention_heads,
            "num_layers": self.num_layers,
            "original_rope": True,
            "padded_vocab_size": self.padded_vocab_size,
            "post_layer_norm": True,
            "rmsnorm": True,
            "rope_ratio": self.rope_ratio,
            "seq_length": self.seq_length,
            "use_cache": True,
            "torch_dtype": "float32",
            "tie_word_embeddings": False,
            **self.extra,
        }


def random_weights(cfg: OriginalConfig, seed: int) -> dict[str, torch.Tensor]:
    """Original-layout tensors with random values (norm weights around 1, every bias non-zero)."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float = 0.08) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    h = cfg.hidden_size
    weights = {"transformer.embedding.word_embeddings.weight": normal(cfg.padded_vocab_size, h, std=0.5)}
    for i in range(cfg.num_layers):
        p = f"transformer.encoder.layers.{i}."
        weights[p + "input_layernorm.weight"] = 1 + normal(h, std=0.1)
        weights[p + "self_attention.query_key_value.weight"] = normal(cfg.qkv_size, h)
        if cfg.add_qkv_bias:
            weights[p + "self_attention.query_key_value.bias"] = normal(cfg.qkv_size, std=0.2)
        weights[p + "self_attention.dense.weight"] = normal(h, cfg.num_attention_heads * cfg.kv_channels)
        weights[p + "post_attention_layernorm.weight"] = 1 + normal(h, std=0.1)
        weights[p + "mlp.dense_h_to_4h.weight"] = normal(2 * cfg.ffn_hidden_size, h)
        weights[p + "mlp.dense_4h_to_h.weight"] = normal(h, cfg.ffn_hidden_size)
    weights["transformer.encoder.final_layernorm.weight"] = 1 + normal(h, std=0.1)
    weights["transformer.output_layer.weight"] = normal(cfg.padded_vocab_size, h, std=0.3)
    # The original stores this buffer too; it is derived from the config (base 10000, not rope_ratio).
    rotary = cfg.kv_channels // 2
    weights["transformer.rotary_pos_emb.inv_freq"] = 1.0 / (
        10000 ** (torch.arange(0, rotary, 2).float() / rotary)
    )
    return weights


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


def _rotate(x: torch.Tensor, positions: torch.Tensor, cfg: OriginalConfig) -> torch.Tensor:
    """x: [batch, seq, heads, head_dim]; rotates adjacent pairs of the first half of each head."""
    half = cfg.kv_channels // 2
    base = 10000.0 * cfg.rope_ratio
    freqs = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.float) / half))  # half / 2 angles
    angles = positions.float()[:, :, None] * freqs  # [batch, seq, half / 2]
    cos, sin = angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]
    rotated, passed = x[..., :half], x[..., half:]
    even, odd = rotated[..., 0::2], rotated[..., 1::2]
    out = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)
    return torch.cat([out, passed], dim=-1)


def tokenizer_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as the original tokenizer pads them: 0 for pads, real tokens count from 0."""
    counted = attention_mask.long().cumsum(-1) - 1
    return counted.clamp(min=0) * attention_mask.long()


def _attention_blocked(attention_mask: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor:
    """True where a query may NOT look: causal, padded keys hidden, padded query rows see everything."""
    allowed = torch.ones(batch, seq, seq).tril()
    if attention_mask is not None and not bool(attention_mask.all()):
        pad = attention_mask.float()
        allowed = allowed * pad[:, None, :]
        allowed = allowed - (pad[:, :, None] - 1)  # +1 on padded query rows
    return allowed < 0.5


def forward(
    weights: dict[str, torch.Tensor],
    cfg: OriginalConfig,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits [batch, seq, padded_vocab_size] of the original network (no cache: every step recomputed)."""
    batch, seq = input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(seq).expand(batch, seq)
    heads, groups, d = cfg.num_attention_heads, cfg.groups, cfg.kv_channels
    blocked = _attention_blocked(attention_mask, batch, seq)[:, None]  # [batch, 1, seq, seq]
    x = weights["transformer.embedding.word_embeddings.weight"][input_ids]
    for i in range(cfg.num_layers):
        p = f"transformer.encoder.layers.{i}."
        normed = _rms_norm(x, weights[p + "input_layernorm.weight"], cfg.layernorm_epsilon)
        mixed = normed @ weights[p + "self_attention.query_key_value.weight"].T
        if cfg.add_qkv_bias:
            mixed = mixed + weights[p + "self_attention.query_key_value.bias"]
        if cfg.multi_query_attention:
            q, k, v = mixed.split([heads * d, groups * d, groups * d], dim=-1)
            q = q.reshape(batch, seq, heads, d)
            k, v = k.reshape(batch, seq, groups, d), v.reshape(batch, seq, groups, d)
        else:
            q, k, v = mixed.reshape(batch, seq, heads, 3 * d).split(d, dim=-1)
        q, k = _rotate(q, position_ids, cfg), _rotate(k, position_ids, cfg)
        per_group = heads // groups
        k, v = k.repeat_interleave(per_group, dim=2), v.repeat_interleave(per_group, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, heads, seq, d]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        probs = scores.masked_fill(blocked, float("-inf")).softmax(-1)
        context = (probs @ v).transpose(1, 2).reshape(batch, seq, heads * d)
        x = x + context @ weights[p + "self_attention.dense.weight"].T
        normed = _rms_norm(x, weights[p + "post_attention_layernorm.weight"], cfg.layernorm_epsilon)
        gate, up = (normed @ weights[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
        x = x + (torch.nn.functional.silu(gate) * up) @ weights[p + "mlp.dense_4h_to_h.weight"].T
    x = _rms_norm(x, weights["transformer.encoder.final_layernorm.weight"], cfg.layernorm_epsilon)
    return x @ weights["transformer.output_layer.weight"].T


def greedy(
    weights: dict[str, torch.Tensor],
    cfg: OriginalConfig,
    rows: list[list[int]],
    pad_id: int,
    max_new_tokens: int,
    stop_ids: list[int],
) -> list[list[int]]:
    """The original's batched greedy decoding: left padding from the tokenizer, positions extended by
    one per new token, a finished row keeps emitting pad. Returns each row's new tokens up to its stop."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    positions = tokenizer_positions(mask)
    done = [False] * len(rows)
    new: list[list[int]] = [[] for _ in rows]
    for _ in range(max_new_tokens):
        logits = forward(weights, cfg, ids, mask, positions)[:, -1]
        chosen = logits.argmax(-1)
        for row, token in enumerate(chosen.tolist()):
            if not done[row]:
                if token in stop_ids:
                    done[row] = True
                else:
                    new[row].append(token)
            chosen[row] = pad_id if done[row] else token
        ids = torch.cat([ids, chosen[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype)], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        if all(done):
            break
    return new


# --- checkpoint files in the original layout -----------------------------------------------------


def save_checkpoint(
    directory: Path, cfg: OriginalConfig, weights: dict[str, torch.Tensor], *, fmt: str, shards: int = 1
) -> None:
    """config.json + weights as ``model.safetensors`` / ``pytorch_model.bin``, or that many shards with
    the index json the original repositories ship (``fmt``: safetensors or bin)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg.config_json(), indent=2))
    names = list(weights)
    per_shard = math.ceil(len(names) / shards)
    groups = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    stem, suffix = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    weight_map = {}
    for index, group in enumerate(groups):
        file = (
            f"{stem}.{suffix}"
            if len(groups) == 1
            else f"{stem}-{index + 1:05d}-of-{len(groups):05d}.{suffix}"
        )
        part = {name: weights[name].contiguous() for name in group}
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(part, str(directory / file), metadata={"format": "pt"})
        else:
            torch.save(part, directory / file)
        weight_map.update(dict.fromkeys(group, file))
    if len(groups) > 1:
        total = sum(t.numel() * t.element_size() for t in weights.values())
        index_data = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / f"{stem}.{suffix}.index.json").write_text(json.dumps(index_data, indent=2))


# --- the tokenizers ------------------------------------------------------------------------------

CHATGLM2_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
CHATGLM3_SPECIALS = [*CHATGLM2_SPECIALS, "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
GLM4_SPECIALS = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
]


class SentencePieceReference:
    """ChatGLM2/3's tokenizer: sentencepiece ids, special tokens numbered after the pieces."""

    def __init__(self, model_file: Path, specials: list[str]):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.special = {name: self.sp.get_piece_size() + i for i, name in enumerate(specials)}
        self.prefix = [self.special["[gMASK]"], self.special["sop"]]

    def encode_text(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def encode(self, text: str) -> list[int]:
        """``tokenizer(text)``: the prefix, then the text's pieces."""
        return self.prefix + self.encode_text(text)

    def decode(self, ids: list[int]) -> str:
        return str(self.sp.decode(ids))

    def chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """ChatGLM3's build_chat_input: each message is its role token, encode(metadata + newline),
        encode(content), each encoded on its own; tools of a system message are appended as JSON."""
        ids = list(self.prefix)
        for message in messages:
            content = message["content"]
            if message["role"] == "system" and "tools" in message:
                content = content + "\n" + json.dumps(message["tools"], indent=4, ensure_ascii=False)
            ids.append(self.special[f"<|{message['role']}|>"])
            ids += self.encode_text(f"{message.get('metadata', '')}\n") + self.encode_text(content)
        if add_generation_prompt:
            ids.append(self.special["<|assistant|>"])
        return ids

    def chatglm2_prompt(self, history: list[tuple[str, str]], query: str) -> list[int]:
        """ChatGLM2's build_prompt, encoded in one piece after the prefix."""
        prompt = "".join(f"[Round {i + 1}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(history))
        prompt += f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："
        return self.encode(prompt)


def train_sentencepiece(texts: list[str], path: Path, vocab_size: int, **settings: Any) -> None:
    """A small sentencepiece BPE model with what ChatGLM's tokenizer relies on (its encode("\n") is the
    word-boundary piece then the newline byte): byte fallback and a dummy prefix; by default no
    normalization rule and spaces kept (``settings`` override any trainer option)."""
    import io

    import sentencepiece as spm

    buffer = io.BytesIO()
    options: dict[str, Any] = {
        "model_type": "bpe",
        "byte_fallback": True,
        "character_coverage": 0.995,
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "add_dummy_prefix": True,
        "split_digits": True,
        **settings,
    }
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buffer,
        vocab_size=vocab_size,
        num_threads=1,
        minloglevel=2,
        **options,
    )
    path.write_bytes(buffer.getvalue())


# GLM-4's split pattern (tokenization_chatglm.py of glm-4-9b).
GLM4_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class TiktokenReference:
    """GLM-4's tokenizer: text split by GLM4_SPLIT, each chunk's bytes merged pairwise, always the
    adjacent pair whose merge has the lowest rank (the rank is the id); specials after the ranks."""

    def __init__(self, ranks: dict[bytes, int]):
        import regex

        self.ranks = ranks
        self.split = regex.compile(GLM4_SPLIT)
        self.special = {name: len(ranks) + i for i, name in enumerate(GLM4_SPECIALS)}
        self.prefix = [self.special["[gMASK]"], self.special["<sop>"]]
        self.by_id = {rank: token for token, rank in ranks.items()}

    def _chunk(self, piece: bytes) -> list[int]:
        if piece in self.ranks:
            return [self.ranks[piece]]
        parts = [bytes([b]) for b in piece]
        while len(parts) > 1:
            best = min(range(len(parts) - 1), key=lambda i: self.ranks.get(parts[i] + parts[i + 1], math.inf))
            if parts[best] + parts[best + 1] not in self.ranks:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        return [self.ranks[p] for p in parts]

    def encode_text(self, text: str) -> list[int]:
        return [i for chunk in self.split.findall(text) for i in self._chunk(chunk.encode("utf-8"))]

    def encode(self, text: str) -> list[int]:
        return self.prefix + self.encode_text(text)

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.by_id[i] for i in ids).decode("utf-8", errors="replace")

    def chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """GLM-4's build_chat_input (tools of a system message listed one by one as JSON)."""
        ids = list(self.prefix)
        for message in messages:
            content = message["content"]
            if message["role"] == "system" and "tools" in message:
                for tool in message["tools"]:
                    content += f"\n\n## {tool['name']}\n\n{json.dumps(tool, ensure_ascii=False, indent=4)}"
                    content += "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
            ids.append(self.special[f"<|{message['role']}|>"])
            ids += self.encode_text(f"{message.get('metadata', '')}\n") + self.encode_text(content)
        if add_generation_prompt:
            ids.append(self.special["<|assistant|>"])
        return ids


def train_byte_bpe(texts: list[str], merges: int) -> dict[bytes, int]:
    """A small tiktoken-style vocabulary: the 256 bytes, then the most frequent adjacent pair inside the
    GLM-4 split chunks merged ``merges`` times (ties broken by the pair's bytes, so it is deterministic)."""
    import collections

    import regex

    split = regex.compile(GLM4_SPLIT)
    words = collections.Counter(chunk.encode("utf-8") for text in texts for chunk in split.findall(text))
    pieces = {word: [bytes([b]) for b in word] for word in words}
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(merges):
        pairs: collections.Counter[tuple[bytes, bytes]] = collections.Counter()
        for word, parts in pieces.items():
            for a, b in itertools.pairwise(parts):
                pairs[(a, b)] += words[word]
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda item: (item[1], item[0]))
        if a + b not in ranks:  # another split of the same bytes may have made it already
            ranks[a + b] = len(ranks)
        for parts in pieces.values():
            i = 0
            while i < len(parts) - 1:
                if parts[i] == a and parts[i + 1] == b:
                    parts[i : i + 2] = [a + b]
                i += 1
    return ranks


def write_tiktoken(ranks: dict[bytes, int], path: Path) -> None:
    lines = [
        f"{base64.b64encode(token).decode()} {rank}"
        for token, rank in sorted(ranks.items(), key=lambda x: x[1])
    ]
    path.write_text("\n".join(lines) + "\n")
