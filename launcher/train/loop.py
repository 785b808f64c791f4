"""The training loop, linear and in one place: data -> model (sharded at load under ZeRO-3) -> method ->
DeepSpeed engine -> resume -> steps (log, eval, checkpoint, preemption) -> final checkpoint -> eval,
samples, BLEU -> export -> result.

Every rank runs this function; only rank 0 writes shared files (metrics, status, samples, result).
All ranks agree on "stop now" (preemption signal, non-finite loss) through one small all_reduce per
optimizer step, so no rank ever waits in a collective the others skipped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from launcher.data.tokenizers import MIN_TOKENIZER_TOKENS, empty_tokenizer_problem, tokenizer_load_problem
from launcher.errors import UserError
from launcher.rundir.paths import RunPaths, RunState, append_jsonl, iter_jsonl, to_json, write_text_atomic
from launcher.rundir.run_config import RunConfig
from launcher.rundir.startup import report_startup_phase
from launcher.rundir.status import failure_reason, record_failure, update_status
from launcher.train import checkpoint as ckpt
from launcher.train.attention import apply_liger_kernels, attention_kwargs
from launcher.train.distributed import DistEnv, all_reduce_sum, barrier, device_for
from launcher.train.loggers import open_metric_loggers
from launcher.train.memory import combine_peaks, peak_memory_all_ranks, reset_peak_memory
from launcher.train.quantization import quantized_loading
from launcher.train.result import TrainOutcome, build_result, write_result
from launcher.train.schedule import fill_ds_config, scale_group_lrs, total_optimizer_steps
from launcher.train.signals import PreemptionFlag
from launcher.train.startup import record_first_optimizer_step, startup_s
from launcher.train.target_loss import TargetOnlyLoss

log = logging.getLogger(__name__)

TEST_CRASH_ENV = "LAUNCHER_TEST_CRASH_AT_STEP"
"""Test-only fault injection: "RANK:STEP" makes that rank raise right after that optimizer step."""

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class NonFiniteLoss(RuntimeError):
    pass


class EvalFailed(RuntimeError):
    """Generation or BLEU failed after training; what was computed before is on disk."""


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

    dtype = _DTYPES[cfg.model.dtype or cfg.training.precision]
    quantized = quantized_loading(cfg.model, _DTYPES[cfg.training.precision])  # QLoRA; {} otherwise
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


def build_data(cfg: RunConfig, tokenizer: Any, env: DistEnv) -> TrainData:
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
    train_features = encode_examples(sets.train, sets.train_format, cfg, tokenizer)
    eval_examples, eval_features = sets.eval, encode_examples(sets.eval, sets.eval_format, cfg, tokenizer)
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


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _maybe_test_crash(rank: int, step: int) -> None:
    """The one place that reads LAUNCHER_TEST_CRASH_AT_STEP (tests simulate a rank dying mid-run)."""
    spec = os.environ.get(TEST_CRASH_ENV)
    if not spec:
        return
    crash_rank, _, crash_step = spec.partition(":")
    if int(crash_rank) == rank and int(crash_step) == step:
        raise RuntimeError(f"{TEST_CRASH_ENV}: simulated crash of rank {rank} at step {step}")


def _truncate_logs_after(paths: RunPaths, step: int) -> None:
    """At the start of an attempt, drop log lines of steps that are about to be recomputed (rank 0)."""
    for path in (paths.metrics_jsonl, paths.eval_jsonl):
        if not path.exists():
            continue
        kept = [line for line in iter_jsonl(path) if int(line.get("step", 0)) <= step]
        write_text_atomic(path, "".join(to_json(obj, indent=None) + "\n" for obj in kept))


def _verify_target_only_loss(
    engine: Any, loss_fn: TargetOnlyLoss, data: Any, batch_size: int, device: torch.device
) -> None:
    """Check the target-only loss against the model's own on the first training examples (every rank
    runs the same forwards, as ZeRO-3 needs); all ranks keep it only if it matched on all of them."""
    from launcher.train.data import collate

    sample = _to_device(collate(data.train_features[:batch_size], data.pad_token_id), device)

    def all_ranks(ok: bool) -> bool:
        return all_reduce_sum([0.0 if ok else 1.0], device)[0] == 0

    engine.eval()
    try:
        kept = loss_fn.verify(engine, sample, agree=all_ranks)
    finally:
        engine.train()
    log.info("loss: %s", "logits of target positions only" if kept else "the model's own (every position)")


def _epoch_progress(state: ckpt.TrainState, batches_per_epoch: int) -> float:
    return state.epoch + state.batches_done / max(1, batches_per_epoch)


def run_training(
    cfg: RunConfig, ds_config: dict[str, Any], paths: RunPaths, env: DistEnv, flag: PreemptionFlag
) -> str:
    import deepspeed

    from launcher.data.templates import chat_format
    from launcher.train.adapters import apply_method, optimizer_param_groups
    from launcher.train.data import with_resolved_template
    from launcher.train.evaluate import bleu_scores, eval_loss, generate_samples
    from launcher.train.export import export_final, save_initial_adapter

    t = cfg.training
    rank0 = env.is_rank0
    device = device_for(env)
    reset_peak_memory()
    seed_everything(t.seed)  # same initial weights for new parameters (LoRA, prefix) on every rank

    # --- data, DeepSpeed config, model, method --------------------------------------------------
    # The model comes last: under ZeRO-3 it is built already partitioned, which needs the filled config,
    # which needs the step count, which needs the data.
    tokenizer = load_tokenizer(cfg)
    cfg, template_used = with_resolved_template(cfg, tokenizer)  # `auto` -> what it is for this model
    log.info("template: %s", template_used)
    data = build_data(cfg, tokenizer, env)
    batches_per_epoch = int(data.order.num_batches)  # >= 1: BatchOrder refuses fewer examples
    # The accumulation DeepSpeed will use (the planner derives it from global_batch_size when that is set).
    accumulation = int(ds_config.get("gradient_accumulation_steps", t.gradient_accumulation_steps))
    total_steps = total_optimizer_steps(t, batches_per_epoch, accumulation)
    ds = fill_ds_config(
        ds_config,
        total_steps=total_steps,
        warmup_ratio=t.warmup_ratio,
        world_size=env.world_size,
        on_cpu=device.type == "cpu",
    )
    log.info("steps: %d optimizer steps, %d micro-batches per epoch per rank", total_steps, batches_per_epoch)
    model = load_model(cfg, ds)
    grad_ckpt = cfg.resources.gradient_checkpointing
    model, counts = apply_method(model, cfg.method, gradient_checkpointing=grad_ckpt)
    if t.packing:
        from launcher.train.packing import prepare_model

        prepare_model(model, cfg.method)  # P-Tuning lays packed batches out per example
    log.info("%s: %s", cfg.method.method, counts.describe())
    save_initial_adapter(model, cfg.method, paths.lora_init, is_rank0=rank0)  # PiSSA / OLoRA only
    cast_added_params(model, _DTYPES[t.precision])
    loss_fn = TargetOnlyLoss(model)  # hooks the LM head; must see the model before DeepSpeed wraps it

    groups, lr_multipliers = optimizer_param_groups(model, cfg.method, t.learning_rate)  # LoRA+: 2 groups
    ds = scale_group_lrs(ds, lr_multipliers)
    report_startup_phase("starting the DeepSpeed engine")
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds)
    exclude_frozen = cfg.method.method != "full"  # frozen weights come back from the base model

    # --- resume --------------------------------------------------------------------------------
    if rank0:
        removed = ckpt.remove_incomplete(paths.checkpoints)
        if removed:
            log.info("removed incomplete checkpoints: %s", ", ".join(removed))
    barrier()
    state = ckpt.load_latest(engine, paths.checkpoints, rank=env.rank, exclude_frozen=exclude_frozen)
    if state is None:
        state = ckpt.TrainState()
    else:
        log.info(
            "resumed from step %d (epoch %d, batch %d)", state.global_step, state.epoch, state.batches_done
        )
    if rank0:  # an earlier attempt's lines past the checkpoint (all of them, without one) are redone
        _truncate_logs_after(paths, state.global_step)
    if rank0:  # the start of an attempt: the one write that may leave FAILED / CANCELLED (run_status)
        update_status(paths, RunState.RUNNING, step=state.global_step, total_steps=total_steps)
    trackers = open_metric_loggers(cfg, paths, start_step=state.global_step, rank0=rank0)

    def save() -> None:
        state.peak_memory = asdict(combine_peaks(peak_memory_all_ranks(device), state.peak_memory))
        ckpt.save_checkpoint(
            engine,
            paths.checkpoints,
            state,
            rank=env.rank,
            keep=t.save_total_limit,
            exclude_frozen=exclude_frozen,
        )

    def run_eval_loss() -> float:
        return eval_loss(engine, data.eval_features, data.pad_token_id, t.per_device_batch_size, loss_fn)

    _verify_target_only_loss(engine, loss_fn, data, t.per_device_batch_size, device)

    # --- the loop ------------------------------------------------------------------------------
    engine.train()
    window_loss = torch.zeros((), dtype=torch.float64, device=device)
    window_micro = 0
    window_tokens = 0
    batches_epoch, batches = -1, []
    while state.global_step < total_steps:
        if batches_epoch != state.epoch:  # one permutation per epoch, not per micro-batch
            batches_epoch, batches = state.epoch, data.order.batches(state.epoch)
        if state.batches_done >= len(batches):
            state.epoch += 1
            state.batches_done = 0
            continue
        step_started = time.perf_counter()
        indices = batches[state.batches_done]
        cpu_batch, real_tokens = data.make_batch(indices)
        window_tokens += real_tokens
        batch = _to_device(cpu_batch, device)
        loss = loss_fn.loss(engine, batch)
        engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()  # must be asked before step()
        engine.step()
        state.batches_done += 1
        state.micro_steps += 1
        window_loss += loss.detach().double()
        window_micro += 1
        if not boundary:
            state.train_time_s += time.perf_counter() - step_started
            continue

        # One optimizer step done: agree on loss, tokens and "stop now" across ranks.
        state.global_step += 1
        record_first_optimizer_step()
        loss_sum, micro_sum, tokens_sum, stop_votes = all_reduce_sum(
            [float(window_loss.item()), window_micro, window_tokens, 1.0 if flag.requested else 0.0], device
        )
        step_loss = loss_sum / micro_sum
        state.tokens += int(tokens_sum)
        state.train_time_s += time.perf_counter() - step_started
        window_loss.zero_()
        window_micro = 0
        window_tokens = 0
        if not math.isfinite(step_loss):
            raise NonFiniteLoss(
                f"loss is {'NaN' if math.isnan(step_loss) else 'inf'} at step {state.global_step}"
            )
        _maybe_test_crash(env.rank, state.global_step)

        if state.global_step % t.logging_steps == 0 and rank0:
            append_jsonl(
                paths.metrics_jsonl,
                record := {
                    "step": state.global_step,
                    "epoch": round(_epoch_progress(state, batches_per_epoch), 4),
                    "loss": step_loss,
                    "lr": float(engine.get_lr()[0]),
                    "tokens": state.tokens,
                    "tokens_per_s": state.tokens / state.train_time_s if state.train_time_s > 0 else None,
                    "elapsed_s": round(state.train_time_s, 3),
                },
            )
            trackers.log_train_record(record, state.global_step)
            # Progress only: a state another rank recorded meanwhile (its FAILED) stays.
            update_status(paths, step=state.global_step, total_steps=total_steps)
        if t.eval_steps and state.global_step % t.eval_steps == 0 and state.global_step < total_steps:
            value = run_eval_loss()
            engine.train()
            if rank0:
                append_jsonl(paths.eval_jsonl, {"step": state.global_step, "eval_loss": value})
                trackers.log_dict({"eval/loss": value}, state.global_step)
        if state.global_step % t.save_steps == 0:
            save()
        if stop_votes > 0 and state.global_step < total_steps:
            save()
            if rank0:
                update_status(
                    paths,
                    RunState.PREEMPTED,
                    reason=f"{flag.signal_name} received; checkpoint saved at step {state.global_step}",
                    step=state.global_step,
                    total_steps=total_steps,
                )
            log.info("preempted at step %d; checkpoint saved", state.global_step)
            trackers.close(RunState.PREEMPTED.value)
            engine.destroy()
            return RunState.PREEMPTED.value

    # --- the end: final checkpoint, eval loss, export, result, then samples and BLEU ----------------
    # What is computed first is kept first: a failure in generation or BLEU leaves the eval loss, the
    # export and result.json (with the failure as the run's reason).
    save()
    # Training peak of the whole run (all attempts), before generation adds its KV cache.
    peak = combine_peaks(peak_memory_all_ranks(device), state.peak_memory)
    final_eval_loss = run_eval_loss()
    chat = chat_format(cfg.template, tokenizer)
    export_final(
        engine.module,
        cfg.method,
        tokenizer,
        paths.final,
        zero_stage=cfg.resources.zero_stage,
        is_rank0=rank0,
        chat=chat,
        initial_adapter=paths.lora_init,
    )
    outcome = TrainOutcome(
        steps=state.global_step,
        epochs=_epoch_progress(state, batches_per_epoch),
        tokens=state.tokens,
        train_time_s=state.train_time_s,
        world_size=env.world_size,
        nodes=_node_count(env),
        gradient_checkpointing=grad_ckpt,
        truncated_frac=data.truncated_frac,
        peak=peak,
        eval_loss=final_eval_loss,
        scores={},
        template_used=template_used,
        query_cut_frac=data.query_cut_frac,
        eval_set_hash=data.eval_set_hash,
        train_examples=_examples_seen(state.micro_steps, data, t, env.world_size),
        startup_s=startup_s(),
    )
    if rank0:
        write_result(paths, build_result(cfg, paths, outcome, RunState.RUNNING.value))
    try:
        samples = generate_samples(
            engine.module, tokenizer, data.eval_examples, cfg, env.rank, env.world_size
        )
        if rank0:
            write_text_atomic(paths.samples_jsonl, "".join(to_json(s, indent=None) + "\n" for s in samples))
            if samples:
                outcome.scores.update(
                    bleu_scores(samples, cfg.eval.bleu_tokenize, chatglm_bleu4=cfg.eval.chatglm_bleu4)
                )
    except Exception as exc:
        what = " ".join(str(exc).split())  # one line: it becomes the run's reason
        failure = EvalFailed(
            f"eval generation/BLEU failed after training ({type(exc).__name__}: {what}); "
            "the eval loss, the export in final/ and result.json are kept"
        )
        if rank0:  # the run's reason: the attempt's earliest failure (another rank's, when it came first)
            first = record_failure(paths, env.rank, failure_reason(failure))
            reason = first.reason if first is not None else str(failure)
            write_result(paths, build_result(cfg, paths, outcome, RunState.FAILED.value, reason=reason))
            trackers.close(RunState.FAILED.value)
        raise failure from exc
    if rank0:
        write_result(paths, build_result(cfg, paths, outcome, RunState.COMPLETED.value))
        trackers.log_final(outcome)
        trackers.close(RunState.COMPLETED.value)
        update_status(paths, RunState.COMPLETED, step=state.global_step, total_steps=total_steps)
    barrier()
    engine.destroy()  # drops ZeRO-3's hooks and pending collectives before the process group goes
    return RunState.COMPLETED.value


def _examples_seen(micro_steps: int, data: TrainData, t: Any, world_size: int) -> int:
    """Training examples seen over all ranks: every micro-batch is full (drop_last). Packed rows hold
    several examples: there it is epochs done x examples per epoch (exact for whole epochs)."""
    if not t.packing:
        return micro_steps * t.per_device_batch_size * world_size
    return round(micro_steps / max(1, data.order.num_batches) * len(data.train_features))


def _node_count(env: DistEnv) -> int:
    """Nodes in the job: from the scheduler when it says, else world size / ranks per node."""
    for var in ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        if os.environ.get(var) and env.source == "submitit":
            return int(os.environ[var])
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local and int(local) > 0:
        return max(1, env.world_size // int(local))
    return 1
