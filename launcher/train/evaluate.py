"""Evaluation: eval loss, greedy generation on the eval set, BLEU / chrF / ChatGLM BLEU-4.

Work is split across ranks by *batches*: the examples are ordered by length, cut into global batches
of the configured size, and batch ``b`` goes to rank ``b % world_size``. A batch therefore holds the
same examples whatever the world size, so 1 rank and N ranks give the same predictions.

ZeRO-3 partitions every parameter, so a forward pass is a collective: every rank must run the same
number of forward passes. Ranks with fewer batches run throw-away passes on a copy of the first
batch, and generation uses ``synced_gpus`` (a rank whose sequences ended keeps stepping until all
ranks are done) - the usual reason other tools refuse generation under ZeRO-3.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from launcher.data.templates import ChatFormat
from launcher.rundir.run_config import RunConfig
from launcher.rundir.samples import reference_streams, sample_references
from launcher.train.distributed import all_reduce_sum
from launcher.train.export import is_zero3_partitioned, unwrap
from launcher.train.target_loss import TargetOnlyLoss, target_count

# --- distributed helpers -----------------------------------------------------------------------


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _world() -> tuple[int, int]:
    if _dist_ready():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _device_of(model_or_engine: Any, module: nn.Module) -> torch.device:
    device = getattr(model_or_engine, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(module.parameters()).device


def shard_batches(
    lengths: Sequence[int], batch_size: int, rank: int, world_size: int
) -> tuple[list[list[int]], int]:
    """This rank's batches (example indices) and the number of global batches.

    Longest first (an out-of-memory shows at once, and padding stays small), ties by index.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return batches[rank::world_size], len(batches)


def _rounds(mine: int, total_batches: int, world_size: int, zero3: bool) -> int:
    """Forward rounds this rank runs: its own batches, or under ZeRO-3 the most any rank has."""
    if zero3 and world_size > 1:
        return math.ceil(total_batches / world_size)
    return mine


# --- eval loss ---------------------------------------------------------------------------------


def eval_loss(
    model_or_engine: Any,
    features: Sequence[Any],
    pad_token_id: int,
    batch_size: int,
    loss_fn: TargetOnlyLoss | None = None,
) -> float:
    """Mean loss per target token over the whole eval set (all ranks call; all get the same value).

    Each rank evaluates its share of the batches; sums of loss x tokens and of tokens are reduced, so
    the result is the token-weighted mean, not a mean of per-batch means. ``loss_fn``: the training
    loop's target-only loss (the same numbers, fewer logits); without it, the model's own loss.
    """
    from launcher.train.data import collate

    module = unwrap(model_or_engine)
    # the engine itself when given one (its forward applies DeepSpeed's precision settings)
    target: nn.Module = model_or_engine if isinstance(model_or_engine, nn.Module) else module
    rank, world_size = _world()
    device = _device_of(model_or_engine, module)
    zero3 = is_zero3_partitioned(module)
    mine, total = shard_batches([len(f.input_ids) for f in features], batch_size, rank, world_size)
    rounds = _rounds(len(mine), total, world_size, zero3)
    was_training = target.training
    target.eval()
    loss_sum = 0.0
    tokens = 0
    try:
        with torch.no_grad():
            for r in range(rounds):
                real = r < len(mine)
                indices = (
                    mine[r] if real else mine[0] if mine else [0]
                )  # throw-away pass keeps ZeRO-3 in step
                batch = {
                    k: v.to(device) for k, v in collate([features[i] for i in indices], pad_token_id).items()
                }
                count = target_count(batch)
                if loss_fn is not None:
                    summed = loss_fn.loss_sum(target, batch)
                else:  # the model's own loss: the mean over the shifted target tokens
                    summed = target(**batch).loss.float() * count
                if real and count:  # no targets: nothing to add (the model's own mean is NaN there)
                    loss_sum += float(summed.item())
                    tokens += count
    finally:
        target.train(was_training)
    loss_sum, token_total = all_reduce_sum([loss_sum, float(tokens)], device)
    return loss_sum / token_total if token_total > 0 else float("nan")


# --- generation --------------------------------------------------------------------------------


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched generation needs LEFT padding: every row's last token is where generation continues."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
            attention[i, width - len(row) :] = 1
    return input_ids, attention


def _eos_ids(tokenizer: Any, module: nn.Module, template_stops: Sequence[int] = ()) -> list[int]:
    """Where an answer ends: the tokenizer's eos, the model's generation config, the template's stops."""
    gen_config = getattr(module, "generation_config", None)
    extra = getattr(gen_config, "eos_token_id", None)
    candidates = [tokenizer.eos_token_id, *(extra if isinstance(extra, list) else [extra]), *template_stops]
    return list(dict.fromkeys(int(v) for v in candidates if v is not None))


def _prompt_learning_type(module: nn.Module) -> str | None:
    """peft's type when ``module`` is a prompt-learning peft model: "P_TUNING" (v1, virtual tokens
    prepended to the input embeddings) or "PREFIX_TUNING" (v2, keys/values in every layer's cache)."""
    config = getattr(module, "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return None
    return str(config.peft_type.value)


def _prefix_generation_inputs(
    peft_model: Any, input_ids: torch.Tensor, attention: torch.Tensor, pad_token_id: int
) -> dict[str, Any]:
    """``generate`` kwargs for the base model, its cache pre-filled with the trained prefix.

    peft's own ``generate`` hands the prefix over as ``past_key_values``, which transformers 5.2x
    ignores once ``generate`` passes its own ``cache``: the predictions then came from the base model
    alone (BLEU 1.6 instead of 42 for the tuned model). Here the prefix IS the generation cache. The
    rows get ``num_virtual_tokens`` placeholder ids in front that the cache already covers (generate
    feeds only the uncached positions), and the attention mask covers the prefix too, so positions
    follow from it as in training.
    """
    base = peft_model.get_base_model()
    virtual = int(peft_model.active_peft_config.num_virtual_tokens)
    rows = input_ids.shape[0]
    placeholders = torch.full((rows, virtual), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    ones = torch.ones((rows, virtual), dtype=attention.dtype, device=attention.device)
    cache_kwarg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    return {
        "input_ids": torch.cat([placeholders, input_ids], dim=1),
        "attention_mask": torch.cat([ones, attention], dim=1),
        cache_kwarg: peft_model.get_prompt(batch_size=rows),
    }


def _embeds_with_virtual_tokens(
    peft_model: Any, input_ids: torch.Tensor, attention: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows laid out ``[pads, virtual tokens, prompt]``, as in training ``[virtual tokens, prompt]``.

    peft's own ``generate`` puts the virtual tokens before the left padding and drops ``position_ids``
    for P-Tuning, so a padded row's prompt sits further from its virtual tokens than in training (its
    prediction then depends on the batch). Here the virtual tokens follow the padding and the base
    model derives the positions from the attention mask.
    """
    words = peft_model.word_embeddings(input_ids)
    prompts = peft_model.get_prompt(batch_size=input_ids.shape[0]).to(words.dtype)
    ones = torch.ones(prompts.shape[:2], dtype=attention.dtype, device=attention.device)
    rows, masks = [], []
    for row in range(input_ids.shape[0]):
        pads = int((attention[row] == 0).sum().item())  # left_pad: all padding comes first
        rows.append(torch.cat([words[row, :pads], prompts[row], words[row, pads:]]))
        masks.append(torch.cat([attention[row, :pads], ones[row], attention[row, pads:]]))
    return torch.stack(rows), torch.stack(masks)


def generate_samples(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Any],
    cfg: RunConfig,
    rank: int,
    world_size: int,
    *,
    chat: ChatFormat | None = None,
) -> list[dict[str, Any]]:
    """Generate a prediction for the first ``eval.num_samples`` eval examples (all ranks call).

    Returns ``{id, prompt, reference, prediction}`` dicts in example order on rank 0, ``[]`` elsewhere.
    Greedy unless ``eval.do_sample``; sampling is seeded per batch, so it too is reproducible.
    ``chat``: the run's chat format (built once per run), else built here from ``cfg.template``.
    """
    from transformers import GenerationConfig

    from launcher.data.eval_set import references_of
    from launcher.data.templates import chat_format
    from launcher.train.data import encode_prompt

    module = unwrap(model)
    limit = cfg.eval.num_samples
    chosen = list(examples[:limit] if limit is not None else examples)
    chat = chat or chat_format(cfg.template, tokenizer)
    prompts = [
        encode_prompt(ex, tokenizer, chat, cfg.training.max_source_length, cfg.data.query_truncation)
        for ex in chosen
    ]
    device = _device_of(model, module)
    zero3 = is_zero3_partitioned(module)
    mine, total = shard_batches([len(p) for p in prompts], cfg.eval.batch_size, rank, world_size)
    rounds = _rounds(len(mine), total, world_size, zero3)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # the template's end-of-turn token (<|im_end|>...) ends an answer too
    eos_ids = _eos_ids(tokenizer, module, chat.stop_ids)
    prompt_type = _prompt_learning_type(module)
    prompt_model: Any = module if prompt_type == "P_TUNING" else None
    prefix_model: Any = module if prompt_type == "PREFIX_TUNING" else None
    gen_config = GenerationConfig(
        max_new_tokens=cfg.eval.max_new_tokens,
        do_sample=cfg.eval.do_sample,
        num_beams=1,
        use_cache=True,  # training turns the model's KV cache off; generation wants it
        pad_token_id=pad_id,
        eos_token_id=eos_ids or None,
    )
    results: list[tuple[int, str]] = []
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            for r in range(rounds):
                real = r < len(mine)
                indices = mine[r] if real else mine[0] if mine else [0]
                input_ids, attention = left_pad([prompts[i] for i in indices], pad_id)
                if cfg.eval.do_sample:  # the global batch number, so the seed does not depend on ranks
                    torch.manual_seed(cfg.training.seed + r * world_size + rank)
                synced = zero3 and world_size > 1
                if prompt_model is not None:
                    embeds, mask = _embeds_with_virtual_tokens(
                        prompt_model, input_ids.to(device), attention.to(device)
                    )
                    # given only embeddings, generate returns only the new tokens
                    out = prompt_model.get_base_model().generate(
                        inputs_embeds=embeds,
                        attention_mask=mask,
                        generation_config=gen_config,
                        synced_gpus=synced,
                    )
                    start = 0
                elif prefix_model is not None:
                    inputs = _prefix_generation_inputs(
                        prefix_model, input_ids.to(device), attention.to(device), pad_id
                    )
                    out = prefix_model.get_base_model().generate(
                        **inputs, generation_config=gen_config, synced_gpus=synced
                    )
                    start = inputs["input_ids"].shape[1]
                else:
                    out = module.generate(  # type: ignore[operator]
                        input_ids=input_ids.to(device),
                        attention_mask=attention.to(device),
                        generation_config=gen_config,
                        synced_gpus=synced,
                    )
                    start = input_ids.shape[1]
                if not real:
                    continue
                for row, index in enumerate(indices):
                    new_tokens = out[row, start:].tolist()
                    for pos, token in enumerate(new_tokens):
                        if token in eos_ids:
                            new_tokens = new_tokens[:pos]
                            break
                    results.append((index, tokenizer.decode(new_tokens, skip_special_tokens=True).strip()))
    finally:
        module.train(was_training)
    gathered = _gather_to_rank0(results, rank, world_size)
    if rank != 0:
        return []
    predictions = dict(gathered)
    return [
        {
            "id": ex.id,
            "prompt": tokenizer.decode(prompts[i], skip_special_tokens=True),
            "reference": ex.response,
            **({"references": references_of(ex)} if len(references_of(ex)) > 1 else {}),
            "prediction": predictions[i],
        }
        for i, ex in enumerate(chosen)
    ]


def _gather_to_rank0(results: list[tuple[int, str]], rank: int, world_size: int) -> list[tuple[int, str]]:
    if world_size == 1 or not _dist_ready():
        return results
    received: list[Any] = [None] * world_size if rank == 0 else []
    torch.distributed.gather_object(results, received if rank == 0 else None, dst=0)
    return [item for part in received for item in (part or [])] if rank == 0 else []


# --- scores ------------------------------------------------------------------------------------


def bleu_scores(
    samples: Sequence[dict[str, Any]], tokenize: str = "zh", *, chatglm_bleu4: bool = True
) -> dict[str, Any]:
    """Corpus BLEU (sacrebleu, ``tokenize``), chrF, and ChatGLM's own metrics: character BLEU-4
    (bleu_chatglm) and ROUGE-1/2/L on jieba words (rouge_chatglm), both with ``chatglm_bleu4``; each
    against every reference of a sample (sacrebleu's multi-reference scoring; nltk's for BLEU-4; the
    best reference per example for ROUGE)."""
    from sacrebleu.metrics import BLEU, CHRF

    from launcher.train.bleu_chatglm import bleu4_chatglm
    from launcher.train.rouge_chatglm import ROUGE_KEYS, rouge_chatglm

    if not samples:
        return {"bleu": None, "chrf": None, "bleu4_chatglm": None, **dict.fromkeys(ROUGE_KEYS)}
    hyps = [str(s["prediction"]) for s in samples]
    refs = [sample_references(s) for s in samples]
    streams: Any = reference_streams(refs)
    chatglm: dict[str, float | None] = dict.fromkeys(("bleu4_chatglm", *ROUGE_KEYS))
    if chatglm_bleu4:
        chatglm = {"bleu4_chatglm": bleu4_chatglm(hyps, refs), **rouge_chatglm(hyps, refs)}
    return {
        "bleu": float(BLEU(tokenize=tokenize).corpus_score(hyps, streams).score),
        "chrf": float(CHRF().corpus_score(hyps, streams).score),
        **chatglm,
    }
