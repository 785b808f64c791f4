"""A run's set-up on one rank: tokenizer, chat format, encoded data and batch order, and the model
(built already partitioned under ZeRO-3) with its method applied. The training loop
(launcher/train/loop.py) turns these into a DeepSpeed engine."""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from launcher.data.templates import ChatFormat
from launcher.data.tokenizers import MIN_TOKENIZER_TOKENS, empty_tokenizer_problem, tokenizer_load_problem
from launcher.errors import UserError
from launcher.rundir.paths import RunPaths
from launcher.rundir.run_config import RunConfig
from launcher.rundir.startup import report_startup_phase
from launcher.train.attention import apply_liger_kernels, attention_kwargs
from launcher.train.distributed import DistEnv
from launcher.train.quantization import quantized_loading

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class TrainData:
    train_features: list[Any]
    """Encoded training examples (input_ids, labels)."""
    eval_features: list[Any]
    eval_examples: list[Any]
    order: Any
    """``BatchOrder`` over the training features for this rank."""
    pad_token_id: int
    truncated_frac: float
    query_cut_frac: float
    eval_set_hash: str
    make_batch: Callable[[Any], tuple[dict[str, torch.Tensor], int]]
    """One batch of ``order`` as tensors, and its number of real (non-pad) tokens."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_tokenizer(cfg: RunConfig) -> Any:
    from transformers import AutoTokenizer

    from launcher.train.data import resolve_model_dir

    report_startup_phase("loading the tokenizer and data")
    tokenizer_dir = Path(cfg.tokenizer.path) if cfg.tokenizer.path else resolve_model_dir(cfg.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(tokenizer_dir), trust_remote_code=cfg.model.trust_remote_code
        )
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(tokenizer_load_problem(tokenizer_dir, exc, cfg.tokenizer.path)) from exc
    if len(tokenizer) < MIN_TOKENIZER_TOKENS:
        raise UserError(empty_tokenizer_problem(len(tokenizer)))
    return tokenizer


@contextlib.contextmanager
def zero3_partitioned_loading(ds_config: dict[str, Any]) -> Iterator[None]:
    """Under ZeRO-3, make ``from_pretrained`` build the model inside ``deepspeed.zero.Init``: each rank
    then holds only its shard of the weights from the start, instead of the whole model per rank before
    ``deepspeed.initialize`` partitions it (a 6B model in fp16 is 12 GB per rank otherwise).
    transformers looks for a live ``HfDeepSpeedConfig``; it must be filled (no "auto") and is dropped after
    the load, so later loads in this process (LoRA merge, tests) are plain ones."""
    if int(ds_config.get("zero_optimization", {}).get("stage", 0)) != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    hf_config = HfDeepSpeedConfig(ds_config)  # kept alive here: transformers holds only a weak reference
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del hf_config


def load_model(cfg: RunConfig, ds_config: dict[str, Any]) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from launcher.train.data import resolve_model_dir

    dtype = DTYPES[cfg.model.dtype or cfg.training.precision]
    quantized = quantized_loading(cfg.model, DTYPES[cfg.training.precision])  # QLoRA; {} otherwise
    report_startup_phase("loading weights")
    attention = attention_kwargs(cfg, on_cuda=torch.cuda.is_available())
    with zero3_partitioned_loading(ds_config):
        model = AutoModelForCausalLM.from_pretrained(
            str(resolve_model_dir(cfg.model)),
            dtype=dtype,
            trust_remote_code=cfg.model.trust_remote_code,
            **quantized,
            **attention,
        )
    if cfg.training.liger_kernel:
        apply_liger_kernels(model)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # no KV cache while training (generation turns it on per call)
    params = list(model.parameters())
    if params and all(hasattr(p, "ds_id") for p in params):
        here = sum(p.ds_tensor.numel() for p in params)  # type: ignore[attr-defined]
        total = sum(p.ds_numel for p in params)  # type: ignore[attr-defined]
        log.info("ZeRO-3: weights partitioned at load (zero.Init): %d of %d elements here", here, total)
    return model


def cast_added_params(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Put the parameters a method added to a model built partitioned (ZeRO-3) into the training dtype;
    returns how many it cast.

    DeepSpeed casts every parameter to the training dtype itself, except in a model built inside
    ``zero.Init``, which it takes to be in that dtype already. peft's adapters and prompt encoders are
    created after loading, in fp32 (peft keeps adapters in fp32 on a bf16/fp16 base), so under ZeRO-3
    they would stay fp32 while ZeRO-2 trains them in bf16, and their forward would run in fp32 (a bf16
    LoRA run at ZeRO-3 with checkpointing peaked 1.6x higher on the built-in model). The optimizer keeps
    its fp32 master copy either way."""
    params = list(model.parameters())
    if dtype == torch.float32 or not any(hasattr(p, "ds_id") for p in params):
        return 0
    added = [p for p in params if not hasattr(p, "ds_id") and p.is_floating_point() and p.dtype != dtype]
    for p in added:
        p.data = p.data.to(dtype)
    return len(added)


def build_data(cfg: RunConfig, tokenizer: Any, env: DistEnv, chat: ChatFormat) -> TrainData:
    """The run's encoded train and eval sets (rendered with ``chat``, the run's one chat format) and
    this rank's batch order."""
    from launcher.data.eval_set import eval_set_hash
    from launcher.train.data import (
        BatchOrder,
        collate,
        encode_examples,
        load_datasets,
        query_cut_fraction,
        truncated_fraction,
    )

    sets = load_datasets(cfg.data)
    if sets.overlapping:
        log.warning(
            "eval data: %d of %d eval examples are training examples too", sets.overlapping, len(sets.eval)
        )
    train_features = encode_examples(sets.train, sets.train_format, cfg, tokenizer, chat=chat)
    eval_examples = sets.eval
    eval_features = encode_examples(sets.eval, sets.eval_format, cfg, tokenizer, chat=chat)
    t = cfg.training
    order = BatchOrder(
        lengths=[len(f.input_ids) for f in train_features],
        batch_size=t.per_device_batch_size,
        rank=env.rank,
        world_size=env.world_size,
        seed=t.seed,
        group_by_length=t.group_by_length,
        drop_last=True,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def make_batch(indices: list[int]) -> tuple[dict[str, torch.Tensor], int]:
        batch = collate([train_features[i] for i in indices], int(pad_id))
        return batch, int(batch["attention_mask"].sum())  # counted on the host: no device sync

    if t.packing:
        from launcher.train import packing

        order, make_batch = packing.batching(  # type: ignore[assignment]
            train_features,
            cfg.method,
            batch_size=t.per_device_batch_size,
            rank=env.rank,
            world_size=env.world_size,
            seed=t.seed,
            pad_token_id=int(pad_id),
        )
    return TrainData(
        train_features=train_features,
        eval_features=eval_features,
        eval_examples=eval_examples,
        order=order,
        pad_token_id=int(pad_id),
        truncated_frac=truncated_fraction(train_features),
        query_cut_frac=query_cut_fraction(train_features),
        eval_set_hash=eval_set_hash(eval_examples),
        make_batch=make_batch,
    )


def build_model(
    cfg: RunConfig, ds_config: dict[str, Any], paths: RunPaths, *, is_rank0: bool
) -> torch.nn.Module:
    """The model with the run's method applied, ready for ``deepspeed.initialize``: loaded (partitioned
    under ZeRO-3), the method's trainable parts added, packed batches laid out per example (P-Tuning),
    the initial adapter saved (PiSSA / OLoRA, rank 0), added parameters in the training dtype."""
    from launcher.train.adapters import apply_method
    from launcher.train.export import save_initial_adapter

    model = load_model(cfg, ds_config)
    model, counts = apply_method(
        model, cfg.method, gradient_checkpointing=cfg.resources.gradient_checkpointing
    )
    if cfg.training.packing:
        from launcher.train.packing import prepare_model

        prepare_model(model, cfg.method)  # P-Tuning lays packed batches out per example
    log.info("%s: %s", cfg.method.method, counts.describe())
    save_initial_adapter(model, cfg.method, paths.lora_init, is_rank0=is_rank0)  # PiSSA / OLoRA only
    cast_added_params(model, DTYPES[cfg.training.precision])
    return model
