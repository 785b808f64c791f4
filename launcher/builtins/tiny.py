"""The built-in tiny model: a GLM-architecture causal LM plus a character-level Chinese tokenizer,
built on this machine from the bundled corpus (no download) and briefly pretrained so it knows the
language before any fine-tuning.

The build is deterministic (fixed seeds, one thread, deterministic kernels) and cached by a content
hash of (builder version, model config, pretraining settings, corpus) in
``cache_dir()/tiny-glm-<hash>/``. Concurrent callers (several ranks) build it once: a lock plus an
atomic rename (``launcher.builtins.cache.build_once``).

Pretraining uses the bundled dialogues as plain text - each turn's question and answer on their own
lines, with no prompt template and no speaker markers (``demo_data.pretraining_corpus``) - on other
dialogues than the train/eval splits. The base therefore knows the language, the facts and how a
conversation goes, but not the fine-tuning format ("[Round i]\n问：...\n答："): its loss on the task
stays high until it is fine-tuned (tests/test_tiny.py checks both), and prompt-based methods
(P-Tuning) have a working model to steer. Pretraining on shuffled single sentences instead
(``corpus_style="sentences"``) left P-Tuning v2 almost unable to learn the task in a small budget.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import string
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.builtins import demo_data
from launcher.builtins.cache import build_once
from launcher.builtins.cache import cache_dir as default_cache_dir
from launcher.rundir.paths import write_json_atomic

if TYPE_CHECKING:
    import torch

BUILDER_VERSION = 2
"""Bump when the build procedure changes in a way the hashed settings do not capture."""
BUILD_INFO = "tiny_build.json"
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)
# Characters the named templates use (launcher.data.templates), so prompts never hit <unk>.
_TEMPLATE_CHARS = "问答：，。？！“”（）《》、；…—\n\t"


@dataclass(frozen=True)
class TinyConfig:
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 384
    max_position_embeddings: int = 2048
    seed: int = 1234
    pretrain_steps: int = 300
    batch_size: int = 8
    block_size: int = 256
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    corpus_dialogues: int = 3000
    corpus_style: str = "dialogue"
    """``demo_data.pretraining_corpus`` style: 'dialogue' (plain turns, no template) or 'sentences'."""


DEFAULT_CONFIG = TinyConfig()


@contextlib.contextmanager
def _deterministic_torch(seed: int) -> Iterator[None]:
    """One thread, deterministic kernels, fixed seed; the caller's settings are restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    rng_state = torch.get_rng_state()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
        torch.set_rng_state(rng_state)


def _vocabulary(texts: list[str]) -> dict[str, int]:
    chars = set("".join(texts)) | set(string.printable) | set(_TEMPLATE_CHARS)
    chars -= {"\r", "\x0b", "\x0c"}
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(chars):
        vocab[ch] = len(vocab)
    return vocab


def _vocab_texts() -> list[str]:
    """Every text the bundled data can contain: the tokenizer's vocabulary is built from it."""
    texts = demo_data.pretraining_corpus(DEFAULT_CONFIG.corpus_dialogues)
    for name in demo_data.BUILTIN_DATA:
        for split in ("train", "eval"):
            for record in demo_data.generate(name, split):
                texts.append(json.dumps(record, ensure_ascii=False))
    return texts


@functools.lru_cache(maxsize=1)
def vocab_size() -> int:
    """Vocabulary size of the built-in model (known without building it; the planner sizes it with this)."""
    return len(_vocabulary(_vocab_texts()))


def build_tokenizer(vocab: dict[str, int]) -> Any:
    """Character-level tokenizer: one token per character, unseen characters -> <unk>.

    A BPE model with no merges is exactly a character lookup, and ~3x faster than a per-character
    pre-tokenizer + WordLevel (tokenization is a visible share of data preparation).
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=False))
    core.decoder = decoders.Fuse()  # characters join without spaces
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
        model_max_length=DEFAULT_CONFIG.max_position_embeddings,
    )


def _model_config(cfg: TinyConfig, vocab_size: int) -> Any:
    from transformers import GlmConfig

    return GlmConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )


def _blocks(token_lines: list[list[int]], block_size: int) -> torch.Tensor:
    """Pack ``<bos> sentence <eos>`` sequences back to back into fixed-length blocks (no padding)."""
    import torch

    stream: list[int] = []
    for ids in token_lines:
        stream += [BOS_ID, *ids, EOS_ID]
    n = len(stream) // block_size
    return torch.tensor(stream[: n * block_size], dtype=torch.long).view(n, block_size)


def _mean_loss(model: Any, blocks: torch.Tensor, batch_size: int) -> float:
    import torch

    model.eval()
    losses = []
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            batch = blocks[start : start + batch_size]
            losses.append(float(model(input_ids=batch, labels=batch).loss) * len(batch))
    model.train()
    return sum(losses) / len(blocks)


def weights_sha256(model: Any) -> str:
    """Hash of every parameter's bytes, in name order: equal hashes mean identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _corpus_sha256(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=8)
def build_hash(cfg: TinyConfig = DEFAULT_CONFIG) -> str:
    """Content hash of everything that determines the build: the cache directory's name."""
    corpus = demo_data.pretraining_corpus(cfg.corpus_dialogues, style=cfg.corpus_style)
    key = {"builder": BUILDER_VERSION, "data": demo_data.DATA_VERSION, "config": asdict(cfg)}
    key["corpus"] = _corpus_sha256(corpus)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def build_tiny_model(out_dir: Path, cfg: TinyConfig = DEFAULT_CONFIG) -> dict[str, Any]:
    """Build tokenizer + model, pretrain, save to ``out_dir`` (HF format); returns the build record."""
    import torch
    from transformers import GlmForCausalLM

    started = time.perf_counter()
    corpus = demo_data.pretraining_corpus(cfg.corpus_dialogues, style=cfg.corpus_style)
    tokenizer = build_tokenizer(_vocabulary(_vocab_texts()))
    held_out = demo_data.pretraining_corpus(300, held_out=True, style=cfg.corpus_style)
    with _deterministic_torch(cfg.seed):
        encode = tokenizer(corpus, add_special_tokens=False)["input_ids"]
        train_blocks = _blocks(encode, cfg.block_size)
        # 32 blocks (~4k tokens) estimate the held-out loss well enough and keep the build short
        eval_blocks = _blocks(tokenizer(held_out, add_special_tokens=False)["input_ids"], cfg.block_size)[:32]
        model = GlmForCausalLM(_model_config(cfg, len(tokenizer)))
        random_init_loss = _mean_loss(model, eval_blocks, cfg.batch_size)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.95), weight_decay=0.01
        )

        def lr_factor(step: int) -> float:  # linear warmup, cosine decay to 10%
            if step < cfg.warmup_steps:
                return (step + 1) / cfg.warmup_steps
            progress = (step - cfg.warmup_steps) / max(1, cfg.pretrain_steps - cfg.warmup_steps)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        generator = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(len(train_blocks), generator=generator)
        losses: list[float] = []
        for step in range(cfg.pretrain_steps):
            start = (step * cfg.batch_size) % max(1, len(order) - cfg.batch_size + 1)
            batch = train_blocks[order[start : start + cfg.batch_size]]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        heldout_loss = _mean_loss(model, eval_blocks, cfg.batch_size)
        model.generation_config.pad_token_id = PAD_ID
        model.generation_config.eos_token_id = EOS_ID
        model.generation_config.bos_token_id = BOS_ID
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        record = {
            "builder_version": BUILDER_VERSION,
            "config": asdict(cfg),
            "corpus_sha256": _corpus_sha256(corpus),
            "corpus_tokens": int(train_blocks.numel()),
            "vocab_size": len(tokenizer),
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "first_train_loss": losses[0] if losses else None,
            "final_train_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "heldout_loss": heldout_loss,
            "random_init_heldout_loss": random_init_loss,
            "weights_sha256": weights_sha256(model),
            "build_time_s": round(time.perf_counter() - started, 2),
            "torch_version": torch.__version__,
        }
    write_json_atomic(out_dir / BUILD_INFO, record)
    return record


def ensure_tiny_model(cache_dir: Path | None = None, cfg: TinyConfig = DEFAULT_CONFIG) -> Path:
    """The built-in model's directory (config.json, weights, tokenizer), built once and cached.

    Safe when several ranks call it at once: one builds, the others wait and reuse the result.
    """
    root = cache_dir or default_cache_dir()
    target = root / f"tiny-glm-{build_hash(cfg)}"
    return build_once(target, lambda tmp: _build_with_notice(tmp, cfg))


def _build_with_notice(out_dir: Path, cfg: TinyConfig) -> None:
    import sys

    from launcher.rundir.startup import report_startup_phase

    report_startup_phase("building the built-in model (once, ~1 min)")

    print(
        f"building the built-in tiny model (once, ~1 min on one CPU thread) -> {out_dir.parent}",
        file=sys.stderr,
    )
    build_tiny_model(out_dir, cfg)


def build_info(model_dir: Path) -> dict[str, Any]:
    path = model_dir / BUILD_INFO
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
