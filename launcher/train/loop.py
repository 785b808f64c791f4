"""The training loop in phases: set-up (data -> model, sharded at load under ZeRO-3 -> method ->
DeepSpeed engine), resume, steps (log, eval, checkpoint, preemption), then the end (final checkpoint,
eval loss, export, result, samples and BLEU: launcher/train/finish.py).

Every rank runs these phases; only rank 0 writes shared files (metrics, status, samples, result).
All ranks agree on "stop now" (preemption signal, non-finite loss) through one small all_reduce per
optimizer step, so no rank ever waits in a collective the others skipped. An optimizer step's loss
and gradient are the mean over every target token of its global batch (launcher/train/step.py).
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

from launcher.rundir.paths import RunPaths, RunState, append_jsonl, iter_jsonl, to_json, write_text_atomic
from launcher.rundir.run_config import RunConfig
from launcher.rundir.startup import report_startup_phase
from launcher.rundir.status import update_status
from launcher.train import checkpoint as ckpt
from launcher.train.distributed import DistEnv, all_reduce_sum, barrier, device_for
from launcher.train.finish import finish
from launcher.train.loggers import open_metric_loggers
from launcher.train.memory import reset_peak_memory
from launcher.train.schedule import fill_ds_config, scale_group_lrs, total_optimizer_steps
from launcher.train.session import TrainingRun
from launcher.train.setup import build_data, build_model, load_tokenizer, seed_everything
from launcher.train.signals import PreemptionFlag
from launcher.train.startup import record_first_optimizer_step
from launcher.train.step import BatchCursor, StepTotals, data_parallel_ranks, optimizer_step
from launcher.train.target_loss import TargetOnlyLoss

log = logging.getLogger(__name__)

TEST_CRASH_ENV = "LAUNCHER_TEST_CRASH_AT_STEP"
"""Test-only fault injection: "RANK:STEP" makes that rank raise right after that optimizer step."""


class NonFiniteLoss(RuntimeError):
    pass


# --- set-up ------------------------------------------------------------------------------------------


def setup(cfg: RunConfig, ds_config: dict[str, Any], paths: RunPaths, env: DistEnv) -> TrainingRun:
    """Data, DeepSpeed config, model, method, engine. The model comes last: under ZeRO-3 it is built
    already partitioned, which needs the filled config, which needs the step count, which needs the data."""
    import deepspeed

    from launcher.data.templates import chat_format
    from launcher.train.adapters import optimizer_param_groups
    from launcher.train.data import with_resolved_template

    t = cfg.training
    device = device_for(env)
    reset_peak_memory()
    seed_everything(t.seed)  # same initial weights for new parameters (LoRA, prefix) on every rank
    tokenizer = load_tokenizer(cfg)
    cfg, template_used = with_resolved_template(cfg, tokenizer)  # `auto` -> what it is for this model
    log.info("template: %s", template_used)
    chat = chat_format(cfg.template, tokenizer)
    data = build_data(cfg, tokenizer, env, chat)
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
    model = build_model(cfg, ds, paths, is_rank0=env.is_rank0)
    loss_fn = TargetOnlyLoss(model)  # hooks the LM head; must see the model before DeepSpeed wraps it
    groups, lr_multipliers = optimizer_param_groups(model, cfg.method, t.learning_rate)  # LoRA+: 2 groups
    ds = scale_group_lrs(ds, lr_multipliers)
    report_startup_phase("starting the DeepSpeed engine")
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds)
    return TrainingRun(
        cfg=cfg,
        paths=paths,
        env=env,
        device=device,
        tokenizer=tokenizer,
        template_used=template_used,
        chat=chat,
        data=data,
        engine=engine,
        loss_fn=loss_fn,
        total_steps=total_steps,
        batches_per_epoch=batches_per_epoch,
    )


# --- resume ------------------------------------------------------------------------------------------


def _truncate_logs_after(paths: RunPaths, step: int) -> None:
    """At the start of an attempt, drop log lines of steps that are about to be recomputed (rank 0)."""
    for path in (paths.metrics_jsonl, paths.eval_jsonl):
        if not path.exists():
            continue
        kept = [line for line in iter_jsonl(path) if int(line.get("step", 0)) <= step]
        write_text_atomic(path, "".join(to_json(obj, indent=None) + "\n" for obj in kept))


def _verify_target_only_loss(run: TrainingRun) -> None:
    """Check the target-only loss against the model's own on the first training examples (every rank
    runs the same forwards, as ZeRO-3 needs); all ranks keep it only if it matched on all of them."""
    from launcher.train.data import collate

    data, engine = run.data, run.engine
    sample = run.to_device(
        collate(data.train_features[: run.cfg.training.per_device_batch_size], data.pad_token_id)
    )

    def all_ranks(ok: bool) -> bool:
        return all_reduce_sum([0.0 if ok else 1.0], run.device)[0] == 0

    engine.eval()
    try:
        kept = run.loss_fn.verify(engine, sample, agree=all_ranks)
    finally:
        engine.train()
    log.info("loss: %s", "logits of target positions only" if kept else "the model's own (every position)")


def resume(run: TrainingRun) -> None:
    """Continue from the newest complete checkpoint, if any; mark the attempt RUNNING; open the trackers."""
    paths, env = run.paths, run.env
    if run.rank0:
        removed = ckpt.remove_incomplete(paths.checkpoints)
        if removed:
            log.info("removed incomplete checkpoints: %s", ", ".join(removed))
    barrier()
    state = ckpt.load_latest(run.engine, paths.checkpoints, rank=env.rank, exclude_frozen=run.exclude_frozen)
    if state is not None:
        run.state = state
        log.info(
            "resumed from step %d (epoch %d, batch %d)", state.global_step, state.epoch, state.batches_done
        )
    step = run.state.global_step
    if run.rank0:  # an earlier attempt's lines past the checkpoint (all of them, without one) are redone
        _truncate_logs_after(paths, step)
        # the start of an attempt: the one write that may leave FAILED / CANCELLED (run_status)
        update_status(paths, RunState.RUNNING, step=step, total_steps=run.total_steps)
    run.trackers = open_metric_loggers(run.cfg, paths, start_step=step, rank0=run.rank0)
    _verify_target_only_loss(run)


# --- steps -------------------------------------------------------------------------------------------


def _maybe_test_crash(rank: int, step: int) -> None:
    """The one place that reads LAUNCHER_TEST_CRASH_AT_STEP (tests simulate a rank dying mid-run)."""
    spec = os.environ.get(TEST_CRASH_ENV)
    if not spec:
        return
    crash_rank, _, crash_step = spec.partition(":")
    if int(crash_rank) == rank and int(crash_step) == step:
        raise RuntimeError(f"{TEST_CRASH_ENV}: simulated crash of rank {rank} at step {step}")


def _log_step(run: TrainingRun, totals: StepTotals, lr: float) -> None:
    """metrics.jsonl, the trackers and status.json's progress (rank 0). ``lr``: the rate the step ran
    at (as the Trainer logs it), not the next step's."""
    state = run.state
    record = {
        "step": state.global_step,
        "epoch": round(run.epoch_progress(), 4),
        "loss": totals.loss,
        "lr": lr,
        "grad_norm": totals.grad_norm,
        "tokens": state.tokens,
        "tokens_per_s": state.tokens / state.train_time_s if state.train_time_s > 0 else None,
        "elapsed_s": round(state.train_time_s, 3),
    }
    append_jsonl(run.paths.metrics_jsonl, record)
    run.loggers.log_train_record(record, state.global_step)
    # Progress only: a state another rank recorded meanwhile (its FAILED) stays.
    update_status(run.paths, step=state.global_step, total_steps=run.total_steps)


def _evaluate_during_training(run: TrainingRun) -> None:
    value = run.eval_loss()
    run.engine.train()
    if run.rank0:
        append_jsonl(run.paths.eval_jsonl, {"step": run.state.global_step, "eval_loss": value})
        run.loggers.log_dict({"eval/loss": value}, run.state.global_step)


def _preempt(run: TrainingRun, flag: PreemptionFlag) -> None:
    """Save a checkpoint, report PREEMPTED and release the engine (a requeue resumes from here)."""
    step = run.state.global_step
    run.save()
    if run.rank0:
        update_status(
            run.paths,
            RunState.PREEMPTED,
            reason=f"{flag.signal_name} received; checkpoint saved at step {step}",
            step=step,
            total_steps=run.total_steps,
        )
    log.info("preempted at step %d; checkpoint saved", step)
    run.loggers.close(RunState.PREEMPTED.value)
    run.engine.destroy()


def train(run: TrainingRun, flag: PreemptionFlag) -> bool:
    """Optimizer steps until the run's total; True when stopped early by a preemption signal (after
    ``_preempt``), False when all steps are done."""
    t, state, engine = run.cfg.training, run.state, run.engine
    accumulation = int(engine.gradient_accumulation_steps())
    ranks = data_parallel_ranks(engine, run.env.world_size)
    cursor = BatchCursor(run.data.order)
    engine.train()
    while state.global_step < run.total_steps:
        step_started = time.perf_counter()
        step_lr = float(engine.get_lr()[0])  # the rate this step runs at: the scheduler moves on in step()
        batches = [run.data.make_batch(indices) for indices in cursor.take(state, accumulation)]
        totals = optimizer_step(
            engine,
            run.loss_fn,
            [batch for batch, _ in batches],
            real_tokens=sum(real for _, real in batches),
            device=run.device,
            ranks=ranks,
            stop_requested=flag.requested,
            to_device=run.to_device,
        )
        state.global_step += 1
        record_first_optimizer_step()
        state.tokens += totals.tokens
        state.train_time_s += time.perf_counter() - step_started
        if not math.isfinite(totals.loss):
            kind = "NaN" if math.isnan(totals.loss) else "inf"
            raise NonFiniteLoss(f"loss is {kind} at step {state.global_step}")
        _maybe_test_crash(run.env.rank, state.global_step)
        if state.global_step % t.logging_steps == 0 and run.rank0:
            _log_step(run, totals, step_lr)
        if t.eval_steps and state.global_step % t.eval_steps == 0 and state.global_step < run.total_steps:
            _evaluate_during_training(run)
        if state.global_step % t.save_steps == 0:
            run.save()
        if totals.stop_votes > 0 and state.global_step < run.total_steps:
            _preempt(run, flag)
            return True
    return False


def run_training(
    cfg: RunConfig, ds_config: dict[str, Any], paths: RunPaths, env: DistEnv, flag: PreemptionFlag
) -> str:
    """Train one run on this rank: "COMPLETED" or "PREEMPTED" (raises on failure)."""
    run = setup(cfg, ds_config, paths, env)
    resume(run)
    if train(run, flag):
        return RunState.PREEMPTED.value
    return finish(run)
